#include "merge/dequantize.h"

#include <string.h>

/* One stored integer of a quantized dtype. */
static double load_q(const uint8_t *p, tm_dtype d) {
    switch (d) {
    case TM_QINT8: return (int8_t)*p;
    case TM_QUINT8: return *p;
    case TM_QINT32: { int32_t v; memcpy(&v, p, 4); return v; }
    default: return 0;
    }
}

void tm_dequantize(const tm_tensor_info *t, double *out) {
    size_t item = tm_dtype_size(t->dtype);
    const uint8_t *base = t->storage_data;
    int per_channel = t->qscheme != TM_QSCHEME_PER_TENSOR_AFFINE;
    int64_t idx[TM_MAX_NDIM] = {0};
    int64_t pos = t->storage_offset;
    for (uint64_t j = 0; j < t->numel; j++) {
        double scale = t->q_scale, zero = (double)t->q_zero_point;
        if (per_channel) {
            scale = t->q_scales[idx[t->q_axis]];
            zero = t->q_zero_points[idx[t->q_axis]];
        }
        out[j] = scale * (load_q(base + (uint64_t)pos * item, t->dtype) - zero);
        for (int d = t->ndim - 1; d >= 0; d--) { /* next element in row-major order */
            pos += t->stride[d];
            if (++idx[d] < t->shape[d]) break;
            pos -= t->stride[d] * t->shape[d];
            idx[d] = 0;
        }
    }
}
