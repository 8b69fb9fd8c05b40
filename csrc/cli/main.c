/* The torchmerge command-line tool. C11, written over the public C API only. */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "torchmerge.h"
#include "cli/cli_common.h"
#include "cli/inspect.h"
#include "cli/run_recipe.h"
#include "cli/greedy_soup.h"
#include "cli/merge_command.h"

static void usage(FILE *f) {
    fprintf(f, "usage: torchmerge METHOD [parameters] [options] -o OUT INPUT...   (torchmerge METHOD --help)\n");
    for (size_t i = 0; i < tm_method_count(); i++) {
        tm_method_info m;
        tm_method_info_init(&m);
        if (tm_method_get(i, &m) == TM_OK) fprintf(f, "         METHOD %-20s %s\n", m.name, m.summary);
    }
    fprintf(f,
            "       torchmerge run RECIPE.yaml [KEY=VALUE ...] [-o OUT]   (see torchmerge run --help)\n"
            "       torchmerge greedy_soup --eval EVAL.pt -o OUT [--template MODULE] INPUT...\n"
            "       torchmerge inspect FILE [--json] [--key NAME]\n"
            "       torchmerge --help | --version\n"
            "\n"
            "Merges PyTorch checkpoints tensor by tensor, streaming.\n"
            "Inputs: torch.save files (zip and legacy; state dicts, nested training checkpoints,\n"
            "pickled modules), TorchScript modules (torch.jit.save), safetensors files, and Hugging\n"
            "Face folders or *.index.json of sharded safetensors / pytorch_model.bin.\n");
    for (size_t i = 0; i < tm_method_count(); i++) {
        tm_method_info m;
        tm_method_info_init(&m);
        if (tm_method_get(i, &m) != TM_OK || !m.n_params) continue;
        fprintf(f, "\n%s parameters:\n", m.name);
        tm_cli_print_method_options(f, i);
    }
    fprintf(f, "\nmerge options:\n");
    tm_cli_print_common_options(f);
    fprintf(f,
            "\nFloating tensors are computed in float64 and rounded once; integer and bool tensors\n"
            "(e.g. num_batches_tracked) are taken from the first input.\n");
}

static int cmd_inspect(int argc, char **argv) {
    static const struct option longopts[] = {{"json", no_argument, 0, 'j'},
                                             {"key", required_argument, 0, 'k'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    int json = 0, c;
    tm_open_options oo;
    tm_open_options_init(&oo);
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'j': json = 1; break;
        case 'k': oo.key = optarg; break;
        case 'h': usage(stdout); return 0;
        default: return tm_cli_usage_error("torchmerge --help", "invalid option");
        }
    }
    if (argc - optind != 1) return tm_cli_usage_error("torchmerge --help", "inspect takes exactly one FILE");
    tm_checkpoint *ck = NULL;
    tm_status st = tm_checkpoint_open(argv[optind], &oo, &ck);
    int rc;
    if (st == TM_ERROR_AMBIGUOUS && !oo.key) {
        /* Several state dicts ({'actor': …, 'critic': …}): list them and their --key. */
        rc = tm_cli_inspect_candidates(argv[optind], json, stdout);
        if (rc > 0) return TM_EXIT_FAILED; /* reported */
    } else if (st != TM_OK) {
        tm_cli_error("%s", tm_errmsg());
        return TM_EXIT_FAILED;
    } else {
        rc = json ? tm_cli_inspect_json(ck, stdout) : tm_cli_inspect_text(ck, stdout);
        tm_checkpoint_free(ck);
    }
    if (rc) {
        tm_cli_error("%s: cannot write the listing", argv[optind]);
        return TM_EXIT_FAILED;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return TM_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "version") == 0) {
        printf("torchmerge %s\n", tm_version());
        return 0;
    }
    /* getopt_long permutes, so options may follow the inputs. */
    optind = 1;
    int64_t method = tm_method_find(cmd);
    if (method >= 0) return tm_cli_merge(argc - 1, argv + 1, (size_t)method);
    if (strcmp(cmd, "inspect") == 0) return cmd_inspect(argc - 1, argv + 1);
    if (strcmp(cmd, "run") == 0) return tm_cli_run(argc - 1, argv + 1);
    if (strcmp(cmd, "greedy_soup") == 0) return tm_cli_greedy_soup(argc - 1, argv + 1);
    return tm_cli_usage_error("torchmerge --help", "unknown command '%s'", cmd);
}
