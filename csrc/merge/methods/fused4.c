/* The loops are static clones (TM_HOT) behind plain functions: a cloned function's dispatcher
 * would be exported from the library whatever its visibility (tests/check_exports.sh). */
#include "merge/methods/fused4.h"

#include <string.h>

#include "merge/hot.h"
#include "merge/methods/consensus.h"
#include "merge/methods/sparse.h"

/* The 4 inputs' arrays as restrict locals, and their factors. */
#define FUSED4_LOCALS(x, keep, c)                                                                   \
    const float *restrict x0 = (x)[0], *restrict x1 = (x)[1], *restrict x2 = (x)[2], *restrict x3 = (x)[3]; \
    const uint8_t *restrict k0 = (keep)[0], *restrict k1 = (keep)[1], *restrict k2 = (keep)[2],    \
                           *restrict k3 = (keep)[3];                                               \
    const double c0 = (c)[0], c1 = (c)[1], c2 = (c)[2], c3 = (c)[3]

/* v0..v3: the 4 inputs' kept cⱼ·δⱼ of element e, be its base (scale_kept's operations). */
#define FUSED4_VALUES(e, be)                                                                        \
    const double v0 = tm_kept_or_zero(c0 * ((double)x0[e] - (be)), k0[e]);                         \
    const double v1 = tm_kept_or_zero(c1 * ((double)x1[e] - (be)), k1[e]);                         \
    const double v2 = tm_kept_or_zero(c2 * ((double)x2[e] - (be)), k2[e]);                         \
    const double v3 = tm_kept_or_zero(c3 * ((double)x3[e] - (be)), k3[e])

/* TIES' score S of the 4 values (tm_consensus_score's order: from 0, in input order). */
static inline __attribute__((always_inline)) double score4(double v0, double v1, double v2, double v3, int sign_rule) {
    double score = 0;
    score += tm_consensus_term(v0, sign_rule);
    score += tm_consensus_term(v1, sign_rule);
    score += tm_consensus_term(v2, sign_rule);
    score += tm_consensus_term(v3, sign_rule);
    return score;
}

/* One loop over the 4 inputs and a base of element type B: STORE per element e, from v0..v3
 * (tm_fused4_add_kept's and tm_fused4_score's loops). */
#define DEFINE_FUSED4_LOOP(name, B, STORE)                                                          \
    TM_HOT static void name(double *restrict out, const float *const *x, const B *restrict b,      \
                            const uint8_t *const *keep, const double *c, size_t count) {           \
        FUSED4_LOCALS(x, keep, c);                                                                 \
        for (size_t e = 0; e < count; e++) {                                                       \
            FUSED4_VALUES(e, b[e]);                                                                \
            STORE;                                                                                 \
        }                                                                                          \
    }
/* tm_fused4_add_kept (in input order), the base in float64 or (suffix _f32) float32 */
DEFINE_FUSED4_LOOP(add_kept4_f32, double, out[e] = ((out[e] + v0) + v1 + v2) + v3)
DEFINE_FUSED4_LOOP(add_kept4_f32_f32, float, out[e] = ((out[e] + v0) + v1 + v2) + v3)
/* tm_fused4_score, one function per sign rule */
DEFINE_FUSED4_LOOP(score4_sum, double, out[e] = score4(v0, v1, v2, v3, TM_SIGN_SUM))
DEFINE_FUSED4_LOOP(score4_count, double, out[e] = score4(v0, v1, v2, v3, TM_SIGN_COUNT))

/* tm_fused4_ties' loop for one sign rule and aggregation, into float64 or (to_f32) float32: the
 * base in float32 (restrict parameters: GCC honours them, not restrict locals, and would check at
 * run time for overlaps the callers never make, falling back to scalar code where the arrays lie
 * close). */
static inline __attribute__((always_inline)) void ties4_rule(
    double *restrict outd, float *restrict outf, const float *restrict x0, const float *restrict x1,
    const float *restrict x2, const float *restrict x3, const float *restrict b, const uint8_t *restrict k0,
    const uint8_t *restrict k1, const uint8_t *restrict k2, const uint8_t *restrict k3, const double *c,
    const double *w, size_t count, int sign_rule, int agg, double zero_sign, double lambda, int to_f32) {
    const double c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
    for (size_t e = 0; e < count; e++) {
        const double be = b[e];
        FUSED4_VALUES(e, be);
        double sum = 0, div = 0, max = 0;
        const double sigma = tm_consensus_sigma(score4(v0, v1, v2, v3, sign_rule), zero_sign);
        const double side = tm_consensus_side(sigma);
        tm_consensus_agree(v0, w0, side, &sum, &div, &max);
        tm_consensus_agree(v1, w1, side, &sum, &div, &max);
        tm_consensus_agree(v2, w2, side, &sum, &div, &max);
        tm_consensus_agree(v3, w3, side, &sum, &div, &max);
        const double r = be + lambda * tm_consensus_result(agg, sum, div, max, sigma); /* θ = b + λ·… */
        if (to_f32) outf[e] = (float)r; /* rounded once */
        else outd[e] = r;
    }
}

/* One function per sign rule, aggregation and output type, constants inside, so that each loop
 * vectorises on its own (inside one function GCC gave up on some). */
#define DEFINE_TIES4(name, rule, agg, to_f32)                                                      \
    TM_HOT static void name(void *out, const tm_fused4 *f, const float *restrict b, size_t count, double zero_sign, \
                            double lambda) {                                                       \
        ties4_rule(to_f32 ? NULL : (double *)out, to_f32 ? (float *)out : NULL, f->x[0], f->x[1], f->x[2], f->x[3], \
                   b, f->keep[0], f->keep[1], f->keep[2], f->keep[3], f->c, f->w, count, rule, agg, zero_sign, \
                   lambda, to_f32);                                                                \
    }
DEFINE_TIES4(ties4_sum_mean, TM_SIGN_SUM, TM_AGG_MEAN, 0)
DEFINE_TIES4(ties4_sum_sum, TM_SIGN_SUM, TM_AGG_SUM, 0)
DEFINE_TIES4(ties4_count_mean, TM_SIGN_COUNT, TM_AGG_MEAN, 0)
DEFINE_TIES4(ties4_count_sum, TM_SIGN_COUNT, TM_AGG_SUM, 0)
DEFINE_TIES4(ties4_sum_mean_f32, TM_SIGN_SUM, TM_AGG_MEAN, 1)
DEFINE_TIES4(ties4_sum_sum_f32, TM_SIGN_SUM, TM_AGG_SUM, 1)
DEFINE_TIES4(ties4_count_mean_f32, TM_SIGN_COUNT, TM_AGG_MEAN, 1)
DEFINE_TIES4(ties4_count_sum_f32, TM_SIGN_COUNT, TM_AGG_SUM, 1)

typedef void (*ties4_fn)(void *, const tm_fused4 *, const float *, size_t, double, double);
static const ties4_fn ties4[2][2][2] = { /* [to_f32][sign_rule][agg] */
    {[TM_SIGN_SUM] = {[TM_AGG_MEAN] = ties4_sum_mean, [TM_AGG_SUM] = ties4_sum_sum},
     [TM_SIGN_COUNT] = {[TM_AGG_MEAN] = ties4_count_mean, [TM_AGG_SUM] = ties4_count_sum}},
    {[TM_SIGN_SUM] = {[TM_AGG_MEAN] = ties4_sum_mean_f32, [TM_AGG_SUM] = ties4_sum_sum_f32},
     [TM_SIGN_COUNT] = {[TM_AGG_MEAN] = ties4_count_mean_f32, [TM_AGG_SUM] = ties4_count_sum_f32}},
};

/* tm_fused4_linear: b + Σ from +0 in input order (add_kept4 then add_base's order), into float64
 * or (suffix _f32) float32. */
#define DEFINE_LINEAR4(name, T)                                                                     \
    TM_HOT static void name(T *restrict out, const tm_fused4 *f, const float *restrict b, size_t count) { \
        FUSED4_LOCALS(f->x, f->keep, f->c);                                                        \
        for (size_t e = 0; e < count; e++) {                                                       \
            const double be = b[e];                                                                \
            FUSED4_VALUES(e, be);                                                                  \
            out[e] = (T)(((((0.0 + v0) + v1) + v2) + v3) + be);                                    \
        }                                                                                          \
    }
DEFINE_LINEAR4(linear4, double)
DEFINE_LINEAR4(linear4_f32, float)

void tm_fused4_add_kept(double *acc, const tm_fused4 *f, const double *b, const float *bf, size_t count) {
    if (bf) add_kept4_f32_f32(acc, f->x, bf, f->keep, f->c, count);
    else add_kept4_f32(acc, f->x, b, f->keep, f->c, count);
}

void tm_fused4_ties(void *out, int to_f32, const tm_fused4 *f, const float *b, size_t count, int sign_rule, int agg,
                    double zero_sign, double lambda) {
    ties4[to_f32 != 0][sign_rule][agg](out, f, b, count, zero_sign, lambda);
}

void tm_fused4_linear(void *out, int to_f32, const tm_fused4 *f, const float *b, size_t count) {
    if (to_f32) linear4_f32(out, f, b, count);
    else linear4(out, f, b, count);
}

void tm_fused4_score(double *out, const tm_fused4 *f, const double *b, size_t count, int sign_rule) {
    (sign_rule == TM_SIGN_COUNT ? score4_count : score4_sum)(out, f->x, b, f->keep, f->c, count);
}
