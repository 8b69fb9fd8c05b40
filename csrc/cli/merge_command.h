/* `torchmerge METHOD ...`: a merge with any method of the table. C11. */
#ifndef TM_CLI_MERGE_COMMAND_H
#define TM_CLI_MERGE_COMMAND_H

#include <stddef.h>
#include <stdio.h>

/* Runs the merge subcommand of method (an index of tm_method_get); argv[0] is the method name.
 * Returns the exit status. */
int tm_cli_merge(int argc, char **argv, size_t method);
/* The parameters of method as option lines, for --help texts. */
void tm_cli_print_method_options(FILE *f, size_t method);
/* The options every merge takes (-o, --format, ...), for --help texts. */
void tm_cli_print_common_options(FILE *f);

#endif
