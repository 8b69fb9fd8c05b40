/* The one hash of the library: FNV-1a over bytes, and splitmix64's finaliser for 64-bit keys.
 * Open-addressing tables place entries with it (names, pickle memo and dict keys, storages),
 * where nothing a caller sees depends on the values; the merge methods' random masks use it as
 * documented in merge/random.h, where the values are part of the output. C11. */
#ifndef TM_CORE_HASH_H
#define TM_CORE_HASH_H

#include <stddef.h>
#include <stdint.h>

/* FNV-1a of n bytes (offset basis 0xcbf29ce484222325, prime 0x100000001b3); seed is XORed into
 * the basis, keeping kinds apart that must not compare equal (str "a", bytes "a"); 0: plain
 * FNV-1a. */
static inline uint64_t tm_hash_bytes(const void *d, size_t n, uint64_t seed) {
    const unsigned char *b = (const unsigned char *)d;
    uint64_t h = seed ^ 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* FNV-1a of a NUL-terminated string. */
static inline uint64_t tm_hash_str(const char *s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) h = (h ^ *p) * 0x100000001b3ULL;
    return h;
}

/* splitmix64's finaliser: (x ^ x>>30)·0xbf58476d1ce4e5b9, (· ^ ·>>27)·0x94d049bb133111eb, · ^ ·>>31,
 * in place on x: a uint64_t, or a GCC vector of them (merge/random.h's vector loops). */
#define TM_HASH_MIX64_INPLACE(x)                                                                   \
    ((x) ^= (x) >> 30, (x) *= 0xbf58476d1ce4e5b9ULL, (x) ^= (x) >> 27, (x) *= 0x94d049bb133111ebULL, \
     (x) ^= (x) >> 31)
static inline uint64_t tm_hash_mix64(uint64_t x) {
    TM_HASH_MIX64_INPLACE(x);
    return x;
}

#endif
