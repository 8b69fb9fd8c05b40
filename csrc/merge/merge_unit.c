/* The per-unit arithmetic: weights as given, normalised per tensor over the inputs that have it
 * (so per-tensor weight rules and --keys union share one rule), summed in float64 by the kernel
 * and rounded once; non-floating tensors are copied from the first input. C11. */
#define _GNU_SOURCE
#include "merge/merge_unit.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>


tm_status tm_merge_worker_init(tm_merge_worker *w, size_t n_inputs) {
    memset(w, 0, sizeof *w);
    size_t n = n_inputs + 1;
    w->acc = malloc(2 * TM_BLOCK_ELEMS * sizeof *w->acc);
    w->rule_weights = malloc(n * sizeof *w->rule_weights);
    w->weights = malloc(n * sizeof *w->weights);
    w->views = malloc(n * sizeof *w->views);
    w->shapes = malloc(n * sizeof *w->shapes);
    w->strides = malloc(n * sizeof *w->strides);
    return w->acc && w->rule_weights && w->weights && w->views && w->shapes && w->strides ? TM_OK : TM_ERROR_NOMEM;
}

void tm_merge_worker_free(tm_merge_worker *w) {
    free(w->acc);
    free(w->rule_weights);
    free(w->weights);
    free(w->views);
    free(w->shapes);
    free(w->strides);
    memset(w, 0, sizeof *w);
}

/* The weights as given (uniform 1/n when none); normalisation happens per tensor, in
 * tm_merge_unit. */
tm_status tm_merge_weights(merge_ctx *c, tm_error *err) {
    const tm_merge_options *o = c->o;
    c->weights = malloc(c->n * sizeof *c->weights);
    if (!c->weights) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t i = 0; i < c->n; i++) c->weights[i] = 1.0 / (double)c->n;
    if (!o->weights) return TM_OK;
    if (o->n_weights != c->n)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "expected %zu weights (one per input), got %zu",
                            c->n, o->n_weights);
    double sum = 0;
    for (size_t i = 0; i < c->n; i++) {
        if (!isfinite(o->weights[i]))
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "weight %zu is not a finite number", i + 1);
        c->weights[i] = o->weights[i];
        sum += o->weights[i];
    }
    if (o->normalize && (sum == 0 || !isfinite(sum)))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "the weights sum to 0 and cannot be normalised (use --no-normalize)");
    return TM_OK;
}

/* One input's view of unit u (the whole storage, or the tensor). */
static tm_view unit_view(const merge_ctx *c, const tm_unit *u, size_t i, int64_t *shape1, int64_t *stride1) {
    tm_tensor_info t = tm_merge_tensor(c->in[i], tm_plan_where(&c->plan, u->keys[0], i));
    tm_view v = {(const uint8_t *)t.storage_data, t.dtype, t.ndim, t.shape, t.stride, t.storage_offset};
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

/* Serialises what merging threads share: the per-tensor weight callback (user code) and the
 * list of differing names. */
static pthread_mutex_t shared_mu = PTHREAD_MUTEX_INITIALIZER;

/* Fills w->views and w->weights for the m inputs holding unit u: the weights as given, through
 * the per-tensor rule, normalised over those inputs (floating units, unless --no-normalize). */
static tm_status unit_inputs(const merge_ctx *c, tm_merge_worker *w, const tm_unit *u, size_t *m, tm_error *err) {
    double *raw = w->rule_weights;
    memcpy(raw, c->weights, c->n * sizeof *raw);
    if (c->o->tensor_weights) {
        pthread_mutex_lock(&shared_mu);
        c->o->tensor_weights(c->o->rules_user, c->plan.keys[u->keys[0]], c->n, raw);
        pthread_mutex_unlock(&shared_mu);
    }
    double wsum = 0;
    *m = 0;
    for (size_t i = 0; i < c->n; i++) {
        if (tm_plan_where(&c->plan, u->keys[0], i) < 0) continue;
        w->views[*m] = unit_view(c, u, i, &w->shapes[*m], &w->strides[*m]);
        w->weights[*m] = raw[i];
        wsum += raw[i];
        ++*m;
    }
    if (!c->o->normalize || !u->floating) return TM_OK;
    if (wsum == 0 || !isfinite(wsum))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "tensor '%s': its weights sum to 0 and cannot be normalised",
                            c->plan.keys[u->keys[0]]);
    for (size_t j = 0; j < *m; j++) w->weights[j] /= wsum;
    return TM_OK;
}

tm_status tm_merge_unit(merge_ctx *c, tm_merge_worker *w, const tm_unit *u, const tm_block_out *out, tm_error *err) {
    size_t m;
    tm_status st = unit_inputs(c, w, u, &m, err);
    const tm_view *v = w->views;
    size_t item = tm_dtype_size(u->out_dtype);
    int differs = 0;
    for (uint64_t begin = 0; begin < (uint64_t)u->numel && !st; begin += TM_BLOCK_ELEMS) {
        size_t count = (uint64_t)u->numel - begin < TM_BLOCK_ELEMS ? (size_t)((uint64_t)u->numel - begin) : TM_BLOCK_ELEMS;
        uint8_t *dst = out->next(out->user);
        if (!dst) {
            st = tm_error_set(err, TM_ERROR_INTERRUPTED, "cancelled");
            break;
        }
        double t0 = tm_merge_now();
        if (u->floating) {
            tm_kernel_weighted_sum(v, w->weights, m, begin, count, u->out_dtype, dst, w->acc);
        } else {
            tm_kernel_copy(&v[0], begin, count, u->out_dtype, dst);
            for (size_t j = 1; j < m && !differs; j++) differs = !tm_kernel_equal(&v[0], &v[j], begin, count);
        }
        w->merge_seconds += tm_merge_now() - t0;
        w->merge_calls++;
        st = out->put(out->user, dst, count * item, err);
    }
    if (differs) {
        pthread_mutex_lock(&shared_mu);
        for (size_t k = 0; k < u->n_keys; k++) tm_name_list_add(&c->differing, c->plan.keys[u->keys[k]]);
        pthread_mutex_unlock(&shared_mu);
    }
    return st;
}
