// Opening real checkpoints written by other people (../shared/realworld, when present): every
// tensor we report must match the static oracle TENSORS.tsv (dtype, shape, stride, offset).
#include <catch2/catch.hpp>

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint/checkpoint_internal.h"
#include "test_support.hpp"

namespace {

const std::string kCorpus = tm_test::realworld_dir();

struct OracleRow {
    std::string path, dtype, shape, stride;
    long long offset;
};

std::vector<std::string> split(const std::string &s, char sep) {
    std::vector<std::string> out;
    std::string cur;
    std::istringstream in(s);
    while (std::getline(in, cur, sep)) out.push_back(cur);
    if (!s.empty() && s.back() == sep) out.push_back("");
    return out;
}

bool corpus_present() { return !tm_test::realworld_file("MANIFEST.tsv").empty(); }

std::map<std::string, std::string> manifest_formats() {
    std::map<std::string, std::string> out;
    std::ifstream f(kCorpus + "/MANIFEST.tsv");
    std::string line;
    std::getline(f, line);
    while (std::getline(f, line)) {
        auto cols = split(line, '\t');
        if (cols.size() > 5) out[cols[0]] = cols[5];
    }
    return out;
}

std::multimap<std::string, OracleRow> oracle() {
    std::multimap<std::string, OracleRow> out;
    std::ifstream f(kCorpus + "/TENSORS.tsv");
    std::string line;
    std::getline(f, line);
    while (std::getline(f, line)) {
        auto c = split(line, '\t');
        if (c.size() < 10) continue;
        out.emplace(c[0], OracleRow{c[1], c[2], c[3], c[6], std::stoll(c[5])});
    }
    return out;
}

std::string oracle_dtype(tm_dtype d) {
    static const std::map<tm_dtype, std::string> m = {
        {TM_FLOAT64, "f64"}, {TM_FLOAT32, "f32"}, {TM_FLOAT16, "f16"}, {TM_BFLOAT16, "bf16"},
        {TM_INT64, "i64"},   {TM_INT32, "i32"},   {TM_INT16, "i16"},   {TM_INT8, "i8"},
        {TM_UINT8, "u8"},    {TM_BOOL, "bool"}};
    auto it = m.find(d);
    return it == m.end() ? tm_dtype_name(d) : it->second;
}

std::string dims(int32_t n, const int64_t *v) {
    if (n == 0) return "";
    std::string s;
    for (int32_t i = 0; i < n; i++) s += (i ? "x" : "") + std::to_string(v[i]);
    return s;
}

struct Opened {
    tm_checkpoint *ck = nullptr;
    tm_error err{};
    tm_status st;
    Opened(const std::string &path, const char *key = nullptr) {
        tm_open_options o;
        tm_open_options_init(&o);
        o.key = key;
        st = tm_checkpoint_open_err(path.c_str(), &o, &ck, &err);
    }
    ~Opened() { tm_checkpoint_free(ck); }
};

}  // namespace

TEST_CASE("every tensor read from a real torch.save or TorchScript file matches the oracle") {
    if (!corpus_present()) return;
    auto formats = manifest_formats();
    auto rows = oracle();
    int opened = 0, refused = 0;
    for (const auto &[file, format] : formats) {
        if (format != "zip-pt" && format != "torchscript") continue;
        INFO(file);
        Opened o(kCorpus + "/" + file);
        if (o.st != TM_OK) {
            // A refusal must be a one-line message naming the file.
            CHECK(std::string(o.err.msg).find(file.substr(file.find('/') + 1)) != std::string::npos);
            CHECK(std::string(o.err.msg).find('\n') == std::string::npos);
            refused++;
            continue;
        }
        opened++;
        auto range = rows.equal_range(file);
        std::string key = tm_checkpoint_key(o.ck);
        for (size_t i = 0; i < tm_checkpoint_n_tensors(o.ck); i++) {
            tm_tensor_info t{};
            tm_tensor_info_init(&t);
            REQUIRE(tm_checkpoint_tensor(o.ck, i, &t) == TM_OK);
            INFO(t.name);
            std::string want_path = key.empty() ? t.name : key + "." + t.name;
            bool named = false, exact = false, similar = false;
            for (auto it = range.first; it != range.second; ++it) {
                const OracleRow &r = it->second;
                bool same = r.dtype == oracle_dtype(t.dtype) && r.shape == (t.ndim ? dims(t.ndim, t.shape) : "()") &&
                            r.stride == dims(t.ndim, t.stride) && r.offset == t.storage_offset;
                if (r.path == want_path) {
                    named = true;
                    exact = exact || same;
                }
                similar = similar || same;
            }
            // Pickled modules and TorchScript objects name tensors by attribute path, which the
            // oracle spells differently (_modules.x._parameters.w); the layout must still match.
            CHECK(similar);
            if (named) CHECK(exact);
        }
    }
    CHECK(opened >= 15);
    INFO("refused " << refused);
}

TEST_CASE("a nested training checkpoint yields its model state dict") {
    if (!corpus_present()) return;
    Opened o(kCorpus + "/arty542__f1predictor/best_model.pt");
    REQUIRE(o.st == TM_OK);
    CHECK(std::string(tm_checkpoint_key(o.ck)) == "model_state_dict");
    CHECK(tm_checkpoint_n_tensors(o.ck) == 8);
    CHECK(tm_checkpoint_find(o.ck, "output_layer.weight") >= 0);
}

TEST_CASE("Fortran-ordered strides are reported, and reading applies them") {
    if (!corpus_present()) return;
    Opened o(kCorpus + "/huggingface__candle/fortran_tensor_3d.pth");
    REQUIRE(o.st == TM_OK);
    tm_tensor_info t{};
    tm_tensor_info_init(&t);
    REQUIRE(tm_checkpoint_tensor(o.ck, 0, &t) == TM_OK);
    CHECK(dims(t.ndim, t.stride) == "1x2x6");
    std::vector<int64_t> v(24);
    REQUIRE(tm_checkpoint_read(o.ck, 0, v.data(), v.size() * 8) == TM_OK);
    // Element [i][j][k] lives at storage index i + 2j + 6k; the contiguous copy is row-major.
    const int64_t *s = static_cast<const int64_t *>(t.storage_data);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++)
            for (int k = 0; k < 4; k++) CHECK(v[size_t(i * 12 + j * 4 + k)] == s[i + 2 * j + 6 * k]);
}

TEST_CASE("views into one flat storage keep their offsets and share a storage id") {
    if (!corpus_present()) return;
    Opened o(kCorpus + "/annshorn__EyeTrackDiagError/last.ckpt", "state_dict");
    REQUIRE(o.st == TM_OK);
    std::map<int64_t, int> per_storage;
    for (size_t i = 0; i < tm_checkpoint_n_tensors(o.ck); i++) {
        tm_tensor_info t{};
        tm_tensor_info_init(&t);
        tm_checkpoint_tensor(o.ck, i, &t);
        per_storage[t.storage_id]++;
    }
    int max_views = 0;
    for (auto &[id, n] : per_storage) max_views = std::max(max_views, n);
    CHECK(max_views == 8);  // the GRU's 8 weights and biases in one cuDNN buffer
}

TEST_CASE("a pickle with no tensors is refused with a message naming the file") {
    if (!corpus_present()) return;
    Opened o(kCorpus + "/Tashu014__lora-imdb-distilbert/training_args.bin");
    CHECK(o.st != TM_OK);
    CHECK(std::string(o.err.msg).find("training_args.bin") != std::string::npos);
}
