/* The dtype table, generated from TM_DTYPE_LIST so names and sizes cannot drift from the enum. */
#include "torchmerge.h"

#include <string.h>
#include <strings.h>

static const char *const dtype_names[] = {
#define TM_DTYPE_NAME_(name, text, size) text,
    TM_DTYPE_LIST(TM_DTYPE_NAME_)
#undef TM_DTYPE_NAME_
};
static const size_t dtype_sizes[] = {
#define TM_DTYPE_SIZE_(name, text, size) size,
    TM_DTYPE_LIST(TM_DTYPE_SIZE_)
#undef TM_DTYPE_SIZE_
};
_Static_assert(sizeof dtype_names / sizeof dtype_names[0] == TM_DTYPE_COUNT, "dtype names");
_Static_assert(sizeof dtype_sizes / sizeof dtype_sizes[0] == TM_DTYPE_COUNT, "dtype sizes");

const char *tm_dtype_name(tm_dtype dtype) {
    return (unsigned)dtype < TM_DTYPE_COUNT ? dtype_names[dtype] : "?";
}

size_t tm_dtype_size(tm_dtype dtype) {
    return (unsigned)dtype < TM_DTYPE_COUNT ? dtype_sizes[dtype] : 0;
}

int tm_dtype_is_floating(tm_dtype dtype) {
    return dtype == TM_FLOAT64 || dtype == TM_FLOAT32 || dtype == TM_FLOAT16 ||
           dtype == TM_BFLOAT16 || dtype == TM_COMPLEX64 || dtype == TM_COMPLEX128;
}

int tm_dtype_is_quantized(tm_dtype dtype) {
    return dtype == TM_QINT8 || dtype == TM_QUINT8 || dtype == TM_QINT32;
}

const char *tm_qscheme_name(tm_qscheme qscheme) {
    switch (qscheme) {
    case TM_QSCHEME_NONE: return "none";
    case TM_QSCHEME_PER_TENSOR_AFFINE: return "per_tensor_affine";
    case TM_QSCHEME_PER_CHANNEL_AFFINE: return "per_channel_affine";
    case TM_QSCHEME_PER_CHANNEL_AFFINE_FLOAT_QPARAMS: return "per_channel_affine_float_qparams";
    }
    return "?";
}

tm_status tm_dtype_from_name(const char *name, tm_dtype *out) {
    static const struct { const char *alias; tm_dtype dtype; } aliases[] = {
        {"fp64", TM_FLOAT64}, {"f64", TM_FLOAT64}, {"double", TM_FLOAT64},
        {"fp32", TM_FLOAT32}, {"f32", TM_FLOAT32}, {"float", TM_FLOAT32},
        {"fp16", TM_FLOAT16}, {"f16", TM_FLOAT16}, {"half", TM_FLOAT16},
        {"bf16", TM_BFLOAT16},
    };
    if (!name || !out) return TM_ERROR_INVALID_ARGUMENT;
    if (strncmp(name, "torch.", 6) == 0) name += 6;
    for (int i = 0; i < TM_DTYPE_COUNT; i++)
        if (strcasecmp(name, dtype_names[i]) == 0) { *out = (tm_dtype)i; return TM_OK; }
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
        if (strcasecmp(name, aliases[i].alias) == 0) { *out = aliases[i].dtype; return TM_OK; }
    return TM_ERROR_INVALID_ARGUMENT;
}
