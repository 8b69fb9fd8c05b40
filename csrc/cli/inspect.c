#include "cli/inspect.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_common.h"

static void shape_text(const tm_tensor_info *t, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = '\0';
    used += (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < t->ndim && used < size; d++)
        used += (size_t)snprintf(buf + used, size - used, "%s%" PRId64, d ? ", " : "", t->shape[d]);
    if (used < size) snprintf(buf + used, size - used, "]");
}

static void totals(const tm_checkpoint *ck, uint64_t *bytes, uint64_t *params, uint64_t per_dtype[]) {
    *bytes = *params = 0;
    for (int d = 0; d < TM_DTYPE_COUNT; d++) per_dtype[d] = 0;
    for (size_t i = 0; i < tm_checkpoint_n_tensors(ck); i++) {
        tm_tensor_info t;
        tm_tensor_info_init(&t);
        if (tm_checkpoint_tensor(ck, i, &t) != TM_OK) continue;
        *bytes += t.nbytes;
        *params += t.numel;
        per_dtype[t.dtype]++;
    }
}

/* Smallest and largest of n values. */
static void range_of(const double *v, size_t n, double *lo, double *hi) {
    *lo = *hi = n ? v[0] : 0;
    for (size_t i = 1; i < n; i++) {
        if (v[i] < *lo) *lo = v[i];
        if (v[i] > *hi) *hi = v[i];
    }
}

/* "per_tensor_affine scale=0.1 zero_point=3" or "per_channel_affine axis=0 channels=3
 * scales=[0.1, 0.3] zero_points=[-1, 1]" (ranges): the table's quantization column. */
static void quant_text(const tm_tensor_info *t, char *buf, size_t size) {
    if (t->qscheme == TM_QSCHEME_PER_TENSOR_AFFINE) {
        snprintf(buf, size, "  %s scale=%.9g zero_point=%" PRId64, tm_qscheme_name(t->qscheme), t->q_scale,
                 t->q_zero_point);
        return;
    }
    size_t n = (size_t)t->shape[t->q_axis];
    double slo, shi, zlo, zhi;
    range_of(t->q_scales, n, &slo, &shi);
    range_of(t->q_zero_points, n, &zlo, &zhi);
    snprintf(buf, size, "  %s axis=%d channels=%zu scales=[%.9g, %.9g] zero_points=[%.9g, %.9g]",
             tm_qscheme_name(t->qscheme), (int)t->q_axis, n, slo, shi, zlo, zhi);
}

int tm_cli_inspect_text(const tm_checkpoint *ck, FILE *out) {
    size_t n = tm_checkpoint_n_tensors(ck);
    fprintf(out, "file:    %s\nformat:  %s\n", tm_checkpoint_path(ck), tm_checkpoint_format(ck));
    if (*tm_checkpoint_key(ck)) fprintf(out, "key:     %s\n", tm_checkpoint_key(ck));
    const char *method = tm_checkpoint_metadata(ck, "torchmerge_method");
    if (method)
        fprintf(out, "merged:  %s of %s, weights %s\n", method,
                tm_checkpoint_metadata(ck, "torchmerge_inputs") ? tm_checkpoint_metadata(ck, "torchmerge_inputs") : "?",
                tm_checkpoint_metadata(ck, "torchmerge_weights") ? tm_checkpoint_metadata(ck, "torchmerge_weights") : "?");
    const char *recipe = tm_checkpoint_metadata(ck, "torchmerge_recipe");
    if (recipe) fprintf(out, "recipe:\n%s%s", recipe, recipe[0] && recipe[strlen(recipe) - 1] == '\n' ? "" : "\n");
    fprintf(out, "\n%-48s %-10s %-20s %12s\n", "name", "dtype", "shape", "bytes");
    for (size_t i = 0; i < n; i++) {
        tm_tensor_info t;
        tm_tensor_info_init(&t);
        if (tm_checkpoint_tensor(ck, i, &t) != TM_OK) continue;
        char shape[256];
        shape_text(&t, shape, sizeof shape);
        char quant[256] = "";
        if (t.qscheme != TM_QSCHEME_NONE) quant_text(&t, quant, sizeof quant);
        fprintf(out, "%-48s %-10s %-20s %12" PRIu64 "%s\n", t.name, tm_dtype_name(t.dtype), shape, t.nbytes, quant);
    }
    uint64_t bytes, params, per[TM_DTYPE_COUNT];
    totals(ck, &bytes, &params, per);
    fprintf(out, "\n%zu tensors, %" PRIu64 " elements, %" PRIu64 " bytes", n, params, bytes);
    for (int d = 0; d < TM_DTYPE_COUNT; d++)
        if (per[d]) fprintf(out, "; %s: %" PRIu64, tm_dtype_name((tm_dtype)d), per[d]);
    fputc('\n', out);
    return ferror(out) ? -1 : 0;
}

static void json_string(FILE *out, const char *s) {
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(out, "\\%c", *p);
        else if (*p < 0x20) fprintf(out, "\\u%04x", *p);
        else fputc(*p, out);
    }
    fputc('"', out);
}

static void json_numbers(FILE *out, const double *v, size_t n) {
    fputc('[', out);
    for (size_t i = 0; i < n; i++) fprintf(out, "%s%.17g", i ? ", " : "", v[i]);
    fputc(']', out);
}

/* , "quantization": {"scheme": …, "scale": …, "zero_point": …} (per channel: "axis", "scales",
 * "zero_points"): every value, exactly (17 digits). */
static void json_quant(FILE *out, const tm_tensor_info *t) {
    fprintf(out, ", \"quantization\": {\"scheme\": \"%s\"", tm_qscheme_name(t->qscheme));
    if (t->qscheme == TM_QSCHEME_PER_TENSOR_AFFINE) {
        fprintf(out, ", \"scale\": %.17g, \"zero_point\": %" PRId64 "}", t->q_scale, t->q_zero_point);
        return;
    }
    size_t n = (size_t)t->shape[t->q_axis];
    fprintf(out, ", \"axis\": %d, \"scales\": ", (int)t->q_axis);
    json_numbers(out, t->q_scales, n);
    fputs(", \"zero_points\": ", out);
    json_numbers(out, t->q_zero_points, n);
    fputc('}', out);
}

int tm_cli_inspect_json(const tm_checkpoint *ck, FILE *out) {
    size_t n = tm_checkpoint_n_tensors(ck);
    fputs("{\"file\": ", out);
    json_string(out, tm_checkpoint_path(ck));
    fputs(", \"format\": ", out);
    json_string(out, tm_checkpoint_format(ck));
    fputs(", \"key\": ", out);
    json_string(out, tm_checkpoint_key(ck));
    const char *recipe = tm_checkpoint_metadata(ck, "torchmerge_recipe");
    if (recipe) {
        fputs(", \"recipe\": ", out);
        json_string(out, recipe);
    }
    fputs(", \"tensors\": [", out);
    for (size_t i = 0; i < n; i++) {
        tm_tensor_info t;
        tm_tensor_info_init(&t);
        if (tm_checkpoint_tensor(ck, i, &t) != TM_OK) continue;
        fputs(i ? ", {\"name\": " : "{\"name\": ", out);
        json_string(out, t.name);
        fprintf(out, ", \"dtype\": \"%s\", \"shape\": [", tm_dtype_name(t.dtype));
        for (int d = 0; d < t.ndim; d++) fprintf(out, "%s%" PRId64, d ? ", " : "", t.shape[d]);
        fprintf(out, "], \"nbytes\": %" PRIu64 ", \"storage\": %" PRId64, t.nbytes, t.storage_id);
        if (t.qscheme != TM_QSCHEME_NONE) json_quant(out, &t);
        fputc('}', out);
    }
    uint64_t bytes, params, per[TM_DTYPE_COUNT];
    totals(ck, &bytes, &params, per);
    fprintf(out, "], \"n_tensors\": %zu, \"total_numel\": %" PRIu64 ", \"total_nbytes\": %" PRIu64 ", \"dtypes\": {", n,
            params, bytes);
    int first = 1;
    for (int d = 0; d < TM_DTYPE_COUNT; d++)
        if (per[d]) {
            fprintf(out, "%s\"%s\": %" PRIu64, first ? "" : ", ", tm_dtype_name((tm_dtype)d), per[d]);
            first = 0;
        }
    fputs("}}\n", out);
    return ferror(out) ? -1 : 0;
}

int tm_cli_inspect_candidates(const char *path, int json, FILE *out) {
    tm_key_list keys;
    tm_key_list_init(&keys);
    if (tm_checkpoint_list_keys(path, &keys) != TM_OK) {
        tm_cli_error("%s", tm_errmsg());
        return 1;
    }
    /* Each candidate opened with its key: its tensor count (and the format) as a merge sees it. */
    size_t *counts = calloc(keys.n ? keys.n : 1, sizeof *counts);
    const char *format = "?";
    tm_checkpoint *ck = NULL;
    for (size_t i = 0; counts && i < keys.n; i++) {
        tm_open_options oo;
        tm_open_options_init(&oo);
        oo.key = keys.keys[i];
        if (tm_checkpoint_open(path, &oo, &ck) != TM_OK) {
            tm_cli_error("%s", tm_errmsg());
            free(counts);
            tm_key_list_free(&keys);
            return 1;
        }
        counts[i] = tm_checkpoint_n_tensors(ck);
        if (i == 0) format = strcmp(tm_checkpoint_format(ck), "pt") == 0 ? "pt" : tm_checkpoint_format(ck);
        tm_checkpoint_free(ck);
    }
    if (!counts) {
        tm_cli_error("out of memory");
        tm_key_list_free(&keys);
        return 1;
    }
    if (json) {
        fputs("{\"file\": ", out);
        json_string(out, path);
        fputs(", \"format\": ", out);
        json_string(out, format);
        fputs(", \"state_dicts\": [", out);
        for (size_t i = 0; i < keys.n; i++) {
            fputs(i ? ", {\"key\": " : "{\"key\": ", out);
            json_string(out, keys.keys[i]);
            fprintf(out, ", \"n_tensors\": %zu}", counts[i]);
        }
        fputs("]}\n", out);
    } else {
        fprintf(out, "file:    %s\nformat:  %s\n\n%zu state dicts; inspect or merge one with --key KEY:\n", path, format,
                keys.n);
        for (size_t i = 0; i < keys.n; i++)
            fprintf(out, "  --key %-40s %zu tensor%s\n", keys.keys[i], counts[i], counts[i] == 1 ? "" : "s");
    }
    free(counts);
    tm_key_list_free(&keys);
    return ferror(out) ? -1 : 0;
}
