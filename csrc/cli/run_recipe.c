/* `torchmerge run`: merges as a YAML recipe says (docs/recipes.md), with Hydra-style key=value
 * overrides. C11, over the public C API only (tm_merge_recipe). */
#define _GNU_SOURCE
#include "cli/run_recipe.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "torchmerge.h"
#include "cli/cli_common.h"



static void run_usage(FILE *f) {
    fprintf(f,
            "usage: torchmerge run RECIPE.yaml [KEY=VALUE ...] [-o OUT] [--profile] [-q]\n"
            "\n"
            "Merges as the YAML recipe says: FusionBench method configs (name: METHOD and its\n"
            "parameters, e.g. weighted_average, weights, normalize), model pools (models: {name: path})\n"
            "and mergekit configs (merge_method: linear, models: [{model: path, parameters: {weight: w}}]).\n"
            "Methods and their parameters: torchmerge --help, torchmerge METHOD --help.\n"
            "RECIPE may be - to read the recipe from standard input.\n"
            "\n"
            "  KEY=VALUE       change the recipe before it is read; VALUE is YAML, KEY a dotted path:\n"
            "                  method.weights=[0.2,0.8]  output=soup.pt  models.0=a.pt\n"
            "                  method.normalize=false  ~exclude (deletes a key)\n"
            "  -o, --output OUT  the same as output=OUT\n"
            "  --profile       print time spent loading, merging and saving\n"
            "  -q, --quiet     no warnings, no progress bar\n"
            "\n"
            "Model paths written in the recipe are relative to the recipe's folder; the output and\n"
            "paths given on the command line are relative to the current directory. Errors point at\n"
            "the recipe's line and column; nothing is written unless the whole recipe is valid.\n");
}






/* output="OUT" as a YAML double-quoted string, so any path survives being parsed as YAML. */
static char *output_override(const char *path) {
    size_t n = strlen(path);
    char *s = malloc(n * 4 + 16), *p = s;
    if (!s) return NULL;
    p += sprintf(p, "output=\"");
    for (const unsigned char *c = (const unsigned char *)path; *c; c++) {
        if (*c == '"' || *c == '\\') p += sprintf(p, "\\%c", *c);
        else if (*c < 0x20 || *c == 0x7f) p += sprintf(p, "\\x%02x", *c);
        else *p++ = (char)*c;
    }
    strcpy(p, "\"");
    return s;
}

static char *read_stdin(void) {
    size_t cap = 4096, used = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (cap - used < 2) {
            char *b = cap < ((size_t)16 << 20) ? realloc(buf, cap * 2) : NULL;
            if (!b) {
                free(buf);
                return NULL;
            }
            buf = b;
            cap *= 2;
        }
        size_t got = fread(buf + used, 1, cap - used - 1, stdin);
        used += got;
        if (!got) break;
    }
    if (buf) buf[used] = '\0';
    return buf;
}

int tm_cli_run(int argc, char **argv) {
    static const struct option longopts[] = {{"output", required_argument, 0, 'o'},
                                             {"profile", no_argument, 0, 'p'},
                                             {"quiet", no_argument, 0, 'q'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    const char *output = NULL;
    int profile = 0, c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":o:qh", longopts, NULL)) != -1) {
        switch (c) {
        case 'o': output = optarg; break;
        case 'p': profile = 1; break;
        case 'q': tm_cli_quiet = 1; break;
        case 'h': run_usage(stdout); return 0;
        case ':': return tm_cli_usage_error("torchmerge run --help", "option '%s' needs a value", argv[optind - 1]);
        default: return tm_cli_usage_error("torchmerge run --help", "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind >= argc) return tm_cli_usage_error("torchmerge run --help", "run needs a RECIPE.yaml");
    const char *recipe = argv[optind];
    size_t n = (size_t)(argc - optind - 1);
    char **overrides = calloc(n + 2, sizeof *overrides);
    if (!overrides) {
        tm_cli_error("out of memory");
        return TM_EXIT_FAILED;
    }
    for (size_t i = 0; i < n; i++) {
        char *a = argv[optind + 1 + (int)i];
        const char *key = a[0] == '~' ? a + 1 : a + strspn(a, "+");
        const char *eq = strchr(key, '=');
        if ((a[0] != '~' && !eq) || (eq ? eq == key : !*key)) {
            free(overrides);
            return tm_cli_usage_error("torchmerge run --help", "expected KEY=VALUE, got '%s'", a);
        }
        overrides[i] = a;
    }
    char *out_override = NULL;
    if (output) {
        if (!*output) {
            free(overrides);
            return tm_cli_usage_error("torchmerge run --help", "-o: the output path is empty");
        }
        if (!(out_override = output_override(output))) {
            free(overrides);
            tm_cli_error("out of memory");
            return TM_EXIT_FAILED;
        }
        overrides[n++] = out_override;
    }
    char *text = NULL;
    if (strcmp(recipe, "-") == 0 && !(text = read_stdin())) {
        free(overrides);
        free(out_override);
        tm_cli_error("cannot read the recipe from standard input");
        return TM_EXIT_FAILED;
    }

    tm_merge_options base;
    tm_merge_options_init(&base);
    tm_profile prof;
    tm_profile_init(&prof);
    tm_cli_set_callbacks(&base);
    if (profile) base.profile = &prof;
    tm_cli_install_signal_handlers();
    tm_status st = tm_merge_recipe(text ? text : recipe, text == NULL, (const char *const *)overrides, n, &base);
    free(text);
    free(overrides);
    free(out_override);
    if (st != TM_OK) {
        tm_cli_error("%s", tm_errmsg());
        return TM_EXIT_FAILED;
    }
    if (profile) tm_cli_print_profile(&prof);
    return 0;
}
