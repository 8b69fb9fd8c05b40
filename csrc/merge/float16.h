/* float16 and bfloat16 conversions for the merge kernel: widening is exact; narrowing from the
 * float64 accumulator rounds ONCE, to nearest even, straight to the 16-bit format (subnormals,
 * overflow to ±inf, NaN kept NaN). Inline so the kernel's loops vectorise in every ISA clone.
 * C11 and C++ (the unit tests include it).
 *
 * How double → 16 bits rounds once: the double is first rounded to float *to odd* (truncate,
 * then set the last bit if anything was lost), then float → 16 bits to nearest even. Rounding to
 * odd into a format with at least two more significand bits than the target never changes the
 * final nearest-even result (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums:
 * proved algorithms using rounding to odd", IEEE TC 2008). float has 24 bits against 11 (half)
 * and 8 (bfloat16) and, where the target is subnormal, still 13 / 16 more: the condition holds
 * over the whole range. Going through float with the hardware's nearest-even instead would
 * round twice: 1 + 2⁻¹¹ + 2⁻³¹ becomes 1 + 2⁻¹¹ in float, a tie, and half rounds it down to 1
 * where the true nearest is 1 + 2⁻¹⁰. */
#ifndef TM_MERGE_FLOAT16_H
#define TM_MERGE_FLOAT16_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t tm_f32_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    return x;
}

static inline float tm_f32_from_bits(uint32_t x) {
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* d rounded to float toward the odd neighbour when inexact (±inf and NaN unchanged; an overflow
 * gives ±FLT_MAX, an underflow the smallest subnormal: both odd, both still round right below).
 * Branch-free so that it vectorises. */
static inline float tm_double_to_float_odd(double d) {
    float f = (float)d; /* nearest even: one of the two neighbours of d */
    uint32_t x = tm_f32_bits(f);
    double back = (double)f;
    /* Comparisons are false for NaN, so a NaN keeps its bits. Moving the integer of a
     * sign-magnitude float by one goes to the adjacent value, away from or toward zero. (Written
     * with 64-bit lanes throughout: GCC vectorises this form, not one mixing 32-bit masks.) */
    int64_t away = fabs(back) < fabs(d), toward = fabs(back) > fabs(d);
    int64_t step = (int64_t)(~x & 1u) * (away - toward);
    return tm_f32_from_bits((uint32_t)((int64_t)x + step));
}

/* float → bfloat16, nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t tm_float_to_bfloat16_rne(float f) {
    uint32_t x = tm_f32_bits(f);
    uint32_t nan = (x & 0x7fffffffu) > 0x7f800000u;
    uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    return (uint16_t)(nan ? (x >> 16) | 0x40u : rounded);
}

/* float → float16, nearest even; overflow gives ±inf, NaN a quiet NaN. */
static inline uint16_t tm_float_to_half_rne(float f) {
    uint32_t x = tm_f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xffu, mant = x & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0));
    int32_t e = (int32_t)exp - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) { /* half subnormal (or zero) */
        uint32_t shift = (uint32_t)(14 - e);
        if (shift > 24) return (uint16_t)sign;
        mant |= 0x800000u;
        uint32_t m = mant >> shift, rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (m & 1))) m++;
        return (uint16_t)(sign | m);
    }
    uint32_t h = sign | ((uint32_t)e << 10) | (mant >> 13), rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* a carry into the exponent is right */
    return (uint16_t)h;
}

static inline uint16_t tm_double_to_bfloat16(double d) { return tm_float_to_bfloat16_rne(tm_double_to_float_odd(d)); }
static inline uint16_t tm_double_to_half(double d) { return tm_float_to_half_rne(tm_double_to_float_odd(d)); }

static inline float tm_bfloat16_to_float(uint16_t b) { return tm_f32_from_bits((uint32_t)b << 16); }

static inline float tm_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, x;
    if (exp == 0) {
        if (!mant) {
            x = sign;
        } else {
            int e = -1;
            do {
                e++;
                mant <<= 1;
            } while (!(mant & 0x400u));
            x = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        x = sign | 0x7f800000u | (mant << 13);
    } else {
        x = sign | ((exp + 112) << 23) | (mant << 13);
    }
    return tm_f32_from_bits(x);
}

#endif
