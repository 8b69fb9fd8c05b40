/* The torchmerge command-line tool. C11, written over the public C API only. */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "torchmerge.h"
#include "cli/cli_common.h"
#include "cli/inspect.h"
#include "cli/run_recipe.h"
#include "cli/greedy_soup.h"



static void usage(FILE *f) {
    fprintf(f,
            "usage: torchmerge simple_average -o OUT [options] INPUT...\n"
            "       torchmerge weighted_average --weights W1,W2,... [--no-normalize] -o OUT [options] INPUT...\n"
            "       torchmerge run RECIPE.yaml [KEY=VALUE ...] [-o OUT]   (see torchmerge run --help)\n"
            "       torchmerge greedy_soup --eval EVAL.pt -o OUT [--template MODULE] INPUT...\n"
            "       torchmerge inspect FILE [--json] [--key NAME]\n"
            "       torchmerge --help | --version\n"
            "\n"
            "Merges PyTorch checkpoints by averaging their weights, tensor by tensor.\n"
            "Inputs: torch.save files (zip and legacy; state dicts, nested training checkpoints,\n"
            "pickled modules), TorchScript modules (torch.jit.save), safetensors files, and Hugging\n"
            "Face folders or *.index.json of sharded safetensors / pytorch_model.bin.\n"
            "\n"
            "merge options:\n"
            "  -o, --output OUT        output file (written to a temporary file, renamed on success)\n"
            "  --weights W1,W2,...     one weight per input (weighted_average)\n"
            "  --no-normalize          use the weights as given instead of dividing by their sum\n"
            "  --format pt|torchscript|safetensors\n"
            "                          output format (default: safetensors when OUT ends in\n"
            "                          .safetensors or is a folder (existing, or ending in '/'),\n"
            "                          which gets sharded safetensors + index.json; torchscript\n"
            "                          when the inputs are modules or --template is given; else pt)\n"
            "  --max-shard-size SIZE   folder output: largest shard, in bytes; suffixes K, M, G\n"
            "                          (powers of 1000) and KiB, MiB, GiB (powers of 1024);\n"
            "                          default 5GiB\n"
            "  --template MODULE       TorchScript module to fill with the merged weights\n"
            "  --dtype DTYPE           write floating tensors as float32|float16|bfloat16|float64\n"
            "                          (default: each tensor's dtype in the first input)\n"
            "  --keys strict|intersection|union\n"
            "                          which tensor names to merge (default strict: all inputs must\n"
            "                          have the same names; union averages each name over the inputs\n"
            "                          that have it)\n"
            "  --key NAME              state dict inside nested checkpoints (e.g. state_dict,\n"
            "                          model.ema); found automatically when unambiguous\n"
            "  --profile               print time spent loading, merging and saving\n"
            "  -q, --quiet             no warnings, no progress bar\n"
            "\n"
            "Floating tensors are accumulated in float64 and rounded once; integer and bool tensors\n"
            "(e.g. num_batches_tracked) are taken from the first input.\n");
}






static int parse_weights(const char *s, double **out, size_t *n) {
    size_t cap = 8, count = 0;
    double *w = malloc(cap * sizeof *w);
    if (!w) return -1;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        double v = strtod(p, &end);
        if (end == p || errno) {
            free(w);
            return -1;
        }
        if (count == cap) {
            double *nw = realloc(w, (cap *= 2) * sizeof *w);
            if (!nw) { free(w); return -1; }
            w = nw;
        }
        w[count++] = v;
        p = end;
        if (*p == ',') p++;
        else if (*p) { free(w); return -1; }
    }
    if (!count) { free(w); return -1; }
    *out = w;
    *n = count;
    return 0;
}

/* "5GiB", "500M", "1048576" → bytes. */
static int parse_size(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || v <= 0) return -1;
    static const struct { const char *suffix; double mult; } units[] = {
        {"", 1},         {"B", 1},           {"K", 1e3},          {"KB", 1e3},        {"M", 1e6},
        {"MB", 1e6},     {"G", 1e9},         {"GB", 1e9},         {"T", 1e12},        {"TB", 1e12},
        {"KiB", 1024.0}, {"MiB", 1048576.0}, {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (strcmp(end, units[i].suffix) == 0) {
            double bytes = v * units[i].mult;
            if (bytes < 1 || bytes > 1.8e19) return -1;
            *out = (uint64_t)bytes;
            return 0;
        }
    return -1;
}


static int cmd_merge(int argc, char **argv, int weighted) {
    enum { OPT_WEIGHTS = 256, OPT_NO_NORMALIZE, OPT_FORMAT, OPT_TEMPLATE, OPT_DTYPE, OPT_KEYS,
           OPT_KEY, OPT_PROFILE, OPT_MAX_SHARD };
    static const struct option longopts[] = {
        {"output", required_argument, 0, 'o'},        {"weights", required_argument, 0, OPT_WEIGHTS},
        {"no-normalize", no_argument, 0, OPT_NO_NORMALIZE},
        {"format", required_argument, 0, OPT_FORMAT}, {"template", required_argument, 0, OPT_TEMPLATE},
        {"dtype", required_argument, 0, OPT_DTYPE},   {"keys", required_argument, 0, OPT_KEYS},
        {"key", required_argument, 0, OPT_KEY},       {"profile", no_argument, 0, OPT_PROFILE},
        {"max-shard-size", required_argument, 0, OPT_MAX_SHARD},
        {"quiet", no_argument, 0, 'q'},               {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    tm_merge_options o;
    tm_merge_options_init(&o);
    const char *output = NULL;
    double *weights = NULL;
    size_t n_weights = 0;
    int profile = 0, c, rc;
    tm_profile prof;
    while ((c = getopt_long(argc, argv, "o:qh", longopts, NULL)) != -1) {
        switch (c) {
        case 'o': output = optarg; break;
        case 'q': tm_cli_quiet = 1; break;
        case 'h': usage(stdout); free(weights); return 0;
        case OPT_WEIGHTS:
            free(weights);
            weights = NULL;
            if (parse_weights(optarg, &weights, &n_weights))
                return tm_cli_usage_error("torchmerge --help", "--weights: expected numbers separated by commas, got '%s'", optarg);
            break;
        case OPT_NO_NORMALIZE: o.normalize = 0; break;
        case OPT_FORMAT:
            if ((rc = tm_cli_set_format(&o, optarg, "torchmerge --help"))) { free(weights); return rc; }
            break;
        case OPT_MAX_SHARD:
            if (parse_size(optarg, &o.max_shard_size)) {
                free(weights);
                return tm_cli_usage_error("torchmerge --help", "--max-shard-size: expected a size like 500MB or 2GiB, got '%s'", optarg);
            }
            break;
        case OPT_TEMPLATE: o.template_path = optarg; break;
        case OPT_DTYPE:
            if ((rc = tm_cli_set_dtype(&o, optarg, "torchmerge --help"))) { free(weights); return rc; }
            break;
        case OPT_KEYS:
            if ((rc = tm_cli_set_keys(&o, optarg, "torchmerge --help"))) { free(weights); return rc; }
            break;
        case OPT_KEY: o.key = optarg; break;
        case OPT_PROFILE: profile = 1; break;
        default: free(weights); return tm_cli_usage_error("torchmerge --help", "invalid option");
        }
    }
    int n = argc - optind;
    if (!output) { free(weights); return tm_cli_usage_error("torchmerge --help", "missing -o OUT"); }
    if (n < 1) { free(weights); return tm_cli_usage_error("torchmerge --help", "no input files"); }
    if (weighted && !weights) return tm_cli_usage_error("torchmerge --help", "weighted_average needs --weights");
    if (!weighted && weights) {
        free(weights);
        return tm_cli_usage_error("torchmerge --help", "simple_average takes no --weights (use weighted_average)");
    }
    o.weights = weights;
    o.n_weights = n_weights;
    tm_cli_set_callbacks(&o);
    if (profile) o.profile = &prof;

    tm_cli_install_signal_handlers();
    tm_status st = tm_merge_files((const char *const *)(argv + optind), (size_t)n, output, &o);
    free(weights);
    if (st != TM_OK) {
        tm_cli_error("%s", tm_errmsg());
        return TM_EXIT_FAILED;
    }
    if (profile) tm_cli_print_profile(&prof);
    return 0;
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
    if (tm_checkpoint_open(argv[optind], &oo, &ck) != TM_OK) {
        tm_cli_error("%s", tm_errmsg());
        return TM_EXIT_FAILED;
    }
    int rc = json ? tm_cli_inspect_json(ck, stdout) : tm_cli_inspect_text(ck, stdout);
    tm_checkpoint_close(ck);
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
    if (strcmp(cmd, "simple_average") == 0) return cmd_merge(argc - 1, argv + 1, 0);
    if (strcmp(cmd, "weighted_average") == 0) return cmd_merge(argc - 1, argv + 1, 1);
    if (strcmp(cmd, "inspect") == 0) return cmd_inspect(argc - 1, argv + 1);
    if (strcmp(cmd, "run") == 0) return tm_cli_run(argc - 1, argv + 1);
    if (strcmp(cmd, "greedy_soup") == 0) return tm_cli_greedy_soup(argc - 1, argv + 1);
    return tm_cli_usage_error("torchmerge --help", "unknown command '%s'", cmd);
}
