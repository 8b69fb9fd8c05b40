// run_method: checks the tensors, describes them to tm_merge_tensors as they lie in memory
// (strides, storage offset, each its own dtype: nothing is copied or converted on the way in),
// and turns the library's failures into one-line RuntimeErrors.
#include "ops/method_call.h"

#include <cstring>

#include "torchmerge.h"

namespace torchmerge {
namespace ops {

Label tensors_label() {
    return [](size_t i) { return "tensors[" + std::to_string(i) + "]"; };
}

bool has_method(const std::string &method) { return tm_method_find(method.c_str()) >= 0; }

void check_method(const char *op, const std::string &method) {
    TORCH_CHECK(has_method(method), op, ": this torchmerge library has no merge method '", method,
                "' (methods: run `torchmerge --help`)");
}

namespace {

// The library's dtype for a floating tensor; false for the others.
bool to_tm_dtype(at::ScalarType st, tm_dtype *out) {
    switch (st) {
    case at::kDouble: *out = TM_FLOAT64; return true;
    case at::kFloat: *out = TM_FLOAT32; return true;
    case at::kHalf: *out = TM_FLOAT16; return true;
    case at::kBFloat16: *out = TM_BFLOAT16; return true;
    case at::kComplexFloat: *out = TM_COMPLEX64; return true;
    case at::kComplexDouble: *out = TM_COMPLEX128; return true;
    default: return false;
    }
}

// One tensor as tm_merge_tensors reads it: borrowed shape, strides and data pointer (valid while
// the tensor lives, i.e. for the call).
tm_tensor_data describe(const char *op, const at::Tensor &t, const std::string &what) {
    TORCH_CHECK(t.defined(), op, ": ", what, " is an undefined tensor");
    TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " is on device ", t.device(),
                "; the merge methods run on the CPU (move the tensors with .cpu())");
    tm_tensor_data d;
    tm_tensor_data_init(&d);
    TORCH_CHECK(to_tm_dtype(t.scalar_type(), &d.dtype), op, ": ", what, " has dtype ", dtype_name(t.scalar_type()),
                "; the merge methods merge floating tensors");
    TORCH_CHECK(t.dim() <= TM_MAX_NDIM, op, ": ", what, " has ", t.dim(), " dimensions, more than ", TM_MAX_NDIM);
    d.ndim = int32_t(t.dim());
    d.shape = t.sizes().data();
    d.stride = t.strides().data();
    d.data = t.data_ptr();
    return d;
}

}  // namespace

at::Tensor run_method(const char *op, const std::string &method, const c10::optional<at::Tensor> &base,
                      at::TensorList tensors, const Label &label, const std::vector<MethodParam> &params,
                      const std::string &name, c10::optional<at::ScalarType> dtype) {
    check_method(op, method);
    TORCH_CHECK(!tensors.empty(), op, ": expected at least one tensor, got an empty list");
    std::vector<tm_tensor_data> in;
    in.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); i++) {
        in.push_back(describe(op, tensors[i], label(i)));
        TORCH_CHECK(tensors[i].sizes().equals(tensors[0].sizes()), op, ": ", label(i), " has shape ",
                    shape_name(tensors[i].sizes()), ", which differs from ", label(0), "'s shape ",
                    shape_name(tensors[0].sizes()));
    }
    tm_tensor_data base_data;
    if (base) {
        base_data = describe(op, *base, "base");
        TORCH_CHECK(base->sizes().equals(tensors[0].sizes()), op, ": base has shape ", shape_name(base->sizes()),
                    ", which differs from ", label(0), "'s shape ", shape_name(tensors[0].sizes()));
    }
    const at::ScalarType out_st = dtype ? *dtype : tensors[0].scalar_type();
    tm_dtype out_dtype;
    TORCH_CHECK(to_tm_dtype(out_st, &out_dtype), op, ": dtype ", dtype_name(out_st),
                " is not a floating dtype (the methods round their float64 result to one)");

    std::vector<tm_param> tp;
    tp.reserve(params.size());
    for (const MethodParam &p : params)
        tp.push_back(p.is_text ? tm_param{p.name.c_str(), p.text.c_str(), nullptr, 0}
                               : tm_param{p.name.c_str(), nullptr, p.numbers.data(), p.numbers.size()});
    tm_merge_options opts;
    tm_merge_options_init(&opts);
    opts.method = method.c_str();
    opts.params = tp.data();
    opts.n_params = tp.size();

    at::Tensor out = at::empty(tensors[0].sizes(), tensors[0].options().dtype(out_st));
    // An empty tensor has no element to merge (and may have no data pointer to describe).
    if (out.numel() == 0) return out;
    const tm_status st = tm_merge_tensors(in.data(), in.size(), base ? &base_data : nullptr, name.c_str(), &opts,
                                          out_dtype, out.data_ptr());
    if (st != TM_OK) {
        std::string msg = tm_errmsg();
        // The library names the tensor; an op's tensor has no name unless the caller gave one.
        const std::string unnamed = "tensor '': ";
        if (name.empty() && msg.compare(0, unnamed.size(), unnamed) == 0) msg.erase(0, unnamed.size());
        TORCH_CHECK(false, op, ": ", msg);
    }
    return out;
}

}  // namespace ops
}  // namespace torchmerge
