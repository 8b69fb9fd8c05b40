#include "merge/methods/consensus.h"

#include <math.h>

#include "merge/hot.h"

/* The loops are static clones (TM_HOT) behind plain functions: a cloned function's dispatcher
 * would be exported from the library whatever its visibility (tests/check_exports.sh). */
TM_HOT static void score(const double *v, size_t n, size_t count, int sign_rule, double *out) {
    for (size_t e = 0; e < count; e++) out[e] = 0;
    for (size_t j = 0; j < n; j++) {
        const double *restrict row = v + j * count;
        if (sign_rule == TM_SIGN_COUNT) /* two loops: each vectorises */
            for (size_t e = 0; e < count; e++) out[e] += tm_consensus_term(row[e], TM_SIGN_COUNT);
        else
            for (size_t e = 0; e < count; e++) out[e] += tm_consensus_term(row[e], TM_SIGN_SUM);
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
        double sigma[CHUNK], side[CHUNK], sum[CHUNK], div[CHUNK], max[CHUNK];
        for (size_t e = 0; e < m; e++) {
            sigma[e] = tm_consensus_sigma(out[c0 + e], zero_sign);
            side[e] = tm_consensus_side(sigma[e]);
            sum[e] = div[e] = max[e] = 0;
        }
        for (size_t j = 0; j < n; j++) {
            const double *restrict row = v + j * count + c0;
            const double wj = w[j];
            for (size_t e = 0; e < m; e++) tm_consensus_agree(row[e], wj, side[e], &sum[e], &div[e], &max[e]);
        }
        for (size_t e = 0; e < m; e++) out[c0 + e] = tm_consensus_result(agg, sum[e], div[e], max[e], sigma[e]);
    }
}

void tm_consensus_score(const double *v, size_t n, size_t count, int sign_rule, double *out) {
    score(v, n, count, sign_rule, out);
}

void tm_consensus_merge(const double *v, const double *w, size_t n, size_t count, int sign_rule, int agg,
                        double zero_sign, double *out) {
    merge(v, w, n, count, sign_rule, agg, zero_sign, out);
}
