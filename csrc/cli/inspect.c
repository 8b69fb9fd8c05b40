#include "cli/inspect.h"

#include <inttypes.h>
#include <string.h>

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
        fprintf(out, "%-48s %-10s %-20s %12" PRIu64 "\n", t.name, tm_dtype_name(t.dtype), shape, t.nbytes);
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
        fprintf(out, "], \"nbytes\": %" PRIu64 ", \"storage\": %" PRId64 "}", t.nbytes, t.storage_id);
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
