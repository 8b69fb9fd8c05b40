#include "merge/methods/weights.h"

#include <math.h>

tm_status tm_method_weights(const tm_method_tensor *t, const double *weights, int normalize, double *out,
                            tm_error *err) {
    double sum = 0;
    for (size_t j = 0; j < t->n; j++) sum += out[j] = weights ? weights[t->input[j]] : 1.0;
    if (!normalize) return TM_OK;
    if (sum == 0 || !isfinite(sum))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "tensor '%s': its weights sum to 0 and cannot be normalised",
                            t->name);
    for (size_t j = 0; j < t->n; j++) out[j] /= sum;
    return TM_OK;
}

/* Per tensor, rules may change the weights: the same check runs again for each tensor. */
tm_status tm_method_check_weights(const tm_param_values *p, size_t p_weights, size_t p_normalize, tm_error *err) {
    if (!p->values[p->at[p_normalize]]) return TM_OK;
    double sum = 0;
    for (size_t i = 0; i < p->count[p_weights]; i++) sum += p->values[p->at[p_weights] + i];
    if (sum == 0 || !isfinite(sum))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "the weights sum to 0 and cannot be normalised (set normalize to false: --no-normalize, "
                            "normalize: false)");
    return TM_OK;
}
