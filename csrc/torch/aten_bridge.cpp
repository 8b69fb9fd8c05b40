#include "torch/aten_bridge.h"

#include <cstring>
#include <sstream>

namespace torchmerge {

at::ScalarType to_scalar_type(tm_dtype dtype) {
    switch (dtype) {
    case TM_FLOAT64: return at::kDouble;
    case TM_FLOAT32: return at::kFloat;
    case TM_FLOAT16: return at::kHalf;
    case TM_BFLOAT16: return at::kBFloat16;
    case TM_COMPLEX64: return at::kComplexFloat;
    case TM_COMPLEX128: return at::kComplexDouble;
    case TM_INT64: return at::kLong;
    case TM_INT32: return at::kInt;
    case TM_INT16: return at::kShort;
    case TM_INT8: return at::kChar;
    case TM_UINT8: return at::kByte;
    case TM_BOOL: return at::kBool;
    case TM_QINT8: return at::kQInt8;
    case TM_QUINT8: return at::kQUInt8;
    case TM_QINT32: return at::kQInt32;
    default: fail(TM_ERROR_INTERNAL, "unknown dtype " + std::to_string(int(dtype)));
    }
}

bool from_scalar_type(at::ScalarType st, tm_dtype *out) {
    for (int d = 0; d < TM_DTYPE_COUNT; d++)
        if (to_scalar_type(tm_dtype(d)) == st) {
            *out = tm_dtype(d);
            return true;
        }
    return false;
}

namespace {

// The integers of a quantized tensor as a plain integer tensor (int8, uint8, int32).
tm_dtype int_repr_dtype(tm_dtype d) { return d == TM_QINT8 ? TM_INT8 : d == TM_QUINT8 ? TM_UINT8 : TM_INT32; }

// A quantized tensor as torch.load returns it: its integers (a contiguous copy) with its scale
// and zero point, per tensor or per channel.
at::Tensor quantized_of(const tm_tensor_info &info) {
    tm_tensor_info ints = info;
    ints.dtype = int_repr_dtype(info.dtype);
    ints.qscheme = TM_QSCHEME_NONE;
    at::Tensor q = view_of(ints).contiguous();
    if (info.qscheme == TM_QSCHEME_PER_TENSOR_AFFINE)
        return at::_make_per_tensor_quantized_tensor(q, info.q_scale, info.q_zero_point);
    int64_t n = info.shape[info.q_axis];
    at::Tensor scales = at::from_blob(const_cast<double *>(info.q_scales), {n}, at::kDouble).clone();
    at::Tensor zeros = at::from_blob(const_cast<double *>(info.q_zero_points), {n}, at::kDouble).clone();
    if (info.qscheme == TM_QSCHEME_PER_CHANNEL_AFFINE)
        return at::_make_per_channel_quantized_tensor(q, scales, zeros.to(at::kLong), info.q_axis);
    // float qparams: torch keeps float32 scales and zero points
    return at::_make_per_channel_quantized_tensor(q, scales.to(at::kFloat), zeros.to(at::kFloat), info.q_axis);
}

}  // namespace

at::Tensor view_of(const tm_tensor_info &info) {
    if (info.qscheme != TM_QSCHEME_NONE) return quantized_of(info);
    auto opts = at::TensorOptions().dtype(to_scalar_type(info.dtype)).device(at::kCPU);
    const auto *base = static_cast<const uint8_t *>(info.storage_data);
    std::vector<int64_t> shape(info.shape, info.shape + info.ndim);
    std::vector<int64_t> stride(info.stride, info.stride + info.ndim);
    if (info.numel == 0) return at::empty(shape, opts);
    void *ptr = const_cast<uint8_t *>(base + uint64_t(info.storage_offset) * tm_dtype_size(info.dtype));
    if (reinterpret_cast<uintptr_t>(base) % tm_dtype_size(info.dtype) == 0)
        return at::from_blob(ptr, shape, stride, opts);
    // Legacy files store tensors at odd offsets; ATen kernels assume natural alignment.
    at::Tensor aligned = at::empty({int64_t(info.storage_nbytes / tm_dtype_size(info.dtype))}, opts);
    std::memcpy(aligned.data_ptr(), base, info.storage_nbytes);
    return aligned.as_strided(shape, stride, info.storage_offset);
}

void fail(tm_status status, std::string message) { throw Failure{status, std::move(message)}; }

std::string shape_string(const at::IntArrayRef &shape) {
    return shape_string(int32_t(shape.size()), shape.data());
}

std::string shape_string(int32_t ndim, const int64_t *shape) {
    std::ostringstream s;
    s << '[';
    for (int32_t i = 0; i < ndim; i++) s << (i ? ", " : "") << shape[i];
    s << ']';
    return s.str();
}

}  // namespace torchmerge
