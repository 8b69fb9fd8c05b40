// Helpers shared by the examples' evaluators (examples/soup, examples/multitask): they link
// LibTorch only, not torchmerge, since the merged models torchmerge writes are ordinary
// TorchScript. Header-only: each evaluator is one translation unit.
#pragma once
#include <torch/script.h>

#include <cstdio>
#include <cstdlib>
#include <ostream>
#include <string>

namespace tm_example {

// The program name errors start with; each evaluator sets it first thing in main.
inline const char *program = "evaluate";

[[noreturn]] inline void die(const std::string &msg) {
    std::fprintf(stderr, "%s: error: %s\n", program, msg.c_str());
    std::exit(1);
}

inline std::string first_line(std::string s) {
    auto nl = s.find('\n');
    if (nl != std::string::npos) s.resize(nl);
    return s;
}

inline torch::jit::Module load(const std::string &path) {
    try {
        return torch::jit::load(path, torch::kCPU);
    } catch (const c10::Error &e) {
        die(path + ": not a loadable TorchScript module: " + first_line(e.what_without_backtrace()));
    }
}

// An evaluation module (the interface of torchmerge greedy_soup --eval): a Tensor attribute
// `inputs` and forward(outputs) -> 0-dim score.
inline at::Tensor eval_inputs(torch::jit::Module &eval, const std::string &path) {
    if (!eval.hasattr("inputs") || !eval.attr("inputs").isTensor())
        die(path + ": the evaluation module has no Tensor attribute 'inputs'");
    eval.eval();
    return eval.attr("inputs").toTensor();
}

// eval.forward(model.forward(inputs)), the model in eval mode with no grad.
inline double score(torch::jit::Module &eval, const at::Tensor &inputs, torch::jit::Module &model,
                    const std::string &model_path) {
    model.eval();
    torch::NoGradGuard no_grad;
    try {
        at::Tensor out = model.forward({inputs}).toTensor();
        return eval.forward({out}).toTensor().item<double>();
    } catch (const c10::Error &e) {
        die(model_path + ": " + first_line(e.what_without_backtrace()));
    }
}

inline std::string xml(const std::string &s) {
    std::string r;
    for (char c : s) {
        switch (c) {
        case '&': r += "&amp;"; break;
        case '<': r += "&lt;"; break;
        case '>': r += "&gt;"; break;
        case '"': r += "&quot;"; break;
        default: r += c;
        }
    }
    return r;
}

inline std::string fmt(const char *f, double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, f, v);
    return buf;
}

// The opening of a chart: the <svg> element, a white background and the bold title (y = 26);
// the caller writes the rest and "</svg>".
inline void svg_begin(std::ostream &f, double W, double H, const std::string &title) {
    f << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
      << " " << H << "\" font-family=\"DejaVu Sans, Arial, sans-serif\" font-size=\"12\">\n";
    f << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    f << "<text x=\"" << W / 2 << "\" y=\"26\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">" << xml(title)
      << "</text>\n";
}

}  // namespace tm_example
