/* The sparse family's loops over 4 float32 inputs at once (sparse.c), δ = x − b and each input's
 * masked, scaled value c·δ computed in registers instead of rows of doubles: the same operations
 * as the row loops (scale_kept / add_kept, then consensus.c), in the same order, so the same bits
 * (tests/python/test_sparse_methods.py compares them). The base is read in float64 (b) or, when
 * the block's base is float32, as it is (bf; the other NULL; the whole-merge loops take a
 * float32 base only). A missing input (fewer than 4) is
 * one kept nowhere with c = w = 0: its +0 changes no sum and never agrees. Elements
 * [0, count) of every array. C11. */
#ifndef TM_MERGE_METHODS_FUSED4_H
#define TM_MERGE_METHODS_FUSED4_H

#include <stddef.h>
#include <stdint.h>

typedef struct tm_fused4 {
    const float *x[4];       /* the inputs */
    const uint8_t *keep[4];  /* their keep bytes (0/1) */
    double c[4];             /* the factor of each kept δ */
    double w[4];             /* TIES' weights (the disjoint mean's divisor) */
} tm_fused4;

/* acc[e] += Σⱼ kept cⱼ·δⱼ, in input order (linear). */
void tm_fused4_add_kept(double *acc, const tm_fused4 *f, const double *b, const float *bf, size_t count);

/* The whole merge of the 4 inputs over a float32 base b, θ = b + λ·TIES' consensus (consensus.h)
 * of the kept cⱼ·δⱼ (sign_rule TM_SIGN_*, agg TM_AGG_MEAN or TM_AGG_SUM: not max), as doubles into
 * out or (to_f32) rounded once to float32: the rows', consensus.c's, then add_scaled's
 * operations. */
void tm_fused4_ties(void *out, int to_f32, const tm_fused4 *f, const float *b, size_t count, int sign_rule, int agg,
                    double zero_sign, double lambda);

/* The same for linear with exactly these 4 inputs: θ = b + Σⱼ kept cⱼ·δⱼ (λ in c), summed from +0
 * in input order, then b added. */
void tm_fused4_linear(void *out, int to_f32, const tm_fused4 *f, const float *b, size_t count);

/* out[e] = TIES' score S alone (tm_consensus_score of the rows). */
void tm_fused4_score(double *out, const tm_fused4 *f, const double *b, size_t count, int sign_rule);

#endif
