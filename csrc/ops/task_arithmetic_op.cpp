// task_arithmetic on tensors in memory: θ = b + λ Σ wᵢ (θᵢ − b) (Σ wᵢ divided out with
// normalize), differentiable with respect to the base and the tensors, and (the tensor_weights
// overload) the weights and λ — learned merging coefficients as in AdaMerging.
//
// Why a custom autograd Function and not a composition of ATen ops: the forward must be the
// library's method itself (run_method → tm_merge_tensors), so that its result has the same bits
// as a file merge of the tensor and the formula lives in one place (methods/task_arithmetic.c
// computes (1 − λΣwᵢ)·b + Σ λwᵢ·θᵢ as one fused float64 sum rounded once; an ATen composition
// would round differently in float64 and could land an ulp away from the engine's output after
// the final rounding). The backward is analytic and short, written with differentiable ATen ops
// on the saved inputs in float64 (so double backward works too): with cᵢ = wᵢ (or wᵢ/S, S = Σwⱼ,
// with normalize), δᵢ = θᵢ − b and g the output's gradient,
//   ∂/∂θᵢ = λcᵢ g,  ∂/∂b = (1 − λΣcᵢ) g,  ∂/∂λ = Σ cᵢ⟨g, δᵢ⟩,
//   ∂/∂wⱼ = λ⟨g, δⱼ⟩, or with normalize λ(⟨g, δⱼ⟩ − Σ cᵢ⟨g, δᵢ⟩)/S (the quotient rule).
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/method_call.h"

namespace torchmerge {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using OptDtype = c10::optional<at::ScalarType>;

const char *const kOp = "task_arithmetic";

class TaskArithmetic : public torch::autograd::Function<TaskArithmetic> {
  public:
    // weights_t / lambda_t: the learned coefficients (tensor_weights overload), or nullopt; their
    // values are also in weights / lambda (what the library is given).
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &base, at::TensorList tensors,
                              const OptTensor &weights_t, const OptTensor &lambda_t, std::vector<double> weights,
                              double lambda, bool normalize, OptDtype dtype) {
        std::vector<MethodParam> params = {number_param("weights", weights), number_param("lambda", lambda),
                                           number_param("normalize", normalize ? 1.0 : 0.0)};
        at::Tensor out = run_method(kOp, "task_arithmetic", base, tensors, tensors_label(), params, "", dtype);
        variable_list saved = {base};
        saved.insert(saved.end(), tensors.begin(), tensors.end());
        if (weights_t) saved.push_back(*weights_t);
        if (lambda_t) saved.push_back(*lambda_t);
        ctx->save_for_backward(saved);
        ctx->saved_data["n"] = int64_t(tensors.size());
        ctx->saved_data["weights"] = c10::List<double>(weights);
        ctx->saved_data["lambda"] = lambda;
        ctx->saved_data["normalize"] = normalize;
        ctx->saved_data["has_weights"] = bool(weights_t);
        ctx->saved_data["has_lambda"] = bool(lambda_t);
        return out;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const variable_list saved = ctx->get_saved_variables();
        const size_t n = size_t(ctx->saved_data["n"].toInt());
        const bool normalize = ctx->saved_data["normalize"].toBool();
        const bool has_w = ctx->saved_data["has_weights"].toBool(), has_l = ctx->saved_data["has_lambda"].toBool();
        const at::Tensor &b = saved[0];
        const at::TensorOptions f64 = b.options().dtype(at::kDouble);
        at::Tensor w = has_w ? saved[n + 1].to(at::kDouble)
                             : at::tensor(ctx->saved_data["weights"].toDoubleVector(), f64);
        at::Tensor lam = has_l ? saved[n + 1 + has_w].to(at::kDouble).reshape({})
                               : at::scalar_tensor(ctx->saved_data["lambda"].toDouble(), f64);
        const at::Tensor sum = w.sum();
        const at::Tensor c = normalize ? w / sum : w;
        const at::Tensor g = grads[0].to(at::kDouble);

        // base, tensors..., weights_t, lambda_t, then the four non-tensor arguments.
        variable_list out(1 + n + 2 + 4);
        out[0] = ((1 - lam * c.sum()) * g).to(b.scalar_type());
        for (size_t i = 0; i < n; i++) out[1 + i] = (lam * c[int64_t(i)] * g).to(saved[1 + i].scalar_type());
        if (has_w || has_l) {
            const at::Tensor b64 = b.to(at::kDouble);
            std::vector<at::Tensor> dots;
            for (size_t i = 0; i < n; i++) dots.push_back((g * (saved[1 + i].to(at::kDouble) - b64)).sum());
            const at::Tensor d = at::stack(dots);
            const at::Tensor cd = (c * d).sum();
            if (has_w) {
                const at::Tensor &wt = saved[n + 1];
                out[1 + n] = (normalize ? lam * (d - cd) / sum : lam * d).to(wt.scalar_type());
            }
            if (has_l) {
                const at::Tensor &lt = saved[n + 1 + has_w];
                out[2 + n] = cd.reshape(lt.sizes()).to(lt.scalar_type());
            }
        }
        return out;
    }
};

at::Tensor with_float_weights(const at::Tensor &base, at::TensorList tensors, c10::optional<at::ArrayRef<double>> weights,
                              double lambda, bool normalize, OptDtype dtype) {
    std::vector<double> w(tensors.size(), 1.0);  // the method's default: 1 each
    if (weights) w.assign(weights->begin(), weights->end());  // a wrong count is the library's error
    return TaskArithmetic::apply(base, tensors, OptTensor(), OptTensor(), w, lambda, normalize, dtype);
}

// The values of a coefficient tensor, read on the host for the library.
std::vector<double> values_of(const at::Tensor &t, const char *what) {
    TORCH_CHECK(t.defined(), kOp, ": ", what, " is an undefined tensor");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), kOp, ": ", what, " must be a floating tensor, got dtype ",
                dtype_name(t.scalar_type()));
    TORCH_CHECK(t.device().is_cpu(), kOp, ": ", what, " is on device ", t.device(),
                "; the merge methods run on the CPU");
    const at::Tensor c = t.detach().to(at::kDouble).contiguous();
    return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

at::Tensor with_tensor_weights(const at::Tensor &base, at::TensorList tensors, const at::Tensor &weights,
                               const at::Tensor &lambda, bool normalize, OptDtype dtype) {
    std::vector<double> w = values_of(weights, "weights");
    TORCH_CHECK(weights.dim() == 1 && size_t(weights.numel()) == tensors.size(), kOp, ": weights must be a 1-D tensor ",
                "with one weight per input (", tensors.size(), "), got shape ", shape_name(weights.sizes()));
    std::vector<double> l = values_of(lambda, "lambda_");
    TORCH_CHECK(l.size() == 1, kOp, ": lambda_ must be a tensor of one element, got shape ",
                shape_name(lambda.sizes()));
    return TaskArithmetic::apply(base, tensors, OptTensor(weights), OptTensor(lambda), w, l[0], normalize, dtype);
}

}  // namespace
}  // namespace ops
}  // namespace torchmerge

// CompositeImplicitAutograd: the kernel is the autograd Function itself (its forward calls the
// library directly, not through the dispatcher), so one registration serves every dispatch key.
TORCH_LIBRARY_IMPL(torchmerge, CompositeImplicitAutograd, m) {
    m.impl("task_arithmetic", TORCH_FN(torchmerge::ops::with_float_weights));
    m.impl("task_arithmetic.tensor_weights", TORCH_FN(torchmerge::ops::with_tensor_weights));
}
