/* The merge methods' randomness: a pure function of (seed, input, tensor name, element index),
 * so a random mask is the same for any thread count, block size or machine. Documented to be
 * reimplemented (docs/methods.md; tests/python/test_methods.py does):
 *
 *   mix(z)   = splitmix64's finaliser: z += 0x9e3779b97f4a7c15;
 *              z = (z ^ z >> 30) * 0xbf58476d1ce4e5b9; z = (z ^ z >> 27) * 0x94d049bb133111eb;
 *              z ^ z >> 31                                  (all arithmetic mod 2^64)
 *   name     = FNV-1a 64 of the tensor name's UTF-8 bytes (offset 0xcbf29ce484222325,
 *              prime 0x100000001b3)
 *   key      = mix(mix(mix(seed) ^ input) ^ name)            (input: 0-based index of the input)
 *   m(index) = the low 32 bits of mix(key ^ ⌊index/2⌋) for an even index, the high 32 bits for
 *              an odd one                                    (index: the element's row-major
 *   u(index) = m(index) · 2^-32 ∈ [0, 1)                      index in the tensor)
 * One mix gives two neighbours' coins: the mix is the whole cost of a DARE mask (two 64-bit
 * multiplies), and 32 bits resolve any keep probability to within 2^-32. C11. */
#ifndef TM_MERGE_RANDOM_H
#define TM_MERGE_RANDOM_H

#include <stdint.h>
#include <string.h>

#include "core/hash.h"

/* mix(z) in place on a uint64_t or a GCC vector of them. */
#define TM_RANDOM_MIX_INPLACE(z) ((z) += 0x9e3779b97f4a7c15ull, TM_HASH_MIX64_INPLACE(z))
static inline uint64_t tm_random_mix(uint64_t z) {
    TM_RANDOM_MIX_INPLACE(z);
    return z;
}

static inline uint64_t tm_random_key(uint64_t seed, uint64_t input, const char *name) {
    return tm_random_mix(tm_random_mix(tm_random_mix(seed) ^ input) ^ tm_hash_str(name));
}

/* m(index) above. */
static inline uint64_t tm_random_coin(uint64_t key, uint64_t index) {
    return (tm_random_mix(key ^ (index >> 1)) >> (32 * (index & 1))) & 0xffffffffu;
}

/* u(index) < p, tested on integers so loops over many elements vectorise: with u = m·2⁻³²,
 * u < p ⟺ m < ⌈p·2³²⌉ (p·2³² is exact; p ≤ 0 keeps nothing, p ≥ 1 everything).
 * keep(key, index, threshold(p)). */
static inline uint64_t tm_random_threshold(double p) {
    if (!(p > 0)) return 0;
    if (p >= 1) return (uint64_t)1 << 32;
    double t = p * 0x1.0p32;
    uint64_t i = (uint64_t)t;
    return (double)i < t ? i + 1 : i;
}
static inline int tm_random_keep(uint64_t key, uint64_t index, uint64_t threshold) {
    return tm_random_coin(key, index) < threshold;
}
/* For 32-bit compares: m < threshold ⟺ m ≤ the result, when threshold > 0 (it keeps some). */
static inline uint32_t tm_random_last_kept(uint64_t threshold) {
    return threshold > 0xffffffffu ? 0xffffffffu : threshold ? (uint32_t)(threshold - 1) : 0;
}

/* The coins of 16 neighbours, m(2k) … m(2k + 15), from 8 mixes in one vector: lane i of *out
 * is m(2k + i), as the low half of a 64-bit lane comes first on a little-endian machine
 * (elsewhere TM_RANDOM_COINS16 is undefined and the callers take tm_random_coin one by one). */
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define TM_RANDOM_COINS16 1
typedef uint64_t tm_random_v8u64 __attribute__((vector_size(64)));
typedef uint32_t tm_random_v16u32 __attribute__((vector_size(64)));
typedef int32_t tm_random_v16i32 __attribute__((vector_size(64))); /* a compare's lanes: −1 or 0 */
typedef uint8_t tm_random_v16u8 __attribute__((vector_size(16)));
static inline __attribute__((always_inline)) void tm_random_coins16(uint64_t key, uint64_t k, tm_random_v16u32 *out) {
    tm_random_v8u64 z = ((tm_random_v8u64){0, 1, 2, 3, 4, 5, 6, 7} + k) ^ key;
    TM_RANDOM_MIX_INPLACE(z);
    *out = (tm_random_v16u32)z;
}
/* 16 keep bytes (0 or 1) from a compare's lanes. */
static inline __attribute__((always_inline)) void tm_random_bytes16(tm_random_v16i32 lanes, uint8_t *out) {
    const tm_random_v16u8 b = __builtin_convertvector(lanes, tm_random_v16u8) & 1;
    memcpy(out, &b, sizeof b);
}
#endif

#endif
