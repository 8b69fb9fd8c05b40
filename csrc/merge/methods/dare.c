/* dare_linear (Yu et al. 2024, "Language Models are Super Mario"; mergekit's dare_linear,
 * FusionBench's DareTaskArithmetic): task arithmetic on task vectors δᵢ = θᵢ − b of which each
 * element is kept with probability density (dropped to 0 otherwise), the kept ones rescaled:
 *   l1       so that ‖kept δᵢ‖₁ = ‖δᵢ‖₁ over the tensor (mergekit's default today),
 *   inverse  by 1 / density (the paper's and FusionBench's),
 *   none     not at all;
 * then θ = b + λ Σ wᵢ δᵢ' (Σ wᵢ divided out with normalize). The mask is the documented
 * function of (seed, input, tensor name, element index) in merge/random.h, so outputs do not
 * depend on threads or machines. l1 needs both norms before any element is written: the reduce
 * pass sums them. Everything in float64, rounded once. C11. */
#include "merge/methods/methods.h"
#include "merge/methods/weights.h"

#include <math.h>

#include "merge/hot.h"
#include "merge/random.h"

enum { P_WEIGHTS, P_LAMBDA, P_DENSITY, P_RESCALE, P_SEED, P_NORMALIZE };
enum { RESCALE_L1, RESCALE_INVERSE, RESCALE_NONE };

static const tm_param_decl params[] = {
    [P_WEIGHTS] = TM_DECL_TASK_WEIGHTS,
    [P_LAMBDA] = TM_DECL_LAMBDA,
    [P_DENSITY] = {.name = "density", .kind = TM_PARAM_NUMBER, .per_input = 1, .required = 1, .min = 0, .max = 1,
                   .min_exclusive = 1, .help = "the probability of keeping each element of a task vector"},
    [P_RESCALE] = {.name = "rescale", .kind = TM_PARAM_CHOICE, .choices = "l1|inverse|none", .default_value = "l1",
                   .help = "how kept elements are scaled up: keep the L1 norm, divide by density, or not"},
    [P_SEED] = {.name = "seed", .kind = TM_PARAM_INTEGER, .default_value = "0", .min = 0, .max = 9007199254740992.0,
                .help = "the random masks' seed (they are a function of seed, input, tensor name, element)"},
    [P_NORMALIZE] = TM_DECL_NORMALIZE("false"),
};

/* state, for the n inputs holding the tensor: [0, n) λ·wᵢ (normalised), [n, 2n) ‖δᵢ‖₁,
 * [2n, 3n) ‖kept δᵢ‖₁. */
static tm_status prepare(const tm_method_tensor *t, double *state, tm_error *err) {
    const size_t n = t->n;
    tm_status st = tm_method_weights(t, t->params + t->param_at[P_WEIGHTS], tm_tensor_param1(t, P_NORMALIZE) != 0,
                                     state, err);
    if (st) return st;
    if (t->in[0].dtype == TM_COMPLEX64 || t->in[0].dtype == TM_COMPLEX128)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED, "tensor '%s': dare_linear does not merge complex tensors",
                            t->name);
    for (size_t j = 0; j < n; j++) {
        state[j] *= tm_tensor_param1(t, P_LAMBDA);
        state[n + j] = state[2 * n + j] = 0;
    }
    return TM_OK;
}

static tm_status check(const tm_param_values *p, tm_error *err) {
    return tm_method_check_weights(p, P_WEIGHTS, P_NORMALIZE, err);
}

/* The mask key of the tensor's j-th holder (hashed per block: a name is short). */
static uint64_t key_of(const tm_method_tensor *t, size_t j) {
    return tm_random_key((uint64_t)tm_tensor_param1(t, P_SEED), t->input[j], t->name);
}

/* δ of input j over the block into d, in float64, by the fused kernel (its fast typed loops;
 * k: count doubles of its scratch). */
static void deltas(const tm_method_tensor *t, size_t j, uint64_t begin, size_t count, double *d, double *k) {
    const tm_view pair[2] = {t->in[j], *t->base};
    static const double plus_minus[2] = {1, -1};
    tm_kernel_weighted_sum(pair, plus_minus, 2, begin, count, TM_FLOAT64, d, k);
}

/* Σ|d| over the block, and over its kept elements. */
TM_HOT static void l1_norms(const double *restrict d, size_t count, uint64_t key, uint64_t begin, uint64_t threshold,
                            double *all_out, double *kept_out) {
    double all = 0, kept = 0;
    for (size_t e = 0; e < count; e++) {
        all += fabs(d[e]);
        kept += tm_random_keep(key, begin + e, threshold) ? fabs(d[e]) : 0.0;
    }
    *all_out = all;
    *kept_out = kept;
}

/* acc += c·d on the kept elements (branch-free: a random mask mispredicts half the time). */
TM_HOT static void add_kept(double *restrict acc, const double *restrict d, double c, size_t count, uint64_t key,
                            uint64_t begin, uint64_t threshold) {
    for (size_t e = 0; e < count; e++) acc[e] += tm_random_keep(key, begin + e, threshold) ? c * d[e] : 0.0;
}

static void reduce(const tm_method_tensor *t, double *state, unsigned pass, uint64_t begin, size_t count,
                   double *scratch) {
    (void)pass;
    const size_t n = t->n;
    if (tm_tensor_param1(t, P_RESCALE) != RESCALE_L1) return;
    double *d = scratch, *k = scratch + count;
    for (size_t j = 0; j < n; j++) {
        deltas(t, j, begin, count, d, k);
        const uint64_t threshold = tm_random_threshold(tm_tensor_param(t, P_DENSITY, t->input[j]));
        const uint64_t key = key_of(t, j);
        double all, kept;
        l1_norms(d, count, key, begin, threshold, &all, &kept);
        state[n + j] += all;
        state[2 * n + j] += kept;
    }
}

static void apply(const tm_method_tensor *t, const double *state, uint64_t begin, size_t count, void *out,
                  double *scratch) {
    const size_t n = t->n;
    const int rescale = (int)tm_tensor_param1(t, P_RESCALE);
    double *acc = scratch, *d = scratch + count, *k = scratch + 2 * count;
    for (size_t e = 0; e < count; e++) acc[e] = 0;
    for (size_t j = 0; j < n; j++) {
        const double density = tm_tensor_param(t, P_DENSITY, t->input[j]);
        double scale = 1;
        if (rescale == RESCALE_INVERSE) scale = 1 / density;
        if (rescale == RESCALE_L1) scale = state[2 * n + j] > 0 ? state[n + j] / state[2 * n + j] : 0;
        const double c = state[j] * scale;
        const uint64_t key = key_of(t, j), threshold = tm_random_threshold(density);
        deltas(t, j, begin, count, d, k);
        add_kept(acc, d, c, count, key, begin, threshold);
    }
    tm_kernel_load_f64(t->base, begin, count, d, k); /* the base, in float64 */
    for (size_t e = 0; e < count; e++) acc[e] += d[e];
    tm_view sum = {(const uint8_t *)acc, TM_FLOAT64, 1, (const int64_t[]){(int64_t)count}, (const int64_t[]){1}, 0};
    tm_kernel_copy(&sum, 0, count, t->out_dtype, out); /* rounded once */
}

const tm_method tm_method_dare_linear = {
    .name = "dare_linear",
    .fusionbench_class = "DareTaskArithmetic",
    .summary = "θ = b + λ Σ wᵢ rescale(mask(θᵢ − b)): task arithmetic on randomly dropped task vectors",
    .params = params,
    .n_params = sizeof params / sizeof *params,
    .needs_base = 1,
    .min_inputs = 1,
    .state_per_input = 3,
    .check = check,
    .prepare = prepare,
    .reduce = reduce,
    .apply = apply,
};
