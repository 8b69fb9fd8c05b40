// The byte path every output takes: the CRC-32 of zip members (folded with PCLMULQDQ where
// the CPU has it) must equal zlib's, and the buffered writer must put exactly the bytes it was
// given into the file whether O_DIRECT is used, refused or turned off.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <random>
#include <string>
#include <vector>

#include "core/crc32.h"
#include "core/output_stream.h"
#include "test_support.hpp"

namespace {

using tm_test::Bytes;

Bytes random_bytes(size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    Bytes b(n);
    for (auto &x : b) x = static_cast<uint8_t>(rng());
    return b;
}

// Writes data through a stream in pieces of the given sizes (cycled), then flushes.
void write_in_pieces(int fd, const Bytes &data, const std::vector<size_t> &pieces, tm_output_stream *s) {
    tm_error err{};
    REQUIRE(tm_output_stream_init(s, fd, "test output", &err) == TM_OK);
    size_t at = 0;
    for (size_t i = 0; at < data.size(); i++) {
        size_t k = std::min(pieces[i % pieces.size()], data.size() - at);
        REQUIRE(tm_output_stream_put(s, data.data() + at, k, &err) == TM_OK);
        at += k;
    }
    REQUIRE(tm_output_stream_flush(s, &err) == TM_OK);
    CHECK(s->pos == data.size());
}

Bytes write_file_via_stream(const std::string &path, const Bytes &data, const std::vector<size_t> &pieces,
                            int *was_direct = nullptr) {
    int fd = open(path.c_str(), O_WRONLY | O_TRUNC);
    REQUIRE(fd >= 0);
    tm_output_stream s;
    write_in_pieces(fd, data, pieces, &s);
    if (was_direct) *was_direct = s.direct;
    tm_output_stream_free(&s);
    close(fd);
    return tm_test::read_file(path);
}

}  // namespace

TEST_CASE("crc32 equals zlib's for every length, alignment and starting value", "[crc32]") {
    Bytes b = random_bytes((1 << 20) + 64, 1);
    for (size_t len = 0; len < 1200; len++)
        for (size_t off = 0; off < 3; off++) {
            uint32_t seed = static_cast<uint32_t>(len * 2654435761u);
            INFO("len " << len << " offset " << off);
            REQUIRE(tm_crc32(seed, b.data() + off, len) == crc32(seed, b.data() + off, static_cast<uInt>(len)));
        }
    REQUIRE(tm_crc32(0, b.data(), b.size()) == crc32(0, b.data(), static_cast<uInt>(b.size())));
}

TEST_CASE("crc32 of a block split anywhere chains like zlib's", "[crc32]") {
    Bytes b = random_bytes(5000, 2);
    uint32_t whole = crc32(0, b.data(), static_cast<uInt>(b.size()));
    for (size_t cut : {0, 1, 63, 64, 65, 1000, 4999, 5000})
        REQUIRE(tm_crc32(tm_crc32(0, b.data(), cut), b.data() + cut, b.size() - cut) == whole);
}

TEST_CASE("output stream writes exactly its input to a regular file", "[output_stream]") {
    tm_test::TempFile f;
    // Sizes around the 2 MiB buffer and the 4 KiB direct-I/O block, and tiny files.
    for (size_t n : {size_t(0), size_t(1), size_t(4095), size_t(4096), size_t(4097), size_t(2 << 20),
                     size_t((2 << 20) + 1), size_t((5 << 20) + 123)}) {
        Bytes data = random_bytes(n, static_cast<unsigned>(n));
        for (auto pieces : std::vector<std::vector<size_t>>{{1 << 30}, {7, 4096, 100000}, {262144}}) {
            INFO("size " << n << ", first piece " << pieces[0]);
            REQUIRE(write_file_via_stream(f.path, data, pieces) == data);
        }
    }
}

TEST_CASE("output stream uses O_DIRECT on an empty regular file unless TORCHMERGE_DIRECT_IO=0",
          "[output_stream]") {
    tm_test::TempFile f;
    Bytes data = random_bytes((3 << 20) + 5, 3);
    SECTION("default") {
        int fd = open(f.path.c_str(), O_WRONLY | O_TRUNC);
        REQUIRE(fd >= 0);
        tm_output_stream s;
        tm_error err{};
        REQUIRE(tm_output_stream_init(&s, fd, "x", &err) == TM_OK);
        // Set exactly when the file system accepted it (ext4 and xfs do; old tmpfs does not).
        CHECK(s.direct == ((fcntl(fd, F_GETFL) & O_DIRECT) != 0));
        REQUIRE(tm_output_stream_put(&s, data.data(), data.size(), &err) == TM_OK);
        REQUIRE(tm_output_stream_flush(&s, &err) == TM_OK);
        CHECK((fcntl(fd, F_GETFL) & O_DIRECT) == 0);  // the tail went through the page cache
        tm_output_stream_free(&s);
        close(fd);
        REQUIRE(tm_test::read_file(f.path) == data);
    }
    SECTION("turned off") {
        setenv("TORCHMERGE_DIRECT_IO", "0", 1);
        int fd = open(f.path.c_str(), O_WRONLY | O_TRUNC);
        REQUIRE(fd >= 0);
        tm_output_stream s;
        tm_error err{};
        REQUIRE(tm_output_stream_init(&s, fd, "x", &err) == TM_OK);
        CHECK(s.direct == 0);
        CHECK((fcntl(fd, F_GETFL) & O_DIRECT) == 0);
        tm_output_stream_free(&s);
        close(fd);
        unsetenv("TORCHMERGE_DIRECT_IO");
        REQUIRE(write_file_via_stream(f.path, data, {65536}) == data);
    }
}

TEST_CASE("output stream leaves a pipe and a non-empty file without O_DIRECT", "[output_stream]") {
    tm_error err{};
    tm_output_stream s;
    int p[2];
    REQUIRE(pipe(p) == 0);
    REQUIRE(tm_output_stream_init(&s, p[1], "pipe", &err) == TM_OK);
    CHECK(s.direct == 0);  // O_DIRECT on a pipe would mean packet mode
    const char msg[] = "hello";
    REQUIRE(tm_output_stream_put(&s, msg, 5, &err) == TM_OK);
    REQUIRE(tm_output_stream_flush(&s, &err) == TM_OK);
    char got[6] = {};
    REQUIRE(read(p[0], got, 5) == 5);
    CHECK(std::string(got) == "hello");
    tm_output_stream_free(&s);
    close(p[0]);
    close(p[1]);

    tm_test::TempFile f;
    tm_test::write_file(f.path, "abc");
    int fd = open(f.path.c_str(), O_WRONLY | O_APPEND);
    REQUIRE(fd >= 0);
    REQUIRE(tm_output_stream_init(&s, fd, "appended", &err) == TM_OK);
    CHECK(s.direct == 0);
    tm_output_stream_free(&s);
    close(fd);
}

TEST_CASE("output stream reports a failed write with the file's name, once and for good",
          "[output_stream]") {
    int fd = open("/dev/full", O_WRONLY);
    if (fd < 0) {
        WARN("no /dev/full: skipped");
        return;
    }
    tm_output_stream s;
    tm_error err{};
    REQUIRE(tm_output_stream_init(&s, fd, "full.pt", &err) == TM_OK);
    Bytes data = random_bytes(3 << 20, 4);
    CHECK(tm_output_stream_put(&s, data.data(), data.size(), &err) == TM_ERROR_IO);
    CHECK(std::string(err.msg).find("full.pt: write failed") == 0);
    CHECK(tm_output_stream_put(&s, data.data(), 1, &err) == TM_ERROR_IO);
    CHECK(tm_output_stream_flush(&s, &err) == TM_ERROR_IO);
    tm_output_stream_free(&s);
    close(fd);
}
