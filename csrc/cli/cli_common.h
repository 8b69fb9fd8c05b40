/* What every torchmerge subcommand shares: error lines, warnings, the progress bar, the
 * profile table and the signal handlers that remove temporary outputs. C11. */
#ifndef TM_CLI_COMMON_H
#define TM_CLI_COMMON_H

#include "torchmerge.h"

enum { TM_EXIT_FAILED = 1, TM_EXIT_USAGE = 2 };

/* Set by -q: no warnings, no progress bar. */
extern int tm_cli_quiet;

/* "torchmerge: error: ..." on stderr. */
void tm_cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Same, followed by " (see HELP)"; returns TM_EXIT_USAGE. */
int tm_cli_usage_error(const char *help, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* --format, --dtype and --keys into o: 0, or the usage error's exit status after printing it. */
int tm_cli_set_format(tm_merge_options *o, const char *arg, const char *help);
int tm_cli_set_dtype(tm_merge_options *o, const char *arg, const char *help);
int tm_cli_set_keys(tm_merge_options *o, const char *arg, const char *help);
/* Fills the warning callback, and the progress bar when stderr is a terminal and not quiet. */
void tm_cli_set_callbacks(tm_merge_options *o);
/* SIGINT/SIGTERM/SIGHUP/SIGBUS remove temporary outputs then re-raise; SIGXFSZ is ignored so
 * an over-limit write fails with EFBIG through the normal error path. */
void tm_cli_install_signal_handlers(void);
void tm_cli_print_profile(const tm_profile *p);
/* A whole number in [lo, hi] into *out: 0, or the usage error's exit status after printing it. */
int tm_cli_int(const char *arg, const char *flag, long lo, long hi, int *out, const char *help);

#endif
