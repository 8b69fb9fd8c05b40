/* task_arithmetic (Ilharco et al. 2023; FusionBench's TaskArithmeticAlgorithm, mergekit's
 * task_arithmetic): θ = b + λ Σ wᵢ (θᵢ − b), the task vectors θᵢ − b of the inputs that hold the
 * tensor, with Σ wᵢ divided out when normalize is on (off by default, as in mergekit).
 * FusionBench's scaling_factor is λ with every wᵢ = 1. Computed by the fused kernel as one
 * weighted sum over the inputs and the base, (1 − λ Σ wᵢ) b + Σ λ wᵢ θᵢ, in float64 and rounded
 * once: the same value to within float64 rounding, and as fast as an average. C11. */
#include "merge/method_xr.h"
#include "merge/methods/methods.h"
#include "merge/methods/weights.h"

#include <math.h>

enum { P_WEIGHTS, P_LAMBDA, P_NORMALIZE };

static const tm_param_decl params[] = {
    [P_WEIGHTS] = TM_DECL_TASK_WEIGHTS,
    [P_LAMBDA] = TM_DECL_LAMBDA,
    [P_NORMALIZE] = TM_DECL_NORMALIZE("false"),
};

/* state: λ·wᵢ (normalised) for the n inputs holding the tensor, then the base's 1 − Σ of them. */
static tm_status prepare(const tm_method_tensor *t, double *state, tm_error *err) {
    const double lambda = tm_tensor_param1(t, P_LAMBDA);
    tm_status st = tm_method_weights(t, t->params + t->param_at[P_WEIGHTS], tm_tensor_param1(t, P_NORMALIZE) != 0,
                                     state, err);
    if (st) return st;
    double coeff_sum = 0;
    for (size_t j = 0; j < t->n; j++) coeff_sum += state[j] *= lambda;
    state[t->n] = 1.0 - coeff_sum;
    return TM_OK;
}

static tm_status check(const tm_param_values *p, tm_error *err) {
    return tm_method_check_weights(p, P_WEIGHTS, P_NORMALIZE, err);
}

static void apply(const tm_method_tensor *t, const double *state, uint64_t begin, size_t count, void *out,
                  double *scratch) {
    tm_kernel_weighted_sum(t->in, state, t->n + 1, begin, count, t->out_dtype, out, scratch); /* in[n] is the base */
}

/* Across hosts (method_xr.h): prepare over every rank's inputs (so the weights are normalised
 * by their global sum and the base's coefficient is 1 − Σ over all of them), this rank's share;
 * each block's Σ λwᵢθᵢ chained in the global order, the base's term added last at the writer
 * and rounded once: the single host's sum, bit for bit. */
static tm_status xr_prepare(const tm_method_tensor *t, double *state, const tm_xr *x, tm_error *err) {
    (void)x;
    const size_t n_all = t->n_inputs;
    size_t all[n_all + 1];
    double coef[n_all + 1];
    tm_method_tensor every;
    tm_xr_every_input(t, &every, all);
    tm_status st = prepare(&every, coef, err);
    for (size_t j = 0; j < t->n && !st; j++) state[j] = coef[t->input[j]];
    state[t->n] = coef[n_all];
    return st;
}

static tm_status xr_apply(const tm_method_tensor *t, const double *state, const tm_xr *x, uint64_t begin,
                          size_t count, void *out, double *scratch, tm_error *err) {
    const int complex = t->out_dtype == TM_COMPLEX64 || t->out_dtype == TM_COMPLEX128;
    const size_t doubles = (complex ? 2 : 1) * count;
    double *prev = tm_method_memory_reserve(x->memory, 2 * doubles * sizeof *prev), *sums = prev + doubles;
    if (!prev) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    int first, has_total;
    tm_status st = tm_xr_receive(x, prev, doubles, &first, err);
    if (st) return st;
    tm_xr_weighted_add(t->in, state, t->n, begin, count, first ? NULL : prev, complex ? TM_COMPLEX128 : TM_FLOAT64,
                       sums, scratch);
    st = tm_xr_deliver(x, sums, doubles, TM_XR_OUTPUT, &has_total, err);
    if (!st && has_total) tm_xr_weighted_finish(sums, t->base, state[t->n], begin, count, t->out_dtype, out, scratch);
    return st;
}

static const tm_method_xr cross_rank = {.prepare = xr_prepare, .apply = xr_apply};

const tm_method tm_method_task_arithmetic = {
    .name = "task_arithmetic",
    .fusionbench_class = "TaskArithmeticAlgorithm",
    .summary = "θ = b + λ Σ wᵢ (θᵢ − b): the base plus the scaled sum of the task vectors",
    .params = params,
    .n_params = sizeof params / sizeof *params,
    .needs_base = 1,
    .min_inputs = 1,
    .state_fixed = 1,
    .state_per_input = 1,
    .check = check,
    .prepare = prepare,
    .apply = apply,
    .cross_rank = &cross_rank,
};
