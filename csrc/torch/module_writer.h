// Writes merged weights into a copy of a TorchScript module (the first input module or a
// template) and saves it so torch::jit::load / torch.jit.load reload it. Holds one module in
// memory; tensors are copied in as they are merged. C++17.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/jit/api/module.h>

#include "torchmerge.h"

namespace torchmerge {

class ModuleWriter {
public:
    // has_dtype/dtype: convert the module's floating parameters and buffers first.
    ModuleWriter(const std::string &template_path, const std::string &output, bool has_dtype,
                 tm_dtype dtype);

    // Names of the module's parameters and buffers, in named_parameters/named_buffers order.
    const std::vector<std::string> &names() const { return names_; }
    bool has(const std::string &name) const { return slots_.count(name) != 0; }
    // Copies value into the module's tensor name (converting dtype; shapes must match).
    void set(const std::string &name, const at::Tensor &value);
    // Fails unless every parameter and buffer was set; saves atomically.
    void commit();

private:
    std::string template_path_, output_;
    torch::jit::Module module_;
    std::vector<std::string> names_;
    std::map<std::string, at::Tensor> slots_;
    std::map<std::string, bool> done_;
};

}  // namespace torchmerge
