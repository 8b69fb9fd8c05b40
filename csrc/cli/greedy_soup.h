/* `torchmerge greedy_soup`: Wortsman et al.'s greedy soup, scored by a TorchScript evaluation
 * module. C11. */
#ifndef TM_CLI_GREEDY_SOUP_H
#define TM_CLI_GREEDY_SOUP_H

/* argv[0] is "greedy_soup". Returns the exit status: 0, 1 (failed), 2 (usage). */
int tm_cli_greedy_soup(int argc, char **argv);

#endif
