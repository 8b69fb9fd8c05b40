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
};
