/* FusionBench's TIES trim over the whole model (ties with trim_scope: global): per input i, over
 * the d elements of all its floating tensors, keep every |δ| ≥ the (d − ⌊d·densityᵢ⌋)-th
 * smallest |δ| (so ⌊d·densityᵢ⌋ + 1 of them, plus ties; density 1 keeps all), then elect signs
 * per element as usual, and where an element's score is exactly 0 take the majority of all the
 * model's elected signs, sign(Σ sign(S)), itself possibly 0 (then the negative entries agree).
 * Streaming, by the engine's model-wide passes, the model never in memory:
 *   HIST     per input a histogram of the next 16 bits of the |δ| keys under the known prefix
 *            (summed over threads: counts), and the element count d;
 *   COLLECT  when the threshold's bin holds at most 2²² keys: its values (tm_method_collect),
 *            then an exact selection;
 *   SIGN     Σ sign(S) over the model.
 * The thresholds and the zero sign are then t->model for every tensor's apply. C11. */
#ifndef TM_MERGE_METHODS_TIES_GLOBAL_H
#define TM_MERGE_METHODS_TIES_GLOBAL_H

#include "merge/method.h"
#include "merge/methods/sparse.h"

/* Model state doubles: fixed, and per input. */
#define TM_TIES_GLOBAL_FIXED 4
#define TM_TIES_GLOBAL_PER_INPUT (8 + 65536)

/* 1 when the tensor is merged with the model-wide trim (t->model set). */
static inline int tm_ties_global(const tm_method_tensor *t) { return t->model != NULL; }

/* The smallest kept key of input `input` (global mode). */
uint64_t tm_ties_global_min_key(const tm_method_tensor *t, size_t input);

/* The sign elected where a score is 0: +1 per tensor (mergekit), the model's majority globally. */
double tm_ties_global_zero_sign(const tm_method_tensor *t);

void tm_ties_global_reduce(const tm_sparse_method *s, const tm_method_tensor *t, const double *state, uint64_t begin,
                           size_t count, double *sum, double *scratch);
tm_status tm_ties_global_end(const tm_sparse_method *s, const tm_param_values *p, double *model, const double *sum,
                             const tm_model_lists *lists, int *again, tm_error *err);

#endif
