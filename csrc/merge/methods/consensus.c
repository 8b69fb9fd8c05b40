#include "merge/methods/consensus.h"

#include <math.h>

#include "merge/hot.h"

/* The loops are static clones (TM_HOT) behind plain functions: a cloned function's dispatcher
 * would be exported from the library whatever its visibility (tests/check_exports.sh). */
TM_HOT static void score(const double *v, size_t n, size_t count, int sign_rule, double *out) {
    for (size_t e = 0; e < count; e++) out[e] = 0;
    for (size_t j = 0; j < n; j++) {
        const double *restrict row = v + j * count;
        if (sign_rule == TM_SIGN_COUNT)
            for (size_t e = 0; e < count; e++) out[e] += (row[e] > 0) - (row[e] < 0);
        else
            for (size_t e = 0; e < count; e++) out[e] += row[e];
    }
}

/* Elements per chunk: the per-element sums live on the stack, so the loops run over j outside and
 * elements inside (vectorised), each element still summing over j in input order. */
#define CHUNK 256

TM_HOT static void merge(const double *v, const double *w, size_t n, size_t count, int sign_rule, int agg,
                         double zero_sign, double *out) {
    score(v, n, count, sign_rule, out);
    for (size_t c0 = 0; c0 < count; c0 += CHUNK) {
        const size_t m = count - c0 < CHUNK ? count - c0 : CHUNK;
        /* side: +1 where σ > 0, else −1 (σ = 0 or −1: the negative entries agree), so an entry
         * agrees exactly when x·side > 0 (a product by ±1 is exact): no branch, one vector loop.
         * Adding +0 for the others leaves every sum's bits as adding only the agreeing ones. */
        double sigma[CHUNK], side[CHUNK], sum[CHUNK], div[CHUNK], max[CHUNK];
        for (size_t e = 0; e < m; e++) {
            /* tm_consensus_sign as two selects, so that the loop vectorises (NaN: zero_sign) */
            const double s = out[c0 + e], neg = s < 0 ? -1.0 : zero_sign;
            sigma[e] = s > 0 ? 1.0 : neg;
            side[e] = sigma[e] > 0 ? 1.0 : -1.0;
            sum[e] = div[e] = max[e] = 0;
        }
        for (size_t j = 0; j < n; j++) {
            const double *restrict row = v + j * count + c0;
            const double wj = w[j];
            for (size_t e = 0; e < m; e++) {
                const double x = row[e], a = x * side[e]; /* |x| where it agrees */
                const int agree = a > 0;
                sum[e] += agree ? x : 0.0;
                div[e] += agree ? wj : 0.0;
                const double cand = agree ? a : 0.0;
                max[e] = cand > max[e] ? cand : max[e];
            }
        }
        for (size_t e = 0; e < m; e++)
            out[c0 + e] = agg == TM_AGG_MAX ? max[e] * sigma[e]
                          : agg == TM_AGG_SUM ? sum[e]
                                              : sum[e] / (div[e] == 0 ? 1 : div[e]);
    }
}

void tm_consensus_score(const double *v, size_t n, size_t count, int sign_rule, double *out) {
    score(v, n, count, sign_rule, out);
}

void tm_consensus_merge(const double *v, const double *w, size_t n, size_t count, int sign_rule, int agg,
                        double zero_sign, double *out) {
    merge(v, w, n, count, sign_rule, agg, zero_sign, out);
}
