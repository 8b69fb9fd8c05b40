/* `torchmerge greedy_soup --eval EVAL.pt -o OUT [--template MODULE] INPUT...`: greedy soup
 * (tm_greedy_soup), then the table of decisions on stdout. C11, over the public C API only. */
#define _GNU_SOURCE
#include "cli/greedy_soup.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "torchmerge.h"
#include "cli/cli_common.h"

#define HELP "torchmerge greedy_soup --help"



static void greedy_usage(FILE *f) {
    fprintf(f,
            "usage: torchmerge greedy_soup --eval EVAL.pt -o OUT [--template MODULE] [options] INPUT...\n"
            "\n"
            "Greedy soup (Wortsman et al. 2022): scores every input alone with the evaluation module,\n"
            "sorts them best first, starts the soup with the best one and adds each next input when\n"
            "the uniform average of the kept inputs plus it scores strictly higher, else drops it.\n"
            "Writes the uniform average of the kept inputs to OUT and prints the decisions.\n"
            "\n"
            "  --eval EVAL.pt          TorchScript evaluation module: a Tensor attribute `inputs` and\n"
            "                          forward(self, outputs: Tensor) -> Tensor returning a 0-dim\n"
            "                          score, higher is better (e.g. accuracy on a validation split);\n"
            "                          each candidate runs model.forward(inputs) in eval mode, no grad\n"
            "  -o, --output OUT        output file (format as for simple_average)\n"
            "  --template MODULE       TorchScript module that receives each candidate's weights\n"
            "                          (default: the first input that is a TorchScript module)\n"
            "  --format pt|torchscript|safetensors, --dtype DTYPE, --keys strict|intersection|union,\n"
            "  --key NAME              as for simple_average; --dtype converts the output only (the\n"
            "                          candidates are scored in the template's dtypes)\n"
            "  -q, --quiet             no warnings, no progress bar\n"
            "\n"
            "Candidates are written to temporary files beside OUT and removed afterwards.\n");
}





static void print_report(const tm_greedy_report *r, char **inputs, const char *eval, const char *output) {
    printf("greedy soup, scored by %s (higher is better)\n", eval);
    printf("%4s  %12s  %12s  %-8s  %s\n", "rank", "score", "soup score", "decision", "input");
    for (size_t i = 0; i < r->n; i++) {
        const tm_greedy_ingredient *t = &r->tried[i];
        printf("%4zu  %12.6f  %12.6f  %-8s  %s\n", i + 1, t->score, t->soup_score,
               i == 0 ? "start" : t->kept ? "kept" : "dropped", inputs[t->input]);
    }
    printf("soup of %zu of %zu inputs, score %.6f -> %s\n", r->n_kept, r->n, r->final_score, output);
}

int tm_cli_greedy_soup(int argc, char **argv) {
    enum { OPT_EVAL = 256, OPT_TEMPLATE, OPT_FORMAT, OPT_DTYPE, OPT_KEYS, OPT_KEY };
    static const struct option longopts[] = {
        {"eval", required_argument, 0, OPT_EVAL},     {"output", required_argument, 0, 'o'},
        {"template", required_argument, 0, OPT_TEMPLATE}, {"format", required_argument, 0, OPT_FORMAT},
        {"dtype", required_argument, 0, OPT_DTYPE},   {"keys", required_argument, 0, OPT_KEYS},
        {"key", required_argument, 0, OPT_KEY},       {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},                {0, 0, 0, 0}};
    tm_merge_options o;
    tm_merge_options_init(&o);
    const char *output = NULL, *eval = NULL;
    int c, rc;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":o:qh", longopts, NULL)) != -1) {
        switch (c) {
        case 'o': output = optarg; break;
        case 'q': tm_cli_quiet = 1; break;
        case 'h': greedy_usage(stdout); return 0;
        case OPT_EVAL: eval = optarg; break;
        case OPT_TEMPLATE: o.template_path = optarg; break;
        case OPT_FORMAT: if ((rc = tm_cli_set_format(&o, optarg, HELP))) return rc; break;
        case OPT_DTYPE: if ((rc = tm_cli_set_dtype(&o, optarg, HELP))) return rc; break;
        case OPT_KEYS: if ((rc = tm_cli_set_keys(&o, optarg, HELP))) return rc; break;
        case OPT_KEY: o.key = optarg; break;
        case ':': return tm_cli_usage_error(HELP, "option '%s' needs a value", argv[optind - 1]);
        default: return tm_cli_usage_error(HELP, "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (!eval) return tm_cli_usage_error(HELP, "greedy_soup needs --eval EVAL.pt");
    if (!output) return tm_cli_usage_error(HELP, "missing -o OUT");
    if (optind >= argc) return tm_cli_usage_error(HELP, "no input files");
    tm_cli_set_callbacks(&o);

    tm_cli_install_signal_handlers();
    tm_greedy_report report;
    tm_greedy_report_init(&report);
    char **inputs = argv + optind;
    if (tm_greedy_soup((const char *const *)inputs, (size_t)(argc - optind), output, eval, &o, &report) != TM_OK) {
        tm_cli_error("%s", tm_errmsg());
        return TM_EXIT_FAILED;
    }
    print_report(&report, inputs, eval, output);
    tm_greedy_report_free(&report);
    if (fflush(stdout) != 0) {
        tm_cli_error("cannot write the report");
        return TM_EXIT_FAILED;
    }
    return 0;
}
