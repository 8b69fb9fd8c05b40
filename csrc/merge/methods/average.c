/* The averaging family: simple_average (FusionBench's SimpleAverageAlgorithm, model soups) and
 * weighted_average (FusionBench's WeightedAverageAlgorithm, mergekit's linear). θ = Σ wᵢθᵢ with
 * the weights of the inputs that hold the tensor, divided by their sum unless normalize is off;
 * accumulated in float64 by the fused kernel and rounded once. Two table entries, one algorithm
 * (as mergekit groups a family in one file). C11. */
#include "merge/methods/methods.h"
#include "merge/methods/weights.h"

#include <math.h>

enum { P_WEIGHTS, P_NORMALIZE };

static const tm_param_decl weighted_params[] = {
    [P_WEIGHTS] = {.name = "weights", .aliases = {"weight"}, .kind = TM_PARAM_NUMBER, .per_input = 1, .exactly_per_input = 1,
                   .required = 1,
                   .min = -INFINITY, .max = INFINITY,
                   .help = "one weight per input"},
    [P_NORMALIZE] = TM_DECL_NORMALIZE("true"),
};

/* simple_average takes normalize too, fixed at true: FusionBench configs may write it. */
static const tm_param_decl simple_params[] = {
    {.name = "normalize", .kind = TM_PARAM_BOOL, .default_value = "true",
     .help = "always true: the average divides by the number of inputs (accepted as configs write it)"},
};

/* state: the n coefficients of the inputs holding the tensor. */
static tm_status prepare_simple(const tm_method_tensor *t, double *state, tm_error *err) {
    return tm_method_weights(t, NULL, 1, state, err);
}

static tm_status prepare_weighted(const tm_method_tensor *t, double *state, tm_error *err) {
    return tm_method_weights(t, t->params + t->param_at[P_WEIGHTS], tm_tensor_param1(t, P_NORMALIZE) != 0, state,
                             err);
}

static tm_status check_weighted(const tm_param_values *p, tm_error *err) {
    return tm_method_check_weights(p, P_WEIGHTS, P_NORMALIZE, err);
}

static tm_status check_simple(const tm_param_values *p, tm_error *err) {
    if (!p->values[p->at[0]])
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "simple_average always divides by the number of models; normalize: false needs "
                            "weighted_average");
    return TM_OK;
}

static void apply(const tm_method_tensor *t, const double *state, uint64_t begin, size_t count, void *out,
                  double *scratch) {
    tm_kernel_weighted_sum(t->in, state, t->n, begin, count, t->out_dtype, out, scratch);
}

const tm_method tm_method_simple_average = {
    .name = "simple_average",
    .fusionbench_class = "SimpleAverageAlgorithm",
    .summary = "θ = (1/n) Σ θᵢ: the uniform average (a model soup)",
    .params = simple_params,
    .n_params = sizeof simple_params / sizeof *simple_params,
    .min_inputs = 1,
    .state_per_input = 1,
    .check = check_simple,
    .prepare = prepare_simple,
    .apply = apply,
};

const tm_method tm_method_weighted_average = {
    .name = "weighted_average",
    .aliases = {"linear"},
    .fusionbench_class = "WeightedAverageAlgorithm",
    .summary = "θ = Σ wᵢθᵢ / Σ wᵢ (or Σ wᵢθᵢ without normalize)",
    .params = weighted_params,
    .n_params = sizeof weighted_params / sizeof *weighted_params,
    .min_inputs = 1,
    .state_per_input = 1,
    .check = check_weighted,
    .prepare = prepare_weighted,
    .apply = apply,
};
