/* slerp (mergekit's slerp; Shoemake's spherical interpolation): two models, v0 = the base and
 * v1 = the one input, t ∈ [0, 1]. The normalised tensors' dot product d = v0·v1 / (‖v0‖‖v1‖)
 * (a norm at most 1e-8 counts as 1, as mergekit's normalize leaves such a tensor alone);
 * when |d| > 0.9995 the tensors are nearly parallel and slerp is the lerp (1 − t)·v0 + t·v1,
 * else with θ = acos(d): sin((1 − t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1, of the unnormalised
 * tensors. The reduce pass sums ‖v0‖², ‖v1‖² and v0·v1 over the tensor in float64 (mergekit:
 * in the tensors' dtype); the interpolation is one fused weighted sum, rounded once. C11. */
#include "merge/methods/methods.h"

#include <math.h>

enum { P_T };

static const tm_param_decl params[] = {
    [P_T] = {.name = "t", .kind = TM_PARAM_NUMBER, .required = 1, .min = 0, .max = 1,
             .help = "where between the base (0) and the input (1)"},
};

/* state: ‖v0‖², ‖v1‖², v0·v1 */
enum { S_NN0, S_NN1, S_DOT };

static tm_status prepare(const tm_method_tensor *t, double *state, tm_error *err) {
    if (t->in[0].dtype == TM_COMPLEX64 || t->in[0].dtype == TM_COMPLEX128)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED, "tensor '%s': slerp does not merge complex tensors", t->name);
    state[S_NN0] = state[S_NN1] = state[S_DOT] = 0;
    return TM_OK;
}

static void reduce(const tm_method_tensor *t, double *state, unsigned pass, uint64_t begin, size_t count,
                   double *scratch) {
    (void)pass;
    double *v0 = scratch, *v1 = scratch + count, *k = scratch + 2 * count;
    tm_kernel_load_f64(t->base, begin, count, v0, k);
    tm_kernel_load_f64(&t->in[0], begin, count, v1, k);
    double nn0 = 0, nn1 = 0, dot = 0;
    for (size_t e = 0; e < count; e++) {
        nn0 += v0[e] * v0[e];
        nn1 += v1[e] * v1[e];
        dot += v0[e] * v1[e];
    }
    state[S_NN0] += nn0;
    state[S_NN1] += nn1;
    state[S_DOT] += dot;
}

static void apply(const tm_method_tensor *t, const double *state, uint64_t begin, size_t count, void *out,
                  double *scratch) {
    const double tt = tm_tensor_param1(t, P_T);
    double n0 = sqrt(state[S_NN0]), n1 = sqrt(state[S_NN1]);
    double d = state[S_DOT] / ((n0 > 1e-8 ? n0 : 1) * (n1 > 1e-8 ? n1 : 1));
    double w[2]; /* on the input (in[0]) and the base (in[1]) */
    if (fabs(d) > 0.9995) {
        w[0] = tt;
        w[1] = 1 - tt;
    } else {
        double theta = acos(d), s = sin(theta);
        w[0] = sin(tt * theta) / s;
        w[1] = sin((1 - tt) * theta) / s;
    }
    tm_kernel_weighted_sum(t->in, w, 2, begin, count, t->out_dtype, out, scratch); /* in[1] is the base */
}

const tm_method tm_method_slerp = {
    .name = "slerp",
    .summary = "spherical interpolation from the base (t = 0) to the one input (t = 1)",
    .params = params,
    .n_params = sizeof params / sizeof *params,
    .needs_base = 1,
    .min_inputs = 1,
    .max_inputs = 1,
    .state_fixed = 3,
    .prepare = prepare,
    .reduce = reduce,
    .apply = apply,
};
