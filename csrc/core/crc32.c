#include "core/crc32.h"

#include <limits.h>
#include <zlib.h>

static uint32_t crc32_zlib(uint32_t crc, const unsigned char *p, size_t len) {
    uLong c = crc;
    while (len) {
        uInt k = len > UINT_MAX ? UINT_MAX : (uInt)len;
        c = crc32(c, p, k);
        p += k;
        len -= k;
    }
    return (uint32_t)c;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define TM_CLMUL __attribute__((target("pclmul,sse4.1")))

/* Folds len bytes (a multiple of 16, at least 64) into the inverted CRC state c. The
 * constants are x^k mod P for the bit-reflected polynomial 0x104C11DB7 at the fold distances
 * (512 ± 32 bits, 128 ± 32 bits, 64 bits), then P and its Barrett quotient μ. */
TM_CLMUL static uint32_t fold(uint32_t c, const unsigned char *p, size_t len) {
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124);
    const __m128i pmu = _mm_set_epi64x(0x1f7011641, 0x1db710641);
    const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);

    __m128i x1 = _mm_loadu_si128((const __m128i *)(const void *)(p + 0));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(const void *)(p + 16));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(const void *)(p + 32));
    __m128i x4 = _mm_loadu_si128((const __m128i *)(const void *)(p + 48));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)c));
    p += 64;
    len -= 64;

    /* Four independent 128-bit lanes, each folded 512 bits forward per step. */
    for (; len >= 64; p += 64, len -= 64) {
        __m128i a1 = _mm_clmulepi64_si128(x1, k1k2, 0x00), b1 = _mm_clmulepi64_si128(x1, k1k2, 0x11);
        __m128i a2 = _mm_clmulepi64_si128(x2, k1k2, 0x00), b2 = _mm_clmulepi64_si128(x2, k1k2, 0x11);
        __m128i a3 = _mm_clmulepi64_si128(x3, k1k2, 0x00), b3 = _mm_clmulepi64_si128(x3, k1k2, 0x11);
        __m128i a4 = _mm_clmulepi64_si128(x4, k1k2, 0x00), b4 = _mm_clmulepi64_si128(x4, k1k2, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(a1, b1), _mm_loadu_si128((const __m128i *)(const void *)(p + 0)));
        x2 = _mm_xor_si128(_mm_xor_si128(a2, b2), _mm_loadu_si128((const __m128i *)(const void *)(p + 16)));
        x3 = _mm_xor_si128(_mm_xor_si128(a3, b3), _mm_loadu_si128((const __m128i *)(const void *)(p + 32)));
        x4 = _mm_xor_si128(_mm_xor_si128(a4, b4), _mm_loadu_si128((const __m128i *)(const void *)(p + 48)));
    }

    /* The four lanes into one, then any remaining 16-byte blocks. */
#define FOLD128(x, next) \
    x = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k3k4, 0x00), _mm_clmulepi64_si128(x, k3k4, 0x11)), next)
    FOLD128(x1, x2);
    FOLD128(x1, x3);
    FOLD128(x1, x4);
    for (; len >= 16; p += 16, len -= 16) FOLD128(x1, _mm_loadu_si128((const __m128i *)(const void *)p));
#undef FOLD128

    /* 128 -> 64 -> 32 bits, then Barrett reduction modulo P. */
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), _mm_clmulepi64_si128(x1, k3k4, 0x10));
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 4), _mm_clmulepi64_si128(_mm_and_si128(x1, low32), k5, 0x00));
    __m128i t = _mm_clmulepi64_si128(_mm_and_si128(x1, low32), pmu, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), pmu, 0x00);
    return (uint32_t)_mm_extract_epi32(_mm_xor_si128(x1, t), 1);
}

static int have_clmul(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    }
    return cached;
}

uint32_t tm_crc32(uint32_t crc, const void *buf, size_t len) {
    const unsigned char *p = buf;
    if (len >= 64 && have_clmul()) {
        size_t bulk = len & ~(size_t)15;
        crc = ~fold(~crc, p, bulk);
        p += bulk;
        len -= bulk;
    }
    return crc32_zlib(crc, p, len);
}

#else

uint32_t tm_crc32(uint32_t crc, const void *buf, size_t len) { return crc32_zlib(crc, buf, len); }

#endif
