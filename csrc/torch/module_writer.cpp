#include "torch/module_writer.h"

#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/import.h>

#include "core/atomic_output.h"
#include "core/output_stream.h"
#include "torch/aten_bridge.h"
#include "torch/bridge_impl.h"

namespace torchmerge {

namespace {
torch::jit::Module load_module(const std::string &path) {
    try {
        return torch::jit::load(path, c10::Device(c10::kCPU));
    } catch (const c10::Error &e) {
        std::string what = e.what_without_backtrace();
        auto nl = what.find('\n');
        if (nl != std::string::npos) what.resize(nl);
        fail(TM_ERROR_FORMAT, path + ": not a loadable TorchScript module: " + what);
    }
}
}  // namespace

ModuleWriter::ModuleWriter(const std::string &template_path, const std::string &output,
                           bool has_dtype, tm_dtype dtype)
    : template_path_(template_path), output_(output), module_(load_module(template_path)) {
    if (has_dtype) module_.to(to_scalar_type(dtype));
    for (const auto &p : module_.named_parameters(/*recurse=*/true)) {
        names_.push_back(p.name);
        slots_[p.name] = p.value;
    }
    for (const auto &b : module_.named_buffers(/*recurse=*/true)) {
        if (slots_.count(b.name)) continue;
        names_.push_back(b.name);
        slots_[b.name] = b.value;
    }
}

void ModuleWriter::set(const std::string &name, const at::Tensor &value) {
    auto it = slots_.find(name);
    if (it == slots_.end())
        fail(TM_ERROR_MISMATCH, template_path_ + ": the module has no parameter or buffer '" + name + "'");
    at::Tensor &dst = it->second;
    if (!dst.sizes().equals(value.sizes()))
        fail(TM_ERROR_MISMATCH, template_path_ + ": tensor '" + name + "': shape " +
                                    shape_string(dst.sizes()) + " differs from the merged " +
                                    shape_string(value.sizes()));
    at::NoGradGuard no_grad;
    dst.copy_(value);
    done_[name] = true;
}

void ModuleWriter::commit() {
    std::string missing;
    for (const auto &n : names_)
        if (!done_.count(n)) missing += (missing.empty() ? "'" : ", '") + n + "'";
    if (!missing.empty())
        fail(TM_ERROR_MISMATCH, template_path_ + ": the merged weights lack the module's " + missing);
    tm_atomic_output out{};
    tm_error err{};
    check(tm_atomic_output_open(output_.c_str(), &out, &err), err);
    /* LibTorch's zip writer throws from its destructor after a failed write (std::terminate:
     * the process aborted and the temporary file stayed). So its writer function never fails:
     * the stream keeps the first error and drops the bytes after it; it is reported here. */
    tm_output_stream stream;
    tm_error werr{};
    if (tm_output_stream_init(&stream, out.fd, output_.c_str(), &err)) {
        tm_atomic_output_abort(&out);
        check(err.status, err);
    }
    auto writer = [&](const void *buf, size_t n) -> size_t {
        if (!werr.status) tm_output_stream_put(&stream, buf, n, &werr);
        return n;
    };
    try {
        torch::jit::ExportModule(module_, writer);
    } catch (const c10::Error &e) {
        tm_output_stream_free(&stream);
        tm_atomic_output_abort(&out);
        fail(TM_ERROR_IO, output_ + ": cannot save the module: " + e.what_without_backtrace());
    }
    if (!werr.status) tm_output_stream_flush(&stream, &werr);
    tm_output_stream_free(&stream);
    if (werr.status) {
        tm_atomic_output_abort(&out);
        check(werr.status, werr);
    }
    check(tm_atomic_output_commit(&out, &err), err);
}

}  // namespace torchmerge

// ---- Bridge functions ------------------------------------------------------------------------

struct tm_module_writer {
    torchmerge::ModuleWriter writer;
};

namespace torchmerge {

tm_status mw_open(const char *template_path, const char *output, int has_dtype, tm_dtype dtype,
                  tm_module_writer **out, tm_error *err) {
    *out = nullptr;
    return guarded(err, [&] { *out = new tm_module_writer{ModuleWriter(template_path, output, has_dtype != 0, dtype)}; });
}

int mw_has(const tm_module_writer *w, const char *name) { return w->writer.has(name); }

tm_status mw_set(tm_module_writer *w, const char *name, tm_dtype dtype, int32_t ndim, const int64_t *shape,
                 const int64_t *stride, int64_t offset, const void *storage, tm_error *err) {
    return guarded(err, [&] {
        auto opts = at::TensorOptions().dtype(to_scalar_type(dtype));
        std::vector<int64_t> sizes(shape, shape + ndim), strides(stride, stride + ndim);
        int64_t numel = 1;
        for (int64_t s : sizes) numel *= s;
        at::Tensor value = numel == 0 ? at::empty(sizes, opts)
                                      : at::from_blob(const_cast<uint8_t *>(static_cast<const uint8_t *>(storage)) +
                                                          offset * int64_t(tm_dtype_size(dtype)),
                                                      sizes, strides, opts);
        w->writer.set(name, value);
    });
}

tm_status mw_commit(tm_module_writer *w, tm_error *err) {
    return guarded(err, [&] { w->writer.commit(); });
}

void mw_free(tm_module_writer *w) { delete w; }

}  // namespace torchmerge
