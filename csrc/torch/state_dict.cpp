// tm_state_dict: an ordered name → ATen tensor map in memory, with FusionBench's
// state_dict_add / state_dict_mul as in-place operations, and saving as pt or TorchScript.
#include <string>
#include <unordered_map>
#include <vector>

#include <cstring>
#include <memory>

#include "checkpoint/checkpoint_internal.h"
#include "formats/pt_writer.h"
#include "torch/aten_bridge.h"
#include "torch/bridge_impl.h"
#include "torch/module_writer.h"

struct tm_state_dict {
    std::vector<std::string> names;
    std::vector<at::Tensor> tensors;  // contiguous, CPU
    std::unordered_map<std::string, size_t> index;
};

namespace torchmerge {
namespace {

void insert(tm_state_dict &sd, const std::string &name, at::Tensor t) {
    auto it = sd.index.find(name);
    if (it != sd.index.end()) {
        sd.tensors[it->second] = std::move(t);
        return;
    }
    sd.index.emplace(name, sd.names.size());
    sd.names.push_back(name);
    sd.tensors.push_back(std::move(t));
}

void require(bool ok, const char *what) {
    if (!ok) fail(TM_ERROR_INVALID_ARGUMENT, what);
}

void same_keys(const tm_state_dict &a, const tm_state_dict &b) {
    std::string lacks, extra;
    for (auto &n : a.names)
        if (!b.index.count(n)) lacks += (lacks.empty() ? "'" : ", '") + n + "'";
    for (auto &n : b.names)
        if (!a.index.count(n)) extra += (extra.empty() ? "'" : ", '") + n + "'";
    std::string msg;
    if (!lacks.empty()) msg += "; the second state dict lacks " + lacks;
    if (!extra.empty()) msg += "; the first state dict lacks " + extra;
    if (!msg.empty()) fail(TM_ERROR_MISMATCH, "state_dict_add: keys differ" + msg);
}

}  // namespace
}  // namespace torchmerge

namespace torchmerge {

tm_status sd_new(tm_state_dict **out, tm_error *err) {
    return guarded(err, [&] {
        require(out, "tm_state_dict_new: out is NULL");
        *out = new tm_state_dict();
    });
}

tm_status sd_load(const char *path, const tm_open_options *opts, tm_state_dict **out, tm_error *err) {
    if (out) *out = nullptr;
    return guarded(err, [&] {
        require(out && path, "tm_state_dict_load: path or out is NULL");
        tm_error e{};
        tm_checkpoint *ck = nullptr;
        check(tm_checkpoint_open_err(path, opts, &ck, &e), e);
        auto sd = std::make_unique<tm_state_dict>();
        try {
            for (size_t i = 0; i < tm_checkpoint_n_tensors(ck); i++) {
                tm_tensor_info info = tm_checkpoint_info(ck, i);
                at::Tensor t = view_of(info);
                // a quantized tensor is already a contiguous copy (and float_qparams cannot be cloned)
                insert(*sd, info.name, info.qscheme != TM_QSCHEME_NONE ? t : t.clone(at::MemoryFormat::Contiguous));
            }
        } catch (...) {
            tm_checkpoint_free(ck);
            throw;
        }
        tm_checkpoint_free(ck);
        *out = sd.release();
    });
}

tm_status sd_clone(const tm_state_dict *sd, tm_state_dict **out, tm_error *err) {
    if (out) *out = nullptr;
    return guarded(err, [&] {
        require(sd && out, "tm_state_dict_clone: NULL argument");
        auto copy = std::make_unique<tm_state_dict>();
        for (size_t i = 0; i < sd->names.size(); i++) insert(*copy, sd->names[i], sd->tensors[i].clone());
        *out = copy.release();
    });
}

void sd_free(tm_state_dict *sd) { delete sd; }

size_t sd_size(const tm_state_dict *sd) { return sd ? sd->names.size() : 0; }

tm_status sd_tensor(const tm_state_dict *sd, size_t i, tm_tensor_info *out, tm_error *err) {
    return guarded(err, [&] {
        require(sd && out && i < sd->names.size(), "tm_state_dict_tensor: index out of range");
        const at::Tensor &t = sd->tensors[i];
        tm_dtype dt{};
        if (!from_scalar_type(t.scalar_type(), &dt)) fail(TM_ERROR_UNSUPPORTED, "unsupported dtype");
        out->name = sd->names[i].c_str();
        out->dtype = dt;
        out->ndim = int32_t(t.dim());
        out->shape = t.sizes().data();
        out->stride = t.strides().data();
        out->storage_offset = 0;
        out->storage_data = t.data_ptr();
        out->numel = uint64_t(t.numel());
        out->nbytes = uint64_t(t.nbytes());
        out->storage_nbytes = out->nbytes;
        out->storage_id = int64_t(i);
        out->qscheme = TM_QSCHEME_NONE;
        if (t.is_quantized()) {
            // The integers are described; per-channel parameters would need storage owned by sd.
            if (t.qscheme() != at::kPerTensorAffine)
                fail(TM_ERROR_UNSUPPORTED, "tm_state_dict_tensor: tensor '" + sd->names[i] +
                                               "': per-channel quantized tensors are not described yet");
            out->qscheme = TM_QSCHEME_PER_TENSOR_AFFINE;
            out->q_scale = t.q_scale();
            out->q_zero_point = t.q_zero_point();
        }
    });
}

int64_t sd_find(const tm_state_dict *sd, const char *name) {
    if (!sd || !name) return -1;
    auto it = sd->index.find(name);
    return it == sd->index.end() ? -1 : int64_t(it->second);
}

tm_status sd_set(tm_state_dict *sd, const char *name, tm_dtype dtype, int32_t ndim,
                 const int64_t *shape, const void *data, tm_error *err) {
    return guarded(err, [&] {
        require(sd && name && (ndim == 0 || shape) && ndim >= 0 && ndim <= TM_MAX_NDIM,
                "tm_state_dict_set: invalid argument");
        std::vector<int64_t> dims(shape, shape + ndim);
        for (int64_t d : dims) require(d >= 0, "tm_state_dict_set: negative dimension");
        at::Tensor t = at::empty(dims, at::TensorOptions().dtype(to_scalar_type(dtype)));
        if (t.nbytes()) {
            require(data, "tm_state_dict_set: data is NULL");
            std::memcpy(t.data_ptr(), data, t.nbytes());
        }
        insert(*sd, name, std::move(t));
    });
}

tm_status sd_add(tm_state_dict *a, const tm_state_dict *b, double alpha, tm_error *err) {
    return guarded(err, [&] {
        require(a && b, "tm_state_dict_add: NULL argument");
        same_keys(*a, *b);
        for (size_t i = 0; i < a->names.size(); i++) {
            at::Tensor &x = a->tensors[i];
            const at::Tensor &y = b->tensors[b->index.at(a->names[i])];
            if (!x.sizes().equals(y.sizes()))
                fail(TM_ERROR_MISMATCH, "state_dict_add: tensor '" + a->names[i] + "': shape " +
                                            shape_string(y.sizes()) + " differs from " + shape_string(x.sizes()));
            if (!at::isFloatingType(x.scalar_type()) && !at::isComplexType(x.scalar_type())) continue;
            x.add_(y.to(x.scalar_type()), alpha);
        }
    });
}

tm_status sd_mul(tm_state_dict *sd, double scalar, tm_error *err) {
    return guarded(err, [&] {
        require(sd, "tm_state_dict_mul: NULL argument");
        for (auto &t : sd->tensors)
            if (at::isFloatingType(t.scalar_type()) || at::isComplexType(t.scalar_type())) t.mul_(scalar);
    });
}

tm_status sd_save(const tm_state_dict *sd, const char *path, tm_format format,
                  const char *template_path, tm_error *err) {
    return guarded(err, [&] {
        require(sd && path, "tm_state_dict_save: NULL argument");
        if (format == TM_FORMAT_AUTO) format = template_path ? TM_FORMAT_TORCHSCRIPT : TM_FORMAT_PT;
        if (format == TM_FORMAT_TORCHSCRIPT) {
            if (!template_path) fail(TM_ERROR_INVALID_ARGUMENT, std::string(path) + ": TorchScript output needs a template module");
            ModuleWriter w(template_path, path, false, TM_FLOAT32);
            for (size_t i = 0; i < sd->names.size(); i++)
                if (w.has(sd->names[i])) w.set(sd->names[i], sd->tensors[i]);
            w.commit();
            return;
        }
        std::vector<tm_pk_out_tensor> out(sd->names.size());
        std::vector<std::string> keys(sd->names.size());
        for (size_t i = 0; i < sd->names.size(); i++) {
            const at::Tensor &t = sd->tensors[i];
            tm_dtype dt{};
            if (!from_scalar_type(t.scalar_type(), &dt)) fail(TM_ERROR_UNSUPPORTED, "unsupported dtype");
            if (t.is_quantized())
                fail(TM_ERROR_UNSUPPORTED, std::string(path) + ": tensor '" + sd->names[i] +
                                               "': saving quantized tensors is not supported");
            keys[i] = std::to_string(i);
            out[i] = tm_pk_out_tensor{sd->names[i].c_str(), dt, int32_t(t.dim()), t.sizes().data(),
                                      t.strides().data(), 0, keys[i].c_str(), t.numel()};
        }
        tm_error e{};
        tm_pt_writer *w = nullptr;
        check(tm_pt_writer_open(path, out.data(), out.size(), &w, &e), e);
        std::unique_ptr<tm_pt_writer, void (*)(tm_pt_writer *)> guard(w, tm_pt_writer_free);
        for (size_t i = 0; i < sd->tensors.size(); i++) {
            const at::Tensor &t = sd->tensors[i];
            check(tm_pt_writer_begin_storage(w, i, t.nbytes(), &e), e);
            check(tm_pt_writer_write(w, t.data_ptr(), t.nbytes(), &e), e);
            check(tm_pt_writer_end_storage(w, &e), e);
        }
        check(tm_pt_writer_commit(w, &e), e);
    });
}

}  // namespace torchmerge
