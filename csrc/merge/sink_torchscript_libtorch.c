/* TorchScript output through LibTorch (loaded on demand through the bridge): the template module
 * is loaded, each merged unit is gathered whole and set into the parameters and buffers that name
 * its tensors, and the module is saved. The fallback for what the streaming rewriter
 * (sink_torchscript.c) cannot do: a --dtype change, views into larger template storages. C11. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "core/torch_bridge.h"
#include "merge/pipeline.h"
#include "merge/sink.h"

typedef struct lt_sink {
    merge_ctx *c;
    const tm_torch_bridge *bridge;
    tm_module_writer *module;
    uint8_t *unit;   /* the unit being gathered: LibTorch takes a tensor whole */
    size_t used;
} lt_sink;

static tm_status lt_begin(void *self, size_t u, tm_error *err) {
    lt_sink *s = self;
    const tm_unit *un = &s->c->plan.units[u];
    s->unit = malloc((size_t)un->numel * tm_dtype_size(un->out_dtype) + 1);
    s->used = 0;
    return s->unit ? TM_OK : tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
}

static tm_status lt_write(void *self, const void *data, size_t len, uint32_t crc, tm_error *err) {
    (void)crc, (void)err;
    lt_sink *s = self;
    memcpy(s->unit + s->used, data, len);
    s->used += len;
    return TM_OK;
}

/* Sets each tensor of unit u the module has; the others go to c->ignored. */
static tm_status lt_end(void *self, size_t u, tm_error *err) {
    lt_sink *s = self;
    merge_ctx *c = s->c;
    const tm_plan *p = &c->plan;
    const tm_unit *un = &p->units[u];
    tm_status st = TM_OK;
    for (size_t j = 0; j < un->n_keys && !st; j++) {
        size_t k = un->keys[j];
        if (!s->bridge->module_writer_has(s->module, p->keys[k])) {
            tm_name_list_add(&c->ignored, p->keys[k]);
            continue;
        }
        tm_tensor_info r = tm_merge_key_tensor(c, k);
        int64_t stride[TM_MAX_NDIM], offset;
        tm_plan_output_layout(p, c->in, k, stride, &offset);
        st = s->bridge->module_writer_set(s->module, p->keys[k], un->out_dtype, r.ndim, r.shape, stride, offset,
                                          s->unit, err);
    }
    free(s->unit);
    s->unit = NULL;
    return st;
}

tm_status tm_sink_torchscript_libtorch_write(merge_ctx *c, const char *module_path, const char *output,
                                             tm_error *err) {
    lt_sink s = {c, NULL, NULL, NULL, 0};
    double t0 = tm_merge_now();
    tm_status st = tm_torch_bridge_get(&s.bridge, err);
    if (!st) st = s.bridge->module_writer_open(module_path, output, c->o->has_dtype, c->o->dtype, &s.module, err);
    c->prof.load_seconds += tm_merge_now() - t0;
    c->prof.load_calls++;
    const tm_sink sink = {&s, 0, lt_begin, lt_write, lt_end};
    size_t done = 0;
    if (!st) st = tm_pipeline_run(c, NULL, 0, c->plan.n_units, &sink, &done, err);
    t0 = tm_merge_now();
    if (!st) st = s.bridge->module_writer_commit(s.module, err);
    c->prof.save_seconds += tm_merge_now() - t0;
    free(s.unit); /* a failed unit's, never ended */
    if (s.module) s.bridge->module_writer_free(s.module);
    return st;
}
