/* Model Breadcrumbs (Davari & Belilovsky 2023; mergekit's breadcrumbs / breadcrumbs_ties, whose
 * sparsification is magnitude_outliers): per input and tensor, in the order of |δ| (equal
 * magnitudes: the lower flat index first), drop the ⌊gamma·numel⌋ largest as outliers and keep
 * the next ⌊density·numel⌋ (the smallest are dropped); then task arithmetic (breadcrumbs) or
 * TIES' consensus (breadcrumbs_ties). mergekit slices the sorted indices [n_bot:-n_top], which
 * is empty when ⌊gamma·numel⌋ = 0, dropping the whole tensor; here that case keeps the
 * ⌊density·numel⌋ largest. Two exact selections per input (topk.h), in sparse.c. C11. */
#include "merge/methods/methods.h"
#include "merge/methods/sparse.h"
#include "merge/methods/weights.h"

#include <math.h>

enum { P_WEIGHTS, P_LAMBDA, P_DENSITY, P_GAMMA, P_RESCALE, P_NORMALIZE, P_SIGN };

#define CRUMB_PARAMS                                                                                \
    [P_WEIGHTS] = TM_DECL_TASK_WEIGHTS, [P_LAMBDA] = TM_DECL_LAMBDA,                                \
    [P_DENSITY] = TM_DECL_DENSITY(1, NULL, "the fraction of each task vector kept, after the outliers"), \
    [P_GAMMA] = TM_DECL_GAMMA, [P_RESCALE] = TM_DECL_RESCALE("none")

static const tm_param_decl linear_params[] = {CRUMB_PARAMS, [P_NORMALIZE] = TM_DECL_NORMALIZE("false")};
static const tm_param_decl ties_params[] = {
    CRUMB_PARAMS,
    [P_NORMALIZE] = {.name = "normalize", .kind = TM_PARAM_BOOL, .default_value = "false",
                     .help = "divide each element by the sum of the weights of the inputs whose sign agrees"},
    [P_SIGN] = TM_DECL_MAJORITY_SIGN,
};

static const tm_sparse_method linear = {
    .name = "breadcrumbs", .sparsify = TM_SPARSIFY_OUTLIERS, .consensus = TM_CONSENSUS_LINEAR,
    .p_weights = P_WEIGHTS, .p_lambda = P_LAMBDA, .p_density = P_DENSITY, .p_normalize = P_NORMALIZE,
    .p_rescale = P_RESCALE, .p_seed = -1, .p_gamma = P_GAMMA, .p_sign = -1, .p_merge_func = -1,
};
static const tm_sparse_method ties = {
    .name = "breadcrumbs_ties", .sparsify = TM_SPARSIFY_OUTLIERS, .consensus = TM_CONSENSUS_TIES,
    .p_weights = P_WEIGHTS, .p_lambda = P_LAMBDA, .p_density = P_DENSITY, .p_normalize = P_NORMALIZE,
    .p_rescale = P_RESCALE, .p_seed = -1, .p_gamma = P_GAMMA, .p_sign = P_SIGN, .p_merge_func = -1,
};

SPARSE_ENTRY_CALLBACKS(linear, linear)
SPARSE_ENTRY_CALLBACKS(ties, ties)

const tm_method tm_method_breadcrumbs = {
    .name = "breadcrumbs",
    .summary = "θ = b + λ Σ wᵢ δᵢ' with δᵢ' = θᵢ − b without its gamma largest and its smallest (Breadcrumbs)",
    .params = linear_params,
    .n_params = sizeof linear_params / sizeof *linear_params,
    TM_SPARSE_METHOD_FIELDS(linear, linear, linear),
};

const tm_method tm_method_breadcrumbs_ties = {
    .name = "breadcrumbs_ties",
    .summary = "θ = b + λ · TIES consensus of the Breadcrumbs-sparsified wᵢδᵢ'",
    .params = ties_params,
    .n_params = sizeof ties_params / sizeof *ties_params,
    TM_SPARSE_METHOD_FIELDS(ties, ties, ties),
};
