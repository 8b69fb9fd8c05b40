/* Merges two files with the installed library and lists the result. */
#include <stdio.h>

#include <torchmerge.h>

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    const char *inputs[2] = {argv[1], argv[2]};
    if (tm_merge_files(inputs, 2, argv[3], NULL) != TM_OK) {
        fprintf(stderr, "%s\n", tm_errmsg());
        return 1;
    }
    tm_checkpoint *ck = NULL;
    if (tm_checkpoint_open(argv[3], NULL, &ck) != TM_OK) return 1;
    printf("torchmerge %s: %zu tensors\n", tm_version(), tm_checkpoint_n_tensors(ck));
    tm_checkpoint_free(ck);
    return 0;
}
