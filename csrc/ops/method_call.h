// The one bridge from the ops to the library's merge methods: tensors in memory through
// tm_merge_tensors (the C API), so every method op (merge, task_arithmetic, ties, dare, slerp,
// model_stock) runs the code of csrc/merge/methods/ — float64, rounded once, the same bits as a
// file merge of that tensor, the same random masks for the same (seed, input, name, element) —
// and no method's arithmetic is written a second time in C++.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "ops/ops_common.h"

namespace torchmerge {
namespace ops {

// A method parameter as an op hands it to the library: numbers (one, or one per input; a bool
// as 0/1, a whole number as itself) or text as the command line writes it ("sum", "0.2,0.8",
// "true"). Parameters left out take the method's default from its table.
struct MethodParam {
    std::string name;
    std::vector<double> numbers;
    std::string text;
    bool is_text;
};

inline MethodParam number_param(std::string name, std::vector<double> values) {
    return {std::move(name), std::move(values), std::string(), false};
}
inline MethodParam number_param(std::string name, double value) {
    return number_param(std::move(name), std::vector<double>{value});
}
inline MethodParam text_param(std::string name, std::string text) {
    return {std::move(name), {}, std::move(text), true};
}

// True when this build's method table knows method (a name or an alias): tm_method_find.
bool has_method(const std::string &method);

// "op: " + the library's message when a method is missing from this build's table.
void check_method(const char *op, const std::string &method);

// tm_merge_tensors of tensors (and base, for the methods that need one) with method and params:
// a new contiguous tensor of tensors[0]'s shape, in dtype, or by default tensors[0]'s dtype (as a
// file merge: the first input's, not the base's). name keys the random masks (DARE) like a
// tensor's name in a file. Checks first, each a one-line RuntimeError starting "op: " and naming
// the argument through label / "base": at least one tensor, every one defined, on the CPU, real
// or complex floating, of tensors[0]'s shape. The library's own errors (parameters out of range,
// a zero weight sum with normalize, ...) come back as "op: " + tm_errmsg().
at::Tensor run_method(const char *op, const std::string &method, const c10::optional<at::Tensor> &base,
                      at::TensorList tensors, const Label &label, const std::vector<MethodParam> &params,
                      const std::string &name, c10::optional<at::ScalarType> dtype);

// Names the i-th element of the Tensor[] argument "tensors" in messages: "tensors[1]".
Label tensors_label();

}  // namespace ops
}  // namespace torchmerge
