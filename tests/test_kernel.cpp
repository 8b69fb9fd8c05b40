// The merge kernel against independent float64 references: rounding float64 once to float16 /
// bfloat16 (every bit pattern's neighbourhood, ties, subnormals, overflow, NaN), strided and
// non-contiguous views, complex inputs.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "merge/float16.h"
#include "merge/kernel.h"

namespace {

// ---- An independent reference for rounding to a 16-bit float ------------------------------
// A format with `mant` stored significand bits and exponent bias `bias`, decoded by ldexp (no bit
// tricks shared with the kernel). Rounding d: find the two finite neighbours in a sorted table of
// every value, compare d with their midpoint (exact in double: 16-bit values need at most 12
// significand bits, their midpoint one more), and break a tie toward the even bit pattern.
struct Format {
    int mant, exp_bits, bias;
    double decode(uint16_t bits) const {
        int e = (bits >> mant) & ((1 << exp_bits) - 1);
        int m = bits & ((1 << mant) - 1);
        double mag = e == 0 ? std::ldexp(m, 1 - bias - mant) : std::ldexp(m + (1 << mant), e - bias - mant);
        return bits >> 15 ? -mag : mag;
    }
    uint16_t inf_bits() const { return uint16_t(((1 << exp_bits) - 1) << mant); }
};

const Format kHalf{10, 5, 15};
const Format kBf16{7, 8, 127};

struct Reference {
    Format f;
    std::vector<double> values;  // non-negative finite values, ascending; index = bit pattern
    explicit Reference(Format fmt) : f(fmt) {
        for (uint32_t b = 0; b < f.inf_bits(); b++) values.push_back(f.decode(uint16_t(b)));
        REQUIRE(std::is_sorted(values.begin(), values.end()));
    }
    // The value one step past the largest finite one (it stands for overflow: an exact tie with
    // the largest finite value goes to it, as its pattern, inf, is even).
    double beyond() const { return std::ldexp(1.0, (1 << (f.exp_bits - 1))); }
    uint16_t round(double d) const {
        if (std::isnan(d)) return 0xffff;  // any NaN: checked by is_nan below
        uint16_t sign = std::signbit(d) ? 0x8000 : 0;
        double a = std::fabs(d);
        if (a >= beyond()) return uint16_t(sign | f.inf_bits());
        size_t hi = size_t(std::lower_bound(values.begin(), values.end(), a) - values.begin());
        if (hi < values.size() && values[hi] == a) return uint16_t(sign | hi);
        size_t lo = hi - 1;  // a > 0 here, and values[0] == 0
        double up = hi < values.size() ? values[hi] : beyond();
        double mid = (values[lo] + up) / 2;
        size_t pick = a < mid ? lo : a > mid ? hi : (lo % 2 == 0 ? lo : hi);
        return uint16_t(sign | pick);
    }
    bool is_nan(uint16_t b) const { return (b & 0x7fff) > f.inf_bits(); }
};

const Reference &half_ref() {
    static Reference r(kHalf);
    return r;
}
const Reference &bf16_ref() {
    static Reference r(kBf16);
    return r;
}

uint16_t to_half(double d) { return tm_double_to_half(d); }
uint16_t to_bf16(double d) { return tm_double_to_bfloat16(d); }

// d and its neighbourhood: the double just below and above, and a relative nudge far below the
// 16-bit precision but far above a double ulp (the case that rounding through float gets wrong).
std::vector<double> around(double d) {
    std::vector<double> v{d, std::nextafter(d, -INFINITY), std::nextafter(d, INFINITY)};
    if (d != 0) {
        v.push_back(d * (1 + std::ldexp(1.0, -30)));
        v.push_back(d * (1 - std::ldexp(1.0, -30)));
    }
    return v;
}

template <class F>
void check_every_neighbourhood(const Reference &ref, F convert) {
    size_t checked = 0;
    for (size_t b = 0; b < ref.values.size(); b++) {
        double lo = ref.values[b], hi = b + 1 < ref.values.size() ? ref.values[b + 1] : ref.beyond();
        for (double m : {lo, (lo + hi) / 2})
            for (double d : around(m))
                for (double s : {d, -d}) {
                    uint16_t want = ref.round(s), got = convert(s);
                    if (got != want) {
                        INFO("d = " << s << " (" << std::hexfloat << s << std::defaultfloat << ")");
                        CHECK(got == want);
                    }
                    checked++;
                }
    }
    CHECK(checked > 500000);
}

}  // namespace

TEST_CASE("rounding float64 to float16 once: the issue's example") {
    // 1·1.0 + (1+2⁻²⁰)·2⁻¹¹ = 1 + 2⁻¹¹ + 2⁻³¹, just above the tie between 1 and 1 + 2⁻¹⁰.
    double d = 1.0 + (1 + std::ldexp(1.0, -20)) * std::ldexp(1.0, -11);
    CHECK(kHalf.decode(to_half(d)) == 1.0009765625);
    // The same through the kernel: two float16 inputs 1.0 and 2⁻¹¹, weights 1 and 1 + 2⁻²⁰.
    uint16_t a = to_half(1.0), b = to_half(std::ldexp(1.0, -11));
    int64_t shape = 1, stride = 1;
    tm_view in[2] = {{reinterpret_cast<const uint8_t *>(&a), TM_FLOAT16, 1, &shape, &stride, 0},
                     {reinterpret_cast<const uint8_t *>(&b), TM_FLOAT16, 1, &shape, &stride, 0}};
    double w[2] = {1.0, 1 + std::ldexp(1.0, -20)}, scratch[2];
    uint16_t out = 0;
    tm_kernel_weighted_sum(in, w, 2, 0, 1, TM_FLOAT16, &out, scratch);
    CHECK(out == 0x3c01);
}

TEST_CASE("rounding float64 to float16 matches the reference at every value and midpoint") {
    check_every_neighbourhood(half_ref(), to_half);
}

TEST_CASE("rounding float64 to bfloat16 matches the reference at every value and midpoint") {
    check_every_neighbourhood(bf16_ref(), to_bf16);
}

TEST_CASE("rounding random float64 values over the whole range matches the reference") {
    std::mt19937_64 rng(12);
    std::uniform_int_distribution<int> exp(-160, 140);
    std::uniform_real_distribution<double> mant(1.0, 2.0);
    for (int i = 0; i < 200000; i++) {
        double d = std::ldexp(mant(rng), exp(rng)) * (i % 2 ? -1 : 1);
        REQUIRE(to_half(d) == half_ref().round(d));
        REQUIRE(to_bf16(d) == bf16_ref().round(d));
    }
}

TEST_CASE("halfway cases go to the even neighbour") {
    CHECK(to_half(1.0 + std::ldexp(1.0, -11)) == 0x3c00);               // tie, 1.0 is even
    CHECK(to_half(1.0 + 3 * std::ldexp(1.0, -11)) == 0x3c02);           // tie, up to even
    CHECK(to_bf16(1.0 + std::ldexp(1.0, -8)) == 0x3f80);
    CHECK(to_bf16(1.0 + 3 * std::ldexp(1.0, -8)) == 0x3f82);
    CHECK(to_bf16(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40)) == 0x3f81);  // just above
}

TEST_CASE("subnormals, overflow, infinities and NaN") {
    CHECK(to_half(std::ldexp(1.0, -24)) == 0x0001);                       // smallest subnormal
    CHECK(to_half(std::ldexp(1.0, -25)) == 0x0000);                       // tie with 0: even
    CHECK(to_half(std::ldexp(1.0, -25) * (1 + std::ldexp(1.0, -40))) == 0x0001);
    CHECK(to_half(-std::ldexp(1.0, -26)) == 0x8000);                      // signed zero
    CHECK(to_half(65504.0) == 0x7bff);
    CHECK(to_half(std::nextafter(65520.0, 0.0)) == 0x7bff);
    CHECK(to_half(65520.0) == 0x7c00);                                    // tie: up to inf
    CHECK(to_half(-1e300) == 0xfc00);
    CHECK(to_half(INFINITY) == 0x7c00);
    CHECK(to_bf16(std::ldexp(1.0, -133)) == 0x0001);                      // bf16 subnormal
    CHECK(to_bf16(std::ldexp(1.0, -134) * (1 + std::ldexp(1.0, -40))) == 0x0001);
    CHECK(to_bf16(std::ldexp(1.0, -200)) == 0x0000);                      // below float's range
    CHECK(to_bf16(1e300) == 0x7f80);
    CHECK(to_bf16(-INFINITY) == 0xff80);
    CHECK(half_ref().is_nan(to_half(std::nan(""))));
    CHECK(bf16_ref().is_nan(to_bf16(-std::nan(""))));
}

TEST_CASE("widening float16 and bfloat16 is exact for every bit pattern") {
    for (uint32_t b = 0; b < 0x10000; b++) {
        uint16_t h = uint16_t(b);
        if (half_ref().is_nan(h)) CHECK(std::isnan(tm_half_to_float(h)));
        else if ((h & 0x7fff) == kHalf.inf_bits()) CHECK(std::isinf(tm_half_to_float(h)));
        else REQUIRE(double(tm_half_to_float(h)) == kHalf.decode(h));
        if (bf16_ref().is_nan(h)) CHECK(std::isnan(tm_bfloat16_to_float(h)));
        else if ((h & 0x7fff) == kBf16.inf_bits()) CHECK(std::isinf(tm_bfloat16_to_float(h)));
        else REQUIRE(double(tm_bfloat16_to_float(h)) == kBf16.decode(h));
    }
}

// ---- The weighted sum over views --------------------------------------------------------------

namespace {

// Element (r, c) of a view by its own strides: the reference walks indices, not the kernel's
// iterator.
template <class T>
double at(const std::vector<T> &store, const int64_t *stride, int64_t offset, int64_t r, int64_t c) {
    return double(store[size_t(offset + r * stride[0] + c * stride[1])]);
}

}  // namespace

TEST_CASE("weighted sum over transposed, offset and broadcast views matches a float64 loop") {
    const int64_t R = 37, C = 301;  // C > one tile of the kernel, odd sizes
    std::mt19937 rng(3);
    std::normal_distribution<float> nd;
    std::vector<float> a(size_t(R * C + 5)), b(size_t(R * C));
    std::vector<double> c(static_cast<size_t>(C));
    for (auto &x : a) x = nd(rng);
    for (auto &x : b) x = nd(rng);
    for (auto &x : c) x = nd(rng);
    int64_t shape[2] = {R, C};
    int64_t sa[2] = {C, 1};      // contiguous, at an offset of 5 elements
    int64_t sb[2] = {1, R};      // transposed (column-major storage)
    int64_t sc[2] = {0, 1};      // one row broadcast down (stride 0)
    tm_view in[3] = {{reinterpret_cast<const uint8_t *>(a.data()), TM_FLOAT32, 2, shape, sa, 5},
                     {reinterpret_cast<const uint8_t *>(b.data()), TM_FLOAT32, 2, shape, sb, 0},
                     {reinterpret_cast<const uint8_t *>(c.data()), TM_FLOAT64, 2, shape, sc, 0}};
    double w[3] = {0.25, 0.5, 0.25};
    std::vector<double> out(size_t(R * C)), scratch(size_t(R * C));
    uint64_t begin = 7;  // a block that starts inside a row
    size_t count = size_t(R * C) - 7;
    tm_kernel_weighted_sum(in, w, 3, begin, count, TM_FLOAT64, out.data(), scratch.data());
    for (size_t j = 0; j < count; j++) {
        int64_t r = int64_t(begin + j) / C, col = int64_t(begin + j) % C;
        double want = w[0] * at(a, sa, 5, r, col);
        want += w[1] * at(b, sb, 0, r, col);
        want += w[2] * at(c, sc, 0, r, col);
        REQUIRE(out[j] == want);
    }
}

TEST_CASE("weighted sum of bfloat16 inputs to bfloat16 rounds the float64 sum once") {
    const size_t n_in = 8, N = 5000;
    std::mt19937 rng(8);
    std::normal_distribution<float> nd;
    std::vector<std::vector<uint16_t>> x(n_in, std::vector<uint16_t>(N));
    for (auto &v : x)
        for (auto &e : v) e = to_bf16(nd(rng));
    int64_t shape = int64_t(N), stride = 1;
    std::vector<tm_view> in;
    std::vector<double> w;
    for (size_t i = 0; i < n_in; i++) {
        in.push_back({reinterpret_cast<const uint8_t *>(x[i].data()), TM_BFLOAT16, 1, &shape, &stride, 0});
        w.push_back(1.0 / double(n_in));
    }
    for (tm_dtype out_dtype : {TM_BFLOAT16, TM_FLOAT16, TM_FLOAT32}) {
        std::vector<uint8_t> out(N * 4);
        std::vector<double> scratch(N);
        tm_kernel_weighted_sum(in.data(), w.data(), n_in, 0, N, out_dtype, out.data(), scratch.data());
        for (size_t j = 0; j < N; j++) {
            double s = 0;
            for (size_t i = 0; i < n_in; i++) s = i ? s + w[i] * kBf16.decode(x[i][j]) : w[i] * kBf16.decode(x[i][j]);
            uint16_t h;
            std::memcpy(&h, &out[2 * j], 2);
            if (out_dtype == TM_BFLOAT16) REQUIRE(h == bf16_ref().round(s));
            if (out_dtype == TM_FLOAT16) REQUIRE(h == half_ref().round(s));
            if (out_dtype == TM_FLOAT32) {
                float f;
                std::memcpy(&f, &out[4 * j], 4);
                REQUIRE(f == float(s));
            }
        }
    }
}

TEST_CASE("1 to 9 float32 and float64 inputs (fused in groups of 4 and 2) sum in input order") {
    const size_t N = 4100;  // two full tiles and a part
    std::mt19937 rng(9);
    std::normal_distribution<double> nd;
    std::vector<std::vector<float>> xf(9, std::vector<float>(N));
    std::vector<std::vector<double>> xd(9, std::vector<double>(N));
    std::vector<double> w(9);
    for (size_t i = 0; i < 9; i++) {
        w[i] = nd(rng);
        for (size_t j = 0; j < N; j++) xf[i][j] = float(nd(rng)), xd[i][j] = nd(rng);
    }
    int64_t shape = int64_t(N), stride = 1;
    for (size_t n = 1; n <= 9; n++)
        for (tm_dtype dt : {TM_FLOAT32, TM_FLOAT64}) {
            std::vector<tm_view> in;
            for (size_t i = 0; i < n; i++) {
                const void *base = dt == TM_FLOAT32 ? static_cast<const void *>(xf[i].data()) : xd[i].data();
                in.push_back({static_cast<const uint8_t *>(base), dt, 1, &shape, &stride, 0});
            }
            std::vector<double> out(N), scratch(N);
            tm_kernel_weighted_sum(in.data(), w.data(), n, 0, N, TM_FLOAT64, out.data(), scratch.data());
            for (size_t j = 0; j < N; j++) {
                double s = 0;
                for (size_t i = 0; i < n; i++) {
                    double x = dt == TM_FLOAT32 ? double(xf[i][j]) : xd[i][j];
                    s = i ? s + w[i] * x : w[i] * x;
                }
                INFO("n = " << n << ", dtype " << tm_dtype_name(dt) << ", element " << j);
                REQUIRE(out[j] == s);
            }
        }
}

TEST_CASE("weighted sum of complex views matches std::complex in float64") {
    const int64_t R = 6, C = 5;
    std::mt19937 rng(5);
    std::normal_distribution<float> nd;
    std::vector<std::complex<float>> a(size_t(R * C));
    std::vector<std::complex<double>> b(size_t(R * C));
    for (auto &z : a) z = {nd(rng), nd(rng)};
    for (auto &z : b) z = {nd(rng), nd(rng)};
    int64_t shape[2] = {R, C}, sa[2] = {C, 1}, sb[2] = {1, R};
    tm_view in[2] = {{reinterpret_cast<const uint8_t *>(a.data()), TM_COMPLEX64, 2, shape, sa, 0},
                     {reinterpret_cast<const uint8_t *>(b.data()), TM_COMPLEX128, 2, shape, sb, 0}};
    double w[2] = {0.3, 0.7};
    std::vector<std::complex<double>> out(size_t(R * C));
    std::vector<std::complex<float>> out64(size_t(R * C));
    std::vector<double> scratch(size_t(2 * R * C));
    tm_kernel_weighted_sum(in, w, 2, 0, size_t(R * C), TM_COMPLEX128, out.data(), scratch.data());
    tm_kernel_weighted_sum(in, w, 2, 0, size_t(R * C), TM_COMPLEX64, out64.data(), scratch.data());
    for (int64_t r = 0; r < R; r++)
        for (int64_t c = 0; c < C; c++) {
            std::complex<double> za(a[size_t(r * C + c)]), zb(b[size_t(c * R + r)]);
            double re = w[0] * za.real() + w[1] * zb.real(), im = w[0] * za.imag() + w[1] * zb.imag();
            REQUIRE(out[size_t(r * C + c)] == std::complex<double>(re, im));
            REQUIRE(out64[size_t(r * C + c)] == std::complex<float>(float(re), float(im)));
        }
}

TEST_CASE("copy converts through float64 with one rounding, and keeps integers exact") {
    std::vector<float> f{1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20), -3.5f, 65520.0f};
    int64_t shape = 3, stride = 1;
    tm_view v{reinterpret_cast<const uint8_t *>(f.data()), TM_FLOAT32, 1, &shape, &stride, 0};
    uint16_t h[3];
    tm_kernel_copy(&v, 0, 3, TM_FLOAT16, h);
    for (int i = 0; i < 3; i++) CHECK(h[i] == half_ref().round(f[size_t(i)]));
    std::vector<int64_t> ints{-7, 1LL << 40, 3};
    int64_t istride = -1;  // reversed
    tm_view iv{reinterpret_cast<const uint8_t *>(ints.data()), TM_INT64, 1, &shape, &istride, 2};
    int64_t got[3];
    tm_kernel_copy(&iv, 0, 3, TM_INT64, got);
    CHECK(got[0] == 3);
    CHECK(got[1] == (1LL << 40));
    CHECK(got[2] == -7);
    CHECK(tm_kernel_equal(&iv, &iv, 0, 3));
}
