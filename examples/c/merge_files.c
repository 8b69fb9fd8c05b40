/* merge_files: averages checkpoints through torchmerge's C API only (no C++, no LibTorch
 * headers), then reopens the result and lists its tensors.
 *
 *   merge_files [-w W1,W2,...] OUTPUT INPUT...
 *
 * Inputs are torch.save files (state dicts, nested training checkpoints) or TorchScript
 * modules; OUTPUT is written like the CLI writes it (pt, or TorchScript for module inputs).
 * Build: cc merge_files.c -Iinclude -Lbuild -ltorchmerge
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "torchmerge.h"

static int fail(const char *what, tm_status st) {
    fprintf(stderr, "merge_files: %s failed: %s: %s\n", what, tm_status_name(st), tm_errmsg());
    return 1;
}

static void on_warning(void *user, const char *message) {
    (void)user;
    fprintf(stderr, "merge_files: warning: %s\n", message);
}

/* Parses "0.5,0.25,0.25"; returns the count, or 0 on a malformed list. */
static size_t parse_weights(const char *text, double *out, size_t cap) {
    size_t n = 0;
    const char *p = text;
    while (*p && n < cap) {
        char *end = NULL;
        out[n++] = strtod(p, &end);
        if (end == p || (*end != ',' && *end != '\0')) return 0;
        p = *end == ',' ? end + 1 : end;
    }
    return *p ? 0 : n;
}

int main(int argc, char **argv) {
    double weights[64];
    size_t n_weights = 0;
    int arg = 1;
    if (arg + 1 < argc && strcmp(argv[arg], "-w") == 0) {
        n_weights = parse_weights(argv[arg + 1], weights, sizeof weights / sizeof weights[0]);
        if (!n_weights) {
            fprintf(stderr, "merge_files: malformed weights '%s'\n", argv[arg + 1]);
            return 2;
        }
        arg += 2;
    }
    if (argc - arg < 2) {
        fprintf(stderr, "usage: %s [-w W1,W2,...] OUTPUT INPUT...\n", argv[0]);
        return 2;
    }
    const char *output = argv[arg];
    const char *const *inputs = (const char *const *)(argv + arg + 1);
    size_t n = (size_t)(argc - arg - 1);

    tm_merge_options opts;
    tm_merge_options_init(&opts); /* simple_average, strict keys, format from the output */
    tm_param w = {"weights", NULL, weights, n_weights};
    if (n_weights) { /* method parameters are name/value pairs */
        opts.method = "weighted_average";
        opts.params = &w;
        opts.n_params = 1;
    }
    opts.warning = on_warning;
    tm_profile profile;
    tm_profile_init(&profile);
    opts.profile = &profile;
    tm_status st = tm_merge_files(inputs, n, output, &opts);
    if (st != TM_OK) return fail("tm_merge_files", st);

    tm_checkpoint *ck = NULL;
    st = tm_checkpoint_open(output, NULL, &ck);
    if (st != TM_OK) return fail("tm_checkpoint_open", st);
    printf("%s (%s): %zu tensors from %zu inputs in %.3f s\n", output, tm_checkpoint_format(ck),
           tm_checkpoint_n_tensors(ck), n, profile.load_seconds + profile.merge_seconds + profile.save_seconds);
    for (size_t i = 0; i < tm_checkpoint_n_tensors(ck); i++) {
        tm_tensor_info info;
        tm_tensor_info_init(&info);
        st = tm_checkpoint_tensor(ck, i, &info);
        if (st != TM_OK) {
            tm_checkpoint_free(ck);
            return fail("tm_checkpoint_tensor", st);
        }
        printf("  %-28s %-8s [", info.name, tm_dtype_name(info.dtype));
        for (int32_t d = 0; d < info.ndim; d++) printf("%s%lld", d ? ", " : "", (long long)info.shape[d]);
        printf("]\n");
    }
    tm_checkpoint_free(ck);
    return 0;
}
