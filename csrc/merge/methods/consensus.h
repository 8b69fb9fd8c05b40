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

/* The elected sign of one element from its S (see above). */
static inline double tm_consensus_sign(double s, double zero_sign) { return s > 0 ? 1.0 : s < 0 ? -1.0 : zero_sign; }

/* S per element: out[e] = Σⱼ v[j·count + e] (sum) or Σⱼ sign(v[j·count + e]) (count). */
void tm_consensus_score(const double *v, size_t n, size_t count, int sign_rule, double *out);

/* out[e] = the disjoint aggregation of v[j·count + e] over j (w[j]: the weights of the rows). */
void tm_consensus_merge(const double *v, const double *w, size_t n, size_t count, int sign_rule, int agg,
                        double zero_sign, double *out);

#endif
