// Scores a TorchScript model with a TorchScript evaluation module (torchmerge greedy_soup).
//
// The evaluation-module interface: a TorchScript module with a Tensor attribute `inputs` and
// forward(self, outputs: Tensor) -> Tensor returning a one-element (0-dim) score, higher is
// better; e.g. the accuracy of outputs.argmax(1) against labels it stores. The model is run as
// model.forward(inputs) in eval mode with no grad; both modules are loaded on the CPU. C++17.
#include <cmath>
#include <string>

#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/jit/serialization/import.h>

#include "torch/aten_bridge.h"
#include "torch/bridge_impl.h"

namespace torchmerge {
namespace {

std::string first_line(std::string s) {
    auto nl = s.find('\n');
    if (nl != std::string::npos) s.resize(nl);
    return s;
}

// One line from an exception of LibTorch: the TorchScript interpreter wraps the error of the
// failing operation in a traceback whose last line is the error itself.
std::string summary(const std::exception &e) {
    const auto *c10e = dynamic_cast<const c10::Error *>(&e);
    std::string s = c10e ? c10e->what_without_backtrace() : e.what();
    if (s.find("Traceback of TorchScript") == std::string::npos) return first_line(s);
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    auto nl = s.rfind('\n');
    return nl == std::string::npos ? s : s.substr(nl + 1);
}

torch::jit::Module load(const std::string &path, const char *what) {
    try {
        return torch::jit::load(path, c10::Device(c10::kCPU));
    } catch (const c10::Error &e) {
        fail(TM_ERROR_FORMAT, path + ": " + what + " is not a loadable TorchScript module: " +
                                  first_line(e.what_without_backtrace()));
    }
}

void score(const std::string &model_path, const std::string &eval_path, double *out) {
    torch::jit::Module eval = load(eval_path, "the evaluation module");
    if (!eval.hasattr("inputs") || !eval.attr("inputs").isTensor())
        fail(TM_ERROR_FORMAT, eval_path + ": the evaluation module has no Tensor attribute 'inputs'");
    if (!eval.find_method("forward"))
        fail(TM_ERROR_FORMAT, eval_path + ": the evaluation module has no forward(outputs) method");
    at::Tensor inputs = eval.attr("inputs").toTensor();
    torch::jit::Module model = load(model_path, "the model");
    if (!model.find_method("forward")) fail(TM_ERROR_FORMAT, model_path + ": the model has no forward method");
    model.eval();
    eval.eval();

    at::NoGradGuard no_grad;
    c10::IValue outputs;
    try {
        outputs = model.forward({inputs});
    } catch (const std::exception &e) {
        fail(TM_ERROR_MISMATCH, model_path + ": forward(inputs) failed on " + eval_path + "'s inputs " +
                                    shape_string(inputs.sizes()) + ": " + summary(e));
    }
    if (!outputs.isTensor())
        fail(TM_ERROR_MISMATCH, model_path + ": forward(inputs) returned " + outputs.tagKind() + ", not a Tensor");
    c10::IValue result;
    try {
        result = eval.forward({outputs});
    } catch (const std::exception &e) {
        fail(TM_ERROR_MISMATCH, eval_path + ": forward(outputs) failed on " + model_path + "'s outputs " +
                                    shape_string(outputs.toTensor().sizes()) + ": " + summary(e));
    }
    if (!result.isTensor())
        fail(TM_ERROR_FORMAT, eval_path + ": forward(outputs) returned " + result.tagKind() + ", not a Tensor");
    at::Tensor s = result.toTensor();
    if (s.numel() != 1 || s.is_complex())
        fail(TM_ERROR_FORMAT, eval_path + ": forward(outputs) must return a 0-dim real score, got a " +
                                  std::string(c10::toString(s.scalar_type())) + " tensor of shape " +
                                  shape_string(s.sizes()));
    *out = s.to(at::kDouble).item<double>();
}

}  // namespace

tm_status score_module(const char *model_path, const char *eval_path, double *out, tm_error *err) {
    return guarded(err, [&] {
        if (!model_path || !eval_path || !out) fail(TM_ERROR_INVALID_ARGUMENT, "score_module: NULL argument");
        score(model_path, eval_path, out);
    });
}

}  // namespace torchmerge
