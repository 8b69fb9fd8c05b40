// safetensors reader and writer: round trips, Python (json + struct + torch.frombuffer) reading
// our output, real files from the shared corpus, and hostile headers that must fail cleanly
// with a message naming the file and the tensor.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "formats/safetensors.h"
#include "test_support.hpp"

namespace {

using tm_test::Bytes;
using Meta = std::vector<std::pair<std::string, std::string>>;

const char *kStPython = TM_TEST_PYTHON;  // test_support.hpp defaults it

const char *const kLabel = "test.safetensors";

struct StTempFile : tm_test::TempFile {
    explicit StTempFile(const char *suffix = ".safetensors") : tm_test::TempFile(suffix) {}
};
using tm_test::read_file;
using tm_test::write_file;

std::string run_capture(const std::string &cmd, int *rc) {
    std::string out;
    FILE *p = popen(cmd.c_str(), "r");
    REQUIRE(p != nullptr);
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    *rc = pclose(p);
    return out;
}

bool python_present() {
    if (access(kStPython, X_OK) == 0) return true;
    tm_test::skip(std::string("no Python at ") + kStPython);
    return false;
}

void put_le64(Bytes &b, uint64_t v) {
    for (int i = 0; i < 8; i++) b.push_back((uint8_t)(v >> (8 * i)));
}

// A file with the given header length field, header text and data section.
Bytes raw_file(uint64_t len_field, const std::string &header, const Bytes &data = {}) {
    Bytes b;
    put_le64(b, len_field);
    b.insert(b.end(), header.begin(), header.end());
    b.insert(b.end(), data.begin(), data.end());
    return b;
}

// A file whose length field is right.
Bytes st_file(const std::string &header, const Bytes &data = {}) {
    return raw_file(header.size(), header, data);
}

Bytes zeros(size_t n) { return Bytes(n, 0); }

// Opens a copy of the bytes in an exactly sized heap block, so AddressSanitizer catches any
// read past the end.
struct Opened {
    std::unique_ptr<uint8_t[]> buf;
    size_t size = 0;
    tm_safetensors *st = nullptr;
    tm_error err{};
    tm_status status = TM_OK;
    explicit Opened(const Bytes &b, const char *label = kLabel) {
        size = b.size();
        buf.reset(new uint8_t[size ? size : 1]);
        if (size) std::memcpy(buf.get(), b.data(), size);
        status = tm_safetensors_open(buf.get(), size, label, &st, &err);
        if (status == TM_OK) {
            REQUIRE(st != nullptr);
        } else {
            REQUIRE(st == nullptr);
        }
    }
    ~Opened() { tm_safetensors_free(st); }
    Opened(const Opened &) = delete;
    Opened &operator=(const Opened &) = delete;
};

void expect_failure(const Bytes &file, tm_status want, std::initializer_list<const char *> parts) {
    Opened o(file);
    std::string shown(file.begin() + std::min<size_t>(8, file.size()),
                      file.begin() + std::min<size_t>(200, file.size()));
    INFO("file after the length field: " << shown);
    INFO("message: " << o.err.msg);
    CHECK(o.status == want);
    CHECK(std::string(o.err.msg).rfind(std::string(kLabel) + ": ", 0) == 0);
    CHECK(std::strchr(o.err.msg, '\n') == nullptr);
    for (const char *p : parts) CHECK(std::string(o.err.msg).find(p) != std::string::npos);
}

template <class T>
Bytes bytes_of(std::initializer_list<T> v) {
    Bytes b(v.size() * sizeof(T));
    if (!b.empty()) std::memcpy(b.data(), v.begin(), b.size());
    return b;
}

struct Spec {
    std::string name;
    tm_dtype dtype;
    std::vector<int64_t> shape;
    Bytes data;
};

// Every dtype safetensors can name, a scalar, empty tensors and a name that needs escaping.
// Python's check below holds the same values.
std::vector<Spec> sample_tensors() {
    return {
        {"f32", TM_FLOAT32, {2, 3}, bytes_of<float>({-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f})},
        {"f64.scalar", TM_FLOAT64, {}, bytes_of<double>({3.25})},
        {"f16", TM_FLOAT16, {4}, bytes_of<uint16_t>({0x3C00, 0x4000, 0xB800, 0x7BFF})},
        {"bf16", TM_BFLOAT16, {2, 2}, bytes_of<uint16_t>({0x3F80, 0xC000, 0x3F00, 0x4040})},
        {"c64", TM_COMPLEX64, {2}, bytes_of<float>({1.0f, 2.0f, -3.5f, 0.0f})},
        {"i64", TM_INT64, {3}, bytes_of<int64_t>({-1, (int64_t)1 << 40, INT64_MIN})},
        {"i32", TM_INT32, {2, 2}, bytes_of<int32_t>({1, -2, 3, INT32_MAX})},
        {"i16", TM_INT16, {3}, bytes_of<int16_t>({-32768, 32767, 5})},
        {"i8", TM_INT8, {2}, bytes_of<int8_t>({-128, 127})},
        {"u8", TM_UINT8, {3}, bytes_of<uint8_t>({0, 255, 7})},
        {"bool", TM_BOOL, {3}, bytes_of<uint8_t>({1, 0, 1})},
        {"empty", TM_FLOAT32, {0}, {}},
        {"empty.2d", TM_FLOAT32, {2, 0, 3}, {}},
        {"name \"quoted\" \\ tab\t \xC3\xA9", TM_INT8, {1}, bytes_of<int8_t>({7})},
    };
}

Meta sample_metadata() {
    return {{"format", "pt"}, {"note", "line1\nline2 \"quoted\" \\ \xC3\xA9"}};
}

// Writes specs through the writer to fd: the tensors' bytes concatenated and handed over in
// chunks of chunk bytes (0: one call per tensor).
tm_status write_specs(int fd, const char *label, const std::vector<Spec> &specs,
                      const Meta &meta, size_t chunk, tm_error *err) {
    std::vector<tm_st_out_tensor> outs;
    for (const Spec &s : specs)
        outs.push_back({s.name.c_str(), s.dtype, (int32_t)s.shape.size(), s.shape.data()});
    std::vector<const char *> keys, values;
    for (const auto &kv : meta) {
        keys.push_back(kv.first.c_str());
        values.push_back(kv.second.c_str());
    }
    tm_st_writer *w = nullptr;
    tm_status st = tm_st_writer_open(fd, label, outs.data(), outs.size(), keys.data(),
                                     values.data(), meta.size(), &w, err);
    if (st) {
        CHECK(w == nullptr);
        return st;
    }
    if (chunk == 0) {
        for (const Spec &s : specs)
            if ((st = tm_st_writer_write(w, s.data.data(), s.data.size(), err))) break;
    } else {
        Bytes all;
        for (const Spec &s : specs) all.insert(all.end(), s.data.begin(), s.data.end());
        for (size_t at = 0; at < all.size() && !st; at += chunk)
            st = tm_st_writer_write(w, all.data() + at, std::min(chunk, all.size() - at), err);
    }
    if (!st) st = tm_st_writer_finish(w, err);
    tm_st_writer_free(w);
    return st;
}

Bytes write_to_bytes(const std::vector<Spec> &specs, const Meta &meta, size_t chunk = 0) {
    StTempFile tmp;
    int fd = open(tmp.path.c_str(), O_WRONLY | O_TRUNC);
    REQUIRE(fd >= 0);
    tm_error err{};
    tm_status st = write_specs(fd, tmp.path.c_str(), specs, meta, chunk, &err);
    close(fd);
    INFO(err.msg);
    REQUIRE(st == TM_OK);
    return read_file(tmp.path);
}

void check_matches_specs(const Opened &o, const std::vector<Spec> &specs, const Meta &meta) {
    INFO(o.err.msg);
    REQUIRE(o.status == TM_OK);
    REQUIRE(tm_safetensors_count(o.st) == specs.size());
    for (size_t i = 0; i < specs.size(); i++) {
        const Spec &s = specs[i];
        const tm_st_tensor *t = tm_safetensors_tensor(o.st, i);
        REQUIRE(t != nullptr);
        INFO("tensor " << s.name);
        CHECK(t->name == s.name);
        CHECK(t->dtype == s.dtype);
        REQUIRE(t->ndim == (int32_t)s.shape.size());
        uint64_t numel = 1;
        for (size_t d = 0; d < s.shape.size(); d++) {
            CHECK(t->shape[d] == s.shape[d]);
            numel *= (uint64_t)s.shape[d];
        }
        CHECK(t->numel == numel);
        CHECK(t->end - t->begin == s.data.size());
        const uint8_t *p = tm_safetensors_tensor_data(o.st, i);
        REQUIRE(p != nullptr);
        CHECK(Bytes(p, p + (t->end - t->begin)) == s.data);
        CHECK(tm_safetensors_find(o.st, s.name.c_str()) == (int64_t)i);
    }
    CHECK(tm_safetensors_tensor(o.st, specs.size()) == nullptr);
    CHECK(tm_safetensors_tensor_data(o.st, specs.size()) == nullptr);
    CHECK(tm_safetensors_find(o.st, "no such tensor") == -1);
    REQUIRE(tm_safetensors_metadata_count(o.st) == meta.size());
    for (size_t i = 0; i < meta.size(); i++) {
        CHECK(tm_safetensors_metadata_key(o.st, i) == meta[i].first);
        CHECK(tm_safetensors_metadata_value(o.st, i) == meta[i].second);
        CHECK(tm_safetensors_metadata_find(o.st, meta[i].first.c_str()) == meta[i].second);
    }
    CHECK(tm_safetensors_metadata_key(o.st, meta.size()) == nullptr);
    CHECK(tm_safetensors_metadata_find(o.st, "no such key") == nullptr);
}

// A small valid file: two tensors, 14 bytes of data.
const char *const kTwoTensors =
    "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
    "\"b\":{\"dtype\":\"I16\",\"shape\":[3],\"data_offsets\":[8,14]}}";

// A one-tensor header with the given entry body for tensor "a".
std::string one_tensor(const std::string &body) { return "{\"a\":{" + body + "}}"; }

// Reports the calling line as well when the check fails.
#define EXPECT_FAILURE(...)                                                                     \
    do {                                                                                        \
        INFO("expect_failure at line " << __LINE__);                                            \
        expect_failure(__VA_ARGS__);                                                            \
    } while (0)

} // namespace

// ---- Dtype names ---------------------------------------------------------------------------

TEST_CASE("safetensors dtype names map to tm_dtype and back", "[safetensors]") {
    const std::pair<const char *, tm_dtype> table[] = {
        {"F64", TM_FLOAT64}, {"F32", TM_FLOAT32}, {"F16", TM_FLOAT16}, {"BF16", TM_BFLOAT16},
        {"C64", TM_COMPLEX64}, {"I64", TM_INT64}, {"I32", TM_INT32}, {"I16", TM_INT16},
        {"I8", TM_INT8}, {"U8", TM_UINT8}, {"BOOL", TM_BOOL},
    };
    for (const auto &row : table) {
        tm_dtype d = TM_DTYPE_COUNT;
        CHECK(tm_safetensors_dtype_from_string(row.first, &d, nullptr) == TM_OK);
        CHECK(d == row.second);
        CHECK(std::string(tm_safetensors_dtype_string(row.second)) == row.first);
    }
    CHECK(tm_safetensors_dtype_string(TM_COMPLEX128) == nullptr);
    CHECK(tm_safetensors_dtype_string((tm_dtype)-1) == nullptr);
    CHECK(tm_safetensors_dtype_string(TM_DTYPE_COUNT) == nullptr);
}

TEST_CASE("safetensors dtypes torchmerge lacks are unsupported with a message naming them",
          "[safetensors]") {
    for (const char *name : {"F8_E4M3", "F8_E5M2", "F8_E8M0", "U16", "U32", "U64", "F4"}) {
        tm_error err{};
        tm_dtype d;
        CHECK(tm_safetensors_dtype_from_string(name, &d, &err) == TM_ERROR_UNSUPPORTED);
        CHECK(std::string(err.msg) == std::string("dtype ") + name +
                                          " is not supported by this LibTorch");
    }
    tm_error err{};
    tm_dtype d;
    CHECK(tm_safetensors_dtype_from_string("f32", &d, &err) == TM_ERROR_UNSUPPORTED);
    CHECK(std::string(err.msg) == "unknown dtype 'f32'");
    CHECK(tm_safetensors_dtype_from_string("", &d, nullptr) == TM_ERROR_UNSUPPORTED);
}

TEST_CASE("safetensors looks_like checks the length field and the opening brace",
          "[safetensors]") {
    Bytes good = st_file("{}      ");
    CHECK(tm_safetensors_looks_like(good.data(), good.size()));
    CHECK_FALSE(tm_safetensors_looks_like(good.data(), 8));
    CHECK_FALSE(tm_safetensors_looks_like(nullptr, 0));
    Bytes past = raw_file(1000, "{}      ");
    CHECK_FALSE(tm_safetensors_looks_like(past.data(), past.size()));
    Bytes huge = raw_file((uint64_t)1 << 63, "{}");
    CHECK_FALSE(tm_safetensors_looks_like(huge.data(), huge.size()));
    Bytes not_brace = st_file("[]");
    CHECK_FALSE(tm_safetensors_looks_like(not_brace.data(), not_brace.size()));
    const uint8_t zip[] = {'P', 'K', 3, 4, 0, 0, 0, 0, '{', 0};
    CHECK_FALSE(tm_safetensors_looks_like(zip, sizeof zip));
}

// ---- Writer -> reader --------------------------------------------------------------------

TEST_CASE("safetensors writer output reads back with names dtypes shapes metadata and bytes",
          "[safetensors]") {
    auto specs = sample_tensors();
    auto meta = sample_metadata();
    Bytes file = write_to_bytes(specs, meta);
    Opened o(file);
    check_matches_specs(o, specs, meta);
    CHECK(tm_safetensors_data_offset(o.st) % 8 == 0);
    CHECK(tm_safetensors_data_offset(o.st) + tm_safetensors_data_size(o.st) == file.size());
    // Contiguous in the given order.
    uint64_t pos = 0;
    for (size_t i = 0; i < specs.size(); i++) {
        CHECK(tm_safetensors_tensor(o.st, i)->begin == pos);
        pos = tm_safetensors_tensor(o.st, i)->end;
    }
    CHECK(pos == tm_safetensors_data_size(o.st));
    // The scalar and the empty tensors.
    const tm_st_tensor *scalar = tm_safetensors_tensor(o.st, 1);
    CHECK(scalar->ndim == 0);
    CHECK(scalar->numel == 1);
    const tm_st_tensor *empty2d = tm_safetensors_tensor(o.st, 12);
    CHECK(empty2d->numel == 0);
    CHECK(empty2d->begin == empty2d->end);
}

TEST_CASE("safetensors writer puts metadata first and pads the header with spaces to 8 bytes",
          "[safetensors]") {
    for (size_t len = 1; len <= 17; len++) {
        std::vector<Spec> specs = {{std::string(len, 'w'), TM_FLOAT32, {1}, zeros(4)}};
        Meta meta = len % 2 ? Meta{{"format", "pt"}} : Meta{};
        Bytes file = write_to_bytes(specs, meta);
        uint64_t n = 0;
        for (int i = 7; i >= 0; i--) n = (n << 8) | file[i];
        INFO("name length " << len);
        CHECK(n % 8 == 0);
        REQUIRE(8 + n + 4 == file.size());
        std::string header(file.begin() + 8, file.begin() + 8 + (long)n);
        size_t close_at = header.find_last_of('}');
        REQUIRE(close_at != std::string::npos);
        CHECK(header.find_first_not_of(' ', close_at + 1) == std::string::npos);
        CHECK(n - (close_at + 1) < 8);
        if (!meta.empty())
            CHECK(header.rfind("{\"__metadata__\":{\"format\":\"pt\"},", 0) == 0);
        else
            CHECK(header.find("__metadata__") == std::string::npos);
        Opened o(file);
        check_matches_specs(o, specs, meta);
    }
}

TEST_CASE("safetensors writer output with no tensors reads back empty", "[safetensors]") {
    Bytes file = write_to_bytes({}, {});
    CHECK(file == st_file("{}      "));
    Opened o(file);
    check_matches_specs(o, {}, {});
    CHECK(tm_safetensors_data_size(o.st) == 0);
}

TEST_CASE("safetensors writer produces the same file for any chunking of the bytes",
          "[safetensors]") {
    // 5 MiB forces both the buffered path and the direct large-write path.
    Bytes big(5u << 20);
    for (size_t i = 0; i < big.size(); i++) big[i] = (uint8_t)(i * 2654435761u >> 13);
    auto specs = sample_tensors();
    specs.push_back({"big", TM_UINT8, {(int64_t)big.size()}, big});
    specs.push_back({"after.big", TM_FLOAT64, {2}, bytes_of<double>({1.5, -2.5})});
    Bytes whole = write_to_bytes(specs, sample_metadata(), 0);
    for (size_t chunk : {(size_t)1 << 30, (size_t)3 << 20, (size_t)4096, (size_t)7}) {
        INFO("chunk " << chunk);
        CHECK(write_to_bytes(specs, sample_metadata(), chunk) == whole);
    }
    Opened o(whole);
    check_matches_specs(o, specs, sample_metadata());
}

TEST_CASE("safetensors writer refuses complex128 with a clear error", "[safetensors]") {
    StTempFile tmp;
    int fd = open(tmp.path.c_str(), O_WRONLY | O_TRUNC);
    REQUIRE(fd >= 0);
    tm_error err{};
    std::vector<Spec> specs = {{"z", TM_COMPLEX128, {1}, zeros(16)}};
    CHECK(write_specs(fd, "out.safetensors", specs, {}, 0, &err) == TM_ERROR_UNSUPPORTED);
    close(fd);
    std::string msg = err.msg;
    CHECK(msg.find("out.safetensors: tensor 'z'") == 0);
    CHECK(msg.find("complex128") != std::string::npos);
    CHECK(msg.find("safetensors") != std::string::npos);
    CHECK(read_file(tmp.path).empty());
}

TEST_CASE("safetensors writer refuses invalid tensors and metadata before writing anything",
          "[safetensors]") {
    struct Case {
        const char *what;
        std::vector<Spec> specs;
        Meta meta;
        tm_status status;
        const char *part;
    };
    const std::vector<Case> cases = {
        {"duplicate names", {{"a", TM_INT8, {1}, zeros(1)}, {"a", TM_INT8, {1}, zeros(1)}}, {},
         TM_ERROR_INVALID_ARGUMENT, "tensor 'a' is given twice"},
        {"reserved name", {{"__metadata__", TM_INT8, {1}, zeros(1)}}, {},
         TM_ERROR_INVALID_ARGUMENT, "reserved"},
        {"invalid UTF-8 name", {{"bad\xFF", TM_INT8, {1}, zeros(1)}}, {},
         TM_ERROR_INVALID_ARGUMENT, "not valid UTF-8"},
        {"too many dims", {{"a", TM_INT8, std::vector<int64_t>(17, 1), zeros(1)}}, {},
         TM_ERROR_INVALID_ARGUMENT, "ndim 17"},
        {"negative dim", {{"a", TM_INT8, {2, -1}, {}}}, {}, TM_ERROR_INVALID_ARGUMENT,
         "shape[1] is -1"},
        {"dim beyond 2^53", {{"a", TM_INT8, {(int64_t)1 << 53}, {}}}, {},
         TM_ERROR_INVALID_ARGUMENT, "2^53"},
        {"element overflow", {{"a", TM_INT8, {1LL << 40, 1LL << 40}, {}}}, {},
         TM_ERROR_INVALID_ARGUMENT, "overflow"},
        {"byte overflow", {{"a", TM_FLOAT64, {1LL << 31, 1LL << 31}, {}}}, {},
         TM_ERROR_INVALID_ARGUMENT, "overflow"},
        {"offsets past 2^53", {{"a", TM_INT8, {1LL << 52}, {}}, {"b", TM_INT8, {1LL << 52}, {}}},
         {}, TM_ERROR_LIMIT, "2^53"},
        {"duplicate metadata", {}, {{"k", "1"}, {"k", "2"}}, TM_ERROR_INVALID_ARGUMENT,
         "metadata key 'k' is given twice"},
        {"invalid UTF-8 metadata", {}, {{"k", "\xC0\x80"}}, TM_ERROR_INVALID_ARGUMENT,
         "not valid UTF-8"},
    };
    for (const Case &c : cases) {
        INFO(c.what);
        StTempFile tmp;
        int fd = open(tmp.path.c_str(), O_WRONLY | O_TRUNC);
        REQUIRE(fd >= 0);
        tm_error err{};
        CHECK(write_specs(fd, "out.safetensors", c.specs, c.meta, 0, &err) == c.status);
        close(fd);
        INFO(err.msg);
        CHECK(std::string(err.msg).rfind("out.safetensors: ", 0) == 0);
        CHECK(std::string(err.msg).find(c.part) != std::string::npos);
        CHECK(read_file(tmp.path).empty());
    }

    tm_error err{};
    tm_st_writer *w = nullptr;
    tm_st_out_tensor nameless = {nullptr, TM_INT8, 0, nullptr};
    CHECK(tm_st_writer_open(1, "x", &nameless, 1, nullptr, nullptr, 0, &w, &err) ==
          TM_ERROR_INVALID_ARGUMENT);
    CHECK(std::string(err.msg).find("tensor 0 has no name") != std::string::npos);
    const char *key = "k";
    const char *value = nullptr;
    CHECK(tm_st_writer_open(1, "x", nullptr, 0, &key, &value, 1, &w, &err) ==
          TM_ERROR_INVALID_ARGUMENT);
    CHECK(tm_st_writer_open(-1, "x", nullptr, 0, nullptr, nullptr, 0, &w, &err) ==
          TM_ERROR_INVALID_ARGUMENT);
    CHECK(w == nullptr);
    tm_st_writer_free(nullptr);
}

TEST_CASE("safetensors writer finish fails unless exactly every byte was written",
          "[safetensors]") {
    StTempFile tmp;
    int fd = open(tmp.path.c_str(), O_WRONLY | O_TRUNC);
    REQUIRE(fd >= 0);
    int64_t shape[] = {2};
    tm_st_out_tensor t = {"t", TM_FLOAT32, 1, shape};
    tm_error err{};
    tm_st_writer *w = nullptr;
    const uint8_t bytes[16] = {0};

    SECTION("too few bytes") {
        REQUIRE(tm_st_writer_open(fd, "out.st", &t, 1, nullptr, nullptr, 0, &w, &err) == TM_OK);
        CHECK(tm_st_writer_data_size(w) == 8);
        REQUIRE(tm_st_writer_write(w, bytes, 7, &err) == TM_OK);
        CHECK(tm_st_writer_data_written(w) == 7);
        CHECK(tm_st_writer_finish(w, &err) == TM_ERROR_INVALID_ARGUMENT);
        CHECK(std::string(err.msg).find("out.st: safetensors: only 7 of the 8 bytes") == 0);
        CHECK(tm_st_writer_finish(w, &err) != TM_OK);
    }
    SECTION("too many bytes") {
        REQUIRE(tm_st_writer_open(fd, "out.st", &t, 1, nullptr, nullptr, 0, &w, &err) == TM_OK);
        REQUIRE(tm_st_writer_write(w, bytes, 5, &err) == TM_OK);
        CHECK(tm_st_writer_write(w, bytes, 4, &err) == TM_ERROR_INVALID_ARGUMENT);
        CHECK(std::string(err.msg).find("past the 8 bytes") != std::string::npos);
        CHECK(tm_st_writer_write(w, bytes, 3, &err) != TM_OK);
        CHECK(tm_st_writer_finish(w, &err) != TM_OK);
    }
    SECTION("exact then nothing more") {
        REQUIRE(tm_st_writer_open(fd, "out.st", &t, 1, nullptr, nullptr, 0, &w, &err) == TM_OK);
        REQUIRE(tm_st_writer_write(w, bytes, 8, &err) == TM_OK);
        REQUIRE(tm_st_writer_write(w, nullptr, 0, &err) == TM_OK);
        CHECK(tm_st_writer_finish(w, &err) == TM_OK);
        CHECK(tm_st_writer_write(w, bytes, 1, &err) == TM_ERROR_INTERNAL);
        CHECK(tm_st_writer_finish(w, &err) == TM_ERROR_INTERNAL);
    }
    tm_st_writer_free(w);
    close(fd);
}

TEST_CASE("safetensors writer reports a full disk as an I/O error naming the output",
          "[safetensors]") {
    int fd = open("/dev/full", O_WRONLY);
    if (fd < 0) {
        WARN("no /dev/full; skipped");
        return;
    }
    SECTION("on a large write") {
        std::vector<Spec> specs = {{"big", TM_UINT8, {5 << 20}, Bytes(5u << 20, 1)}};
        tm_error err{};
        CHECK(write_specs(fd, "full.safetensors", specs, {}, 0, &err) == TM_ERROR_IO);
        CHECK(std::string(err.msg) ==
              "full.safetensors: write failed: " + std::string(std::strerror(ENOSPC)));
    }
    SECTION("on the final flush") {
        tm_error err{};
        CHECK(write_specs(fd, "full.safetensors", sample_tensors(), {}, 0, &err) ==
              TM_ERROR_IO);
        CHECK(std::string(err.msg).find("full.safetensors: write failed: ") == 0);
        CHECK(std::string(err.msg).find(std::strerror(ENOSPC)) != std::string::npos);
    }
    close(fd);
}

TEST_CASE("Python parses the writer's output by hand and torch.frombuffer sees the same values",
          "[safetensors][python]") {
    if (!python_present()) return;
    StTempFile out;
    {
        Bytes file = write_to_bytes(sample_tensors(), sample_metadata());
        std::ofstream f(out.path, std::ios::binary);
        f.write((const char *)file.data(), (std::streamsize)file.size());
    }
    StTempFile script(".py");
    write_file(script.path, R"PY(
import json, struct, sys, torch
b = open(sys.argv[1], 'rb').read()
n = struct.unpack('<Q', b[:8])[0]
assert n % 8 == 0, n
text = b[8:8 + n].decode('utf-8')
assert text.startswith('{'), text[:20]
body = text.rstrip(' ')
assert body.endswith('}') and len(text) - len(body) < 8
pairs = json.loads(body, object_pairs_hook=lambda p: p)
assert pairs[0][0] == '__metadata__', pairs[0]
assert dict(pairs[0][1]) == {'format': 'pt', 'note': 'line1\nline2 "quoted" \\ \u00e9'}, pairs[0]
dtypes = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
          'BF16': torch.bfloat16, 'C64': torch.complex64, 'I64': torch.int64,
          'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
          'BOOL': torch.bool}
expected = {
    'f32': torch.arange(6, dtype=torch.float32).reshape(2, 3) * 0.5 - 1,
    'f64.scalar': torch.tensor(3.25, dtype=torch.float64),
    'f16': torch.tensor([1.0, 2.0, -0.5, 65504.0], dtype=torch.float16),
    'bf16': torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.bfloat16),
    'c64': torch.tensor([1 + 2j, -3.5 + 0j], dtype=torch.complex64),
    'i64': torch.tensor([-1, 2**40, -2**63], dtype=torch.int64),
    'i32': torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32),
    'i16': torch.tensor([-32768, 32767, 5], dtype=torch.int16),
    'i8': torch.tensor([-128, 127], dtype=torch.int8),
    'u8': torch.tensor([0, 255, 7], dtype=torch.uint8),
    'bool': torch.tensor([True, False, True]),
    'empty': torch.zeros(0, dtype=torch.float32),
    'empty.2d': torch.zeros(2, 0, 3, dtype=torch.float32),
    'name "quoted" \\ tab\t \u00e9': torch.tensor([7], dtype=torch.int8),
}
data = b[8 + n:]
pos = 0
names = []
for name, info in pairs[1:]:
    info = dict(info)
    begin, end = info['data_offsets']
    assert begin == pos, (name, begin, pos)
    pos = end
    dtype, shape = dtypes[info['dtype']], info['shape']
    raw = data[begin:end]
    t = (torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape) if raw
         else torch.empty(shape, dtype=dtype))
    e = expected[name]
    assert t.dtype == e.dtype and t.shape == e.shape, (name, t, e)
    assert torch.equal(t, e), (name, t, e)
    names.append(name)
assert pos == len(data), (pos, len(data))
assert names == list(expected), names
print('ok')
)PY");
    int rc = 0;
    std::string out_text =
        run_capture(std::string(kStPython) + " " + script.path + " " + out.path + " 2>&1", &rc);
    INFO(out_text);
    CHECK(rc == 0);
    CHECK(out_text == "ok\n");
}

// ---- Reader: valid files ------------------------------------------------------------------

TEST_CASE("safetensors reader keeps header key order when the data is laid out differently",
          "[safetensors]") {
    Bytes data = bytes_of<float>({1.0f, 2.0f, 3.0f});
    std::string h = "{\"late\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]},"
                    "\"early\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]},"
                    "\"__metadata__\":{\"z\":\"last\",\"a\":\"first\"}}";
    Opened o(st_file(h, data));
    INFO(o.err.msg);
    REQUIRE(o.status == TM_OK);
    REQUIRE(tm_safetensors_count(o.st) == 2);
    CHECK(std::string(tm_safetensors_tensor(o.st, 0)->name) == "late");
    CHECK(std::string(tm_safetensors_tensor(o.st, 1)->name) == "early");
    float v[2];
    std::memcpy(v, tm_safetensors_tensor_data(o.st, 0), 8);
    CHECK(v[0] == 2.0f);
    CHECK(v[1] == 3.0f);
    CHECK(tm_safetensors_find(o.st, "early") == 1);
    REQUIRE(tm_safetensors_metadata_count(o.st) == 2);
    CHECK(std::string(tm_safetensors_metadata_key(o.st, 0)) == "z");
    CHECK(std::string(tm_safetensors_metadata_value(o.st, 1)) == "first");
    CHECK(tm_safetensors_data_offset(o.st) == 8 + h.size());
}

TEST_CASE("safetensors reader accepts zero-size tensors trailing whitespace and unknown fields",
          "[safetensors]") {
    std::string h = "{\"e1\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},"
                    "\"a\":{\"dtype\":\"I16\",\"shape\":[1],\"data_offsets\":[0,2],"
                    "\"extra\":[1,{\"x\":null}]},"
                    "\"e2\":{\"dtype\":\"BOOL\",\"shape\":[3,0],\"data_offsets\":[2,2]},"
                    "\"e3\":{\"dtype\":\"F64\",\"shape\":[0,4503599627370495,1],"
                    "\"data_offsets\":[2,2]},"
                    "\"\\u00e9\\ud83d\\ude00\":{\"dtype\":\"U8\",\"shape\":[1],"
                    "\"data_offsets\":[2,3]}} \t\r\n  ";
    Opened o(st_file(h, {1, 2, 3}));
    INFO(o.err.msg);
    REQUIRE(o.status == TM_OK);
    CHECK(tm_safetensors_count(o.st) == 5);
    CHECK(tm_safetensors_tensor(o.st, 3)->numel == 0);
    CHECK(tm_safetensors_tensor(o.st, 3)->shape[1] == 4503599627370495LL);
    // JSON escapes decode to UTF-8.
    CHECK(tm_safetensors_find(o.st, "\xC3\xA9\xF0\x9F\x98\x80") == 4);
    CHECK(*tm_safetensors_tensor_data(o.st, 4) == 3);

    Opened empty(st_file("{}"));
    REQUIRE(empty.status == TM_OK);
    CHECK(tm_safetensors_count(empty.st) == 0);
    CHECK(tm_safetensors_metadata_count(empty.st) == 0);
    tm_safetensors_free(nullptr);
}

// ---- Reader: hostile input ----------------------------------------------------------------

TEST_CASE("safetensors reader fails cleanly on every truncation of a valid file",
          "[safetensors]") {
    Bytes file = write_to_bytes(sample_tensors(), sample_metadata());
    {
        Opened whole(file);
        REQUIRE(whole.status == TM_OK);
    }
    for (size_t len = 0; len < file.size(); len++) {
        Opened o(Bytes(file.begin(), file.begin() + (long)len));
        INFO("length " << len << ": " << o.err.msg);
        CHECK(o.status == TM_ERROR_FORMAT);
        CHECK(std::string(o.err.msg).rfind(std::string(kLabel) + ": ", 0) == 0);
    }
}

TEST_CASE("safetensors reader survives every single-byte corruption of a small file",
          "[safetensors]") {
    Bytes file = st_file(std::string(kTwoTensors) + "  ", zeros(14));
    const uint8_t replacements[] = {0x00, 0xFF, 0x80, '"', '{', '}', '[', ']', ',', ':', '0',
                                    '9', '-', '.', 'e', ' ', '\\', 'x', 0x01, 0x7F};
    size_t opened = 0;
    for (size_t at = 0; at < file.size() - 14; at++) {
        for (uint8_t r : replacements) {
            Bytes b = file;
            b[at] = r;
            Opened o(b);
            INFO("byte " << at << " = " << (int)r << ": " << o.err.msg);
            if (o.status != TM_OK) {
                CHECK((o.status == TM_ERROR_FORMAT || o.status == TM_ERROR_UNSUPPORTED ||
                       o.status == TM_ERROR_LIMIT));
                CHECK(o.err.msg[0] != '\0');
                continue;
            }
            opened++;
            // Whatever opened must be safe to read.
            uint64_t total = 0;
            for (size_t i = 0; i < tm_safetensors_count(o.st); i++) {
                const tm_st_tensor *t = tm_safetensors_tensor(o.st, i);
                CHECK(t->begin <= t->end);
                CHECK(t->end <= tm_safetensors_data_size(o.st));
                CHECK(t->end - t->begin == t->numel * tm_dtype_size(t->dtype));
                total += t->end - t->begin;
            }
            CHECK(total == tm_safetensors_data_size(o.st));
        }
    }
    CHECK(opened > 0); // e.g. a renamed tensor or a space for a space
}

TEST_CASE("safetensors reader refuses bad header lengths", "[safetensors]") {
    EXPECT_FAILURE(Bytes{1, 2, 3}, TM_ERROR_FORMAT, {"3 bytes, too short"});
    EXPECT_FAILURE(raw_file((uint64_t)1 << 63, "{}"), TM_ERROR_FORMAT,
                   {"header length 9223372036854775808 runs past the end of the file (10 bytes)"});
    EXPECT_FAILURE(raw_file(UINT64_MAX, "{}"), TM_ERROR_FORMAT, {"past the end"});
    EXPECT_FAILURE(raw_file(1000, "{\"w\":{}}", zeros(20)), TM_ERROR_FORMAT,
                   {"header length 1000", "past the end"});
    EXPECT_FAILURE(raw_file(0, "", zeros(4)), TM_ERROR_FORMAT, {"header is empty"});
}

TEST_CASE("safetensors reader refuses a declared header over 100 MB", "[safetensors]") {
    const uint64_t n = 100000001;
    const size_t size = (size_t)(8 + n);
    // Uninitialised on purpose: the reader must refuse before looking past byte 8.
    std::unique_ptr<uint8_t[]> buf(new uint8_t[size]);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)(n >> (8 * i));
    buf[8] = '{';
    tm_safetensors *st = nullptr;
    tm_error err{};
    CHECK(tm_safetensors_open(buf.get(), size, kLabel, &st, &err) == TM_ERROR_LIMIT);
    CHECK(st == nullptr);
    CHECK(std::string(err.msg) ==
          std::string(kLabel) + ": safetensors header is 100000001 bytes, over the limit of "
                                "100000000");
}

TEST_CASE("safetensors reader refuses headers that are not one JSON object", "[safetensors]") {
    EXPECT_FAILURE(st_file("{\"a\": nope}"), TM_ERROR_FORMAT, {"not valid JSON"});
    EXPECT_FAILURE(st_file("{\"a\":{\"dtype\":\"F32\""), TM_ERROR_FORMAT, {"not valid JSON"});
    EXPECT_FAILURE(st_file("[1, 2]"), TM_ERROR_FORMAT, {"header is an array, not a JSON object"});
    EXPECT_FAILURE(st_file("\"text\""), TM_ERROR_FORMAT, {"a string, not a JSON object"});
    EXPECT_FAILURE(st_file(" {}"), TM_ERROR_FORMAT, {"must start with '{'"});
    EXPECT_FAILURE(st_file("{} x"), TM_ERROR_FORMAT, {"unexpected data after the JSON object"});
    EXPECT_FAILURE(st_file("{}{}"), TM_ERROR_FORMAT, {"unexpected data after the JSON object"});
    EXPECT_FAILURE(st_file(std::string("{}\0", 3)), TM_ERROR_FORMAT, {"invalid byte 0x00"});
    EXPECT_FAILURE(st_file("{\"a\xFF\":1}"), TM_ERROR_FORMAT, {"not valid UTF-8 (at byte 3)"});
    EXPECT_FAILURE(st_file("{\"a\xED\xA0\x80\":1}"), TM_ERROR_FORMAT, {"not valid UTF-8"});
    EXPECT_FAILURE(st_file("{\"a\\u0000b\":1}"), TM_ERROR_FORMAT, {"escaped NUL"});
    EXPECT_FAILURE(st_file("{\"a\nb\":1}"), TM_ERROR_FORMAT, {"raw control character"});
    EXPECT_FAILURE(st_file("{\"a\\ud800\":1}"), TM_ERROR_FORMAT, {"not valid JSON"});
    // Deep nesting hits cJSON's depth limit instead of the stack.
    std::string deep = "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
    EXPECT_FAILURE(st_file(deep), TM_ERROR_FORMAT, {"not valid JSON"});
    // A backslash-escaped backslash before u0000 is not a NUL escape.
    Opened ok(st_file("{\"__metadata__\":{\"k\":\"\\\\u0000\"}}"));
    REQUIRE(ok.status == TM_OK);
    CHECK(std::string(tm_safetensors_metadata_value(ok.st, 0)) == "\\u0000");
}

TEST_CASE("safetensors reader refuses malformed tensor entries naming the tensor",
          "[safetensors]") {
    const std::string dt = "\"dtype\":\"F32\"", sh = "\"shape\":[2]",
                      of = "\"data_offsets\":[0,8]";
    const Bytes d8 = zeros(8);
    EXPECT_FAILURE(st_file("{\"a\":5}"), TM_ERROR_FORMAT,
                   {"tensor 'a': entry is a number, not an object"});
    EXPECT_FAILURE(st_file(one_tensor(sh + "," + of), d8), TM_ERROR_FORMAT,
                   {"tensor 'a': missing \"dtype\""});
    EXPECT_FAILURE(st_file(one_tensor(dt + "," + of), d8), TM_ERROR_FORMAT,
                   {"tensor 'a': missing \"shape\""});
    EXPECT_FAILURE(st_file(one_tensor(dt + "," + sh), d8), TM_ERROR_FORMAT,
                   {"tensor 'a': missing \"data_offsets\""});
    EXPECT_FAILURE(st_file(one_tensor(dt + "," + dt + "," + sh + "," + of), d8),
                   TM_ERROR_FORMAT, {"tensor 'a': \"dtype\" appears twice"});
    EXPECT_FAILURE(st_file(one_tensor("\"dtype\":32," + sh + "," + of), d8), TM_ERROR_FORMAT,
                   {"tensor 'a': \"dtype\" is a number, not a string"});
    EXPECT_FAILURE(st_file(one_tensor("\"DTYPE\":\"F32\"," + sh + "," + of), d8),
                   TM_ERROR_FORMAT, {"missing \"dtype\""});
    EXPECT_FAILURE(st_file(one_tensor(dt + ",\"shape\":2," + of), d8), TM_ERROR_FORMAT,
                   {"tensor 'a': \"shape\" is a number, not an array"});
    EXPECT_FAILURE(st_file(one_tensor(dt + "," + sh + ",\"data_offsets\":{}"), d8),
                   TM_ERROR_FORMAT, {"\"data_offsets\" is an object, not an array"});
}

TEST_CASE("safetensors reader refuses unsupported and unknown dtypes naming tensor and dtype",
          "[safetensors]") {
    const std::string rest = ",\"shape\":[2],\"data_offsets\":[0,2]";
    EXPECT_FAILURE(st_file(one_tensor("\"dtype\":\"F8_E4M3\"" + rest), zeros(2)),
                   TM_ERROR_UNSUPPORTED,
                   {"test.safetensors: tensor 'a': dtype F8_E4M3 is not supported by this "
                    "LibTorch"});
    EXPECT_FAILURE(st_file(one_tensor("\"dtype\":\"F8_E5M2\"" + rest), zeros(2)),
                   TM_ERROR_UNSUPPORTED, {"tensor 'a'", "F8_E5M2"});
    EXPECT_FAILURE(st_file(one_tensor("\"dtype\":\"U16\"" + rest), zeros(4)),
                   TM_ERROR_UNSUPPORTED, {"tensor 'a'", "dtype U16 is not supported"});
    EXPECT_FAILURE(st_file(one_tensor("\"dtype\":\"F33\"" + rest), zeros(8)),
                   TM_ERROR_UNSUPPORTED, {"tensor 'a': unknown dtype 'F33'"});
}

TEST_CASE("safetensors reader refuses negative fractional huge and overflowing shapes",
          "[safetensors]") {
    auto file = [](const std::string &shape, const std::string &dtype = "F32") {
        return st_file(one_tensor("\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
                                  ",\"data_offsets\":[0,0]"));
    };
    EXPECT_FAILURE(file("[-1]"), TM_ERROR_FORMAT,
                   {"tensor 'a': shape[0] is -1; it must not be negative"});
    EXPECT_FAILURE(file("[3,-0]"), TM_ERROR_FORMAT, {"shape[1]", "negative"});
    EXPECT_FAILURE(file("[2.5]"), TM_ERROR_FORMAT, {"tensor 'a': shape[0] is 2.5, not an integer"});
    EXPECT_FAILURE(file("[1e-3]"), TM_ERROR_FORMAT, {"shape[0] is 0.001, not an integer"});
    EXPECT_FAILURE(file("[\"2\"]"), TM_ERROR_FORMAT, {"shape[0] is a string, not an integer"});
    EXPECT_FAILURE(file("[null]"), TM_ERROR_FORMAT, {"shape[0] is null, not an integer"});
    EXPECT_FAILURE(file("[9007199254740992]"), TM_ERROR_FORMAT,
                   {"shape[0] is 9007199254740992, too large"});
    EXPECT_FAILURE(file("[1e400]"), TM_ERROR_FORMAT, {"shape[0] is inf, too large"});
    EXPECT_FAILURE(file("[1099511627776,1099511627776]"), TM_ERROR_FORMAT,
                   {"tensor 'a': shape [1099511627776, 1099511627776] has too many elements "
                    "(overflow)"});
    // Stricter than the reference: the non-zero dimensions must multiply without overflow
    // even when another is 0, so stride arithmetic elsewhere is safe.
    EXPECT_FAILURE(file("[0,1099511627776,1099511627776]"), TM_ERROR_FORMAT, {"overflow"});
    // numel fits in int64 but numel * itemsize does not.
    EXPECT_FAILURE(file("[2147483648,2147483648]", "F64"), TM_ERROR_FORMAT,
                   {"shape [2147483648, 2147483648] of F64 has too many bytes (overflow)"});
    std::string dims17 = "[1";
    for (int i = 1; i < 17; i++) dims17 += ",1";
    EXPECT_FAILURE(file(dims17 + "]"), TM_ERROR_UNSUPPORTED,
                   {"tensor 'a': shape has more than 16 dimensions"});
    // 16 is fine.
    std::string dims16 = "[1";
    for (int i = 1; i < 16; i++) dims16 += ",1";
    Opened ok(st_file(one_tensor("\"dtype\":\"F32\",\"shape\":" + dims16 +
                                 "],\"data_offsets\":[0,4]"),
                      zeros(4)));
    INFO(ok.err.msg);
    CHECK(ok.status == TM_OK);
}

TEST_CASE("safetensors reader refuses data offsets that do not tile the data section",
          "[safetensors]") {
    auto two = [](const char *a_off, const char *b_off) {
        return std::string("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":") + a_off +
               "},\"b\":{\"dtype\":\"I16\",\"shape\":[3],\"data_offsets\":" + b_off + "}}";
    };
    const std::string sh = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":";
    EXPECT_FAILURE(st_file(two("[0,8]", "[4,10]"), zeros(10)), TM_ERROR_FORMAT,
                   {"tensor 'b': data_offsets [4, 10] overlap tensor 'a' [0, 8]"});
    EXPECT_FAILURE(st_file(two("[0,8]", "[0,6]"), zeros(8)), TM_ERROR_FORMAT,
                   {"overlap"});
    EXPECT_FAILURE(st_file(two("[0,8]", "[10,16]"), zeros(16)), TM_ERROR_FORMAT,
                   {"gap in the data section: bytes [8, 10) between tensor 'a' and tensor 'b'"});
    EXPECT_FAILURE(st_file(two("[2,10]", "[10,16]"), zeros(16)), TM_ERROR_FORMAT,
                   {"tensor 'a': data starts at byte 2; bytes [0, 2)"});
    EXPECT_FAILURE(st_file(kTwoTensors, zeros(20)), TM_ERROR_FORMAT,
                   {"the tensors end at byte 14 of the data section but it holds 20 bytes (6 "
                    "trailing bytes"});
    EXPECT_FAILURE(st_file("{}", zeros(4)), TM_ERROR_FORMAT, {"4 trailing bytes"});
    EXPECT_FAILURE(st_file(kTwoTensors, zeros(13)), TM_ERROR_FORMAT,
                   {"tensor 'b': data_offsets [8, 14] run past the end of the data section (13 "
                    "bytes)"});
    EXPECT_FAILURE(st_file(sh + "[0,12]}}", zeros(12)), TM_ERROR_FORMAT,
                   {"tensor 'a': data_offsets [0, 12] hold 12 bytes but shape [2] of F32 needs "
                    "8"});
    EXPECT_FAILURE(st_file(sh + "[8,0]}}", zeros(8)), TM_ERROR_FORMAT,
                   {"data_offsets [8, 0] end before they begin"});
    EXPECT_FAILURE(st_file(sh + "[0]}}", zeros(8)), TM_ERROR_FORMAT,
                   {"must be [begin, end], it has 1 elements"});
    EXPECT_FAILURE(st_file(sh + "[0,8,8]}}", zeros(8)), TM_ERROR_FORMAT,
                   {"it has more than 2 elements"});
    EXPECT_FAILURE(st_file(sh + "[-8,0]}}", zeros(8)), TM_ERROR_FORMAT,
                   {"data_offsets[0] is -8; it must not be negative"});
    EXPECT_FAILURE(st_file(sh + "[0,8.5]}}", zeros(8)), TM_ERROR_FORMAT,
                   {"data_offsets[1] is 8.5, not an integer"});
    EXPECT_FAILURE(st_file(sh + "[18446744073709551608,18446744073709551616]}}", zeros(8)),
                   TM_ERROR_FORMAT, {"data_offsets[0]", "too large"});
}

TEST_CASE("safetensors reader refuses duplicate names and bad metadata", "[safetensors]") {
    const std::string a = "\"a\":{\"dtype\":\"I8\",\"shape\":[1],\"data_offsets\":[0,1]}";
    const std::string a2 = "\"a\":{\"dtype\":\"I8\",\"shape\":[1],\"data_offsets\":[1,2]}";
    EXPECT_FAILURE(st_file("{" + a + "," + a2 + "}", zeros(2)), TM_ERROR_FORMAT,
                   {"tensor 'a' appears twice in the header"});
    EXPECT_FAILURE(st_file("{\"__metadata__\":{},\"__metadata__\":{}}"), TM_ERROR_FORMAT,
                   {"header has \"__metadata__\" twice"});
    EXPECT_FAILURE(st_file("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}"), TM_ERROR_FORMAT,
                   {"__metadata__ has the key 'k' twice"});
    EXPECT_FAILURE(st_file("{\"__metadata__\":{\"format\":1}}"), TM_ERROR_FORMAT,
                   {"__metadata__ entry 'format' is a number, not a string"});
    EXPECT_FAILURE(st_file("{\"__metadata__\":{\"x\":{\"y\":\"z\"}}}"), TM_ERROR_FORMAT,
                   {"__metadata__ entry 'x' is an object, not a string"});
    EXPECT_FAILURE(st_file("{\"__metadata__\":\"pt\"}"), TM_ERROR_FORMAT,
                   {"__metadata__ is a string, not an object"});
    // A name with a control character is shown escaped, keeping the message on one line.
    EXPECT_FAILURE(st_file("{\"x\\ny\":5}"), TM_ERROR_FORMAT, {"tensor 'x\\x0Ay'"});
}

// ---- Real files from the shared corpus ------------------------------------------------------

TEST_CASE("safetensors reader opens burn's mnist with 20 tensors", "[safetensors][corpus]") {
    std::string path = tm_test::realworld_file("tracel-ai__burn/mnist.safetensors");
    if (path.empty()) return;
    Opened o(read_file(path), path.c_str());
    INFO(o.err.msg);
    REQUIRE(o.status == TM_OK);
    CHECK(tm_safetensors_count(o.st) == 20);
    CHECK(tm_safetensors_metadata_count(o.st) == 0);
    size_t f32 = 0, i64 = 0;
    for (size_t i = 0; i < 20; i++) {
        tm_dtype d = tm_safetensors_tensor(o.st, i)->dtype;
        f32 += d == TM_FLOAT32;
        i64 += d == TM_INT64;
    }
    CHECK(f32 == 18);
    CHECK(i64 == 2);
    const tm_st_tensor *nbt = tm_safetensors_tensor(o.st, 0);
    CHECK(std::string(nbt->name) == "norm1.num_batches_tracked");
    CHECK(nbt->ndim == 0);
    int64_t fc1 = tm_safetensors_find(o.st, "fc1.weight");
    REQUIRE(fc1 >= 0);
    const tm_st_tensor *t = tm_safetensors_tensor(o.st, (size_t)fc1);
    CHECK(t->ndim == 2);
    CHECK(t->shape[0] == 32);
    CHECK(t->shape[1] == 11616);
    CHECK(tm_safetensors_data_offset(o.st) == 8 + 1520);
}

TEST_CASE("safetensors reader opens tinygrad's mnist with 2 tensors", "[safetensors][corpus]") {
    std::string path = tm_test::realworld_file("AliBayatMokhtari__mnist-tinygrad/model_4bc2046.safetensors");
    if (path.empty()) return;
    Opened o(read_file(path), path.c_str());
    INFO(o.err.msg);
    REQUIRE(o.status == TM_OK);
    REQUIRE(tm_safetensors_count(o.st) == 2);
    const tm_st_tensor *l1 = tm_safetensors_tensor(o.st, 0);
    CHECK(std::string(l1->name) == "l1.weight");
    CHECK(l1->dtype == TM_FLOAT32);
    CHECK(l1->shape[0] == 128);
    CHECK(l1->shape[1] == 784);
    const tm_st_tensor *l2 = tm_safetensors_tensor(o.st, 1);
    CHECK(std::string(l2->name) == "l2.weight");
    CHECK(l2->shape[0] == 10);
    CHECK(l2->shape[1] == 128);
}

TEST_CASE("safetensors reader opens the PEFT LoRA adapters with 28 tensors and format metadata",
          "[safetensors][corpus]") {
    for (const char *rel :
         {"Tashu014__lora-imdb-distilbert/adapter_model.safetensors",
          "dayanidhi04__emotion-classification-distilbert-lora/adapter_model.safetensors"}) {
        std::string path = tm_test::realworld_file(rel);
        if (path.empty()) continue;
        Opened o(read_file(path), path.c_str());
        INFO(path << ": " << o.err.msg);
        REQUIRE(o.status == TM_OK);
        CHECK(tm_safetensors_count(o.st) == 28);
        REQUIRE(tm_safetensors_metadata_count(o.st) == 1);
        CHECK(std::string(tm_safetensors_metadata_key(o.st, 0)) == "format");
        CHECK(std::string(tm_safetensors_metadata_value(o.st, 0)) == "pt");
        for (size_t i = 0; i < 28; i++) CHECK(tm_safetensors_tensor(o.st, i)->dtype == TM_FLOAT32);
        int64_t c = tm_safetensors_find(o.st, "base_model.model.classifier.weight");
        REQUIRE(c >= 0);
        CHECK(tm_safetensors_tensor(o.st, (size_t)c)->shape[0] ==
              (std::strstr(rel, "Tashu014") ? 2 : 6));
        CHECK(tm_safetensors_tensor(o.st, (size_t)c)->shape[1] == 768);
    }
}

TEST_CASE("safetensors reader refuses the FluxML dtype-coverage file over its F8 tensors",
          "[safetensors][corpus]") {
    std::string path = tm_test::realworld_file("FluxML__SafeTensors.jl/model.safetensors");
    if (path.empty()) return;
    Bytes file = read_file(path);
    {
        Opened o(file, path.c_str());
        CHECK(o.status == TM_ERROR_UNSUPPORTED);
        std::string msg = o.err.msg;
        CHECK(msg == path + ": tensor 'float8_e4m3fn_3': dtype F8_E4M3 is not supported by this "
                            "LibTorch");
    }
    // With the 1-byte F8 dtypes relabelled U8 the rest of the file is valid: 36 tensors.
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | file[i];
    std::string header(file.begin() + 8, file.begin() + 8 + (long)n);
    for (const char *f8 : {"\"F8_E4M3\"", "\"F8_E5M2\""})
        for (size_t at; (at = header.find(f8)) != std::string::npos;)
            header.replace(at, std::strlen(f8), "\"U8\"");
    Opened o(st_file(header, Bytes(file.begin() + 8 + (long)n, file.end())), path.c_str());
    INFO(o.err.msg);
    REQUIRE(o.status == TM_OK);
    CHECK(tm_safetensors_count(o.st) == 36);
    int64_t i = tm_safetensors_find(o.st, "bfloat16_357");
    REQUIRE(i >= 0);
    const tm_st_tensor *t = tm_safetensors_tensor(o.st, (size_t)i);
    CHECK(t->dtype == TM_BFLOAT16);
    CHECK(t->ndim == 3);
    CHECK(t->end - t->begin == 3 * 5 * 7 * 2);
}

TEST_CASE("safetensors reader refuses safetensors-cpp's abuse file whose header runs past EOF",
          "[safetensors][corpus]") {
    std::string path = tm_test::realworld_file("syoyo__safetensors-cpp/safetensors_abuse_attempt_1.safetensors");
    if (path.empty()) return;
    Opened o(read_file(path), path.c_str());
    CHECK(o.status == TM_ERROR_FORMAT);
    CHECK(std::string(o.err.msg) == path + ": safetensors header length 1000 runs past the end "
                                           "of the file (88 bytes)");
}

TEST_CASE("safetensors reader agrees with a Python parse of the corpus files",
          "[safetensors][corpus][python]") {
    if (!python_present()) return;
    std::vector<std::string> paths;
    for (const char *rel :
         {"tracel-ai__burn/mnist.safetensors",
          "AliBayatMokhtari__mnist-tinygrad/model_4bc2046.safetensors",
          "AliBayatMokhtari__mnist-tinygrad/model_6682ba5.safetensors",
          "Tashu014__lora-imdb-distilbert/adapter_model.safetensors",
          "dayanidhi04__emotion-classification-distilbert-lora/adapter_model.safetensors"}) {
        std::string p = tm_test::realworld_file(rel);
        if (!p.empty()) paths.push_back(p);
    }
    if (paths.empty()) return;
    StTempFile script(".py");
    write_file(script.path, R"PY(
import json, struct, sys, zlib
for path in sys.argv[1:]:
    b = open(path, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    base = 8 + n
    print('file', path, base, len(b) - base, sep='\t')
    for k, v in json.loads(b[8:base], object_pairs_hook=lambda p: p):
        if k == '__metadata__':
            for mk, mv in v:
                print('meta', mk, mv, sep='\t')
            continue
        v = dict(v)
        s, e = v['data_offsets']
        print('tensor', k, v['dtype'], ','.join(map(str, v['shape'])), s, e,
              zlib.crc32(b[base + s:base + e]), sep='\t')
)PY");
    std::string cmd = std::string(kStPython) + " " + script.path;
    for (const auto &p : paths) cmd += " '" + p + "'";
    int rc = 0;
    std::string python = run_capture(cmd, &rc);
    REQUIRE(rc == 0);

    std::ostringstream ours;
    for (const auto &p : paths) {
        Opened o(read_file(p), p.c_str());
        INFO(o.err.msg);
        REQUIRE(o.status == TM_OK);
        ours << "file\t" << p << "\t" << tm_safetensors_data_offset(o.st) << "\t"
             << tm_safetensors_data_size(o.st) << "\n";
        for (size_t i = 0; i < tm_safetensors_metadata_count(o.st); i++)
            ours << "meta\t" << tm_safetensors_metadata_key(o.st, i) << "\t"
                 << tm_safetensors_metadata_value(o.st, i) << "\n";
        for (size_t i = 0; i < tm_safetensors_count(o.st); i++) {
            const tm_st_tensor *t = tm_safetensors_tensor(o.st, i);
            ours << "tensor\t" << t->name << "\t" << tm_safetensors_dtype_string(t->dtype) << "\t";
            for (int32_t d = 0; d < t->ndim; d++) ours << (d ? "," : "") << t->shape[d];
            uLong crc = crc32(crc32(0L, Z_NULL, 0), tm_safetensors_tensor_data(o.st, i),
                              (uInt)(t->end - t->begin));
            ours << "\t" << t->begin << "\t" << t->end << "\t" << crc << "\n";
        }
    }
    CHECK(ours.str() == python);
}
