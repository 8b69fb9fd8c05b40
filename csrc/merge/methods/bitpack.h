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

static inline uint8_t tm_bit_at(const uint8_t *bits, uint64_t i) { return (uint8_t)((bits[i >> 3] >> (i & 7)) & 1); }
static inline void tm_bits_put(uint8_t *bits, uint64_t i, uint8_t v) {
    bits[i >> 3] = (uint8_t)((bits[i >> 3] & ~(1u << (i & 7))) | (unsigned)v << (i & 7));
}

/* keep[e] = bit begin + e of bits, for e < count: a tensor's mask stored as bits (1/8 of the
 * bytes to write and read back), taken out a block at a time. */
static inline void tm_bits_unpack(const uint8_t *bits, uint64_t begin, size_t count, uint8_t *keep) {
    size_t e = 0;
    for (; e < count && (begin + e) % 8; e++) keep[e] = tm_bit_at(bits, begin + e);
    for (; e + 8 <= count; e += 8) {
        const uint64_t v = tm_spread8(bits[(begin + e) >> 3]);
        memcpy(keep + e, &v, sizeof v);
    }
    for (; e < count; e++) keep[e] = tm_bit_at(bits, begin + e);
}

/* The inverse: bits begin + e set to keep[e] (0/1), the others left as they are. */
static inline void tm_bits_pack(uint8_t *bits, uint64_t begin, const uint8_t *keep, size_t count) {
    size_t e = 0;
    for (; e < count && (begin + e) % 8; e++) tm_bits_put(bits, begin + e, keep[e]);
    for (; e + 8 <= count; e += 8) bits[(begin + e) >> 3] = tm_pack8(keep + e);
    for (; e < count; e++) tm_bits_put(bits, begin + e, keep[e]);
}

#endif
