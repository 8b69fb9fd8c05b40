/* The one string hash of the pickle code: FNV-1a over bytes, and a 64-bit finaliser (splitmix64)
 * for integer keys. The unpickler's dict index, memo and storage index, the pickle writer's
 * storage-key memo and the legacy reader's key index all hash with it. The values only place
 * entries in open-addressing tables, so nothing a caller sees depends on them. C11. */
#ifndef TM_FORMATS_PICKLE_HASH_H
#define TM_FORMATS_PICKLE_HASH_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* FNV-1a of n bytes; seed keeps kinds apart that must not compare equal (str "a", bytes "a"). */
static inline uint64_t tm_pk_hash_bytes(const void *d, size_t n, uint64_t h) {
    const unsigned char *b = (const unsigned char *)d;
    h ^= 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static inline uint64_t tm_pk_hash_str(const char *s) { return tm_pk_hash_bytes(s, strlen(s), 0); }

static inline uint64_t tm_pk_mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

#endif
