/* Safetensors output, one file: the header (names, dtypes, shapes, offsets, the merge metadata)
 * is known from the plan, so it is written first and the units' bytes follow in plan order.
 * The folder sink writes each shard through tm_sink_safetensors_units. C11. */
#define _GNU_SOURCE
#include <stdlib.h>

#include "core/atomic_output.h"
#include "formats/safetensors.h"
#include "merge/pipeline.h"
#include "merge/sink.h"

static tm_status st_write(void *self, const void *data, size_t len, uint32_t crc, tm_error *err) {
    (void)crc;
    return tm_st_writer_write(self, data, len, err);
}

tm_status tm_sink_safetensors_units(merge_ctx *c, int fd, const char *label, size_t u0, size_t u1,
                                    const tm_output_metadata *m, size_t *done, tm_error *err) {
    const tm_plan *p = &c->plan;
    tm_st_out_tensor *t = calloc(u1 - u0 + 1, sizeof *t);
    if (!t) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t u = u0; u < u1; u++) {
        size_t k = p->units[u].keys[0];
        tm_tensor_info r = tm_merge_key_tensor(c, k);
        t[u - u0] = (tm_st_out_tensor){p->keys[k], p->units[u].out_dtype, r.ndim, r.shape};
    }
    tm_st_writer *w = NULL;
    double t0 = tm_merge_now();
    tm_status st = tm_st_writer_open(fd, label, t, u1 - u0, m->keys, (const char *const *)m->values, m->n, &w, err);
    c->prof.save_seconds += tm_merge_now() - t0;
    free(t);
    const tm_sink sink = {w, 0, NULL, st_write, NULL};
    if (!st) st = tm_pipeline_run(c, NULL, u0, u1, &sink, done, err);
    if (!st) st = tm_st_writer_finish(w, err);
    tm_st_writer_free(w);
    return st;
}

tm_status tm_sink_safetensors_write(merge_ctx *c, const char *output, const tm_output_metadata *m, tm_error *err) {
    tm_atomic_output out;
    size_t done = 0;
    tm_status st = tm_atomic_output_open(output, &out, err);
    if (st) return st;
    st = tm_sink_safetensors_units(c, out.fd, output, 0, c->plan.n_units, m, &done, err);
    if (!st) st = tm_atomic_output_commit(&out, err);
    else tm_atomic_output_abort(&out);
    return st;
}
