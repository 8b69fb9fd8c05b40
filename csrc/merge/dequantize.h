/* Quantized tensors merged on request (tm_merge_options.dequantize): each input's integers are
 * turned into the real values they stand for, in float64, before the method sees them, so every
 * method merges them as it merges a float64 tensor. C11. */
#ifndef TM_MERGE_DEQUANTIZE_H
#define TM_MERGE_DEQUANTIZE_H

#include "torchmerge.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[j] = scale·(q[j] − zero_point) for the elements of t in row-major order (per channel: the
 * scale and zero point of the element's index along t->q_axis). float64 throughout: q − zero_point
 * is exact, the product rounds once. out holds t->numel doubles. */
void tm_dequantize(const tm_tensor_info *t, double *out);

#ifdef __cplusplus
}
#endif
#endif
