// Scaffolding the Catch2 test files share: temporary files and folders, whole-file reads and
// writes. Header-only; each helper is in an anonymous namespace per test file.
#pragma once

#include <catch2/catch.hpp>

#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#ifndef TM_TEST_PYTHON
#define TM_TEST_PYTHON "/usr/bin/python3"
#endif

namespace tm_test {

using Bytes = std::vector<uint8_t>;

inline std::string temp_root() {
    const char *dir = std::getenv("TMPDIR");
    return dir && *dir ? dir : "/tmp";
}

// A fresh, empty file (created, then closed), removed when the object goes.
struct TempFile {
    std::string path;
    explicit TempFile(const char *suffix = ".bin") {
        std::string tmpl = temp_root() + "/tm_test_XXXXXX" + suffix;
        std::vector<char> buf(tmpl.begin(), tmpl.end());
        buf.push_back('\0');
        int fd = mkstemps(buf.data(), (int)std::strlen(suffix));
        REQUIRE(fd >= 0);
        close(fd);
        path = buf.data();
    }
    ~TempFile() { std::remove(path.c_str()); }
    TempFile(const TempFile &) = delete;
    TempFile &operator=(const TempFile &) = delete;
};

// A folder removed with everything in it when the object goes.
struct TempDir {
    std::string path;
    explicit TempDir(const char *tag = "dir") {
        std::string tmpl = temp_root() + "/tm_test_" + tag + "_XXXXXX";
        std::vector<char> buf(tmpl.begin(), tmpl.end());
        buf.push_back('\0');
        const char *p = mkdtemp(buf.data());
        if (!p) std::abort();
        path = p;
    }
    ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
    TempDir(const TempDir &) = delete;
    TempDir &operator=(const TempDir &) = delete;
};

inline Bytes read_file(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    INFO(path);
    REQUIRE(f.good());
    return Bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

inline void write_file(const std::string &path, const void *data, size_t n) {
    std::ofstream f(path, std::ios::binary);
    f.write(static_cast<const char *>(data), static_cast<std::streamsize>(n));
    REQUIRE(f.good());
}

inline void write_file(const std::string &path, const std::string &s) { write_file(path, s.data(), s.size()); }

}  // namespace tm_test
