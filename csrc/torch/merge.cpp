// tm_merge_files: the streaming file merge. For each output storage: read it from every input
// (views over the mapped files), accumulate Σ wᵢθᵢ in float64/complex128, round once to the
// output dtype, write it, drop the input pages. Memory stays near one tensor, not one model.
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/checkpoint_internal.h"
#include "torch/aten_bridge.h"
#include "torch/module_writer.h"
#include "torch/pt_writer.h"

namespace torchmerge {
namespace {

using Clock = std::chrono::steady_clock;

struct Input {
    std::string path;
    tm_checkpoint *ck = nullptr;
    std::unordered_map<std::string, size_t> index;
};

struct InputSet {
    std::vector<Input> inputs;
    ~InputSet() {
        for (auto &in : inputs) tm_checkpoint_close(in.ck);
    }
};

// One output storage: either a single tensor written contiguously, or a storage shared by
// several tensors (tied weights, views) merged as a whole so the views are rebuilt unchanged.
struct Unit {
    std::vector<size_t> keys;  // indices into Plan::keys
    bool whole_storage = false;
    bool floating = false;
    tm_dtype out_dtype = TM_FLOAT32;
    int64_t numel = 0;
};

struct Plan {
    std::vector<std::string> keys;
    std::vector<std::vector<int64_t>> where;  // where[k][i]: tensor index of key k in input i, or -1
    std::vector<Unit> units;
};

tm_tensor_info info_of(const Input &in, size_t idx) {
    tm_tensor_info info{};
    tm_error err{};
    if (tm_checkpoint_tensor(in.ck, idx, &info) != TM_OK)
        fail(TM_ERROR_INTERNAL, in.path + ": tensor index out of range");
    (void)err;
    return info;
}

std::string quote_list(const std::vector<std::string> &names, size_t limit = 10) {
    std::string s;
    for (size_t i = 0; i < names.size() && i < limit; i++) s += (i ? ", '" : "'") + names[i] + "'";
    if (names.size() > limit) s += ", … (" + std::to_string(names.size()) + " in all)";
    return s;
}

void open_inputs(InputSet &set, const char *const *paths, size_t n, const char *key) {
    tm_open_options oo;
    tm_open_options_init(&oo);
    oo.key = key;
    for (size_t i = 0; i < n; i++) {
        if (!paths[i]) fail(TM_ERROR_INVALID_ARGUMENT, "input path " + std::to_string(i) + " is NULL");
        Input in;
        in.path = paths[i];
        tm_error err{};
        check(tm_checkpoint_open_err(paths[i], &oo, &in.ck, &err), err);
        for (size_t t = 0; t < tm_checkpoint_n_tensors(in.ck); t++) {
            tm_tensor_info info = info_of(in, t);
            in.index.emplace(info.name, t);
        }
        set.inputs.push_back(std::move(in));
    }
}

void plan_keys(Plan &plan, const std::vector<Input> &inputs, tm_key_policy policy) {
    const Input &first = inputs[0];
    std::vector<std::string> order;
    for (size_t t = 0; t < tm_checkpoint_n_tensors(first.ck); t++) order.push_back(info_of(first, t).name);
    if (policy == TM_KEYS_UNION) {
        std::unordered_map<std::string, bool> seen;
        for (auto &k : order) seen[k] = true;
        for (size_t i = 1; i < inputs.size(); i++)
            for (size_t t = 0; t < tm_checkpoint_n_tensors(inputs[i].ck); t++) {
                std::string name = info_of(inputs[i], t).name;
                if (!seen[name]) {
                    seen[name] = true;
                    order.push_back(name);
                }
            }
    }
    if (policy == TM_KEYS_STRICT) {
        std::string problems;
        for (size_t i = 0; i < inputs.size(); i++) {
            std::vector<std::string> lacks, extra;
            for (auto &k : order)
                if (!inputs[i].index.count(k)) lacks.push_back(k);
            for (size_t t = 0; t < tm_checkpoint_n_tensors(inputs[i].ck); t++) {
                std::string name = info_of(inputs[i], t).name;
                if (!first.index.count(name)) extra.push_back(name);
            }
            if (!lacks.empty()) problems += "; " + inputs[i].path + " lacks " + quote_list(lacks);
            if (!extra.empty())
                problems += "; " + inputs[i].path + " has keys " + first.path + " lacks: " + quote_list(extra);
        }
        if (!problems.empty())
            fail(TM_ERROR_MISMATCH, inputs[1 % inputs.size()].path + ": keys differ between inputs" + problems +
                                        " (use --keys intersection or union)");
    }
    for (auto &k : order) {
        std::vector<int64_t> w(inputs.size(), -1);
        size_t present = 0;
        for (size_t i = 0; i < inputs.size(); i++) {
            auto it = inputs[i].index.find(k);
            if (it != inputs[i].index.end()) {
                w[i] = int64_t(it->second);
                present++;
            }
        }
        if (policy == TM_KEYS_INTERSECTION && present != inputs.size()) continue;
        plan.keys.push_back(k);
        plan.where.push_back(std::move(w));
    }
    if (plan.keys.empty()) fail(TM_ERROR_MISMATCH, first.path + ": the inputs have no tensor name in common");
}

void check_compatible(const Plan &plan, const std::vector<Input> &inputs) {
    for (size_t k = 0; k < plan.keys.size(); k++) {
        int64_t ref = -1;
        tm_tensor_info a{};
        for (size_t i = 0; i < inputs.size(); i++) {
            if (plan.where[k][i] < 0) continue;
            tm_tensor_info b = info_of(inputs[i], size_t(plan.where[k][i]));
            if (ref < 0) {
                ref = int64_t(i);
                a = b;
                continue;
            }
            const std::string &fa = inputs[size_t(ref)].path, &fb = inputs[i].path;
            bool same = a.ndim == b.ndim;
            for (int d = 0; same && d < a.ndim; d++) same = a.shape[d] == b.shape[d];
            if (!same)
                fail(TM_ERROR_MISMATCH, fb + ": tensor '" + plan.keys[k] + "': shape " +
                                            shape_string(b.ndim, b.shape) + " differs from " + fa + "'s " +
                                            shape_string(a.ndim, a.shape));
            if (tm_dtype_is_floating(a.dtype) != tm_dtype_is_floating(b.dtype))
                fail(TM_ERROR_MISMATCH, fb + ": tensor '" + plan.keys[k] + "': dtype " + tm_dtype_name(b.dtype) +
                                            " cannot be averaged with " + fa + "'s " + tm_dtype_name(a.dtype));
            bool complex_a = a.dtype == TM_COMPLEX64 || a.dtype == TM_COMPLEX128;
            bool complex_b = b.dtype == TM_COMPLEX64 || b.dtype == TM_COMPLEX128;
            if (complex_a != complex_b)
                fail(TM_ERROR_MISMATCH, fb + ": tensor '" + plan.keys[k] + "': dtype " + tm_dtype_name(b.dtype) +
                                            " cannot be averaged with " + fa + "'s " + tm_dtype_name(a.dtype));
        }
    }
}

// Output dtype: the first input's (that has the key), or the override for floating tensors.
tm_dtype output_dtype(const tm_tensor_info &first, const tm_merge_options &o) {
    if (!tm_dtype_is_floating(first.dtype) || !o.has_dtype) return first.dtype;
    bool complex = first.dtype == TM_COMPLEX64 || first.dtype == TM_COMPLEX128;
    if (complex) return first.dtype;  // --dtype names real types; complex stays complex
    return o.dtype;
}

// Tensors that share a storage in every input, the same way, are merged storage by storage.
bool shared_identically(const std::vector<size_t> &group, const Plan &plan, const std::vector<Input> &inputs) {
    for (size_t i = 0; i < inputs.size(); i++) {
        int64_t sid = -1;
        tm_dtype dt{};
        uint64_t storage_numel = 0;
        for (size_t k : group) {
            if (plan.where[k][i] < 0) return false;
            tm_tensor_info t = info_of(inputs[i], size_t(plan.where[k][i]));
            tm_tensor_info r = info_of(inputs[0], size_t(plan.where[k][0]));
            uint64_t sn = t.storage_nbytes / tm_dtype_size(t.dtype);
            if (sid < 0) {
                sid = t.storage_id;
                dt = t.dtype;
                storage_numel = sn;
            } else if (t.storage_id != sid || t.dtype != dt || sn != storage_numel) {
                return false;
            }
            if (sn != r.storage_nbytes / tm_dtype_size(r.dtype) || t.storage_offset != r.storage_offset)
                return false;
            for (int d = 0; d < t.ndim; d++)
                if (t.stride[d] != r.stride[d]) return false;
        }
        // No other merged tensor may live in that storage in this input.
        size_t users = 0;
        for (size_t k = 0; k < plan.keys.size(); k++)
            if (plan.where[k][i] >= 0 && info_of(inputs[i], size_t(plan.where[k][i])).storage_id == sid) users++;
        if (users != group.size()) return false;
    }
    return true;
}

void plan_units(Plan &plan, const std::vector<Input> &inputs, const tm_merge_options &o) {
    std::map<int64_t, std::vector<size_t>> by_storage;  // storage id in input 0 → keys
    std::vector<bool> grouped(plan.keys.size(), false);
    for (size_t k = 0; k < plan.keys.size(); k++)
        if (plan.where[k][0] >= 0) by_storage[info_of(inputs[0], size_t(plan.where[k][0])).storage_id].push_back(k);
    std::map<size_t, size_t> unit_of_first_key;
    std::vector<Unit> shared;
    for (auto &[sid, group] : by_storage) {
        if (group.size() < 2 || !shared_identically(group, plan, inputs)) continue;
        tm_tensor_info r = info_of(inputs[0], size_t(plan.where[group[0]][0]));
        Unit u;
        u.keys = group;
        u.whole_storage = true;
        u.floating = tm_dtype_is_floating(r.dtype);
        u.out_dtype = output_dtype(r, o);
        u.numel = int64_t(r.storage_nbytes / tm_dtype_size(r.dtype));
        for (size_t k : group) grouped[k] = true;
        unit_of_first_key[group[0]] = shared.size();
        shared.push_back(std::move(u));
    }
    // Units in the order of their first key, so output records follow the first input's order.
    for (size_t k = 0; k < plan.keys.size(); k++) {
        auto it = unit_of_first_key.find(k);
        if (it != unit_of_first_key.end()) {
            plan.units.push_back(shared[it->second]);
            continue;
        }
        if (grouped[k]) continue;
        size_t i = 0;
        while (plan.where[k][i] < 0) i++;
        tm_tensor_info r = info_of(inputs[i], size_t(plan.where[k][i]));
        Unit u;
        u.keys = {k};
        u.floating = tm_dtype_is_floating(r.dtype);
        u.out_dtype = output_dtype(r, o);
        u.numel = int64_t(r.numel);
        plan.units.push_back(std::move(u));
    }
}

tm_tensor_info storage_info(const tm_tensor_info &t) {
    static thread_local int64_t shape[1], stride[1] = {1};
    tm_tensor_info s = t;
    shape[0] = int64_t(t.storage_nbytes / tm_dtype_size(t.dtype));
    s.ndim = 1;
    s.shape = shape;
    s.stride = stride;
    s.storage_offset = 0;
    s.numel = uint64_t(shape[0]);
    s.nbytes = t.storage_nbytes;
    return s;
}

struct Timer {
    double *slot;
    uint64_t *calls;
    Clock::time_point start = Clock::now();
    ~Timer() {
        *slot += std::chrono::duration<double>(Clock::now() - start).count();
        ++*calls;
    }
};

class Merger {
public:
    Merger(const Plan &plan, const std::vector<Input> &inputs, std::vector<double> weights,
           const tm_merge_options &o, tm_profile &prof)
        : plan_(plan), inputs_(inputs), weights_(std::move(weights)), o_(o), prof_(prof) {}

    // The merged storage (or tensor) of unit u, contiguous, in u.out_dtype.
    at::Tensor merge(const Unit &u) {
        size_t k0 = u.keys[0];
        std::vector<size_t> present;
        for (size_t i = 0; i < inputs_.size(); i++)
            if (plan_.where[k0][i] >= 0) present.push_back(i);
        auto view = [&](size_t i) {
            tm_tensor_info t = info_of(inputs_[i], size_t(plan_.where[k0][i]));
            return view_of(u.whole_storage ? storage_info(t) : t);
        };
        at::ScalarType out_t = to_scalar_type(u.out_dtype);
        if (!u.floating) {
            at::Tensor first;
            {
                Timer t{&prof_.load_seconds, &prof_.load_calls};
                first = view(present[0]).contiguous();
            }
            for (size_t j = 1; j < present.size(); j++)
                if (!at::equal(first, view(present[j]))) {
                    for (size_t k : u.keys) differing_.push_back(plan_.keys[k]);
                    break;
                }
            return first.scalar_type() == out_t ? first : first.to(out_t);
        }
        double wsum = 0;
        for (size_t i : present) wsum += weights_[i];
        bool complex = out_t == at::kComplexFloat || out_t == at::kComplexDouble;
        at::ScalarType acc_t = complex ? at::kComplexDouble : at::kDouble;
        at::Tensor acc;
        for (size_t i : present) {
            double w = weights_[i];
            if (o_.normalize && present.size() != inputs_.size()) w /= wsum;  // union: renormalise
            at::Tensor x;
            {
                Timer t{&prof_.load_seconds, &prof_.load_calls};
                x = view(i).to(acc_t, /*non_blocking=*/false, /*copy=*/true);
            }
            Timer t{&prof_.merge_seconds, &prof_.merge_calls};
            if (!acc.defined()) {
                acc = x.mul_(w);
            } else {
                acc.add_(x, w);
            }
        }
        Timer t{&prof_.merge_seconds, &prof_.merge_calls};
        return acc.to(out_t).contiguous();
    }

    void release(const Unit &u) {
        for (size_t i = 0; i < inputs_.size(); i++) {
            int64_t idx = plan_.where[u.keys[0]][i];
            if (idx >= 0) tm_checkpoint_release_tensor(inputs_[i].ck, size_t(idx));
        }
    }

    const std::vector<std::string> &differing() const { return differing_; }

private:
    const Plan &plan_;
    const std::vector<Input> &inputs_;
    std::vector<double> weights_;
    const tm_merge_options &o_;
    tm_profile &prof_;
    std::vector<std::string> differing_;
};

std::vector<double> resolve_weights(const tm_merge_options &o, size_t n) {
    std::vector<double> w(n, 1.0 / double(n));
    if (!o.weights) return w;
    if (o.n_weights != n)
        fail(TM_ERROR_INVALID_ARGUMENT, "expected " + std::to_string(n) + " weights (one per input), got " +
                                            std::to_string(o.n_weights));
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        if (!std::isfinite(o.weights[i]))
            fail(TM_ERROR_INVALID_ARGUMENT, "weight " + std::to_string(i + 1) + " is not a finite number");
        w[i] = o.weights[i];
        sum += w[i];
    }
    if (o.normalize) {
        if (sum == 0 || !std::isfinite(sum))
            fail(TM_ERROR_INVALID_ARGUMENT, "the weights sum to 0 and cannot be normalised (use --no-normalize)");
        for (auto &x : w) x /= sum;
    }
    return w;
}

void refuse_overwriting_an_input(const char *const *inputs, size_t n, const char *output,
                                 const char *template_path) {
    char *out = realpath(output, nullptr);
    if (!out) return;  // output does not exist yet
    std::string o(out);
    free(out);
    auto same = [&](const char *p) {
        if (!p) return false;
        char *r = realpath(p, nullptr);
        bool eq = r && o == r;
        free(r);
        return eq;
    };
    for (size_t i = 0; i < n; i++)
        if (same(inputs[i]))
            fail(TM_ERROR_INVALID_ARGUMENT, std::string(output) + ": the output would replace an input");
    if (same(template_path))
        fail(TM_ERROR_INVALID_ARGUMENT, std::string(output) + ": the output would replace the template");
}

void warn(const tm_merge_options &o, const std::string &msg) {
    if (o.warning) o.warning(o.warning_user, msg.c_str());
}

// Fills the output tensor list (shape/stride/offset per key) for the plan.
void describe_outputs(const Plan &plan, const std::vector<Input> &inputs, std::vector<OutTensor> &tensors,
                      std::vector<OutStorage> &storages) {
    tensors.assign(plan.keys.size(), OutTensor{});
    storages.clear();
    for (size_t s = 0; s < plan.units.size(); s++) {
        const Unit &u = plan.units[s];
        storages.push_back({u.out_dtype, u.numel});
        for (size_t k : u.keys) {
            size_t i = 0;
            while (plan.where[k][i] < 0) i++;
            tm_tensor_info r = info_of(inputs[i], size_t(plan.where[k][i]));
            OutTensor &t = tensors[k];
            t.name = plan.keys[k];
            t.dtype = u.out_dtype;
            t.storage = s;
            t.shape.assign(r.shape, r.shape + r.ndim);
            if (u.whole_storage) {
                t.stride.assign(r.stride, r.stride + r.ndim);
                t.storage_offset = r.storage_offset;
            } else {
                t.stride.assign(size_t(r.ndim), 1);
                for (int d = r.ndim - 2; d >= 0; d--) t.stride[size_t(d)] = t.stride[size_t(d) + 1] * std::max<int64_t>(r.shape[d + 1], 1);
                t.storage_offset = 0;
            }
        }
    }
}

void run_merge(const char *const *paths, size_t n, const char *output, const tm_merge_options &o) {
    if (n == 0) fail(TM_ERROR_INVALID_ARGUMENT, "no input files");
    if (!output || !*output) fail(TM_ERROR_INVALID_ARGUMENT, "no output path");
    std::vector<double> weights = resolve_weights(o, n);
    refuse_overwriting_an_input(paths, n, output, o.template_path);

    tm_profile prof{};
    InputSet set;
    {
        Timer t{&prof.load_seconds, &prof.load_calls};
        open_inputs(set, paths, n, o.key);
    }
    const auto &inputs = set.inputs;
    Plan plan;
    plan_keys(plan, inputs, o.keys);
    check_compatible(plan, inputs);
    plan_units(plan, inputs, o);

    tm_format format = o.format;
    if (format == TM_FORMAT_AUTO)
        format = (o.template_path || tm_checkpoint_is_module(inputs[0].ck)) ? TM_FORMAT_TORCHSCRIPT : TM_FORMAT_PT;
    std::string module_path;
    if (format == TM_FORMAT_TORCHSCRIPT) {
        if (o.template_path) module_path = o.template_path;
        else if (tm_checkpoint_is_module(inputs[0].ck)) module_path = inputs[0].path;
        else fail(TM_ERROR_INVALID_ARGUMENT, inputs[0].path + ": TorchScript output needs module inputs or --template MODULE");
    }

    Merger merger(plan, inputs, weights, o, prof);
    size_t done = 0, total = plan.units.size();
    if (format == TM_FORMAT_PT) {
        std::vector<OutTensor> tensors;
        std::vector<OutStorage> storages;
        describe_outputs(plan, inputs, tensors, storages);
        PtWriter writer(output);
        {
            Timer t{&prof.save_seconds, &prof.save_calls};
            writer.write_header(tensors, storages);
        }
        for (size_t s = 0; s < plan.units.size(); s++) {
            at::Tensor merged = merger.merge(plan.units[s]);
            {
                Timer t{&prof.save_seconds, &prof.save_calls};
                writer.write_storage(s, merged.data_ptr(), merged.nbytes());
            }
            merger.release(plan.units[s]);
            if (o.progress) o.progress(o.progress_user, ++done, total);
        }
        Timer t{&prof.save_seconds, &prof.save_calls};
        writer.commit();
    } else {
        std::unique_ptr<ModuleWriter> writer;
        {
            Timer t{&prof.load_seconds, &prof.load_calls};
            writer = std::make_unique<ModuleWriter>(module_path, output, o.has_dtype != 0, o.dtype);
        }
        std::vector<OutTensor> tensors;
        std::vector<OutStorage> storages;
        describe_outputs(plan, inputs, tensors, storages);
        std::vector<std::string> ignored;
        for (const Unit &u : plan.units) {
            at::Tensor merged = merger.merge(u);
            Timer t{&prof.save_seconds, &prof.save_calls};
            for (size_t k : u.keys) {
                const OutTensor &ot = tensors[k];
                if (!writer->has(ot.name)) {
                    ignored.push_back(ot.name);
                    continue;
                }
                writer->set(ot.name, merged.as_strided(ot.shape, ot.stride, ot.storage_offset));
            }
            merger.release(u);
            if (o.progress) o.progress(o.progress_user, ++done, total);
        }
        if (!ignored.empty())
            warn(o, "ignored " + std::to_string(ignored.size()) + " tensors that " + module_path +
                        " holds no parameter or buffer for: " + quote_list(ignored));
        Timer t{&prof.save_seconds, &prof.save_calls};
        writer->commit();
    }
    if (!merger.differing().empty())
        warn(o, "non-floating tensors differ between inputs; taken from " + inputs[0].path + ": " +
                    quote_list(merger.differing()));
    if (o.profile) *o.profile = prof;
}

}  // namespace
}  // namespace torchmerge

extern "C" {

void tm_merge_options_init(tm_merge_options *opts) {
    if (!opts) return;
    *opts = tm_merge_options{};
    opts->normalize = 1;
    opts->format = TM_FORMAT_AUTO;
    opts->keys = TM_KEYS_STRICT;
    opts->dtype = TM_FLOAT32;
}

tm_status tm_merge_files(const char *const *inputs, size_t n, const char *output,
                         const tm_merge_options *opts) {
    return torchmerge::guarded([&] {
        tm_merge_options defaults;
        tm_merge_options_init(&defaults);
        if (!inputs && n) torchmerge::fail(TM_ERROR_INVALID_ARGUMENT, "inputs is NULL");
        torchmerge::run_merge(inputs, n, output, opts ? *opts : defaults);
    });
}

}  // extern "C"
