/* The merge arithmetic: one fused pass per block of elements. Each input is read once
 * (through its strides, straight from the mapped file), accumulated as Σ wᵢxᵢ in float64 (or
 * complex128), and rounded once to the output dtype. No LibTorch: this is what lets the CLI
 * merge without loading it. C11. */
#ifndef TM_MERGE_KERNEL_H
#define TM_MERGE_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#include "torchmerge.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A strided view over read-only bytes, as tm_tensor_info describes it. */
typedef struct tm_view {
    const uint8_t *base; /* storage start */
    tm_dtype dtype;
    int32_t ndim;
    const int64_t *shape, *stride; /* elements */
    int64_t offset;                /* elements */
} tm_view;

/* Elements [begin, begin+count) in row-major order of the view's shape. */

/* out[j] = round_to(out_dtype, Σᵢ w[i] · in[i][begin + j]) for floating dtypes (complex
 * inputs need a complex out_dtype). scratch holds count doubles (2·count for complex). */
void tm_kernel_weighted_sum(const tm_view *in, const double *w, size_t n, uint64_t begin,
                            size_t count, tm_dtype out_dtype, void *out, double *scratch);

/* Elements [begin, begin+count) of v widened to float64 into out, through the weighted sum's
 * typed loops (scratch: count doubles). For methods that work on the values themselves. */
void tm_kernel_load_f64(const tm_view *v, uint64_t begin, size_t count, double *out, double *scratch);

/* out[j] = v[begin + j] − sub[j] in float64 (a task vector δ = x − b, b already widened), fused
 * into one pass where the typed loops can read v (scratch: count doubles). */
void tm_kernel_delta_f64(const tm_view *v, uint64_t begin, size_t count, const double *sub, double *out,
                         double *scratch);

/* Where elements [begin, …) of v start as a plain float32 array (contiguous, aligned), or NULL:
 * for a method's loops fused over float32 inputs, the common case. */
const float *tm_kernel_f32_at(const tm_view *v, uint64_t begin);

/* out = acc[0, count) rounded once to out_dtype (a method's float64 result into the output). */
void tm_kernel_store_f64(const double *acc, size_t count, tm_dtype out_dtype, void *out);

/* Copies elements [begin, begin+count) of v into out as out_dtype (a plain cast for integer and
 * bool tensors; same dtype is a byte copy). */
void tm_kernel_copy(const tm_view *v, uint64_t begin, size_t count, tm_dtype out_dtype, void *out);

/* 1 if elements [begin, begin+count) of a and b are equal bit for bit (same dtype). */
int tm_kernel_equal(const tm_view *a, const tm_view *b, uint64_t begin, size_t count);

#ifdef __cplusplus
}
#endif
#endif
