/* The per-unit arithmetic: weights as given, normalised per tensor over the inputs that have it
 * (so per-tensor weight rules and --keys union share one rule), summed in float64 by the kernel
 * and rounded once; non-floating tensors are copied from the first input. C11. */
#define _GNU_SOURCE
#include "merge/merge_unit.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "merge/kernel.h"

tm_status tm_merge_worker_init(tm_merge_worker *w, size_t n_inputs) {
    memset(w, 0, sizeof *w);
    w->acc = malloc(2 * TM_BLOCK_ELEMS * sizeof *w->acc);
    w->rule_weights = malloc((n_inputs + 1) * sizeof *w->rule_weights);
    return w->acc && w->rule_weights ? TM_OK : TM_ERROR_NOMEM;
}

void tm_merge_worker_free(tm_merge_worker *w) {
    free(w->acc);
    free(w->rule_weights);
    w->acc = w->rule_weights = NULL;
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

tm_status tm_merge_unit(merge_ctx *c, tm_merge_worker *w, const tm_unit *u, const tm_block_out *out, tm_error *err) {
    tm_view views[64], *vp = views;
    int64_t shapes[64], strides[64], *sp = shapes, *tp = strides;
    double wv[64], *wp = wv;
    if (c->n > 64) {
        vp = malloc(c->n * sizeof *vp);
        sp = malloc(c->n * sizeof *sp);
        tp = malloc(c->n * sizeof *tp);
        wp = malloc(c->n * sizeof *wp);
        if (!vp || !sp || !tp || !wp) {
            free(vp); free(sp); free(tp); free(wp);
            return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        }
    }
    double *raw = w->rule_weights;
    memcpy(raw, c->weights, c->n * sizeof *raw);
    if (c->o->tensor_weights) {
        pthread_mutex_lock(&shared_mu);
        c->o->tensor_weights(c->o->rules_user, c->plan.keys[u->keys[0]], c->n, raw);
        pthread_mutex_unlock(&shared_mu);
    }
    size_t m = 0;
    double wsum = 0;
    for (size_t i = 0; i < c->n; i++) {
        if (tm_plan_where(&c->plan, u->keys[0], i) < 0) continue;
        vp[m] = unit_view(c, u, i, &sp[m], &tp[m]);
        wp[m] = raw[i];
        wsum += wp[m];
        m++;
    }
    if (c->o->normalize && u->floating) {
        if (wsum == 0 || !isfinite(wsum)) {
            if (vp != views) { free(vp); free(sp); free(tp); free(wp); }
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                "tensor '%s': its weights sum to 0 and cannot be normalised",
                                c->plan.keys[u->keys[0]]);
        }
        for (size_t j = 0; j < m; j++) wp[j] /= wsum;
    }

    tm_status st = TM_OK;
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
            tm_kernel_weighted_sum(vp, wp, m, begin, count, u->out_dtype, dst, w->acc);
        } else {
            tm_kernel_copy(&vp[0], begin, count, u->out_dtype, dst);
            for (size_t j = 1; j < m && !differs; j++) differs = !tm_kernel_equal(&vp[0], &vp[j], begin, count);
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
    if (vp != views) { free(vp); free(sp); free(tp); free(wp); }
    return st;
}
