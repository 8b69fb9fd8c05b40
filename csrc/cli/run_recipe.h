/* `torchmerge run RECIPE.yaml [key=value ...]`: a merge described by a YAML recipe. C11. */
#ifndef TM_CLI_RUN_RECIPE_H
#define TM_CLI_RUN_RECIPE_H

/* argv[0] is "run". Returns the exit status: 0, 1 (the merge or the recipe failed), 2 (usage). */
int tm_cli_run(int argc, char **argv);

#endif
