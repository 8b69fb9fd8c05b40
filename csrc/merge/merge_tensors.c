/* tm_merge_tensors: one tensor held in memory, merged by the same method code as a file merge
 * (tm_merge_floating: prepare, reduce passes, apply), into the caller's buffer. What the
 * operators (torch.ops.torchmerge.*) and C++ callers with tensors in memory use. C11. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "core/struct_size.h"
#include "merge/merge_unit.h"
#include "merge/model_passes.h"

void tm_tensor_data_init(tm_tensor_data *t) { TM_STRUCT_INIT(t); }

typedef struct memory_merge {
    uint8_t *out;
    const tm_method *m;
    tm_merge_worker *w;
    tm_method_tensor *t;
    double *const *model; /* the model state being built (read by model_reduce) */
} memory_merge;

/* Blocks go straight into the caller's buffer, one after another. */
static void *next_block(void *user) { return ((memory_merge *)user)->out; }
static tm_status put_block(void *user, const void *block, size_t len, tm_error *err) {
    (void)block;
    (void)err;
    ((memory_merge *)user)->out += len;
    return TM_OK;
}

static tm_status model_pass(void *user, unsigned pass, tm_model_lists *lists, double *sum, tm_error *err) {
    memory_merge *mm = user;
    mm->t->model = *mm->model;
    return tm_model_pass_tensor(mm->m, mm->w, mm->t, pass, lists, sum, err);
}

/* Input i (or the base, i == n) as a view; contiguous strides in cstride when none are given. */
static tm_status view_of(const tm_tensor_data *d, const tm_tensor_data *first, const char *what, size_t i,
                         const char *name, int64_t *cstride, tm_view *v, tm_error *err) {
    if (TM_STRUCT_CHECK(d, err)) return err->status;
    if (!d->data || d->ndim < 0 || d->ndim > TM_MAX_NDIM || (d->ndim && !d->shape))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "tensor '%s': %s %zu: no data or a bad shape", name, what, i);
    if (!tm_dtype_is_floating(d->dtype))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "tensor '%s': %s %zu is %s; methods merge floating tensors",
                            name, what, i, tm_dtype_name(d->dtype));
    int same = d->ndim == first->ndim;
    for (int32_t k = 0; same && k < d->ndim; k++) same = d->shape[k] == first->shape[k];
    if (!same) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "tensor '%s': %s %zu's shape differs from input 0's",
                                   name, what, i);
    int64_t s = 1;
    for (int32_t k = d->ndim - 1; k >= 0; k--) {
        cstride[k] = s;
        s *= d->shape[k];
    }
    *v = (tm_view){(const uint8_t *)d->data, d->dtype, d->ndim, d->shape, d->stride ? d->stride : cstride, 0};
    return TM_OK;
}

static tm_status merge(const tm_tensor_data *inputs, size_t n, const tm_tensor_data *base, const char *name,
                       const tm_merge_options *o, tm_dtype out_dtype, void *out, tm_error *err) {
    if (!inputs || n == 0) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "tensor '%s': no inputs", name);
    if (!out) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "tensor '%s': out is NULL", name);
    if (!tm_dtype_is_floating(out_dtype))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "tensor '%s': the output dtype %s is not floating", name,
                            tm_dtype_name(out_dtype));
    merge_ctx c;
    memset(&c, 0, sizeof c);
    c.n = n;
    tm_merge_options no_base = *o; /* tm_merge_method checks the base by path: any non-NULL will do */
    no_base.base = base ? "(memory)" : NULL;
    c.o = &no_base;
    tm_status st = tm_merge_method(&c, err);
    tm_view *views = calloc(n + 1, sizeof *views);
    int64_t *strides = calloc((n + 1) * TM_MAX_NDIM + 1, sizeof *strides);
    size_t *input = calloc(n + 1, sizeof *input);
    if (!st && (!views || !strides || !input)) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t i = 0; i <= n && !st; i++) {
        if (i == n && !base) break;
        input[i] = i;
        st = view_of(i < n ? &inputs[i] : base, &inputs[0], i < n ? "input" : "base", i, name,
                     strides + i * TM_MAX_NDIM, &views[i], err);
    }
    tm_merge_worker w;
    int have_worker = 0;
    if (!st) st = tm_merge_worker_init(&w, &c);
    have_worker = !st;
    if (!st) {
        uint64_t numel = 1;
        for (int32_t k = 0; k < inputs[0].ndim; k++) numel *= (uint64_t)inputs[0].shape[k];
        memcpy(w.params, c.params.values, c.params.n_values * sizeof *w.params);
        if (o->tensor_param)
            for (size_t j = 0; j < c.params.n_params; j++)
                if (c.method->params[j].kind == TM_PARAM_NUMBER)
                    o->tensor_param(o->rules_user, name, c.method->params[j].name, c.params.count[j],
                                    w.params + c.params.at[j]);
        tm_method_tensor t = {.name = name, .n_inputs = n, .n = n, .input = input, .in = views,
                              .base = base ? &views[n] : NULL, .out_dtype = out_dtype, .numel = numel,
                              .params = w.params, .param_at = c.params.at, .memory = &w.memory};
        memory_merge mm = {(uint8_t *)out, c.method, &w, &t, &c.model};
        st = tm_model_passes_run(&c, &c.model, model_pass, &mm, err);
        t.model = c.model;
        const tm_block_out sink = {next_block, put_block, &mm};
        if (!st) st = tm_merge_floating(c.method, &w, &t, &sink, err);
    }
    if (have_worker) tm_merge_worker_free(&w);
    free(views);
    free(strides);
    free(input);
    free(c.model);
    tm_param_values_free(&c.params);
    return st;
}

tm_status tm_merge_tensors(const tm_tensor_data *inputs, size_t n, const tm_tensor_data *base, const char *name,
                           const tm_merge_options *opts, tm_dtype out_dtype, void *out) {
    tm_error err = {0};
    tm_merge_options o;
    tm_merge_options_init(&o);
    if (opts && TM_STRUCT_CHECK(opts, &err)) return tm_error_publish(&err);
    if (opts) TM_STRUCT_COPY_IN(&o, opts);
    tm_status st = merge(inputs, n, base, name ? name : "", &o, out_dtype, out, &err);
    return st ? tm_error_publish(&err) : TM_OK;
}
