/* model_stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models";
 * mergekit's model_stock, FusionBench's ModelStock): the average of N ≥ 2 fine-tunes pulled
 * towards the base b by the angle between their task vectors δᵢ = θᵢ − b:
 *   t = N·cos θ / (1 + (N − 1)·cos θ),   θ_merged = t · (1/N) Σ θᵢ + (1 − t) · b.
 * cos θ, over the tensor (or each row with filter_wise), is
 *   cosine  the mean over pairs i < j of clamp(δᵢ·δⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6), −1, 1) (mergekit), or
 *   angle   the cosine of the mean of the pairwise angles acos(clamp(δᵢ·δⱼ / (‖δᵢ‖‖δⱼ‖ + 1e-8))),
 *           with t = N·cos θ / ((N − 1)·cos θ + 1 + 1e-8) (FusionBench, eps included).
 * A row is a fibre along the last dimension (mergekit's dim = -1: each output row of a 2-D
 * weight); 0-d and 1-D tensors are one row, as mergekit's unsqueeze(0).
 * One reduce pass sums, in float64, the squared norms and pairwise dot products of the row being
 * read (a row may span blocks: blocks come in order, so only one row is open at a time) and
 * leaves each row's t in the thread's method memory (one double per row: at most one float64
 * copy of the tensor). Apply is one fused weighted sum (t/N on each input, 1 − t on the base),
 * rounded once. Where 1 + (N − 1)·cos θ ≤ 0 (mergekit divides by zero or beyond: ±inf, NaN or
 * an unbounded t) the merge stops with an error naming the tensor. C11. */
#include "merge/methods/methods.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "merge/hot.h"
#include "merge/merge_ctx.h"
#include "merge/method_xr.h"

enum { P_FILTER_WISE, P_PAIRWISE };
enum { PAIRWISE_COSINE, PAIRWISE_ANGLE };

static const tm_param_decl params[] = {
    [P_FILTER_WISE] = {.name = "filter_wise", .kind = TM_PARAM_BOOL, .default_value = "false",
                       .help = "one ratio t per row (along the last dimension) instead of one per tensor"},
    [P_PAIRWISE] = {.name = "pairwise", .kind = TM_PARAM_CHOICE, .choices = "cosine|angle", .default_value = "cosine",
                    .help = "cos θ as the mean pairwise cosine (mergekit) or the cosine of the mean pairwise angle "
                            "(FusionBench)",
                    .fusionbench_default = "angle"},
};

/* Elements summed per chunk of a row: chunks end at multiples of CHUNK (which divides the
 * engine's block), so the float64 sums depend on element indices only. */
#define CHUNK 4096

/* state: the row length (elements). */
enum { S_ROW };

/* The method memory: rows doubles (each row's cos θ, then its t), n × n sums of the open row
 * (‖δᵢ‖² on the diagonal, δᵢ·δⱼ above it), n × CHUNK task-vector values, n + 1 weights. */
typedef struct layout {
    double *ratio, *sums, *d, *w;
} layout;

static uint64_t rows_of(const tm_method_tensor *t, const double *state) {
    return state[S_ROW] > 0 ? t->numel / (uint64_t)state[S_ROW] : 0;
}

static layout layout_of(const tm_method_tensor *t, const double *state) {
    double *m = t->memory->data;
    layout l;
    l.ratio = m;
    l.sums = l.ratio + rows_of(t, state);
    l.d = l.sums + t->n * t->n;
    l.w = l.d + t->n * CHUNK;
    return l;
}

static tm_status prepare(const tm_method_tensor *t, double *state, tm_error *err) {
    const size_t n = t->n;
    if (t->in[0].dtype == TM_COMPLEX64 || t->in[0].dtype == TM_COMPLEX128)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED, "tensor '%s': model_stock does not merge complex tensors",
                            t->name);
    if (n < 2)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "tensor '%s': model_stock needs it in at least 2 inputs besides the base, it is in %zu",
                            t->name, n);
    const tm_view *v = &t->in[0];
    state[S_ROW] = (double)(tm_tensor_param1(t, P_FILTER_WISE) && v->ndim >= 2 ? (uint64_t)v->shape[v->ndim - 1]
                                                                                : t->numel);
    size_t doubles = (size_t)rows_of(t, state) + n * n + n * CHUNK + n + 1;
    if (!tm_method_memory_reserve(t->memory, doubles * sizeof(double)))
        return tm_error_set(err, TM_ERROR_NOMEM, "tensor '%s': out of memory for model_stock's ratios", t->name);
    return TM_OK;
}

/* Σ a[e]·b[e] in eight interleaved partial sums (lane k takes e ≡ k mod 8: one vector of them,
 * and a fixed order, so the same bits on every machine), added pairwise at the end. */
#define LANES 8
TM_HOT static double dot(const double *restrict a, const double *restrict b, size_t len) {
    double s[LANES] = {0};
    size_t e = 0;
    for (; e + LANES <= len; e += LANES)
        for (size_t k = 0; k < LANES; k++) s[k] += a[e + k] * b[e + k];
    for (size_t k = 0; e < len; e++, k++) s[k] += a[e] * b[e];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* d −= b */
TM_HOT static void subtract(double *restrict d, const double *restrict b, size_t len) {
    for (size_t e = 0; e < len; e++) d[e] -= b[e];
}

/* Adds elements [begin, begin + len) (one chunk of one row) to the open row's sums. */
static void add_chunk(const tm_method_tensor *t, const layout *l, uint64_t begin, size_t len, double *b, double *k) {
    const size_t n = t->n;
    tm_kernel_load_f64(t->base, begin, len, b, k);
    for (size_t i = 0; i < n; i++) {
        double *d = l->d + i * CHUNK;
        tm_kernel_load_f64(&t->in[i], begin, len, d, k);
        subtract(d, b, len);
    }
    for (size_t i = 0; i < n; i++)
        for (size_t j = i; j < n; j++) l->sums[i * n + j] += dot(l->d + i * CHUNK, l->d + j * CHUNK, len);
}

/* cos θ of a row from its sums. */
static double row_cos(const double *sums, size_t n, int mode) {
    double acc = 0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++) {
            double ni = sqrt(sums[i * n + i]), nj = sqrt(sums[j * n + j]), c;
            if (mode == PAIRWISE_ANGLE) {
                c = sums[i * n + j] / (sqrt(sums[i * n + i] * sums[j * n + j]) + 1e-8);
            } else {
                double p = ni * nj;
                c = sums[i * n + j] / (p > 1e-6 ? p : 1e-6);
            }
            c = c < -1 ? -1 : c > 1 ? 1 : c;
            acc += mode == PAIRWISE_ANGLE ? acos(c) : c;
        }
    double mean = acc / (double)(n * (n - 1) / 2);
    return mode == PAIRWISE_ANGLE ? cos(mean) : mean;
}

static void reduce(const tm_method_tensor *t, double *state, unsigned pass, uint64_t begin, size_t count,
                   double *scratch) {
    (void)pass;
    const uint64_t row_len = (uint64_t)state[S_ROW], end = begin + count;
    const int mode = (int)tm_tensor_param1(t, P_PAIRWISE);
    layout l = layout_of(t, state);
    double *b = scratch, *k = scratch + count;
    for (uint64_t e = begin; e < end;) {
        const uint64_t row = e / row_len, row_end = (row + 1) * row_len, seg_end = row_end < end ? row_end : end;
        if (e == row * row_len) memset(l.sums, 0, t->n * t->n * sizeof *l.sums);
        for (uint64_t c0 = e; c0 < seg_end;) {
            uint64_t c1 = (c0 / CHUNK + 1) * CHUNK;
            if (c1 > seg_end) c1 = seg_end;
            add_chunk(t, &l, c0, (size_t)(c1 - c0), b, k);
            c0 = c1;
        }
        if (seg_end == row_end) l.ratio[row] = row_cos(l.sums, t->n, mode);
        e = seg_end;
    }
}

/* Each row's cos θ → its t. */
static tm_status reduce_end(const tm_method_tensor *t, double *state, unsigned pass, int *again, tm_error *err) {
    (void)pass;
    *again = 0;
    const double n = (double)t->n, eps = tm_tensor_param1(t, P_PAIRWISE) == PAIRWISE_ANGLE ? 1e-8 : 0;
    const uint64_t rows = rows_of(t, state);
    layout l = layout_of(t, state);
    for (uint64_t r = 0; r < rows; r++) {
        const double c = l.ratio[r], den = 1 + (n - 1) * c + eps;
        if (!(den > 0)) {
            char where[64] = "";
            if (rows > 1) snprintf(where, sizeof where, " row %llu:", (unsigned long long)r);
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                "tensor '%s':%s model_stock: the task vectors' cos θ = %.17g makes t = N·cos θ / "
                                "(1 + (N − 1)·cos θ) undefined (1 + (N − 1)·cos θ ≤ 0 with N = %zu)",
                                t->name, where, c, t->n);
        }
        l.ratio[r] = n * c / den;
    }
    return TM_OK;
}

static void apply(const tm_method_tensor *t, const double *state, uint64_t begin, size_t count, void *out,
                  double *scratch) {
    const size_t n = t->n, item = tm_dtype_size(t->out_dtype);
    const uint64_t row_len = (uint64_t)state[S_ROW], end = begin + count;
    layout l = layout_of(t, state);
    for (uint64_t e = begin; e < end;) {
        const uint64_t row = e / row_len, row_end = (row + 1) * row_len, seg_end = row_end < end ? row_end : end;
        const double r = l.ratio[row];
        for (size_t i = 0; i < n; i++) l.w[i] = r / (double)n;
        l.w[n] = 1 - r; /* in[n] is the base */
        tm_kernel_weighted_sum(t->in, l.w, n + 1, e, (size_t)(seg_end - e), t->out_dtype,
                               (uint8_t *)out + (size_t)(e - begin) * item, scratch);
        e = seg_end;
    }
}

/* ---- Across hosts (method_xr.h; docs/distributed.md) ---------------------------------------
 * The pairwise dot products δᵢ·δⱼ of inputs on different ranks are not sums of what one rank
 * has, but their cosines' sum is: with uᵢ = δᵢ/‖δᵢ‖ (0 when δᵢ = 0),
 *   Σ_{i<j} uᵢ·uⱼ = (‖Σᵢ uᵢ‖² − Σᵢ ‖uᵢ‖²) / 2,
 * one chained elementwise sum (Σᵢ uᵢ) and per-row scalars. Each rank computes its inputs' row
 * norms (the single host's sums), the ranks sum them (every rank learns all of them), then
 * Σ uᵢ block by block and Σ ‖uᵢ‖² per row; every rank derives the same cos θ and t, and the
 * apply is the single host's weighted sum chained in the global input order. cos θ differs from
 * the single host's mean of the pairwise cosines by float64 rounding (the difference of two
 * sums of size ~N), so t does too and an output element can differ by an ulp where that
 * rounding crosses a boundary (a few where the result cancels to near 0). Not a sum, hence
 * refused: pairwise angle (a mean of arccos), and mergekit's guard max(‖δᵢ‖‖δⱼ‖, 1e-6) where
 * it applies to non-zero task vectors. */

static tm_status xr_check(const tm_param_values *p, tm_error *err) {
    if (p->values[p->at[P_PAIRWISE]] == PAIRWISE_ANGLE)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                            "model_stock with pairwise: angle cannot be merged across hosts: the mean of the pairwise "
                            "angles is not a sum over the ranks (pairwise: cosine is)");
    return TM_OK;
}

/* prepare as one host would for all inputs (at least 2 over all ranks; the row length). */
static tm_status xr_prepare(const tm_method_tensor *t, double *state, const tm_xr *x, tm_error *err) {
    (void)x;
    size_t all[t->n_inputs + 1];
    tm_method_tensor every;
    tm_xr_every_input(t, &every, all);
    return prepare(&every, state, err);
}

/* Runs the statement on every piece (row, off from begin, len) of [begin, end) that lies in one row and one CHUNK. */
#define FOR_PIECES(begin, end, row_len, ...)                                                       \
    for (uint64_t p0 = (begin); p0 < (end);) {                                                      \
        const uint64_t row = p0 / (row_len), row_end = (row + 1) * (row_len);                      \
        uint64_t p1 = (p0 / CHUNK + 1) * CHUNK;                                                     \
        p1 = p1 < row_end ? p1 : row_end;                                                           \
        p1 = p1 < (end) ? p1 : (end);                                                               \
        const size_t off = (size_t)(p0 - (begin)), len = (size_t)(p1 - p0);                         \
        __VA_ARGS__;                                                                                \
        p0 = p1;                                                                                    \
    }

static tm_status xr_reduce(const tm_method_tensor *t, double *state, const tm_xr *x, double *scratch, tm_error *err) {
    const size_t n = t->n, n_all = t->n_inputs;
    const uint64_t row_len = (uint64_t)state[S_ROW], rows = rows_of(t, state);
    /* exchange memory: the row norms² of every input, Σ‖uᵢ‖², ‖Σuᵢ‖² per row, a block of Σuᵢ and one to receive */
    double *sq = tm_method_memory_reserve(x->memory, (rows * (n_all + 2) + 2 * TM_BLOCK_ELEMS) * sizeof *sq);
    if (!sq) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory for model_stock's row sums");
    double *uu = sq + rows * n_all, *ss = uu + rows, *sums = ss + rows, *tmp = sums + TM_BLOCK_ELEMS;
    double *b = scratch, *k = scratch + TM_BLOCK_ELEMS, *d = scratch + 2 * TM_BLOCK_ELEMS;
    memset(sq, 0, rows * (n_all + 2) * sizeof *sq);
    for (uint64_t begin = 0; begin < t->numel; begin += TM_BLOCK_ELEMS) { /* this rank's row norms² */
        const size_t count = t->numel - begin < TM_BLOCK_ELEMS ? (size_t)(t->numel - begin) : TM_BLOCK_ELEMS;
        tm_kernel_load_f64(t->base, begin, count, b, k);
        for (size_t i = 0; i < n; i++) {
            tm_kernel_delta_f64(&t->in[i], begin, count, b, d, k);
            FOR_PIECES(begin, begin + count, row_len, sq[row * n_all + t->input[i]] += dot(d + off, d + off, len))
        }
    }
    tm_status st = tm_xr_sum_all(x, sq, tmp, rows * n_all, err);
    for (uint64_t r = 0; r < rows && !st; r++) /* the guard of one host is not a sum: refused where it applies */
        for (size_t i = 0; i < n_all && !st; i++)
            for (size_t j = i + 1; j < n_all && !st; j++) {
                const double p = sqrt(sq[r * n_all + i]) * sqrt(sq[r * n_all + j]);
                if (p > 0 && p < 1e-6)
                    st = tm_error_set(err, TM_ERROR_UNSUPPORTED,
                                      "model_stock across hosts: inputs %zu and %zu have ‖δᵢ‖·‖δⱼ‖ = %g < 1e-6 (row "
                                      "%llu), where one host's cosine takes max(‖δᵢ‖‖δⱼ‖, 1e-6), not a sum over "
                                      "ranks: merge this model on one host", i, j, p, (unsigned long long)r);
            }
    for (uint64_t begin = 0; begin < t->numel && !st; begin += TM_BLOCK_ELEMS) { /* Σ uᵢ, chained */
        const size_t count = t->numel - begin < TM_BLOCK_ELEMS ? (size_t)(t->numel - begin) : TM_BLOCK_ELEMS;
        int first, has_total;
        st = tm_xr_receive(x, sums, count, &first, err);
        if (st) break;
        if (first) memset(sums, 0, count * sizeof *sums);
        tm_kernel_load_f64(t->base, begin, count, b, k);
        for (size_t i = 0; i < n; i++) {
            tm_kernel_delta_f64(&t->in[i], begin, count, b, d, k);
            FOR_PIECES(begin, begin + count, row_len, {
                const double norm = sqrt(sq[row * n_all + t->input[i]]), inv = norm > 0 ? 1 / norm : 0;
                double s2 = 0;
                for (size_t e = off; e < off + len; e++) {
                    const double u = d[e] * inv;
                    sums[e] += u;
                    s2 += u * u;
                }
                uu[row] += s2;
            })
        }
        st = tm_xr_deliver(x, sums, count, TM_XR_ALL, &has_total, err);
        if (!st) FOR_PIECES(begin, begin + count, row_len, ss[row] += dot(sums + off, sums + off, len))
    }
    if (!st) st = tm_xr_sum_all(x, uu, tmp, rows, err);
    if (st) return st;
    layout l = layout_of(t, state);
    const double pairs = (double)(n_all * (n_all - 1) / 2);
    for (uint64_t r = 0; r < rows; r++) {
        const double c = (ss[r] - uu[r]) / 2 / pairs;
        l.ratio[r] = c < -1 ? -1 : c > 1 ? 1 : c;
    }
    tm_method_tensor every = *t; /* cos θ → t with N = every input */
    every.n = n_all;
    int again;
    return reduce_end(&every, state, 0, &again, err);
}

static tm_status xr_apply(const tm_method_tensor *t, const double *state, const tm_xr *x, uint64_t begin, size_t count,
                          void *out, double *scratch, tm_error *err) {
    const size_t n = t->n, n_all = t->n_inputs, item = tm_dtype_size(t->out_dtype);
    const uint64_t row_len = (uint64_t)state[S_ROW], end = begin + count;
    const double *ratio = t->memory->data;
    double *prev = tm_method_memory_reserve(x->memory, 2 * count * sizeof *prev), *sums = prev + count;
    if (!prev) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    int first, has_total;
    tm_status st = tm_xr_receive(x, prev, count, &first, err);
    if (st) return st;
    double w[n + 1];
    for (uint64_t e = begin; e < end;) { /* one host's weighted sum, row by row, without the base */
        const uint64_t row = e / row_len, row_end = (row + 1) * row_len, seg_end = row_end < end ? row_end : end;
        for (size_t i = 0; i < n; i++) w[i] = ratio[row] / (double)n_all;
        tm_xr_weighted_add(t->in, w, n, e, (size_t)(seg_end - e), first ? NULL : prev + (e - begin), TM_FLOAT64,
                           sums + (e - begin), scratch);
        e = seg_end;
    }
    st = tm_xr_deliver(x, sums, count, TM_XR_OUTPUT, &has_total, err);
    for (uint64_t e = begin; e < end && !st && has_total;) { /* + (1 − t)·b, rounded once */
        const uint64_t row = e / row_len, row_end = (row + 1) * row_len, seg_end = row_end < end ? row_end : end;
        tm_xr_weighted_finish(sums + (e - begin), t->base, 1 - ratio[row], e, (size_t)(seg_end - e), t->out_dtype,
                              (uint8_t *)out + (size_t)(e - begin) * item, scratch);
        e = seg_end;
    }
    return st;
}

static const tm_method_xr cross_rank = {.check = xr_check, .prepare = xr_prepare, .reduce = xr_reduce,
                                        .apply = xr_apply};

const tm_method tm_method_model_stock = {
    .name = "model_stock",
    .fusionbench_class = "ModelStock",
    .summary = "θ = t·mean(θᵢ) + (1 − t)·b, t = N·cos θ / (1 + (N − 1)·cos θ) from the task vectors' angle",
    .params = params,
    .n_params = sizeof params / sizeof *params,
    .needs_base = 1,
    .min_inputs = 2,
    .state_fixed = 1,
    .prepare = prepare,
    .reduce = reduce,
    .reduce_end = reduce_end,
    .apply = apply,
    .cross_rank = &cross_rank,
};
