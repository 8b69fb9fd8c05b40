/* TorchScript output the streaming way, without LibTorch: when every merged tensor has exactly
 * the template's dtype and layout, and each merged storage is one whole storage record of the
 * template, the template archive is copied record by record and those records are replaced by
 * the merged bytes as they are computed. Anything else (a --dtype change, a tensor that is a view
 * into a larger template storage such as cuDNN's flat RNN weights, two units in one storage)
 * leaves *applicable = 0 and nothing written, for sink_torchscript_libtorch.c. C11. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "core/atomic_output.h"
#include "formats/archive_rewriter.h"
#include "merge/pipeline.h"
#include "merge/sink.h"

typedef struct ts_sink {
    tm_archive_rewriter *rw;
    int64_t *unit_record; /* the template record each unit replaces (see unit_template_record) */
} ts_sink;

static tm_status ts_begin(void *self, size_t u, tm_error *err) {
    ts_sink *s = self;
    return tm_archive_rewriter_begin(s->rw, (size_t)s->unit_record[u], err);
}
static tm_status ts_write(void *self, const void *data, size_t len, uint32_t crc, tm_error *err) {
    return tm_archive_rewriter_write_crc(((ts_sink *)self)->rw, data, len, crc, err);
}
static tm_status ts_end(void *self, size_t u, tm_error *err) {
    (void)u;
    return tm_archive_rewriter_end(((ts_sink *)self)->rw, err);
}

/* The template record unit u can replace: >= 0; -1 when the template has none of its tensors
 * (the unit is skipped, as LibTorch skips names the module lacks); -2 when it cannot stream. */
static int64_t unit_template_record(const merge_ctx *c, tm_archive_rewriter *rw, const tm_checkpoint *tpl,
                                    const tm_unit *un) {
    const tm_plan *p = &c->plan;
    int64_t record = -1;
    int in_template = 0, not_in_template = 0;
    for (size_t j = 0; j < un->n_keys; j++) {
        size_t k = un->keys[j];
        int64_t ti = tm_checkpoint_find(tpl, p->keys[k]);
        if (ti < 0) {
            not_in_template = 1;
            continue;
        }
        in_template = 1;
        tm_tensor_info t = tm_merge_tensor((tm_checkpoint *)tpl, ti);
        tm_tensor_info r = tm_merge_key_tensor(c, k);
        int64_t stride[TM_MAX_NDIM], offset;
        tm_plan_output_layout(p, c->in, k, stride, &offset);
        if (t.dtype != un->out_dtype || t.ndim != r.ndim || t.storage_offset != offset ||
            t.storage_nbytes != (uint64_t)un->numel * tm_dtype_size(un->out_dtype))
            return -2;
        for (int32_t d = 0; d < t.ndim; d++)
            if (t.shape[d] != r.shape[d] || (t.shape[d] > 1 && t.stride[d] != stride[d])) return -2;
        uint64_t at;
        if (!tm_checkpoint_storage_location(tpl, (size_t)ti, &at)) return -2;
        int64_t rec = tm_archive_rewriter_find_record(rw, at, t.storage_nbytes);
        if (rec < 0 || (record >= 0 && rec != record)) return -2;
        record = rec;
    }
    if (in_template && not_in_template) return -2;
    return in_template ? record : -1;
}

static int cmp_by_record(const void *a, const void *b, void *records) {
    int64_t ra = ((const int64_t *)records)[*(const size_t *)a], rb = ((const int64_t *)records)[*(const size_t *)b];
    return (ra > rb) - (ra < rb);
}

/* The units in template record order (the archive is copied front to back), each replacing a
 * record of its own; 0 when the template cannot be rewritten this way. Skipped units go to
 * c->ignored. */
static int plan_records(merge_ctx *c, ts_sink *s, const tm_checkpoint *tpl, size_t *order, size_t *n_order) {
    const tm_plan *p = &c->plan;
    int ok = 1;
    *n_order = 0;
    for (size_t u = 0; u < p->n_units && ok; u++) {
        int64_t rec = s->unit_record[u] = unit_template_record(c, s->rw, tpl, &p->units[u]);
        if (rec == -2) ok = 0;
        else if (rec >= 0) order[(*n_order)++] = u;
        else
            for (size_t j = 0; j < p->units[u].n_keys; j++) tm_name_list_add(&c->ignored, p->keys[p->units[u].keys[j]]);
    }
    if (ok) qsort_r(order, *n_order, sizeof *order, cmp_by_record, s->unit_record);
    for (size_t k = 1; k < *n_order && ok; k++) ok = s->unit_record[order[k]] != s->unit_record[order[k - 1]];
    if (!ok) memset(&c->ignored, 0, sizeof c->ignored);
    return ok;
}

/* The template as a checkpoint: an input when it is one, else opened here (*opened). */
static const tm_checkpoint *open_template(const merge_ctx *c, const char *module_path, tm_checkpoint **opened) {
    *opened = NULL;
    for (size_t i = 0; i < c->n; i++)
        if (tm_same_file(module_path, c->in[i] ? tm_checkpoint_path(c->in[i]) : NULL)) return c->in[i];
    tm_error ignore;
    return tm_checkpoint_open_err(module_path, NULL, opened, &ignore) == TM_OK ? *opened : NULL;
}

static tm_status stream(merge_ctx *c, ts_sink *s, const char *output, const size_t *order, size_t n_order,
                        tm_error *err) {
    const tm_plan *p = &c->plan;
    unsigned char *replaced = calloc(tm_archive_rewriter_count(s->rw) + 1, 1);
    tm_status st = replaced ? TM_OK : tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t k = 0; k < n_order && !st; k++) replaced[s->unit_record[order[k]]] = 1;
    double t0 = tm_merge_now();
    if (!st) st = tm_archive_rewriter_start(s->rw, output, replaced, err);
    c->prof.save_seconds += tm_merge_now() - t0;
    const tm_sink sink = {s, 1, ts_begin, ts_write, ts_end};
    size_t done = 0;
    if (!st) st = tm_pipeline_run(c, order, 0, n_order, &sink, &done, err);
    /* Units the module has no place for were skipped: the bar still ends full. */
    if (!st && done < p->n_units && c->o->progress) c->o->progress(c->o->progress_user, p->n_units, p->n_units);
    t0 = tm_merge_now();
    if (!st) st = tm_archive_rewriter_commit(s->rw, err);
    c->prof.save_seconds += tm_merge_now() - t0;
    free(replaced);
    return st;
}

tm_status tm_sink_torchscript_write(merge_ctx *c, const char *module_path, const char *output, int *applicable,
                                    tm_error *err) {
    const tm_plan *p = &c->plan;
    *applicable = 0;
    if (c->o->has_dtype) return TM_OK;
    tm_checkpoint *opened;
    const tm_checkpoint *tpl = open_template(c, module_path, &opened);
    ts_sink s = {NULL, NULL};
    tm_error ignore;
    if (!tpl || !tm_checkpoint_is_module(tpl) || tm_archive_rewriter_open(module_path, &s.rw, &ignore) != TM_OK) {
        tm_checkpoint_free(opened);
        return TM_OK;
    }
    s.unit_record = malloc((p->n_units + 1) * sizeof *s.unit_record);
    size_t *order = malloc((p->n_units + 1) * sizeof *order), n_order = 0;
    *applicable = s.unit_record && order && plan_records(c, &s, tpl, order, &n_order);
    tm_checkpoint_free(opened);
    tm_status st = *applicable ? stream(c, &s, output, order, n_order, err) : TM_OK;
    tm_archive_rewriter_free(s.rw);
    free(s.unit_record);
    free(order);
    return st;
}
