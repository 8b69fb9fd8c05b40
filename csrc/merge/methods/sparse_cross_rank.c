/* The generalized task arithmetic of sparse.h across hosts (method_xr.h; docs/distributed.md).
 * Each rank sparsifies its own inputs with the single-host code (tm_sparse_prepare, the local
 * reduce passes, tm_sparse_rows), keyed by their global input index, so masks and selections are
 * the single host's; only per-element sums cross the ranks, chained in the global input order,
 * so the output is the single host's bit for bit:
 *   linear: Σⱼ cⱼδⱼ' (cⱼ = λwⱼ, wⱼ divided by the global Σw with normalize), then + b at the writer;
 *   ties:   round 1 the sign-election score Σⱼ vⱼ or Σⱼ sign(vⱼ) (to every rank: each elects the
 *           signs), round 2 the agreeing sum and the agreeing weight sum (merge_func mean), the
 *           agreeing sum (sum) or the largest agreeing magnitude (max; a max is exact in any
 *           order), to the writer, which applies consensus.h's rule, × λ, + b.
 * TIES with trim_scope global needs model-wide passes and is refused before (distributed.c). C11. */
#include "merge/methods/sparse_cross_rank.h"

#include <string.h>

#include "merge/methods/consensus.h"
#include "merge/methods/ties_global.h"
#include "merge/methods/weights.h"

static const tm_sparse_header *cheader(const double *state) { return (const tm_sparse_header *)state; }
static tm_sparse_input *inputs(double *state) { return (tm_sparse_input *)(state + TM_SPARSE_STATE_FIXED); }
static const tm_sparse_input *cinputs(const double *state) {
    return (const tm_sparse_input *)(state + TM_SPARSE_STATE_FIXED);
}

tm_status tm_sparse_xr_prepare(const tm_sparse_method *s, const tm_method_tensor *t, double *state, const tm_xr *x,
                               tm_error *err) {
    if (s->consensus != TM_CONSENSUS_LINEAR || !tm_tensor_param1(t, (size_t)s->p_normalize))
        return tm_sparse_prepare(s, t, state, err); /* weights not normalised: nothing global */
    /* The core's prepare without normalize (this rank's weights are not all of them), then
     * wⱼ / Σ w over the global inputs, as one host sums and divides. */
    const size_t n_values = x->cr->params->n_values;
    double params[n_values + 1];
    memcpy(params, t->params, n_values * sizeof *params);
    params[t->param_at[s->p_normalize]] = 0;
    tm_method_tensor local = *t;
    local.params = params;
    tm_status st = tm_sparse_prepare(s, &local, state, err);
    if (st) return st;
    const size_t n_all = t->n_inputs;
    size_t all[n_all + 1];
    double coef[n_all + 1];
    tm_method_tensor every; /* the weights of every rank's inputs, normalised as on one host */
    tm_xr_every_input(t, &every, all);
    st = tm_method_weights(&every, t->params + t->param_at[s->p_weights], 1, coef, err);
    tm_sparse_input *in = inputs(state);
    for (size_t j = 0; j < t->n && !st; j++) in[j].coef = coef[t->input[j]] * cheader(state)->lambda;
    return st;
}

/* The exchange buffers: doubles of the thread's cross-rank memory. */
static double *buffers(const tm_xr *x, size_t doubles, const tm_method_tensor *t, tm_error *err) {
    double *p = tm_method_memory_reserve(x->memory, doubles * sizeof *p);
    if (!p) tm_error_set(err, TM_ERROR_NOMEM, "tensor '%s': out of memory for the exchange buffers", t->name);
    return p;
}

static tm_status linear_apply(const tm_sparse_method *s, const tm_method_tensor *t, const double *state,
                              const tm_xr *x, uint64_t begin, size_t count, void *out, double *scratch,
                              tm_error *err) {
    double *acc = buffers(x, count, t, err), *b = scratch + count, *k = scratch + 2 * count;
    int first, has_total;
    tm_status st = acc ? tm_xr_receive(x, acc, count, &first, err) : err->status;
    if (st) return st;
    if (first) memset(acc, 0, count * sizeof *acc); /* as tm_sparse_apply's accumulator */
    tm_kernel_load_f64(t->base, begin, count, b, k);
    for (size_t c0 = 0; c0 < count; c0 += TM_SPARSE_CHUNK) {
        const size_t m = count - c0 < TM_SPARSE_CHUNK ? count - c0 : TM_SPARSE_CHUNK;
        tm_sparse_rows(s, t, state, begin, c0, m, b, k, acc);
    }
    st = tm_xr_deliver(x, acc, count, TM_XR_OUTPUT, &has_total, err);
    if (st || !has_total) return st;
    for (size_t e = 0; e < count; e++) acc[e] += b[e];
    tm_kernel_store_f64(acc, count, t->out_dtype, out);
    return TM_OK;
}

/* Round 1 of the consensus: score[e] += this rank's rows (n rows of count). */
static void add_score(const double *rows, size_t n, size_t count, int sign_rule, double *score) {
    for (size_t j = 0; j < n; j++) {
        const double *row = rows + j * count;
        for (size_t e = 0; e < count; e++) score[e] += tm_consensus_term(row[e], sign_rule);
    }
}

/* Round 2: the agreeing entries of this rank's rows added to sum (and div: their weights), or
 * their largest magnitude into sum (max), as consensus.c's merge does element by element. */
static void add_agreeing(const double *rows, const double *w, size_t n, size_t count, const double *score,
                         double zero_sign, int agg, double *sum, double *div) {
    for (size_t j = 0; j < n; j++) {
        const double *row = rows + j * count;
        for (size_t e = 0; e < count; e++) {
            const double side = tm_consensus_side(tm_consensus_sigma(score[e], zero_sign));
            double s = sum[e], d = agg == TM_AGG_MEAN ? div[e] : 0, max = sum[e];
            tm_consensus_agree(row[e], w[j], side, &s, &d, &max);
            sum[e] = agg == TM_AGG_MAX ? max : s;
            if (agg == TM_AGG_MEAN) div[e] = d;
        }
    }
}

static tm_status ties_apply(const tm_sparse_method *s, const tm_method_tensor *t, const double *state, const tm_xr *x,
                            uint64_t begin, size_t count, void *out, double *scratch, tm_error *err) {
    const size_t n = t->n;
    const tm_sparse_header *h = cheader(state);
    const int agg = h->agg, width = agg == TM_AGG_MEAN ? 2 : 1;
    const double zero_sign = tm_ties_global_zero_sign(t);
    double *rows = buffers(x, (n + 1 + 2) * count, t, err), *b = scratch + count, *k = scratch + 2 * count;
    if (!rows) return err->status;
    double *score = rows + n * count, *sum = score + count, *div = sum + count;
    double w[n ? n : 1];
    for (size_t j = 0; j < n; j++) w[j] = cinputs(state)[j].coef;
    tm_kernel_load_f64(t->base, begin, count, b, k);
    for (size_t c0 = 0; c0 < count; c0 += TM_SPARSE_CHUNK) { /* the weighted δ' rows, kept for both rounds */
        const size_t m = count - c0 < TM_SPARSE_CHUNK ? count - c0 : TM_SPARSE_CHUNK;
        const double *r = tm_sparse_rows(s, t, state, begin, c0, m, b, k, NULL);
        for (size_t j = 0; j < n; j++) memcpy(rows + j * count + c0, r + j * m, m * sizeof *r);
    }
    int first, has_total;
    tm_status st = tm_xr_receive(x, score, count, &first, err);
    if (!st && first) memset(score, 0, count * sizeof *score);
    if (!st) add_score(rows, n, count, h->sign_rule, score);
    if (!st) st = tm_xr_deliver(x, score, count, TM_XR_ALL, &has_total, err);
    if (!st) st = tm_xr_receive(x, sum, width * count, &first, err);
    if (!st && first) memset(sum, 0, width * count * sizeof *sum);
    if (!st) add_agreeing(rows, w, n, count, score, zero_sign, agg, sum, div);
    if (!st) st = tm_xr_deliver(x, sum, width * count, TM_XR_OUTPUT, &has_total, err);
    if (st || !has_total) return st;
    for (size_t e = 0; e < count; e++) {
        const double r = tm_consensus_result(agg, sum[e], agg == TM_AGG_MEAN ? div[e] : 0, sum[e],
                                             tm_consensus_sigma(score[e], zero_sign));
        sum[e] = b[e] + h->lambda * r;
    }
    tm_kernel_store_f64(sum, count, t->out_dtype, out);
    return TM_OK;
}

tm_status tm_sparse_xr_apply(const tm_sparse_method *s, const tm_method_tensor *t, const double *state,
                             const tm_xr *x, uint64_t begin, size_t count, void *out, double *scratch, tm_error *err) {
    return s->consensus == TM_CONSENSUS_TIES ? ties_apply(s, t, state, x, begin, count, out, scratch, err)
                                             : linear_apply(s, t, state, x, begin, count, out, scratch, err);
}
