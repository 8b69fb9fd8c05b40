// The torchmerge ops from C++: a scripted module saved by Python
// (torchscript/make_scripted_average.py, run by the ops_make_scripted fixture) calls
// torch.ops.torchmerge.*; torch::jit::load finds the ops because this binary links
// libtorchmerge_ops.so with -Wl,--no-as-needed. Results are compared with plain ATen
// references computed in float64.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

#ifndef TM_OPS_SCRIPTED
#error "TM_OPS_SCRIPTED must name the scripted module written by make_scripted_average.py"
#endif

namespace {

using StateDict = c10::Dict<std::string, at::Tensor>;

torch::jit::Module &scripted() {
    static torch::jit::Module m = torch::jit::load(TM_OPS_SCRIPTED);
    return m;
}

at::Tensor randn(std::vector<int64_t> shape, uint64_t seed, at::ScalarType dtype = at::kFloat) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    return at::randn(shape, gen, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

// |out - ref| <= eps(dtype) * |ref| + tiny: one rounding of a float64 accumulation.
void require_close(const at::Tensor &out, const at::Tensor &ref64, at::ScalarType dtype) {
    REQUIRE(out.scalar_type() == dtype);
    REQUIRE(out.sizes() == ref64.sizes());
    double eps = dtype == at::kFloat ? 1.0 / (1 << 23) : dtype == at::kHalf ? 1.0 / (1 << 10)
               : dtype == at::kBFloat16 ? 1.0 / (1 << 7) : 4.0 / double(uint64_t(1) << 52);
    at::Tensor err = (out.to(at::kDouble) - ref64).abs();
    at::Tensor bound = ref64.abs() * eps + 1e-30;
    REQUIRE(at::le(err, bound).all().item<bool>());
}

std::string error_of(const std::function<void()> &f) {
    try {
        f();
    } catch (const std::exception &e) {
        return e.what();
    }
    return "";
}

}  // namespace

TEST_CASE("scripted forward() calls torchmerge::simple_average") {
    std::vector<at::Tensor> ts{randn({5, 7}, 1), randn({5, 7}, 2), randn({5, 7}, 3)};
    c10::List<at::Tensor> list(ts);
    at::Tensor out = scripted().forward({list}).toTensor();
    at::Tensor ref = (ts[0].to(at::kDouble) + ts[1].to(at::kDouble) + ts[2].to(at::kDouble)) / 3;
    require_close(out, ref, at::kFloat);
}

TEST_CASE("scripted weighted() keeps float16 and rounds once from float64") {
    std::vector<at::Tensor> ts{randn({64}, 4, at::kHalf), randn({64}, 5, at::kHalf)};
    c10::List<at::Tensor> list(ts);
    c10::List<double> w({1.0, 3.0});
    at::Tensor out = scripted().get_method("weighted")({list, w}).toTensor();
    at::Tensor ref = ts[0].to(at::kDouble) * 0.25 + ts[1].to(at::kDouble) * 0.75;
    require_close(out, ref, at::kHalf);

    at::Tensor raw = scripted().get_method("weighted")({list, w, false}).toTensor();
    require_close(raw, ts[0].to(at::kDouble) + ts[1].to(at::kDouble) * 3, at::kHalf);
}

TEST_CASE("scripted average_state_dicts(): weights, integer buffers, key order") {
    StateDict a, b;
    a.insert("fc.weight", randn({3, 4}, 6));
    a.insert("bn.num_batches_tracked", at::scalar_tensor(7, at::kLong));
    a.insert("bn.running_mean", randn({3}, 7, at::kBFloat16));
    b.insert("bn.running_mean", randn({3}, 8, at::kBFloat16));
    b.insert("fc.weight", randn({3, 4}, 9));
    b.insert("bn.num_batches_tracked", at::scalar_tensor(9, at::kLong));
    c10::List<StateDict> sds({a, b});
    c10::List<double> w({2.0, 6.0});

    auto out = c10::impl::toTypedDict<std::string, at::Tensor>(
        scripted().get_method("average_state_dicts")({sds, w}).toGenericDict());
    std::vector<std::string> keys;
    for (const auto &item : out) keys.push_back(item.key());
    REQUIRE(keys == std::vector<std::string>{"fc.weight", "bn.num_batches_tracked", "bn.running_mean"});
    for (const char *k : {"fc.weight", "bn.running_mean"}) {
        at::Tensor ref = a.at(k).to(at::kDouble) * 0.25 + b.at(k).to(at::kDouble) * 0.75;
        require_close(out.at(k), ref, a.at(k).scalar_type());
    }
    REQUIRE(out.at("bn.num_batches_tracked").scalar_type() == at::kLong);
    REQUIRE(out.at("bn.num_batches_tracked").item<int64_t>() == 7);

    // weights=None: uniform.
    auto uniform = c10::impl::toTypedDict<std::string, at::Tensor>(
        scripted().get_method("average_state_dicts")({sds}).toGenericDict());
    require_close(uniform.at("fc.weight"), (a.at("fc.weight").to(at::kDouble) + b.at("fc.weight").to(at::kDouble)) / 2,
                  at::kFloat);
}

TEST_CASE("scripted task_arithmetic() composes state_dict_add") {
    StateDict base, ft1, ft2;
    base.insert("w", randn({4}, 10));
    ft1.insert("w", randn({4}, 11));
    ft2.insert("w", randn({4}, 12));
    c10::List<StateDict> fts({ft1, ft2});
    auto out = c10::impl::toTypedDict<std::string, at::Tensor>(
        scripted().get_method("task_arithmetic")({base, fts, 0.5}).toGenericDict());
    at::Tensor b = base.at("w").to(at::kDouble);
    at::Tensor ref = b + 0.5 * (ft1.at("w").to(at::kDouble) - b) + 0.5 * (ft2.at("w").to(at::kDouble) - b);
    REQUIRE(at::allclose(out.at("w").to(at::kDouble), ref, 1e-6, 1e-6));
}

TEST_CASE("errors inside the scripted module surface as exceptions naming the problem") {
    c10::List<at::Tensor> bad({randn({3, 4}, 13), randn({4, 4}, 14)});
    std::string msg = error_of([&] { scripted().forward({bad}); });
    REQUIRE_THAT(msg, Catch::Contains("tensor 1 has shape [4, 4]") && Catch::Contains("[3, 4]"));

    c10::List<at::Tensor> two({randn({2}, 15), randn({2}, 16)});
    msg = error_of([&] { scripted().get_method("weighted")({two, c10::List<double>({1.0})}); });
    REQUIRE_THAT(msg, Catch::Contains("expected 2 weights (one per input), got 1"));

    msg = error_of([&] { scripted().forward({c10::List<at::Tensor>()}); });
    REQUIRE_THAT(msg, Catch::Contains("expected at least one tensor"));
}

TEST_CASE("the ops are callable through the dispatcher without TorchScript") {
    auto op = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("torchmerge::weighted_average", "tensor_weights")
                  .typed<at::Tensor(at::TensorList, const at::Tensor &, bool)>();
    std::vector<at::Tensor> ts{randn({6}, 17, at::kDouble), randn({6}, 18, at::kDouble)};
    at::Tensor w = at::tensor({1.0, 3.0}, at::kDouble);
    at::Tensor out = op.call(ts, w, true);
    require_close(out, ts[0] * 0.25 + ts[1] * 0.75, at::kDouble);

    auto simple = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("torchmerge::simple_average", "")
                      .typed<at::Tensor(at::TensorList)>();
    std::vector<at::Tensor> ints{at::arange(4, at::kLong), at::arange(4, at::kLong) * 10};
    at::Tensor first = simple.call(ints);
    REQUIRE(at::equal(first, ints[0]));
    REQUIRE(first.data_ptr() != ints[0].data_ptr());  // a copy, never an alias
}
