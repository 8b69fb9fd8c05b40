/* TIES' consensus over the n weighted, sparsified task-vector values of a block (Yadav et al.
 * 2023; mergekit's get_mask, FusionBench's resolve_sign / disjoint_merge), one job:
 *   elect a sign per element from S = Σⱼ vⱼ (TM_SIGN_SUM) or Σⱼ sign(vⱼ) (TM_SIGN_COUNT):
 *     σ = sign(S), and where S = 0 the caller's zero_sign (+1 in mergekit; FusionBench's global
 *     TIES: the majority of all elected signs of the model, which may itself be 0);
 *   the agreeing entries: vⱼ > 0 where σ > 0, else vⱼ < 0 (FusionBench's where(σ > 0, v > 0,
 *     v < 0); a dropped or zero entry never agrees);
 *   aggregate them: MEAN Σ agreeing vⱼ / Σ agreeing wⱼ (a zero divisor counts as 1), SUM
 *     Σ agreeing vⱼ, MAX max |agreeing vⱼ| · σ.
 * Sums run over j in input order from 0. C11. */
#ifndef TM_MERGE_METHODS_CONSENSUS_H
#define TM_MERGE_METHODS_CONSENSUS_H

#include <stddef.h>

enum { TM_SIGN_SUM, TM_SIGN_COUNT };
enum { TM_AGG_MEAN, TM_AGG_SUM, TM_AGG_MAX };

/* (inlined whatever GCC's size estimates: the fused loops vectorise only with them inside) */
#define TM_CONSENSUS_INLINE static inline __attribute__((always_inline))

/* The pieces of one element's consensus, shared by tm_consensus_merge's vector loops and the
 * loops that fuse it with the sparsification (sparse.c): an entry's term of S; */
TM_CONSENSUS_INLINE double tm_consensus_term(double x, int sign_rule) {
    return sign_rule == TM_SIGN_COUNT ? (double)((x > 0) - (x < 0)) : x;
}

/* the elected sign σ from S (see above) as two selects, so that the loops vectorise (NaN:
 * zero_sign); */
TM_CONSENSUS_INLINE double tm_consensus_sigma(double s, double zero_sign) {
    const double neg = s < 0 ? -1.0 : zero_sign;
    return s > 0 ? 1.0 : neg;
}

/* the side of σ: +1 where σ > 0, else −1 (σ = 0 or −1: the negative entries agree); */
TM_CONSENSUS_INLINE double tm_consensus_side(double sigma) { return sigma > 0 ? 1.0 : -1.0; }

/* entry x of weight w agrees when x·side > 0 (a product by ±1 is exact: no branch); adding +0
 * for the others leaves every sum's bits as adding only the agreeing ones; */
TM_CONSENSUS_INLINE void tm_consensus_agree(double x, double w, double side, double *sum, double *div, double *max) {
    const double a = x * side; /* |x| where it agrees */
    const int agree = a > 0;
    *sum += agree ? x : 0.0;
    *div += agree ? w : 0.0;
    const double cand = agree ? a : 0.0;
    *max = cand > *max ? cand : *max;
}

/* the aggregate of the agreeing entries. */
TM_CONSENSUS_INLINE double tm_consensus_result(int agg, double sum, double div, double max, double sigma) {
    return agg == TM_AGG_MAX ? max * sigma : agg == TM_AGG_SUM ? sum : sum / (div == 0 ? 1 : div);
}

/* S per element: out[e] = Σⱼ v[j·count + e] (sum) or Σⱼ sign(v[j·count + e]) (count). */
void tm_consensus_score(const double *v, size_t n, size_t count, int sign_rule, double *out);

/* out[e] = the disjoint aggregation of v[j·count + e] over j (w[j]: the weights of the rows). */
void tm_consensus_merge(const double *v, const double *w, size_t n, size_t count, int sign_rule, int agg,
                        double zero_sign, double *out);

#endif
