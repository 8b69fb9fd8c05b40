/* DARE (Yu et al. 2024, "Language Models are Super Mario"): task vectors δᵢ = θᵢ − b of which
 * each element is kept with probability density (dropped to 0 otherwise), the kept ones
 * rescaled: l1 so that ‖kept δᵢ‖₁ = ‖δᵢ‖₁ over the tensor (mergekit's default today), inverse by
 * 1 / density (the paper's and FusionBench's), or none; then
 *   dare_linear (mergekit's dare_linear, FusionBench's DareTaskArithmetic): task arithmetic,
 *     θ = b + λ Σ wᵢ δᵢ' (Σ wᵢ divided out with normalize);
 *   dare_ties (mergekit's dare_ties): TIES' sign election and disjoint merge of wᵢδᵢ' without a
 *     magnitude trim (consensus.h), θ = b + λ · that.
 * The mask is the documented function of (seed, input, tensor name, element index) in
 * merge/random.h, so outputs do not depend on threads or machines. Both are entries of the
 * generalized task arithmetic in sparse.c. C11. */
#include "merge/methods/methods.h"
#include "merge/methods/sparse.h"
#include "merge/methods/weights.h"

#include <math.h>

enum { P_WEIGHTS, P_LAMBDA, P_DENSITY, P_RESCALE, P_SEED, P_NORMALIZE, P_SIGN };

#define DARE_PARAMS                                                                                 \
    [P_WEIGHTS] = TM_DECL_TASK_WEIGHTS, [P_LAMBDA] = TM_DECL_LAMBDA,                                \
    [P_DENSITY] = TM_DECL_DENSITY(1, NULL, "the probability of keeping each element of a task vector"), \
    [P_RESCALE] = TM_DECL_DARE_RESCALE, [P_SEED] = TM_DECL_SEED

static const tm_param_decl linear_params[] = {DARE_PARAMS, [P_NORMALIZE] = TM_DECL_NORMALIZE("false")};
static const tm_param_decl ties_params[] = {
    DARE_PARAMS,
    [P_NORMALIZE] = {.name = "normalize", .kind = TM_PARAM_BOOL, .default_value = "false",
                     .help = "divide each element by the sum of the weights of the inputs whose sign agrees"},
    [P_SIGN] = TM_DECL_MAJORITY_SIGN,
};

static const tm_sparse_method linear = {
    .name = "dare_linear", .sparsify = TM_SPARSIFY_RANDOM, .consensus = TM_CONSENSUS_LINEAR,
    .p_weights = P_WEIGHTS, .p_lambda = P_LAMBDA, .p_density = P_DENSITY, .p_normalize = P_NORMALIZE,
    .p_rescale = P_RESCALE, .p_seed = P_SEED, .p_gamma = -1, .p_sign = -1, .p_merge_func = -1,
};
static const tm_sparse_method ties = {
    .name = "dare_ties", .sparsify = TM_SPARSIFY_RANDOM, .consensus = TM_CONSENSUS_TIES,
    .p_weights = P_WEIGHTS, .p_lambda = P_LAMBDA, .p_density = P_DENSITY, .p_normalize = P_NORMALIZE,
    .p_rescale = P_RESCALE, .p_seed = P_SEED, .p_gamma = -1, .p_sign = P_SIGN, .p_merge_func = -1,
};

SPARSE_ENTRY_CALLBACKS(linear, linear)
SPARSE_ENTRY_CALLBACKS(ties, ties)

const tm_method tm_method_dare_linear = {
    .name = "dare_linear",
    .fusionbench_class = "DareTaskArithmetic",
    .summary = "θ = b + λ Σ wᵢ rescale(mask(θᵢ − b)): task arithmetic on randomly dropped task vectors",
    .params = linear_params,
    .n_params = sizeof linear_params / sizeof *linear_params,
    TM_SPARSE_METHOD_FIELDS(linear, linear, linear),
};

const tm_method tm_method_dare_ties = {
    .name = "dare_ties",
    .summary = "θ = b + λ · TIES consensus of wᵢ rescale(mask(θᵢ − b)): sign election on randomly dropped task vectors",
    .params = ties_params,
    .n_params = sizeof ties_params / sizeof *ties_params,
    TM_SPARSE_METHOD_FIELDS(ties, ties, ties),
};
