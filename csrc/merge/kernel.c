#include "merge/kernel.h"

#include "merge/float16.h"
#include "merge/hot.h"

#include <stdint.h>
#include <string.h>

/* ---- Element access --------------------------------------------------------------------- */

static int is_complex(tm_dtype d) { return d == TM_COMPLEX64 || d == TM_COMPLEX128; }

static double load_real(const uint8_t *p, tm_dtype d) {
    switch (d) {
    case TM_FLOAT64: { double v; memcpy(&v, p, 8); return v; }
    case TM_FLOAT32: { float v; memcpy(&v, p, 4); return v; }
    case TM_FLOAT16: { uint16_t v; memcpy(&v, p, 2); return tm_half_to_float(v); }
    case TM_BFLOAT16: { uint16_t v; memcpy(&v, p, 2); return tm_bfloat16_to_float(v); }
    case TM_INT64: { int64_t v; memcpy(&v, p, 8); return (double)v; }
    case TM_INT32: { int32_t v; memcpy(&v, p, 4); return v; }
    case TM_INT16: { int16_t v; memcpy(&v, p, 2); return v; }
    case TM_INT8: return (int8_t)*p;
    case TM_UINT8: return *p;
    case TM_BOOL: return *p != 0;
    default: return 0;
    }
}

static void store_real(uint8_t *p, tm_dtype d, double v) {
    switch (d) {
    case TM_FLOAT64: memcpy(p, &v, 8); break;
    case TM_FLOAT32: { float f = (float)v; memcpy(p, &f, 4); break; }
    case TM_FLOAT16: { uint16_t h = tm_double_to_half(v); memcpy(p, &h, 2); break; }
    case TM_BFLOAT16: { uint16_t h = tm_double_to_bfloat16(v); memcpy(p, &h, 2); break; }
    case TM_INT64: { int64_t i = (int64_t)v; memcpy(p, &i, 8); break; }
    case TM_INT32: { int32_t i = (int32_t)v; memcpy(p, &i, 4); break; }
    case TM_INT16: { int16_t i = (int16_t)v; memcpy(p, &i, 2); break; }
    case TM_INT8: *p = (uint8_t)(int8_t)v; break;
    case TM_UINT8: *p = (uint8_t)v; break;
    case TM_BOOL: *p = v != 0; break;
    default: break;
    }
}

/* Walks a view's elements in row-major order from a linear start index. */
typedef struct iter {
    const tm_view *v;
    int64_t idx[TM_MAX_NDIM];
    int64_t pos; /* storage element index */
} iter;

static void iter_init(iter *it, const tm_view *v, uint64_t begin) {
    it->v = v;
    it->pos = v->offset;
    for (int d = v->ndim - 1; d >= 0; d--) {
        int64_t s = v->shape[d] ? v->shape[d] : 1;
        it->idx[d] = (int64_t)(begin % (uint64_t)s);
        begin /= (uint64_t)s;
        it->pos += it->idx[d] * v->stride[d];
    }
}

static inline void iter_next(iter *it) {
    const tm_view *v = it->v;
    for (int d = v->ndim - 1; d >= 0; d--) {
        it->pos += v->stride[d];
        if (++it->idx[d] < v->shape[d]) return;
        it->pos -= v->stride[d] * v->shape[d];
        it->idx[d] = 0;
    }
}

/* Row-major contiguous (dimensions of size 1 may have any stride). */
static int is_contiguous(const tm_view *v) {
    int64_t expect = 1;
    for (int d = v->ndim - 1; d >= 0; d--) {
        if (v->shape[d] != 1 && v->stride[d] != expect) return 0;
        expect *= v->shape[d];
    }
    return 1;
}

/* ---- Accumulation ----------------------------------------------------------------------- */

/* The contiguous loops below are the whole cost of a merge: TM_HOT (merge/hot.h). */

/* One element of a contiguous input, widened exactly to float64. */
#define LOAD_F32(x, j) ((double)(x)[j])
#define LOAD_F64(x, j) ((x)[j])
#define LOAD_BF16(x, j) ((double)tm_bfloat16_to_float((x)[j]))

/* acc[j] (+)= w₀·x₀[j] (+ w₁·x₁[j] + …) for 1, 2 or 4 inputs of one dtype in one pass. The
 * additions happen in input order, exactly as one pass per input would do them, so fusing
 * inputs changes no bit; it only reads and writes the accumulator once per group instead of once
 * per input, the traffic that bounded the speed of many 16-bit inputs (cheap to load). */
#define DEFINE_ACC(name, T, LOAD)                                                                      \
    TM_HOT static void name##_1(const T *restrict x0, double w0, size_t count, double *restrict acc,  \
                                int first) {                                                          \
        if (first) for (size_t j = 0; j < count; j++) acc[j] = w0 * LOAD(x0, j);                      \
        else for (size_t j = 0; j < count; j++) acc[j] += w0 * LOAD(x0, j);                           \
    }                                                                                                 \
    TM_HOT static void name##_2(const T *restrict x0, const T *restrict x1, const double *w,          \
                                size_t count, double *restrict acc, int first) {                      \
        double w0 = w[0], w1 = w[1];                                                                  \
        if (first) for (size_t j = 0; j < count; j++) acc[j] = w0 * LOAD(x0, j) + w1 * LOAD(x1, j);   \
        else for (size_t j = 0; j < count; j++) acc[j] = (acc[j] + w0 * LOAD(x0, j)) + w1 * LOAD(x1, j); \
    }                                                                                                 \
    TM_HOT static void name##_4(const T *restrict x0, const T *restrict x1, const T *restrict x2,     \
                                const T *restrict x3, const double *w, size_t count,                  \
                                double *restrict acc, int first) {                                    \
        double w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];                                            \
        for (size_t j = 0; j < count; j++) {                                                          \
            double s = first ? w0 * LOAD(x0, j) : acc[j] + w0 * LOAD(x0, j);                          \
            s += w1 * LOAD(x1, j);                                                                    \
            s += w2 * LOAD(x2, j);                                                                    \
            acc[j] = s + w3 * LOAD(x3, j);                                                            \
        }                                                                                             \
    }

DEFINE_ACC(acc_f32, float, LOAD_F32)
DEFINE_ACC(acc_f64, double, LOAD_F64)
DEFINE_ACC(acc_bf16, uint16_t, LOAD_BF16)

TM_HOT static void store_f32(const double *restrict acc, size_t count, float *restrict o) {
    for (size_t j = 0; j < count; j++) o[j] = (float)acc[j];
}

TM_HOT static void store_bf16(const double *restrict acc, size_t count, uint16_t *restrict o) {
    for (size_t j = 0; j < count; j++) o[j] = tm_double_to_bfloat16(acc[j]);
}

/* Where elements [begin, …) of v start when the typed loops can read them: contiguous, naturally
 * aligned (legacy files store tensors at odd offsets) and of a dtype they handle; else NULL. */
static const void *fast_start(const tm_view *v, uint64_t begin) {
    if (v->dtype != TM_FLOAT32 && v->dtype != TM_FLOAT64 && v->dtype != TM_BFLOAT16) return NULL;
    size_t item = tm_dtype_size(v->dtype);
    const uint8_t *p = v->base + (uint64_t)(v->offset + (int64_t)begin) * item;
    return is_contiguous(v) && (uintptr_t)p % item == 0 ? p : NULL;
}

void tm_kernel_store_f64(const double *acc, size_t count, tm_dtype out_dtype, void *out) {
    const int64_t shape = (int64_t)count, one = 1;
    const tm_view v = {(const uint8_t *)acc, TM_FLOAT64, 1, &shape, &one, 0};
    tm_kernel_copy(&v, 0, count, out_dtype, out);
}

const float *tm_kernel_f32_at(const tm_view *v, uint64_t begin) {
    return v->dtype == TM_FLOAT32 ? fast_start(v, begin) : NULL;
}

/* Inputs in[0..avail) from begin whose first g (4 or 2) are fast inputs of one dtype: adds them
 * in one fused pass and returns g; returns 0 when no such group starts here. */
static size_t accumulate_group(const tm_view *in, const double *w, size_t avail, uint64_t begin, size_t count,
                               double *acc, int first) {
    for (size_t g = 4; g >= 2; g /= 2) {
        if (avail < g) continue;
        const void *x[4];
        size_t ok = 0;
        while (ok < g && in[ok].dtype == in[0].dtype && (x[ok] = fast_start(&in[ok], begin))) ok++;
        if (ok < g) continue;
#define FUSED(name, T)                                                                                 \
    (g == 4 ? name##_4((const T *)x[0], (const T *)x[1], (const T *)x[2], (const T *)x[3], w, count, acc, first) \
            : name##_2((const T *)x[0], (const T *)x[1], w, count, acc, first))
        switch (in[0].dtype) {
        case TM_FLOAT32: FUSED(acc_f32, float); break;
        case TM_FLOAT64: FUSED(acc_f64, double); break;
        default: FUSED(acc_bf16, uint16_t); break;
        }
#undef FUSED
        return g;
    }
    return 0;
}

/* acc[j] (+)= w · x[j] */
static void accumulate_real(const tm_view *v, double w, uint64_t begin, size_t count, double *acc,
                            int first) {
    size_t item = tm_dtype_size(v->dtype);
    const uint8_t *p = v->base + (uint64_t)(v->offset + (int64_t)begin) * item;
    /* Legacy files store tensors at odd offsets: typed loads need natural alignment. */
    if (is_contiguous(v) && (uintptr_t)p % item == 0) {
        switch (v->dtype) {
        case TM_FLOAT32: acc_f32_1((const float *)(const void *)p, w, count, acc, first); return;
        case TM_FLOAT64: acc_f64_1((const double *)(const void *)p, w, count, acc, first); return;
        case TM_BFLOAT16: acc_bf16_1((const uint16_t *)(const void *)p, w, count, acc, first); return;
        case TM_FLOAT16: {
            const uint16_t *x = (const uint16_t *)(const void *)p;
            for (size_t j = 0; j < count; j++) {
                double f = tm_half_to_float(x[j]);
                acc[j] = first ? w * f : acc[j] + w * f;
            }
            return;
        }
        default: break;
        }
    }
    iter it;
    iter_init(&it, v, begin);
    for (size_t j = 0; j < count; j++, iter_next(&it)) {
        double x = load_real(v->base + (uint64_t)it.pos * item, v->dtype);
        acc[j] = first ? w * x : acc[j] + w * x;
    }
}

static void accumulate_complex(const tm_view *v, double w, uint64_t begin, size_t count, double *acc,
                               int first) {
    size_t item = tm_dtype_size(v->dtype);
    iter it;
    iter_init(&it, v, begin);
    for (size_t j = 0; j < count; j++, iter_next(&it)) {
        const uint8_t *p = v->base + (uint64_t)it.pos * item;
        double re, im;
        if (v->dtype == TM_COMPLEX64) {
            float f[2];
            memcpy(f, p, 8);
            re = f[0];
            im = f[1];
        } else {
            double d[2];
            memcpy(d, p, 16);
            re = d[0];
            im = d[1];
        }
        acc[2 * j] = first ? w * re : acc[2 * j] + w * re;
        acc[2 * j + 1] = first ? w * im : acc[2 * j + 1] + w * im;
    }
}

#define TILE_ELEMS 2048

static void store_real_block(const double *acc, size_t count, tm_dtype out_dtype, uint8_t *o) {
    switch (out_dtype) {
    case TM_FLOAT32: store_f32(acc, count, (float *)(void *)o); break;
    case TM_FLOAT64: memcpy(o, acc, count * 8); break;
    case TM_BFLOAT16: store_bf16(acc, count, (uint16_t *)(void *)o); break;
    case TM_FLOAT16:
        for (size_t j = 0; j < count; j++) {
            uint16_t h = tm_double_to_half(acc[j]);
            memcpy(o + 2 * j, &h, 2);
        }
        break;
    default: {
        size_t item = tm_dtype_size(out_dtype);
        for (size_t j = 0; j < count; j++) store_real(o + j * item, out_dtype, acc[j]);
    }
    }
}

void tm_kernel_weighted_sum(const tm_view *in, const double *w, size_t n, uint64_t begin,
                            size_t count, tm_dtype out_dtype, void *out, double *scratch) {
    if (count == 0) return;
    if (is_complex(out_dtype)) {
        for (size_t i = 0; i < n; i++) accumulate_complex(&in[i], w[i], begin, count, scratch, i == 0);
        uint8_t *o = out;
        for (size_t j = 0; j < count; j++) {
            if (out_dtype == TM_COMPLEX64) {
                float f[2] = {(float)scratch[2 * j], (float)scratch[2 * j + 1]};
                memcpy(o + 8 * j, f, 8);
            } else {
                memcpy(o + 16 * j, &scratch[2 * j], 16);
            }
        }
        return;
    }
    /* Tiles small enough that the float64 accumulator stays in L1 while every input streams
     * through it once. */
    for (size_t s0 = 0; s0 < count; s0 += TILE_ELEMS) {
        size_t k = count - s0 < TILE_ELEMS ? count - s0 : TILE_ELEMS;
        for (size_t i = 0; i < n;) {
            size_t g = accumulate_group(in + i, w + i, n - i, begin + s0, k, scratch, i == 0);
            if (!g) {
                accumulate_real(&in[i], w[i], begin + s0, k, scratch, i == 0);
                g = 1;
            }
            i += g;
        }
        store_real_block(scratch, k, out_dtype, (uint8_t *)out + s0 * tm_dtype_size(out_dtype));
    }
}

/* out[j] = x[j] (− sub[j]): widened straight into out, no tile and copy (1·x is x exactly, so the
 * bits are the weighted sum's). */
#define DEFINE_LOAD(name, T, LOAD)                                                                     \
    TM_HOT static void name(const T *restrict x, const double *restrict sub, size_t count, double *restrict out) { \
        if (sub) for (size_t j = 0; j < count; j++) out[j] = LOAD(x, j) - sub[j];                      \
        else for (size_t j = 0; j < count; j++) out[j] = LOAD(x, j);                                   \
    }

#define LOAD_F16(x, j) ((double)tm_half_to_float((x)[j]))
DEFINE_LOAD(load_f32, float, LOAD_F32)
DEFINE_LOAD(load_f64, double, LOAD_F64)
DEFINE_LOAD(load_bf16, uint16_t, LOAD_BF16)
DEFINE_LOAD(load_f16, uint16_t, LOAD_F16)

TM_HOT static void subtract(double *restrict out, const double *restrict sub, size_t count) {
    for (size_t j = 0; j < count; j++) out[j] -= sub[j];
}

static void load_sub(const tm_view *v, uint64_t begin, size_t count, const double *sub, double *out,
                     double *scratch) {
    const size_t item = tm_dtype_size(v->dtype);
    const uint8_t *p = v->base + (uint64_t)(v->offset + (int64_t)begin) * item;
    if (count && is_contiguous(v) && (uintptr_t)p % item == 0) {
        switch (v->dtype) {
        case TM_FLOAT32: load_f32((const float *)(const void *)p, sub, count, out); return;
        case TM_FLOAT64: load_f64((const double *)(const void *)p, sub, count, out); return;
        case TM_BFLOAT16: load_bf16((const uint16_t *)(const void *)p, sub, count, out); return;
        case TM_FLOAT16: load_f16((const uint16_t *)(const void *)p, sub, count, out); return;
        default: break;
        }
    }
    static const double one = 1;
    tm_kernel_weighted_sum(v, &one, 1, begin, count, TM_FLOAT64, out, scratch);
    if (sub) subtract(out, sub, count);
}

void tm_kernel_load_f64(const tm_view *v, uint64_t begin, size_t count, double *out, double *scratch) {
    load_sub(v, begin, count, NULL, out, scratch);
}

void tm_kernel_delta_f64(const tm_view *v, uint64_t begin, size_t count, const double *sub, double *out,
                         double *scratch) {
    load_sub(v, begin, count, sub, out, scratch);
}

void tm_kernel_copy(const tm_view *v, uint64_t begin, size_t count, tm_dtype out_dtype, void *out) {
    size_t item = tm_dtype_size(v->dtype), oitem = tm_dtype_size(out_dtype);
    uint8_t *o = out;
    if (out_dtype == v->dtype && is_contiguous(v)) {
        memcpy(o, v->base + (uint64_t)(v->offset + (int64_t)begin) * item, count * item);
        return;
    }
    const uint8_t *p = v->base + (uint64_t)(v->offset + (int64_t)begin) * item;
    if (v->dtype == TM_FLOAT64 && is_contiguous(v) && (uintptr_t)p % item == 0) { /* a method's float64 result */
        store_real_block((const double *)(const void *)p, count, out_dtype, o);
        return;
    }
    iter it;
    iter_init(&it, v, begin);
    for (size_t j = 0; j < count; j++, iter_next(&it)) {
        const uint8_t *p = v->base + (uint64_t)it.pos * item;
        if (out_dtype == v->dtype) memcpy(o + j * oitem, p, item);
        else store_real(o + j * oitem, out_dtype, load_real(p, v->dtype));
    }
}

int tm_kernel_equal(const tm_view *a, const tm_view *b, uint64_t begin, size_t count) {
    size_t item = tm_dtype_size(a->dtype);
    if (a->dtype != b->dtype) return 0;
    iter ia, ib;
    iter_init(&ia, a, begin);
    iter_init(&ib, b, begin);
    for (size_t j = 0; j < count; j++, iter_next(&ia), iter_next(&ib))
        if (memcmp(a->base + (uint64_t)ia.pos * item, b->base + (uint64_t)ib.pos * item, item)) return 0;
    return 1;
}
