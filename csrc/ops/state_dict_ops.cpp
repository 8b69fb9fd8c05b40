// state_dict_add, state_dict_mul, state_dict_average: key-by-key arithmetic over
// Dict(str, Tensor), out of place, in the first dict's key order. Floating tensors are
// computed in float64 (complex128) and rounded once to the first dict's dtype; integer and bool
// tensors (num_batches_tracked, ...) are copied from the first dict. The kernels compose
// differentiable ATen ops, so gradients flow through them to the dicts' tensors.
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops/ops_common.h"

namespace torchmerge {
namespace ops {
namespace {

using StateDict = c10::Dict<std::string, at::Tensor>;

// "; NAME lacks 'x', 'y'; NAME has keys FIRST lacks: 'z'", or "" when the keys are the same.
std::string key_differences(const StateDict &first, const std::string &first_name, const StateDict &other,
                            const std::string &other_name) {
    std::vector<std::string> lacks, extra;
    for (const auto &item : first)
        if (!other.contains(item.key())) lacks.push_back(item.key());
    for (const auto &item : other)
        if (!first.contains(item.key())) extra.push_back(item.key());
    std::string msg;
    if (!lacks.empty()) msg += "; " + other_name + " lacks " + quote_list(lacks);
    if (!extra.empty()) msg += "; " + other_name + " has keys " + first_name + " lacks: " + quote_list(extra);
    return msg;
}

std::string item_label(const std::string &dict, const std::string &key) { return dict + "['" + key + "']"; }

StateDict state_dict_add(const StateDict &a, const StateDict &b, double alpha) {
    const char *op = "state_dict_add";
    std::string diff = key_differences(a, "a", b, "b");
    TORCH_CHECK(diff.empty(), op, ": the state dicts have different keys", diff);
    StateDict out;
    out.reserve(a.size());
    const std::vector<double> w{1.0, alpha};
    for (const auto &item : a) {
        const std::string &key = item.key();
        std::vector<at::Tensor> ts{item.value(), b.at(key)};
        check_averageable(op, ts, [&](size_t i) { return item_label(i ? "b" : "a", key); });
        out.insert(key, weighted_sum(ts, w));
    }
    return out;
}

StateDict state_dict_mul(const StateDict &sd, double scalar) {
    const char *op = "state_dict_mul";
    StateDict out;
    out.reserve(sd.size());
    const std::vector<double> w{scalar};
    for (const auto &item : sd) {
        const std::string &key = item.key();
        std::vector<at::Tensor> ts{item.value()};
        check_averageable(op, ts, [&](size_t) { return item_label("state_dict", key); });
        out.insert(key, weighted_sum(ts, w));
    }
    return out;
}

StateDict state_dict_average(const c10::List<StateDict> &state_dicts, c10::optional<at::ArrayRef<double>> weights) {
    const char *op = "state_dict_average";
    const size_t n = state_dicts.size();
    TORCH_CHECK(n > 0, op, ": expected at least one state dict, got an empty list");
    std::vector<double> w = resolve_weights(op, n, weights, /*normalize=*/true);
    std::vector<StateDict> sds;
    sds.reserve(n);
    for (size_t i = 0; i < n; i++) sds.push_back(state_dicts.get(i));
    auto name = [](size_t i) { return "state_dicts[" + std::to_string(i) + "]"; };
    std::string diff;
    for (size_t i = 1; i < n; i++) diff += key_differences(sds[0], name(0), sds[i], name(i));
    TORCH_CHECK(diff.empty(), op, ": the state dicts have different keys", diff);
    StateDict out;
    out.reserve(sds[0].size());
    std::vector<at::Tensor> ts(n);
    for (const auto &item : sds[0]) {
        const std::string &key = item.key();
        for (size_t i = 0; i < n; i++) ts[i] = sds[i].at(key);
        check_averageable(op, ts, [&](size_t i) { return item_label(name(i), key); });
        out.insert(key, weighted_sum(ts, w));
    }
    return out;
}

}  // namespace
}  // namespace ops
}  // namespace torchmerge

// No Tensor arguments to dispatch on (tensors inside a Dict are not looked at), so these always
// reach their CompositeImplicitAutograd kernel, whose ATen calls dispatch (and record autograd)
// per tensor as usual.
TORCH_LIBRARY_IMPL(torchmerge, CompositeImplicitAutograd, m) {
    m.impl("state_dict_add", TORCH_FN(torchmerge::ops::state_dict_add));
    m.impl("state_dict_mul", TORCH_FN(torchmerge::ops::state_dict_mul));
    m.impl("state_dict_average", TORCH_FN(torchmerge::ops::state_dict_average));
}
