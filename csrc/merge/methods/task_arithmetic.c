/* task_arithmetic (Ilharco et al. 2023; FusionBench's TaskArithmeticAlgorithm, mergekit's
 * task_arithmetic): θ = b + λ Σ wᵢ (θᵢ − b), the task vectors θᵢ − b of the inputs that hold the
 * tensor, with Σ wᵢ divided out when normalize is on (off by default, as in mergekit).
 * FusionBench's scaling_factor is λ with every wᵢ = 1. Computed by the fused kernel as one
 * weighted sum over the inputs and the base, (1 − λ Σ wᵢ) b + Σ λ wᵢ θᵢ, in float64 and rounded
 * once: the same value to within float64 rounding, and as fast as an average. C11. */
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
};
