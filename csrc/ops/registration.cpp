// The torchmerge operator library: the one TORCH_LIBRARY(torchmerge, ...) with every schema
// written out, so the ops take keyword arguments and defaults in Python and TorchScript. The
// kernels are registered beside their code with TORCH_LIBRARY_IMPL:
//   average_kernels.cpp  simple_average, weighted_average (float[] and Tensor weights)
//   state_dict_ops.cpp   state_dict_add, state_dict_mul, state_dict_average
//   merge_files_op.cpp   merge_files (tm_merge_files through the C API)
//   method_ops.cpp       merge, ties, dare, slerp, model_stock (tm_merge_tensors, method_call.h)
//   task_arithmetic_op.cpp  task_arithmetic (tm_merge_tensors, with an analytic backward)
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

    // ---- The merge methods of the library's table on tensors in memory (tm_merge_tensors):
    // float64, rounded once to dtype (default: tensors[0]'s, as a file merge's first input), the
    // same bits as a file merge of the tensor. CPU tensors; any floating dtypes, strides, 0-d.
    // Any method by name, with its parameters as in the C API: numbers (one, or one per input;
    // bools as 0/1) in params, text as on the command line ("sum", "0.2,0.8", "true") in
    // text_params. name keys the random masks (DARE) as a tensor's name in a file does.
    m.def("merge(str method, Tensor[] tensors, Tensor? base=None, Dict(str, float[])? params=None, "
          "Dict(str, str)? text_params=None, str name=\"\", ScalarType? dtype=None) -> Tensor");
    // b + λ Σ wᵢ (θᵢ − b) (÷ Σ wᵢ with normalize). weights None: 1 each. Differentiable with
    // respect to base and tensors; the tensor_weights overload also to weights and lambda_
    // (learned coefficients, AdaMerging). lambda_, not lambda, which Python keywords cannot be.
    m.def("task_arithmetic(Tensor base, Tensor[] tensors, float[]? weights=None, float lambda_=1., "
          "bool normalize=False, ScalarType? dtype=None) -> Tensor");
    m.def("task_arithmetic.tensor_weights(Tensor base, Tensor[] tensors, Tensor weights, Tensor lambda_, "
          "bool normalize=False, ScalarType? dtype=None) -> Tensor");
    // TIES: trim each task vector to density (None: the method's default), elect signs, disjoint
    // (weighted) mean, × λ, + b.
    m.def("ties(Tensor base, Tensor[] tensors, float[1]? density=None, float[]? weights=None, float lambda_=1., "
          "str majority_sign=\"sum\", bool normalize=True, str trim_scope=\"tensor\", ScalarType? dtype=None) -> Tensor");
    // DARE: random drop with keep probability density (one, or one per input), rescale, then
    // task arithmetic (consensus linear: dare_linear) or TIES' sign election (ties: dare_ties).
    // normalize / majority_sign None: the method's default.
    m.def("dare(Tensor base, Tensor[] tensors, float[1] density, float[]? weights=None, float lambda_=1., "
          "str rescale=\"l1\", int seed=0, str name=\"\", str consensus=\"linear\", bool? normalize=None, "
          "str? majority_sign=None, ScalarType? dtype=None) -> Tensor");
    // Spherical interpolation from base (t = 0) to other (t = 1); the dtype is other's by default.
    m.def("slerp(Tensor base, Tensor other, float t, ScalarType? dtype=None) -> Tensor");
    // Model Stock: t·mean(θᵢ) + (1 − t)·b with t from the task vectors' mean pairwise cosine.
    m.def("model_stock(Tensor base, Tensor[] tensors, bool filter_wise=False, ScalarType? dtype=None) -> Tensor");
}
