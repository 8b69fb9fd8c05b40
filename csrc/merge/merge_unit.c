/* The per-unit arithmetic: the method's parameters for the tensor (the merge's values, then the
 * caller's per-tensor rules), then the method's prepare, optional reduce pass and apply, block
 * by block; non-floating tensors are copied from the first input that has them. C11. */
#define _GNU_SOURCE
#include "merge/merge_unit.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "merge/dequantize.h"
#include "merge/kernel.h"
#include "merge/method_xr.h"

/* The room the largest quantized unit's dequantized copies take: one per input and the base. */
static tm_status dequantize_init(tm_merge_worker *w, const merge_ctx *c) {
    if (!c->plan.dequantize) return TM_OK;
    size_t most = 0;
    for (size_t u = 0; u < c->plan.n_units; u++) {
        const tm_unit *un = &c->plan.units[u];
        for (size_t i = 0; i <= c->n; i++) {
            tm_checkpoint *ck = i < c->n ? c->in[i] : c->base;
            int64_t idx = i < c->n ? tm_plan_where(&c->plan, un->keys[0], i)
                                   : (c->base ? c->plan.base_where[un->keys[0]] : -1);
            if (!ck || idx < 0) continue;
            tm_tensor_info t = tm_merge_tensor(ck, idx);
            if (t.qscheme != TM_QSCHEME_NONE && t.numel > most) most = (size_t)t.numel;
        }
    }
    if (!most) return TM_OK;
    size_t slots = c->n + 1;
    if (most > SIZE_MAX / sizeof(double) / slots) return TM_ERROR_NOMEM;
    w->deq = malloc(slots * most * sizeof *w->deq);
    w->deq_stride = malloc(slots * sizeof *w->deq_stride);
    w->deq_elems = most;
    return w->deq && w->deq_stride ? TM_OK : TM_ERROR_NOMEM;
}

tm_status tm_merge_worker_init(tm_merge_worker *w, const merge_ctx *c) {
    memset(w, 0, sizeof *w);
    size_t n = c->n + 1, state = c->method->state_fixed + c->method->state_per_input * c->n + 1;
    w->acc = malloc(TM_METHOD_SCRATCH * TM_BLOCK_ELEMS * sizeof *w->acc);
    w->params = malloc((c->params.n_values + 1) * sizeof *w->params);
    w->state = malloc(state * sizeof *w->state);
    w->views = malloc(n * sizeof *w->views);
    w->shape1 = malloc(n * sizeof *w->shape1);
    w->stride1 = malloc(n * sizeof *w->stride1);
    w->input = malloc(n * sizeof *w->input);
    w->xr = c->xr;
    if (c->xr && !((w->xr_sums = malloc(2 * TM_BLOCK_ELEMS * sizeof *w->xr_sums)) &&
                   (w->xr_prev = malloc(2 * TM_BLOCK_ELEMS * sizeof *w->xr_prev)) &&
                   (w->xr_input = malloc((n + 1) * sizeof *w->xr_input))))
        return TM_ERROR_NOMEM;
    if (!(w->acc && w->params && w->state && w->views && w->shape1 && w->stride1 && w->input)) return TM_ERROR_NOMEM;
    return dequantize_init(w, c);
}

void tm_merge_worker_free(tm_merge_worker *w) {
    free(w->memory.data);
    free(w->acc);
    free(w->params);
    free(w->state);
    free(w->views);
    free(w->shape1);
    free(w->stride1);
    free(w->input);
    free(w->xr_sums);
    free(w->xr_prev);
    free(w->xr_input);
    free(w->xr_memory.data);
    free(w->deq);
    free(w->deq_stride);
    memset(w, 0, sizeof *w);
}

tm_status tm_merge_method(merge_ctx *c, tm_error *err) {
    const char *name = c->o->method ? c->o->method : "simple_average";
    c->method = tm_methods_find(name);
    if (!c->method)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "unknown method '%s' (torchmerge runs %s)", name,
                            tm_methods_list());
    const tm_method *m = c->method;
    if (c->n < m->min_inputs && !(c->xr && c->xr->params)) /* across hosts: the global count (distributed.c) */
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s needs at least %zu inputs, got %zu", m->name,
                            m->min_inputs, c->n);
    if (m->needs_base && !c->o->base)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s needs a base model (--base BASE, base_model: in a recipe)",
                            m->name);
    if (!m->needs_base && c->o->base)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s takes no base model (%s given)", m->name, c->o->base);
    if (m->max_inputs && c->n > m->max_inputs)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s merges at most %zu input%s, got %zu", m->name,
                            m->max_inputs, m->max_inputs == 1 ? "" : "s", c->n);
    if (c->xr && c->xr->params) { /* across hosts: the global inputs' parameters (distributed.c checked them) */
        c->params = *c->xr->params;
        c->params.values = malloc((c->params.n_values + 1) * sizeof *c->params.values);
        if (!c->params.values) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        memcpy(c->params.values, c->xr->params->values, c->params.n_values * sizeof *c->params.values);
        return TM_OK;
    }
    return tm_param_values_resolve(m, c->o->params, c->o->n_params, c->n, &c->params, err);
}

/* A view of unit u in ck, whose tensor idx holds its first key (the whole storage, or the tensor);
 * a quantized tensor's is a float64 view of its real values in w's slot (never a whole storage:
 * plan.c). */
static tm_view unit_view(tm_merge_worker *w, size_t slot, tm_checkpoint *ck, int64_t idx, const tm_unit *u,
                         int64_t *shape1, int64_t *stride1) {
    tm_tensor_info t = tm_merge_tensor(ck, idx);
    tm_view v = {(const uint8_t *)t.storage_data, t.dtype, t.ndim, t.shape, t.stride, t.storage_offset};
    if (t.qscheme != TM_QSCHEME_NONE) {
        double *values = w->deq + slot * w->deq_elems;
        tm_dequantize(&t, values);
        int64_t s = 1;
        for (int d = t.ndim - 1; d >= 0; d--) {
            w->deq_stride[slot][d] = s;
            s *= t.shape[d] > 1 ? t.shape[d] : 1;
        }
        v = (tm_view){(const uint8_t *)values, TM_FLOAT64, t.ndim, t.shape, w->deq_stride[slot], 0};
    }
    if (u->whole_storage) {
        shape1[0] = (int64_t)(t.storage_nbytes / tm_dtype_size(t.dtype));
        stride1[0] = 1;
        v.ndim = 1;
        v.shape = shape1;
        v.stride = stride1;
        v.offset = 0;
    }
    return v;
}

/* Serialises what merging threads share: the per-tensor parameter callback (user code) and the
 * list of differing names. */
static pthread_mutex_t shared_mu = PTHREAD_MUTEX_INITIALIZER;

/* This tensor's parameter values: the merge's, changed by the caller's per-tensor rules. */
static void tensor_params(const merge_ctx *c, const char *name, double *values) {
    const tm_param_values *p = &c->params;
    memcpy(values, p->values, p->n_values * sizeof *values);
    if (!c->o->tensor_param) return;
    pthread_mutex_lock(&shared_mu);
    for (size_t j = 0; j < p->n_params; j++)
        if (c->method->params[j].kind == TM_PARAM_NUMBER)
            c->o->tensor_param(c->o->rules_user, name, c->method->params[j].name, p->count[j], values + p->at[j]);
    pthread_mutex_unlock(&shared_mu);
}

void tm_merge_unit_tensor(const merge_ctx *c, tm_merge_worker *w, const tm_unit *u, tm_method_tensor *t) {
    *t = (tm_method_tensor){.name = c->plan.keys[u->keys[0]], .n_inputs = c->n, .input = w->input, .in = w->views,
                            .out_dtype = u->out_dtype, .numel = (uint64_t)u->numel, .params = w->params,
                            .param_at = c->params.at, .memory = &w->memory, .model = c->model,
                            .masks = c->masks, .unit_index = (uint64_t)(u - c->plan.units)};
    for (size_t i = 0; i < c->n; i++) {
        if (tm_plan_where(&c->plan, u->keys[0], i) < 0) continue;
        w->views[t->n] = unit_view(w, t->n, c->in[i], tm_plan_where(&c->plan, u->keys[0], i), u, &w->shape1[t->n],
                                   &w->stride1[t->n]);
        w->input[t->n++] = i;
    }
    /* The base view right after the inputs' (in[n]), so a kernel can take both as one array. */
    if (c->base) {
        w->views[t->n] = unit_view(w, t->n, c->base, c->plan.base_where[u->keys[0]], u, &w->shape1[t->n],
                                   &w->stride1[t->n]);
        t->base = &w->views[t->n];
    }
    if (u->floating) tensor_params(c, t->name, w->params);
}

/* Elements per block of a tensor from begin. */
static size_t block_count(uint64_t numel, uint64_t begin) {
    return numel - begin < TM_BLOCK_ELEMS ? (size_t)(numel - begin) : TM_BLOCK_ELEMS;
}

/* A merge across hosts (cross_rank.h): the block's float64 (complex128) sum Σ state[j]·in[j] into
 * w->xr_sums, started from the previous ranks' running sum in w->xr_prev when has_prev. */
static void cross_rank_sum(tm_merge_worker *w, const tm_method_tensor *t, uint64_t begin, size_t count, int has_prev,
                           tm_dtype wide) {
    tm_xr_weighted_add(t->in, w->state, t->n, begin, count, has_prev ? w->xr_prev : NULL, wide, w->xr_sums, w->acc);
}

/* An error of a block's exchanges names the tensor. */
static tm_status name_tensor(const tm_method_tensor *t, tm_status st, tm_error *err) {
    char what[300];
    snprintf(what, sizeof what, "tensor '%s'", t->name);
    if (st) tm_error_prefix(err, what);
    return st;
}

/* The block's sum handed down the ranks and its total rounded once into dst. The first rank
 * passes on blocks up to xr->ahead ahead of the one it waits the total of. */
static tm_status cross_rank_apply(tm_merge_worker *w, const tm_method_tensor *t, uint64_t begin, size_t count,
                                  void *dst, tm_error *err) {
    const tm_cross_rank *xr = w->xr;
    int complex = t->out_dtype == TM_COMPLEX64 || t->out_dtype == TM_COMPLEX128;
    tm_dtype wide = complex ? TM_COMPLEX128 : TM_FLOAT64;
    size_t per = complex ? 2 : 1;
    tm_status st = TM_OK;
    if (xr->first) {
        if (begin == 0) w->xr_next = 0;
        while (!st && w->xr_next < t->numel && w->xr_next <= begin + (uint64_t)(xr->ahead - 1) * TM_BLOCK_ELEMS) {
            size_t n = block_count(t->numel, w->xr_next);
            cross_rank_sum(w, t, w->xr_next, n, 0, wide);
            st = xr->pass(xr->user, w->xr_sums, per * n, err);
            w->xr_next += n;
        }
    } else {
        int has_prev = 0;
        st = xr->before(xr->user, w->xr_prev, per * count, &has_prev, err);
        if (!st) cross_rank_sum(w, t, begin, count, has_prev, wide);
        if (!st) st = xr->pass(xr->user, w->xr_sums, per * count, err);
    }
    if (!st) st = xr->total(xr->user, w->xr_sums, per * count, err);
    int64_t shape = (int64_t)count, one = 1;
    tm_view sums = {(const uint8_t *)w->xr_sums, wide, 1, &shape, &one, 0};
    if (!st) tm_kernel_copy(&sums, 0, count, t->out_dtype, dst);
    return name_tensor(t, st, err);
}

tm_status tm_merge_floating(const tm_method *m, tm_merge_worker *w, const tm_method_tensor *t,
                            const tm_block_out *out, tm_error *err) {
    /* Across hosts, a method with its own cross-rank code sees the global view (method_xr.h). */
    const tm_method_xr *mx = tm_xr_method(m, w);
    tm_method_tensor global;
    tm_xr x;
    if (mx) t = tm_xr_tensor(w, t, &global, &x);
    tm_status st = mx ? mx->prepare(t, w->state, &x, err) : m->prepare(t, w->state, err);
    int again = m->reduce != NULL;
    if (mx && mx->reduce) { /* the statistics across ranks replace the local passes */
        again = 0;
        if (!st) st = name_tensor(t, mx->reduce(t, w->state, &x, w->acc, err), err);
    }
    for (unsigned pass = 0; again && !st; pass++) {
        for (uint64_t begin = 0; begin < t->numel; begin += TM_BLOCK_ELEMS) {
            double t0 = tm_merge_now();
            m->reduce(t, w->state, pass, begin, block_count(t->numel, begin), w->acc);
            w->merge_seconds += tm_merge_now() - t0;
        }
        again = 0;
        if (m->reduce_end) st = m->reduce_end(t, w->state, pass, &again, err);
    }
    size_t item = tm_dtype_size(t->out_dtype);
    for (uint64_t begin = 0; begin < t->numel && !st; begin += TM_BLOCK_ELEMS) {
        size_t count = block_count(t->numel, begin);
        uint8_t *dst = out->next(out->user);
        if (!dst) return tm_error_set(err, TM_ERROR_INTERRUPTED, "cancelled");
        double t0 = tm_merge_now();
        if (mx) st = name_tensor(t, mx->apply(t, w->state, &x, begin, count, dst, w->acc, err), err);
        else if (w->xr) st = cross_rank_apply(w, t, begin, count, dst, err);
        else m->apply(t, w->state, begin, count, dst, w->acc);
        w->merge_seconds += tm_merge_now() - t0;
        if (st) break;
        w->merge_calls++;
        st = out->put(out->user, dst, count * item, err);
    }
    return st;
}

/* A non-floating unit: copied from the base when there is one, else from the first input,
 * noting when the inputs' values differ. */
static tm_status copy_unit(merge_ctx *c, tm_merge_worker *w, const tm_unit *u, const tm_method_tensor *t,
                           const tm_block_out *out, tm_error *err) {
    const tm_view *from = t->base ? t->base : &t->in[0];
    size_t item = tm_dtype_size(u->out_dtype);
    int differs = 0;
    tm_status st = TM_OK;
    for (uint64_t begin = 0; begin < t->numel && !st; begin += TM_BLOCK_ELEMS) {
        size_t count = block_count(t->numel, begin);
        uint8_t *dst = out->next(out->user);
        if (!dst) return tm_error_set(err, TM_ERROR_INTERRUPTED, "cancelled");
        double t0 = tm_merge_now();
        tm_kernel_copy(from, begin, count, u->out_dtype, dst);
        if (w->xr && w->xr->share) st = w->xr->share(w->xr->user, dst, count * item, err); /* rank 0's bytes */
        for (size_t j = 0; j < t->n && !differs; j++) differs = !tm_kernel_equal(from, &t->in[j], begin, count);
        w->merge_seconds += tm_merge_now() - t0;
        w->merge_calls++;
        if (!st) st = out->put(out->user, dst, count * item, err);
    }
    if (differs) {
        pthread_mutex_lock(&shared_mu);
        for (size_t k = 0; k < u->n_keys; k++) tm_name_list_add(&c->differing, c->plan.keys[u->keys[k]]);
        pthread_mutex_unlock(&shared_mu);
    }
    return st;
}

tm_status tm_merge_unit(merge_ctx *c, tm_merge_worker *w, const tm_unit *u, const tm_block_out *out, tm_error *err) {
    tm_method_tensor t;
    tm_merge_unit_tensor(c, w, u, &t);
    return u->floating ? tm_merge_floating(c->method, w, &t, out, err) : copy_unit(c, w, u, &t, out, err);
}

void *tm_method_memory_reserve(tm_method_memory *m, size_t bytes) {
    if (bytes <= m->size) return m->data;
    size_t size = m->size ? m->size : 4096;
    while (size < bytes) size = size > SIZE_MAX / 2 ? bytes : size * 2;
    void *p = realloc(m->data, size);
    if (!p) return NULL;
    m->data = p;
    m->size = size;
    return p;
}
