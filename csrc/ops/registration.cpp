// The torchmerge operator library: the one TORCH_LIBRARY(torchmerge, ...) with every schema
// written out, so the ops take keyword arguments and defaults in Python and TorchScript. The
// kernels are registered beside their code with TORCH_LIBRARY_IMPL:
//   average_kernels.cpp  simple_average, weighted_average (float[] and Tensor weights)
//   state_dict_ops.cpp   state_dict_add, state_dict_mul, state_dict_average
//   merge_files_op.cpp   merge_files (tm_merge_files through the C API)
//
// Python:      torch.ops.load_library("build/libtorchmerge_ops.so")
//              torch.ops.torchmerge.simple_average([a, b])
// C++:         link libtorchmerge_ops.so with -Wl,--no-as-needed (nothing references its
//              symbols; the registrations run from its static initialisers).
#include <torch/library.h>

TORCH_LIBRARY(torchmerge, m) {
    // θ = (1/n) Σ θᵢ. Floating tensors are accumulated in float64 (complex128) and rounded once
    // to the first tensor's dtype; integer and bool tensors are returned from the first input.
    m.def("simple_average(Tensor[] tensors) -> Tensor");
    // θ = Σ wᵢθᵢ, with wᵢ / Σ wⱼ when normalize.
    m.def("weighted_average(Tensor[] tensors, float[] weights, bool normalize=True) -> Tensor");
    // The same with the weights as a 1-D tensor, differentiable with respect to the weights
    // too (learned soups: optimise mixing coefficients by gradient descent).
    m.def("weighted_average.tensor_weights(Tensor[] tensors, Tensor weights, bool normalize=True) -> Tensor");
    // FusionBench's state-dict arithmetic, out of place: a[k] + alpha * b[k]; sd[k] * scalar.
    m.def("state_dict_add(Dict(str, Tensor) a, Dict(str, Tensor) b, float alpha=1.0) -> Dict(str, Tensor)");
    m.def("state_dict_mul(Dict(str, Tensor) state_dict, float scalar) -> Dict(str, Tensor)");
    // Key by key Σ wᵢ sdᵢ[k] / Σ wᵢ (uniform when weights is None), in the first dict's key order.
    m.def("state_dict_average(Dict(str, Tensor)[] state_dicts, float[]? weights=None) -> Dict(str, Tensor)");
    // tm_merge_files: streams the files' tensors, writes output (pt, or TorchScript for module
    // inputs). Writes a file, so TorchScript must never drop or reorder it: CONSERVATIVE.
    m.def(torch::schema("merge_files(str[] inputs, str output, float[]? weights=None) -> ()",
                        c10::AliasAnalysisKind::CONSERVATIVE));
}
