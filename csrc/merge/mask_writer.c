/* The keep-masks file (mask_writer.h). C11. */
#define _GNU_SOURCE
#include "merge/mask_writer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/atomic_output.h"
#include "formats/safetensors.h"

struct tm_mask_writer {
    tm_atomic_output out;
    size_t n;          /* inputs of the merge */
    uint64_t *offset;  /* [unit * n + input]: the mask's file offset, UINT64_MAX when none */
    int failed;        /* errno of the first failed write, or 0 */
};

void tm_method_mask(const tm_method_tensor *t, size_t j, uint64_t begin, size_t count, const uint8_t *keep) {
    tm_mask_writer *w = t->masks;
    if (!w || !count) return;
    uint64_t at = w->offset[t->unit_index * w->n + t->input[j]];
    if (at == UINT64_MAX) return;
    for (size_t done = 0; done < count;) {
        ssize_t r = pwrite(w->out.fd, keep + done, count - done, (off_t)(at + begin + done));
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            __atomic_store_n(&w->failed, r < 0 ? errno : ENOSPC, __ATOMIC_RELAXED);
            return;
        }
        done += (size_t)r;
    }
}

/* The masks in plan order: their names, shapes and offsets. */
static tm_status layout(merge_ctx *c, tm_st_out_tensor **tensors, char ***names, int64_t **shapes, size_t *n_out,
                        tm_error *err) {
    const tm_plan *p = &c->plan;
    size_t n = 0;
    for (size_t u = 0; u < p->n_units; u++)
        for (size_t i = 0; p->units[u].floating && i < c->n; i++) n += tm_plan_where(p, p->units[u].keys[0], i) >= 0;
    *tensors = calloc(n + 1, sizeof **tensors);
    *names = calloc(n + 1, sizeof **names);
    *shapes = calloc(n + 1, sizeof **shapes);
    if (!*tensors || !*names || !*shapes) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    size_t k = 0;
    for (size_t u = 0; u < p->n_units; u++) {
        const tm_unit *un = &p->units[u];
        for (size_t i = 0; un->floating && i < c->n; i++) {
            if (tm_plan_where(p, un->keys[0], i) < 0) continue;
            const char *key = p->keys[un->keys[0]];
            if (asprintf(&(*names)[k], "%zu.%s", i, key) < 0) {
                (*names)[k] = NULL;
                return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
            }
            tm_tensor_info ti = tm_merge_key_tensor(c, un->keys[0]);
            (*shapes)[k] = un->numel;
            (*tensors)[k] = un->whole_storage ? (tm_st_out_tensor){(*names)[k], TM_BOOL, 1, &(*shapes)[k]}
                                              : (tm_st_out_tensor){(*names)[k], TM_BOOL, ti.ndim, ti.shape};
            k++;
        }
    }
    *n_out = n;
    return TM_OK;
}

tm_status tm_mask_writer_open(merge_ctx *c, const char *path, const char *output, tm_error *err) {
    if (!c->method->has_masks)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "masks_out: %s keeps every element; it has no masks to write",
                            c->method->name);
    if (tm_same_file(path, output) || strcmp(path, output) == 0)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "masks_out: %s is the output", path);
    for (size_t i = 0; i < c->n; i++)
        if (tm_same_file(path, tm_checkpoint_path(c->in[i])))
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "masks_out: %s would replace an input", path);
    if (c->base && tm_same_file(path, tm_checkpoint_path(c->base)))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "masks_out: %s would replace the base model", path);
    tm_st_out_tensor *tensors = NULL;
    char **names = NULL;
    int64_t *shapes = NULL;
    size_t n = 0;
    tm_status st = layout(c, &tensors, &names, &shapes, &n, err);
    uint8_t *header = NULL;
    size_t header_len = 0;
    uint64_t data = 0;
    const char *meta_keys[] = {"format", "torchmerge_masks_of"};
    const char *meta_values[] = {"pt", c->method->name};
    if (!st) st = tm_safetensors_header(path, tensors, n, meta_keys, meta_values, 2, &header, &header_len, &data, err);
    tm_mask_writer *w = st ? NULL : calloc(1, sizeof *w);
    if (!st && !w) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    if (!st) {
        w->out.fd = -1;
        w->n = c->n;
        w->offset = malloc((c->plan.n_units * c->n + 1) * sizeof *w->offset);
        if (!w->offset) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    if (!st) {
        const tm_plan *p = &c->plan;
        uint64_t at = header_len;
        for (size_t u = 0; u < p->n_units; u++)
            for (size_t i = 0; i < c->n; i++) {
                int has = p->units[u].floating && tm_plan_where(p, p->units[u].keys[0], i) >= 0;
                w->offset[u * c->n + i] = has ? at : UINT64_MAX;
                at += has ? (uint64_t)p->units[u].numel : 0;
            }
        st = tm_atomic_output_open(path, &w->out, err);
    }
    if (!st && (pwrite(w->out.fd, header, header_len, 0) != (ssize_t)header_len ||
                ftruncate(w->out.fd, (off_t)(header_len + data)) != 0))
        st = tm_error_set(err, TM_ERROR_IO, "%s: cannot write: %s", path, strerror(errno));
    for (size_t k = 0; names && k < n; k++) free(names[k]);
    free(names);
    free(tensors);
    free(shapes);
    free(header);
    c->masks = w;
    if (st) tm_mask_writer_abort(c);
    return st;
}

tm_status tm_mask_writer_commit(merge_ctx *c, tm_error *err) {
    tm_mask_writer *w = c->masks;
    if (!w) return TM_OK;
    tm_status st = TM_OK;
    if (w->failed) {
        st = tm_error_set(err, TM_ERROR_IO, "%s: cannot write the masks: %s", w->out.target, strerror(w->failed));
        tm_mask_writer_abort(c);
        return st;
    }
    st = tm_atomic_output_commit(&w->out, err);
    free(w->offset);
    free(w);
    c->masks = NULL;
    return st;
}

void tm_mask_writer_abort(merge_ctx *c) {
    tm_mask_writer *w = c->masks;
    if (!w) return;
    if (w->out.fd >= 0 || w->out.temp) tm_atomic_output_abort(&w->out);
    free(w->offset);
    free(w);
    c->masks = NULL;
}
