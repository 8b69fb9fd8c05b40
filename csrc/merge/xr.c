/* The engine's side of a method across hosts (method_xr.h): the chained sums over the hooks of
 * cross_rank.h, the weighted sums a chain is made of, and the global view of a tensor that the
 * method's cross-rank callbacks see. C11. */
#include "merge/method_xr.h"

#include <string.h>

#include "merge/cross_rank.h"
#include "merge/merge_unit.h"

tm_status tm_xr_receive(const tm_xr *x, double *buf, size_t count, int *first, tm_error *err) {
    int has_prev = 0;
    tm_status st = x->cr->before(x->cr->user, buf, count, &has_prev, err);
    *first = !has_prev;
    return st;
}

tm_status tm_xr_deliver(const tm_xr *x, double *buf, size_t count, int to, int *has_total, tm_error *err) {
    return x->cr->deliver(x->cr->user, buf, count, to, has_total, err);
}

tm_status tm_xr_sum_all(const tm_xr *x, double *values, double *tmp, size_t len, tm_error *err) {
    tm_status st = TM_OK;
    for (size_t at = 0; at < len && !st; at += TM_BLOCK_ELEMS) {
        const size_t m = len - at < TM_BLOCK_ELEMS ? len - at : TM_BLOCK_ELEMS;
        int first, has_total;
        st = tm_xr_receive(x, tmp, m, &first, err);
        for (size_t e = 0; e < m && !st && !first; e++) values[at + e] = tmp[e] + values[at + e];
        if (!st) st = tm_xr_deliver(x, values + at, m, TM_XR_ALL, &has_total, err);
    }
    return st;
}

void tm_xr_weighted_add(const tm_view *in, const double *w, size_t n, uint64_t begin, size_t count,
                        const double *prev, tm_dtype wide, double *sums, double *scratch) {
    const size_t per = wide == TM_COMPLEX128 ? 2 : 1;
    if (!prev && n == 0) { /* no term yet: −0.0 + x is x for every x, +0.0 would turn −0.0 into +0.0 */
        for (size_t e = 0; e < per * count; e++) sums[e] = -0.0;
        return;
    }
    /* The running sum as input 0 with weight 1 (exact), so the kernel adds this rank's terms to
     * it in the single-host order. Its view starts at element begin. */
    tm_view v[n + 1];
    double c[n + 1];
    int64_t prev_shape = (int64_t)(begin + count), one = 1;
    v[0] = (tm_view){(const uint8_t *)prev, wide, 1, &prev_shape, &one, -(int64_t)begin};
    c[0] = 1.0;
    memcpy(v + 1, in, n * sizeof *in);
    memcpy(c + 1, w, n * sizeof *w);
    tm_kernel_weighted_sum(v + !prev, c + !prev, n + (prev != NULL), begin, count, wide, sums, scratch);
}

void tm_xr_weighted_finish(const double *sums, const tm_view *base, double wb, uint64_t begin, size_t count,
                           tm_dtype out_dtype, void *out, double *scratch) {
    const tm_dtype wide = out_dtype == TM_COMPLEX64 || out_dtype == TM_COMPLEX128 ? TM_COMPLEX128 : TM_FLOAT64;
    int64_t shape = (int64_t)(begin + count), one = 1;
    tm_view v[2] = {{(const uint8_t *)sums, wide, 1, &shape, &one, -(int64_t)begin}, *base};
    double c[2] = {1.0, wb};
    tm_kernel_weighted_sum(v, c, 2, begin, count, out_dtype, out, scratch);
}

void tm_xr_every_input(const tm_method_tensor *t, tm_method_tensor *every, size_t *all) {
    for (size_t i = 0; i < t->n_inputs; i++) all[i] = i;
    *every = *t;
    every->n = t->n_inputs;
    every->input = all;
}

const tm_method_xr *tm_xr_method(const tm_method *m, const tm_merge_worker *w) {
    return w->xr && w->xr->params ? m->cross_rank : NULL;
}

const tm_method_tensor *tm_xr_tensor(tm_merge_worker *w, const tm_method_tensor *t, tm_method_tensor *g, tm_xr *x) {
    const tm_cross_rank *cr = w->xr;
    *g = *t;
    g->n_inputs = cr->params->n_inputs;
    g->n = cr->no_inputs ? 0 : t->n;
    for (size_t j = 0; j < g->n; j++) w->xr_input[j] = cr->offset + t->input[j];
    g->input = w->xr_input;
    *x = (tm_xr){cr, &w->xr_memory};
    return g;
}
