// simple_average and weighted_average (float[] and Tensor weights): compositions of
// differentiable ATen ops, registered as CompositeImplicitAutograd, so autograd works with
// respect to the tensors and (tensor_weights overload) the weights without a backward of our
// own, on whatever device the tensors live.
#include <torch/library.h>

#include <cmath>
#include <sstream>

#include "ops/ops_common.h"

namespace torchmerge {
namespace ops {

std::string dtype_name(at::ScalarType st) {
    switch (st) {
    case at::kDouble: return "float64";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(st);
    }
}

std::string shape_name(at::IntArrayRef shape) {
    std::ostringstream s;
    s << '[';
    for (size_t i = 0; i < shape.size(); i++) s << (i ? ", " : "") << shape[i];
    s << ']';
    return s.str();
}

std::string quote_list(const std::vector<std::string> &names) {
    const size_t limit = 10;
    std::string s;
    for (size_t i = 0; i < names.size() && i < limit; i++) s += (i ? ", '" : "'") + names[i] + "'";
    if (names.size() > limit) s += ", ... (" + std::to_string(names.size()) + " in all)";
    return s;
}

namespace {

int category(at::ScalarType st) {
    if (at::isComplexType(st)) return 2;
    if (at::isFloatingType(st)) return 1;
    return 0;
}

}  // namespace

void check_averageable(const char *op, at::TensorList tensors, const Label &label) {
    TORCH_CHECK(!tensors.empty(), op, ": expected at least one tensor, got an empty list");
    for (size_t i = 0; i < tensors.size(); i++)
        TORCH_CHECK(tensors[i].defined(), op, ": ", label(i), " is an undefined tensor");
    const at::Tensor &a = tensors[0];
    for (size_t i = 1; i < tensors.size(); i++) {
        const at::Tensor &b = tensors[i];
        TORCH_CHECK(b.sizes().equals(a.sizes()), op, ": ", label(i), " has shape ", shape_name(b.sizes()),
                    ", which differs from ", label(0), "'s shape ", shape_name(a.sizes()));
        TORCH_CHECK(category(b.scalar_type()) == category(a.scalar_type()), op, ": ", label(i), " has dtype ",
                    dtype_name(b.scalar_type()), ", which cannot be averaged with ", label(0), "'s dtype ",
                    dtype_name(a.scalar_type()),
                    " (floating tensors are averaged; integer and bool tensors are taken from the first input)");
        TORCH_CHECK(b.device() == a.device(), op, ": ", label(i), " is on device ", b.device(), " but ", label(0),
                    " is on device ", a.device(), "; move them to one device first");
    }
}

std::vector<double> resolve_weights(const char *op, size_t n, c10::optional<at::ArrayRef<double>> weights,
                                    bool normalize) {
    if (!weights) return std::vector<double>(n, 1.0 / double(n));
    TORCH_CHECK(weights->size() == n, op, ": expected ", n, " weights (one per input), got ", weights->size());
    std::vector<double> w(weights->begin(), weights->end());
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        TORCH_CHECK(std::isfinite(w[i]), op, ": weight ", i, " is not a finite number (", w[i], ")");
        sum += w[i];
    }
    if (normalize) {
        TORCH_CHECK(sum != 0 && std::isfinite(sum), op,
                    ": the weights sum to 0 and cannot be normalised (pass normalize=False to use them as given)");
        for (auto &x : w) x /= sum;
    }
    return w;
}

namespace {

at::ScalarType accumulator(const at::Tensor &t) { return t.is_complex() ? at::kComplexDouble : at::kDouble; }

}  // namespace

at::Tensor weighted_sum(at::TensorList tensors, at::ArrayRef<double> weights) {
    const at::Tensor &first = tensors[0];
    if (!is_averaged(first.scalar_type())) return first.clone();
    const at::ScalarType acc_t = accumulator(first);
    at::Tensor acc;
    for (size_t i = 0; i < tensors.size(); i++) {
        at::Tensor x = tensors[i].to(acc_t);
        acc = i == 0 ? at::mul(x, weights[i]) : at::add(acc, x, weights[i]);
    }
    return acc.to(first.scalar_type());
}

at::Tensor weighted_sum(at::TensorList tensors, const at::Tensor &weights) {
    const at::Tensor &first = tensors[0];
    if (!is_averaged(first.scalar_type())) return first.clone();
    const at::ScalarType acc_t = accumulator(first);
    at::Tensor acc;
    for (size_t i = 0; i < tensors.size(); i++) {
        at::Tensor term = at::mul(tensors[i].to(acc_t), weights.select(0, int64_t(i)));
        acc = i == 0 ? term : at::add(acc, term);
    }
    return acc.to(first.scalar_type());
}

namespace {

Label numbered() {
    return [](size_t i) { return "tensor " + std::to_string(i); };
}

at::Tensor simple_average(at::TensorList tensors) {
    check_averageable("simple_average", tensors, numbered());
    return weighted_sum(tensors, resolve_weights("simple_average", tensors.size(), c10::nullopt, true));
}

at::Tensor weighted_average(at::TensorList tensors, at::ArrayRef<double> weights, bool normalize) {
    check_averageable("weighted_average", tensors, numbered());
    return weighted_sum(tensors, resolve_weights("weighted_average", tensors.size(), weights, normalize));
}

at::Tensor weighted_average_tensor_weights(at::TensorList tensors, const at::Tensor &weights, bool normalize) {
    const char *op = "weighted_average";
    check_averageable(op, tensors, numbered());
    TORCH_CHECK(weights.defined(), op, ": weights is an undefined tensor");
    TORCH_CHECK(weights.dim() == 1, op, ": weights must be a 1-D tensor with one weight per input, got shape ",
                shape_name(weights.sizes()));
    TORCH_CHECK(weights.numel() == int64_t(tensors.size()), op, ": expected ", tensors.size(),
                " weights (one per input), got ", weights.numel());
    TORCH_CHECK(at::isFloatingType(weights.scalar_type()), op, ": weights must be a floating tensor, got dtype ",
                dtype_name(weights.scalar_type()));
    TORCH_CHECK(weights.device() == tensors[0].device(), op, ": weights is on device ", weights.device(),
                " but the tensors are on device ", tensors[0].device(), "; move them to one device first");
    at::Tensor w = weights.to(at::kDouble);
    if (normalize) {
        at::Tensor sum = w.sum();
        // One scalar read (a device sync on accelerators) so that a zero sum is an error rather
        // than a silent inf/nan average.
        const double s = sum.item<double>();
        TORCH_CHECK(s != 0 && std::isfinite(s), op,
                    ": the weights sum to ", s, " and cannot be normalised (pass normalize=False to use them as given)");
        w = at::div(w, sum);
    }
    return weighted_sum(tensors, w);
}

}  // namespace
}  // namespace ops
}  // namespace torchmerge

TORCH_LIBRARY_IMPL(torchmerge, CompositeImplicitAutograd, m) {
    m.impl("simple_average", TORCH_FN(torchmerge::ops::simple_average));
    m.impl("weighted_average", TORCH_FN(torchmerge::ops::weighted_average));
    m.impl("weighted_average.tensor_weights", TORCH_FN(torchmerge::ops::weighted_average_tensor_weights));
}
