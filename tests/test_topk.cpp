// The exact streaming top-k (csrc/merge/methods/topk.c) against brute force: keep the k values
// of largest |v|, the lower index first among equal magnitudes, for small tensors (one collect
// pass) and large ones (histogram passes, candidates, deeper histograms, the index count), with
// many ties, all zeros, values packed in one bin and one value repeated; blocks of varying size.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

extern "C" {
#include "merge/methods/topk.h"
}

namespace {

std::vector<uint8_t> brute_force(const std::vector<double> &v, uint64_t k) {
    std::vector<size_t> order(v.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        double x = std::fabs(v[a]), y = std::fabs(v[b]);
        return x > y; // stable: equal magnitudes keep the lower index first
    });
    std::vector<uint8_t> keep(v.size(), 0);
    for (uint64_t i = 0; i < k; i++) keep[order[i]] = 1;
    return keep;
}

std::vector<uint8_t> streamed(const std::vector<double> &v, uint64_t k, unsigned *passes, std::mt19937_64 &rng) {
    tm_topk s;
    tm_topk_init(&s, v.size(), k);
    std::vector<uint8_t> mem;
    *passes = 0;
    while (s.phase != TM_TOPK_DONE) {
        s.offset = 0;
        mem.assign(tm_topk_bytes(&s) + 8, 0);
        for (size_t begin = 0; begin < v.size();) {
            size_t count = std::min<size_t>(v.size() - begin, 1 + rng() % 70000);
            tm_topk_block(&s, mem.data(), v.data() + begin, begin, count);
            begin += count;
        }
        tm_topk_end(&s, mem.data());
        ++*passes;
        REQUIRE(*passes < 8);
    }
    std::vector<uint8_t> keep(v.size());
    tm_topk_keep(&s, v.data(), 0, v.size(), keep.data());
    return keep;
}

} // namespace

TEST_CASE("exact top-k by magnitude, lower index first among equal magnitudes") {
    std::mt19937_64 rng(13);
    std::normal_distribution<double> normal;
    for (size_t numel : {size_t(1), size_t(7), size_t(1000), size_t(65536), size_t(65537), size_t(200000)}) {
        for (int kind = 0; kind < 6; kind++) {
            std::vector<double> v(numel);
            for (size_t i = 0; i < numel; i++) {
                switch (kind) {
                case 0: v[i] = normal(rng); break;                              // distinct
                case 1: v[i] = double(int(rng() % 9) - 4); break;               // many ties, signs
                case 2: v[i] = 0.0; break;                                      // untouched weights
                case 3: v[i] = (i % 2 ? -1 : 1) * (1 + double(i / 2) * 0x1p-30); break; // one top bin, pairs
                case 4: v[i] = -2.5; break;                                     // one value
                default: v[i] = rng() % 4 ? 0.0 : normal(rng);                  // mostly zeros
                }
            }
            for (double density : {0.0, 0.1, 0.5, 0.9, 1.0}) {
                uint64_t k = uint64_t(density * double(numel));
                unsigned passes;
                INFO("numel " << numel << " kind " << kind << " k " << k);
                std::vector<uint8_t> got = streamed(v, k, &passes, rng);
                CHECK(got == brute_force(v, k));
                CHECK(std::count(got.begin(), got.end(), 1) == long(k));
            }
        }
    }
}
