/* The per-input weights most methods share: each input's weight on the tensor, divided by their
 * sum over the inputs that hold it when normalize is on, and the merge-wide check that such a
 * sum is not 0. One implementation for the averages, task arithmetic and DARE. C11. */
#ifndef TM_MERGE_METHODS_WEIGHTS_H
#define TM_MERGE_METHODS_WEIGHTS_H

#include <math.h>

#include "merge/method.h"

/* The parameters of the methods on task vectors, declared once: per-input weights on the task
 * vectors (default 1 each), the scale λ (FusionBench's scaling_factor), normalize (default off,
 * as mergekit). */
#define TM_DECL_TASK_WEIGHTS                                                                        \
    {.name = "weights", .aliases = {"weight"}, .kind = TM_PARAM_NUMBER, .per_input = 1,             \
     .exactly_per_input = 1, .default_value = "1", .min = -INFINITY, .max = INFINITY,              \
     .help = "one weight per input, on its task vector (input - base)"}
#define TM_DECL_LAMBDA                                                                              \
    {.name = "lambda", .aliases = {"scaling_factor"}, .kind = TM_PARAM_NUMBER, .default_value = "1",  \
     .min = -INFINITY, .max = INFINITY, .help = "the scale of the summed task vectors"}
#define TM_DECL_NORMALIZE(dflt)                                                                     \
    {.name = "normalize", .kind = TM_PARAM_BOOL, .default_value = dflt,                             \
     .help = "divide the weights by their sum (over the inputs that hold each tensor)"}

/* out[j] = the weight of t's j-th holder (weights: indexed by input; NULL: 1 each), divided by
 * their sum when normalize. A zero sum to divide by is an error naming the tensor. */
tm_status tm_method_weights(const tm_method_tensor *t, const double *weights, int normalize, double *out,
                            tm_error *err);

/* Merge-wide: with normalize (parameter p_normalize) the weights (p_weights) must not sum to 0. */
tm_status tm_method_check_weights(const tm_param_values *p, size_t p_weights, size_t p_normalize, tm_error *err);

#endif
