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
 *   u(index) = (mix(key ^ index) >> 11) · 2^-53              (index: the element's row-major
 *                                                             index in the tensor) ∈ [0, 1)
 * C11. */
#ifndef TM_MERGE_RANDOM_H
#define TM_MERGE_RANDOM_H

#include <stdint.h>

#include "core/hash.h"

static inline uint64_t tm_random_mix(uint64_t z) { return tm_hash_mix64(z + 0x9e3779b97f4a7c15ull); }

static inline uint64_t tm_random_key(uint64_t seed, uint64_t input, const char *name) {
    return tm_random_mix(tm_random_mix(tm_random_mix(seed) ^ input) ^ tm_hash_str(name));
}

/* u(index) < p, tested on integers so loops over many elements vectorise: with u = m·2⁻⁵³,
 * u < p ⟺ m < ⌈p·2⁵³⌉ (p·2⁵³ is exact). keep(key, index, threshold(p)). */
static inline uint64_t tm_random_threshold(double p) {
    double t = p * 0x1.0p53;
    uint64_t i = (uint64_t)t;
    return (double)i < t ? i + 1 : i;
}
static inline int tm_random_keep(uint64_t key, uint64_t index, uint64_t threshold) {
    return (tm_random_mix(key ^ index) >> 11) < threshold;
}

#endif
