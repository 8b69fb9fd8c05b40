/* ties (Yadav et al. 2023, "TIES-Merging"; mergekit's ties, FusionBench's TiesMergingAlgorithm):
 * per input keep the density fraction of δᵢ = θᵢ − b with the largest |δ| (exactly
 * k = ⌊density·numel⌋ per tensor, equal magnitudes: the lower flat index first; k = 0 keeps
 * nothing, so the tensor is the base's), elect a sign per element (majority_sign: the sum of the
 * weighted kept values, or the count of their signs; 0 elects +), merge the agreeing ones
 * (merge_func mean: ÷ Σ agreeing wᵢ, as normalize; sum; max), × λ, + b.
 * trim_scope: global is FusionBench's ties_merging exactly: the trim over each input's whole
 * model, keeping every |δ| at or above its (d − ⌊d·density⌋)-th smallest, and elements whose
 * score is 0 take the model's majority sign (ties_global.c: model-wide passes). C11. */
#include "merge/methods/methods.h"
#include "merge/methods/sparse.h"
#include "merge/methods/ties_global.h"
#include "merge/methods/weights.h"

#include <math.h>

enum { P_WEIGHTS, P_LAMBDA, P_DENSITY, P_SIGN, P_NORMALIZE, P_MERGE_FUNC, P_TRIM_SCOPE, P_RESCALE };
enum { SCOPE_TENSOR, SCOPE_GLOBAL };

static const tm_param_decl params[] = {
    [P_WEIGHTS] = TM_DECL_TASK_WEIGHTS,
    [P_LAMBDA] = TM_DECL_LAMBDA,
    [P_DENSITY] = TM_DECL_DENSITY(0, "1", "the fraction of each task vector kept, by magnitude"),
    [P_SIGN] = TM_DECL_MAJORITY_SIGN,
    [P_NORMALIZE] = {.name = "normalize", .kind = TM_PARAM_BOOL, .default_value = "true",
                     .help = "divide each element by the sum of the weights of the inputs whose sign agrees "
                             "(false: merge_func sum)"},
    [P_MERGE_FUNC] = {.name = "merge_func", .kind = TM_PARAM_CHOICE, .choices = "mean|sum|max", .default_value = "mean",
                      .fusionbench_default = "sum",
                      .help = "how the agreeing values merge: their weighted mean, sum, or largest magnitude"},
    [P_TRIM_SCOPE] = {.name = "trim_scope", .kind = TM_PARAM_CHOICE, .choices = "tensor|global",
                      .default_value = "tensor", .fusionbench_default = "global",
                      .help = "trim each tensor (mergekit) or each input's whole model (FusionBench's ties_merging)"},
    [P_RESCALE] = TM_DECL_RESCALE("none"),
};

static const tm_sparse_method desc = {
    .name = "ties", .sparsify = TM_SPARSIFY_MAGNITUDE, .consensus = TM_CONSENSUS_TIES,
    .p_weights = P_WEIGHTS, .p_lambda = P_LAMBDA, .p_density = P_DENSITY, .p_normalize = P_NORMALIZE,
    .p_rescale = P_RESCALE, .p_seed = -1, .p_gamma = -1, .p_sign = P_SIGN, .p_merge_func = P_MERGE_FUNC,
};

SPARSE_ENTRY_CALLBACKS(ties, desc)

static double value(const tm_param_values *p, int j) { return p->values[p->at[j]]; }

static tm_status check(const tm_param_values *p, tm_error *err) {
    static const char *const funcs[] = {"mean", "sum", "max"};
    const int func = (int)value(p, P_MERGE_FUNC), normalize = value(p, P_NORMALIZE) != 0;
    if (p->given[P_MERGE_FUNC] && p->given[P_NORMALIZE] && (func == 2 || (func == 0) != normalize))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "merge_func: %s contradicts normalize: %s (normalize true is mean, false is sum)",
                            funcs[func], normalize ? "true" : "false");
    if (value(p, P_TRIM_SCOPE) == SCOPE_GLOBAL && value(p, P_RESCALE) == TM_RESCALE_L1)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "rescale: l1 keeps each tensor's norm, not available with trim_scope: global");
    return ties_check(p, err);
}

static int wants_model_passes(const tm_param_values *p) { return value(p, P_TRIM_SCOPE) == SCOPE_GLOBAL; }

static void model_reduce(const tm_method_tensor *t, const double *state, unsigned pass, uint64_t begin, size_t count,
                         double *sum, double *scratch) {
    (void)pass;
    tm_ties_global_reduce(&desc, t, state, begin, count, sum, scratch);
}

static tm_status model_end(const tm_param_values *p, double *model, const double *sum, const tm_model_lists *lists,
                           unsigned pass, int *again, tm_error *err) {
    (void)pass;
    return tm_ties_global_end(&desc, p, model, sum, lists, again, err);
}

const tm_method tm_method_ties = {
    .name = "ties",
    .aliases = {"ties_merging"},
    .fusionbench_class = "TiesMergingAlgorithm",
    .summary = "θ = b + λ · disjoint merge of the sign-agreeing top-density |θᵢ − b| (TIES)",
    .params = params,
    .n_params = sizeof params / sizeof *params,
    .needs_base = 1,
    .min_inputs = 1,
    .has_masks = 1,
    .state_fixed = TM_SPARSE_STATE_FIXED,
    .state_per_input = TM_SPARSE_STATE_PER_INPUT,
    .check = check,
    .prepare = ties_prepare,
    .reduce = ties_reduce,
    .reduce_end = ties_reduce_end,
    .apply = ties_apply,
    .cross_rank = &ties_xr,
    .model_state = TM_TIES_GLOBAL_FIXED,
    .model_state_per_input = TM_TIES_GLOBAL_PER_INPUT,
    .wants_model_passes = wants_model_passes,
    .model_reduce = model_reduce,
    .model_end = model_end,
};
