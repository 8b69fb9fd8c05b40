// The merge methods on tensors in memory: the generic merge(method, ...) for every method of the
// table, and ties, dare, slerp and model_stock with typed schemas. Each only translates its
// arguments into the method's parameters (by the names of the method table) and calls
// run_method (tm_merge_tensors): the arithmetic is the library's. A method this build's table
// lacks is an error naming it, so these ops start working as soon as the method is added.
//
// Not differentiable: the result never requires grad (the differentiable one is task_arithmetic,
// task_arithmetic_op.cpp). Registered CompositeImplicitAutograd, as merge_files is, so the kernel
// runs for every dispatch key and a tensor on another device gets run_method's one-line error
// rather than the dispatcher's list of backends.
#include <torch/library.h>

#include "ops/method_call.h"

namespace torchmerge {
namespace ops {
namespace {

using OptDtype = c10::optional<at::ScalarType>;
using OptFloats = c10::optional<at::ArrayRef<double>>;

std::vector<double> to_vector(at::ArrayRef<double> v) { return std::vector<double>(v.begin(), v.end()); }

// The parameters the methods on task vectors share (methods/weights.h): weights (None: the
// method's default, 1 each), lambda.
void task_vector_params(std::vector<MethodParam> &p, const OptFloats &weights, double lambda) {
    if (weights) p.push_back(number_param("weights", to_vector(*weights)));
    p.push_back(number_param("lambda", lambda));
}

at::Tensor merge(const std::string &method, at::TensorList tensors, const c10::optional<at::Tensor> &base,
                 const c10::optional<c10::Dict<std::string, c10::List<double>>> &params,
                 const c10::optional<c10::Dict<std::string, std::string>> &text_params, const std::string &name,
                 OptDtype dtype) {
    std::vector<MethodParam> p;
    if (params)
        for (const auto &kv : *params) {
            const c10::List<double> v = kv.value();
            p.push_back(number_param(kv.key(), std::vector<double>(v.begin(), v.end())));
        }
    if (text_params)
        for (const auto &kv : *text_params) p.push_back(text_param(kv.key(), kv.value()));
    return run_method("merge", method, base, tensors, tensors_label(), p, name, dtype);
}

at::Tensor ties(const at::Tensor &base, at::TensorList tensors, OptFloats density, OptFloats weights, double lambda,
                const std::string &majority_sign, bool normalize, const std::string &trim_scope, OptDtype dtype) {
    std::vector<MethodParam> p;
    if (density) p.push_back(number_param("density", to_vector(*density)));
    task_vector_params(p, weights, lambda);
    p.push_back(text_param("majority_sign", majority_sign));
    p.push_back(number_param("normalize", normalize ? 1.0 : 0.0));
    p.push_back(text_param("trim_scope", trim_scope));
    return run_method("ties", "ties", base, tensors, tensors_label(), p, "", dtype);
}

at::Tensor dare(const at::Tensor &base, at::TensorList tensors, at::ArrayRef<double> density, OptFloats weights,
                double lambda, const std::string &rescale, int64_t seed, const std::string &name,
                const std::string &consensus, c10::optional<bool> normalize,
                const c10::optional<std::string> &majority_sign, OptDtype dtype) {
    const char *op = "dare";
    TORCH_CHECK(consensus == "linear" || consensus == "ties", op, ": consensus must be 'linear' or 'ties', got '",
                consensus, "'");
    TORCH_CHECK(!majority_sign || consensus == "ties", op,
                ": majority_sign applies to consensus='ties' only (linear sums every task vector)");
    std::vector<MethodParam> p;
    p.push_back(number_param("density", to_vector(density)));
    task_vector_params(p, weights, lambda);
    p.push_back(text_param("rescale", rescale));
    p.push_back(number_param("seed", double(seed)));
    if (normalize) p.push_back(number_param("normalize", *normalize ? 1.0 : 0.0));
    if (majority_sign) p.push_back(text_param("majority_sign", *majority_sign));
    return run_method(op, consensus == "ties" ? "dare_ties" : "dare_linear", base, tensors, tensors_label(), p, name,
                      dtype);
}

at::Tensor slerp(const at::Tensor &base, const at::Tensor &other, double t, OptDtype dtype) {
    const at::Tensor one[] = {other};
    return run_method("slerp", "slerp", base, one, [](size_t) { return std::string("other"); },
                      {number_param("t", t)}, "", dtype);
}

at::Tensor model_stock(const at::Tensor &base, at::TensorList tensors, bool filter_wise, OptDtype dtype) {
    return run_method("model_stock", "model_stock", base, tensors, tensors_label(),
                      {number_param("filter_wise", filter_wise ? 1.0 : 0.0)}, "", dtype);
}

}  // namespace
}  // namespace ops
}  // namespace torchmerge

TORCH_LIBRARY_IMPL(torchmerge, CompositeImplicitAutograd, m) {
    m.impl("merge", TORCH_FN(torchmerge::ops::merge));
    m.impl("ties", TORCH_FN(torchmerge::ops::ties));
    m.impl("dare", TORCH_FN(torchmerge::ops::dare));
    m.impl("slerp", TORCH_FN(torchmerge::ops::slerp));
    m.impl("model_stock", TORCH_FN(torchmerge::ops::model_stock));
}
