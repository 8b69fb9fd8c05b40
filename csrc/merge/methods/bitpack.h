/* Eight 0/1 bytes as the bits of one byte and back (keep[i] at bit i), without a loop: masks are
 * made as bytes by vectorised loops, then stored or scanned as bits. C11. */
#ifndef TM_MERGE_METHODS_BITPACK_H
#define TM_MERGE_METHODS_BITPACK_H

#include <stdint.h>
#include <string.h>

/* The byte whose bit i is b[i] (each b[i] 0 or 1): the multiply gathers byte i's low bit into
 * bit 56 + i, with no carries (each partial product lands on its own bit). */
static inline uint8_t tm_pack8(const uint8_t *b) {
    uint64_t v;
    memcpy(&v, b, sizeof v);
    return (uint8_t)((v * 0x0102040810204080ull) >> 56);
}

/* The inverse: the 8 bytes (little-endian in the result) holding the bits of x (x < 256). */
static inline uint64_t tm_spread8(uint64_t x) {
    x = (x | x << 28) & 0x0000000F0000000Full;
    x = (x | x << 14) & 0x0003000300030003ull;
    return (x | x << 7) & 0x0101010101010101ull;
}

/* The bits of b[0, 64) (0/1 bytes; those at and past n read as 0) as a 64-bit mask. */
static inline uint64_t tm_pack64(const uint8_t *b) {
    uint64_t m = 0;
    for (unsigned w = 0; w < 8; w++) m |= (uint64_t)tm_pack8(b + 8 * w) << (8 * w);
    return m;
}

#endif
