/* torch.save zip output: the pickle (every tensor's name, dtype, shape, strides and storage) is
 * written first, from the plan, then each unit's bytes as one storage record. C11. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>

#include "formats/pt_writer.h"
#include "merge/pipeline.h"
#include "merge/sink.h"

typedef struct pt_sink {
    const merge_ctx *c;
    tm_pt_writer *w;
} pt_sink;

static tm_status pt_begin(void *self, size_t u, tm_error *err) {
    pt_sink *s = self;
    const tm_unit *un = &s->c->plan.units[u];
    return tm_pt_writer_begin_storage(s->w, u, (uint64_t)un->numel * tm_dtype_size(un->out_dtype), err);
}
static tm_status pt_write(void *self, const void *data, size_t len, uint32_t crc, tm_error *err) {
    return tm_pt_writer_write_crc(((pt_sink *)self)->w, data, len, crc, err);
}
static tm_status pt_end(void *self, size_t u, tm_error *err) {
    (void)u;
    return tm_pt_writer_end_storage(((pt_sink *)self)->w, err);
}

tm_status tm_sink_pt_write(merge_ctx *c, const char *output, tm_error *err) {
    const tm_plan *p = &c->plan;
    tm_pk_out_tensor *t = calloc(p->n_keys ? p->n_keys : 1, sizeof *t);
    int64_t *strides = calloc(p->n_keys * TM_MAX_NDIM + 1, sizeof *strides);
    char (*keys)[24] = calloc(p->n_units + 1, sizeof *keys);
    tm_status st = TM_OK;
    if (!t || !strides || !keys) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t u = 0; u < p->n_units && !st; u++) {
        snprintf(keys[u], sizeof keys[u], "%zu", u);
        for (size_t j = 0; j < p->units[u].n_keys; j++) {
            size_t k = p->units[u].keys[j];
            tm_tensor_info r = tm_merge_key_tensor(c, k);
            t[k].name = p->keys[k];
            t[k].dtype = p->units[u].out_dtype;
            t[k].ndim = r.ndim;
            t[k].shape = r.shape;
            t[k].stride = strides + k * TM_MAX_NDIM;
            tm_plan_output_layout(p, c->in, k, strides + k * TM_MAX_NDIM, &t[k].storage_offset);
            t[k].storage_key = keys[u];
            t[k].storage_numel = p->units[u].numel;
        }
    }
    pt_sink s = {c, NULL};
    double t0 = tm_merge_now();
    if (!st) st = tm_pt_writer_open(output, t, p->n_keys, &s.w, err);
    c->prof.save_seconds += tm_merge_now() - t0;
    c->prof.save_calls++;
    const tm_sink sink = {&s, 1, pt_begin, pt_write, pt_end};
    size_t done = 0;
    if (!st) st = tm_pipeline_run(c, NULL, 0, p->n_units, &sink, &done, err);
    t0 = tm_merge_now();
    if (!st) st = tm_pt_writer_commit(s.w, err);
    c->prof.save_seconds += tm_merge_now() - t0;
    tm_pt_writer_free(s.w);
    free(t);
    free(strides);
    free(keys);
    return st;
}
