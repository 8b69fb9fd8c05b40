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

TM_HOT static void merge(const double *v, const double *w, size_t n, size_t count, int sign_rule, int agg,
                         double zero_sign, double *out) {
    score(v, n, count, sign_rule, out);
    for (size_t e = 0; e < count; e++) {
        const double sigma = tm_consensus_sign(out[e], zero_sign);
        double sum = 0, div = 0, max = 0;
        for (size_t j = 0; j < n; j++) {
            const double x = v[j * count + e];
            if (sigma > 0 ? x > 0 : x < 0) {
                sum += x;
                div += w[j];
                if (fabs(x) > max) max = fabs(x);
            }
        }
        out[e] = agg == TM_AGG_MAX ? max * sigma : agg == TM_AGG_SUM ? sum : sum / (div == 0 ? 1 : div);
    }
}

void tm_consensus_score(const double *v, size_t n, size_t count, int sign_rule, double *out) {
    score(v, n, count, sign_rule, out);
}

void tm_consensus_merge(const double *v, const double *w, size_t n, size_t count, int sign_rule, int agg,
                        double zero_sign, double *out) {
    merge(v, w, n, count, sign_rule, agg, zero_sign, out);
}
