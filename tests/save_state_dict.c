/* tm_state_dict_save from a process that handles signals as the torchmerge CLI does (remove
 * the temporary outputs, then die by the signal), for the signal tests of
 * tests/python/test_failure_injection.py: the save runs in libtorchmerge_torch.so, whose
 * temporary files must be in the table the handler empties.
 * usage: save_state_dict IN OUT pt|torchscript   (torchscript: IN is also the template) */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "torchmerge.h"

static void on_signal(int sig) {
    tm_remove_temporary_outputs();
    signal(sig, SIG_DFL);
    raise(sig);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: save_state_dict IN OUT pt|torchscript\n");
        return 2;
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    int script = strcmp(argv[3], "torchscript") == 0;
    tm_state_dict *sd = NULL;
    if (tm_state_dict_load(argv[1], NULL, &sd) != TM_OK ||
        tm_state_dict_save(sd, argv[2], script ? TM_FORMAT_TORCHSCRIPT : TM_FORMAT_PT,
                           script ? argv[1] : NULL) != TM_OK) {
        fprintf(stderr, "save_state_dict: %s\n", tm_errmsg());
        tm_state_dict_free(sd);
        return 1;
    }
    tm_state_dict_free(sd);
    return 0;
}
