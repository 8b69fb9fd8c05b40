// Checks and arithmetic shared by the torchmerge ops. Everything here composes differentiable
// ATen ops and is device-generic: nothing reads tensor memory on the host, so a CUDA (or any
// other backend) build of LibTorch runs the same code on that device.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

namespace torchmerge {
namespace ops {

// Floating and complex tensors are averaged; integer and bool tensors are taken from the first.
inline bool is_averaged(at::ScalarType st) { return at::isFloatingType(st) || at::isComplexType(st); }

// "float32", "int64", ... as Python spells them.
std::string dtype_name(at::ScalarType st);
std::string shape_name(at::IntArrayRef shape);
// 'a', 'b', … (10 at most, then a count).
std::string quote_list(const std::vector<std::string> &names);

// Names the i-th tensor of an argument in messages: "tensor 1", "state_dicts[1]['fc.weight']".
using Label = std::function<std::string(size_t)>;

// Checks that tensors can be averaged together: at least one, all defined, the same shape,
// the same dtype category (real floating / complex / integer and bool) and the same device.
// Messages start with "op: " and name both tensors involved.
void check_averageable(const char *op, at::TensorList tensors, const Label &label);

// One weight per input, finite; divided by their sum when normalize (which must not be 0).
std::vector<double> resolve_weights(const char *op, size_t n, c10::optional<at::ArrayRef<double>> weights,
                                    bool normalize);

// Σ wᵢ tensors[i], accumulated in float64 (complex128) and rounded once to tensors[0]'s dtype,
// differentiable with respect to the tensors. Non-averaged dtypes: a copy of tensors[0]. Always
// returns a new tensor (never an alias of an input). Call check_averageable first.
at::Tensor weighted_sum(at::TensorList tensors, at::ArrayRef<double> weights);

// The same with the weights as a float64 1-D tensor of tensors.size() elements (differentiable
// with respect to them as well).
at::Tensor weighted_sum(at::TensorList tensors, const at::Tensor &weights);

}  // namespace ops
}  // namespace torchmerge
