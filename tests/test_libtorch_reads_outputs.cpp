// What torchmerge writes, read by LibTorch itself: pt outputs through torch::pickle_load (which
// cannot read torch.save(model.state_dict()) files, so ours must be plain dicts), TorchScript
// outputs through torch::jit::load, compared with an average computed here with ATen.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "torchmerge.h"

namespace {

// Inputs come from the generate_fixtures test (tests/fixtures/make_fixtures.py); each test case
// writes outputs under its own name, so cases can run in parallel.
std::string path(const std::string &name) { return std::string(TM_FIXTURES) + "/" + name; }

c10::IValue pickle_load_file(const std::string &p) {
    std::ifstream f(p, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return torch::jit::pickle_load(bytes);
}

// Every parameter and buffer of a scripted module by name.
std::map<std::string, at::Tensor> tensors_of(const torch::jit::Module &m) {
    std::map<std::string, at::Tensor> out;
    for (const auto &p : m.named_parameters(true)) out[p.name] = p.value;
    for (const auto &b : m.named_buffers(true)) out[b.name] = b.value;
    return out;
}

void merge(std::vector<std::string> inputs, const std::string &out, const tm_merge_options *o = nullptr) {
    std::vector<const char *> argv;
    for (auto &s : inputs) argv.push_back(s.c_str());
    INFO(tm_errmsg());
    REQUIRE(tm_merge_files(argv.data(), argv.size(), out.c_str(), o) == TM_OK);
}

}  // namespace

TEST_CASE("pickle_load reads a merged state dict as a dict of the averaged tensors") {
    std::string out = path("libtorch_mean.pt");
    merge({path("ts_a.pt"), path("ts_b.pt"), path("ts_c.pt")}, out, [] {
        static tm_merge_options o;
        tm_merge_options_init(&o);
        o.format = TM_FORMAT_PT;
        return &o;
    }());
    c10::IValue v = pickle_load_file(out);
    REQUIRE(v.isGenericDict());
    auto dict = v.toGenericDict();

    auto a = tensors_of(torch::jit::load(path("ts_a.pt")));
    auto b = tensors_of(torch::jit::load(path("ts_b.pt")));
    auto c = tensors_of(torch::jit::load(path("ts_c.pt")));
    REQUIRE(dict.size() == a.size());
    for (const auto &[name, ta] : a) {
        INFO(name);
        REQUIRE(dict.contains(name));
        at::Tensor got = dict.at(name).toTensor();
        REQUIRE(got.sizes() == ta.sizes());
        REQUIRE(got.scalar_type() == ta.scalar_type());
        if (at::isFloatingType(ta.scalar_type())) {
            at::Tensor ref = ((ta.to(at::kDouble) + b[name].to(at::kDouble) + c[name].to(at::kDouble)) / 3.0)
                                 .to(ta.scalar_type());
            CHECK(at::allclose(got, ref, 1e-6, 1e-7));
        } else {
            CHECK(at::equal(got, ta));  // non-floating: taken from the first input
        }
    }
}

TEST_CASE("pickle_load reads every dtype we write") {
    std::string out = path("libtorch_dtypes.pt");
    merge({path("dtype_a.pt"), path("dtype_b.pt")}, out);
    auto dict = pickle_load_file(out).toGenericDict();
    std::map<std::string, at::ScalarType> expected = {
        {"f64", at::kDouble}, {"f32", at::kFloat},  {"f16", at::kHalf},   {"bf16", at::kBFloat16},
        {"i64", at::kLong},   {"i32", at::kInt},    {"i16", at::kShort},  {"i8", at::kChar},
        {"u8", at::kByte},    {"bool", at::kBool},  {"c64", at::kComplexFloat}, {"c128", at::kComplexDouble}};
    for (const auto &[name, st] : expected) {
        INFO(name);
        REQUIRE(dict.contains(name));
        CHECK(dict.at(name).toTensor().scalar_type() == st);
    }
}

TEST_CASE("a merged TorchScript module reloads with torch::jit::load and runs the averaged model") {
    std::string out = path("libtorch_module.pt");
    merge({path("ts_a.pt"), path("ts_b.pt"), path("ts_c.pt")}, out);
    torch::jit::Module merged = torch::jit::load(out);
    merged.eval();

    // Reference: the first module with its tensors replaced by the float64 mean, in ATen.
    torch::jit::Module ref = torch::jit::load(path("ts_a.pt"));
    ref.eval();
    auto b = tensors_of(torch::jit::load(path("ts_b.pt")));
    auto c = tensors_of(torch::jit::load(path("ts_c.pt")));
    {
        at::NoGradGuard g;
        for (auto &[name, t] : tensors_of(ref))
            if (at::isFloatingType(t.scalar_type()))
                t.copy_((t.to(at::kDouble) + b[name].to(at::kDouble) + c[name].to(at::kDouble)) / 3.0);
    }
    at::manual_seed(0);
    at::Tensor x = at::randn({2, 3, 8, 8});
    at::Tensor y = merged.forward({x}).toTensor();
    at::Tensor y_ref = ref.forward({x}).toTensor();
    CHECK(at::allclose(y, y_ref, 1e-5, 1e-6));
    auto mt = tensors_of(merged);
    for (auto &[name, t] : tensors_of(ref)) {
        INFO(name);
        CHECK(at::allclose(mt[name].to(at::kDouble), t.to(at::kDouble), 1e-6, 1e-7));
    }
}

TEST_CASE("state dict inputs merged into a template module via --template") {
    std::string out = path("libtorch_template.pt");
    tm_merge_options o;
    tm_merge_options_init(&o);
    std::string tmpl = path("template.pt");
    o.template_path = tmpl.c_str();
    merge({path("sd_a.pt"), path("sd_b.pt")}, out, &o);
    torch::jit::Module m = torch::jit::load(out);
    auto a = tensors_of(torch::jit::load(path("ts_a.pt")));
    auto b = tensors_of(torch::jit::load(path("ts_b.pt")));
    for (auto &[name, t] : tensors_of(m)) {
        INFO(name);
        if (!at::isFloatingType(t.scalar_type())) continue;
        at::Tensor ref = ((a[name].to(at::kDouble) + b[name].to(at::kDouble)) / 2).to(t.scalar_type());
        CHECK(at::allclose(t, ref, 1e-6, 1e-7));
    }
}
