#include "merge/methods/ties_global.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "merge/hot.h"
#include "merge/methods/bitpack.h"
#include "merge/methods/consensus.h"

enum { G_PHASE, G_SIGNSUM, G_ZERO_SIGN };            /* fixed doubles */
enum { I_D, I_TOP, I_ABOVE, I_PREFIX, I_BITS, I_PHASE, I_MINKEY, I_EXPECT, I_HIST }; /* per input */
enum { PH_SELECT, PH_SIGN, PH_DONE };                 /* G_PHASE */
enum { IN_HIST, IN_COLLECT, IN_DONE };                /* I_PHASE */

#define COLLECT_CAP ((uint64_t)1 << 22)

static double *in_state(double *model, size_t i) { return model + TM_TIES_GLOBAL_FIXED + i * TM_TIES_GLOBAL_PER_INPUT; }
static const double *cin_state(const double *model, size_t i) {
    return model + TM_TIES_GLOBAL_FIXED + i * TM_TIES_GLOBAL_PER_INPUT;
}
/* 64-bit keys live in doubles bit for bit. */
static uint64_t get_bits(const double *x) {
    uint64_t u;
    memcpy(&u, x, sizeof u);
    return u;
}
static void set_bits(double *x, uint64_t u) { memcpy(x, &u, sizeof u); }

uint64_t tm_ties_global_min_key(const tm_method_tensor *t, size_t input) {
    return get_bits(&cin_state(t->model, input)[I_MINKEY]);
}

double tm_ties_global_zero_sign(const tm_method_tensor *t) { return t->model ? t->model[G_ZERO_SIGN] : 1.0; }

/* The counters of the keys under the prefix (bits == 0: every key), of the values or the δ of
 * float32 inputs (topk.h's TM_VALUE_*). */
#define DEFINE_HIST(name, T, VALUE)                                                                  \
    TM_HOT static void name(double *restrict hist, const T *restrict v, const double *restrict sub, size_t count, \
                            unsigned bits, uint64_t prefix) {                                        \
        if (bits == 0) {                                                                             \
            for (size_t e = 0; e < count; e++) hist[tm_topk_key(VALUE(v, sub, e)) >> 48] += 1;       \
            return;                                                                                  \
        }                                                                                            \
        for (size_t e = 0; e < count; e++) {                                                         \
            const uint64_t key = tm_topk_key(VALUE(v, sub, e));                                      \
            if (key >> (64 - bits) == prefix) hist[(key >> (48 - bits)) & 0xffff] += 1;              \
        }                                                                                            \
    }
DEFINE_HIST(hist_block, double, TM_VALUE_PLAIN)
DEFINE_HIST(hist_block_f32, float, TM_VALUE_F32_DELTA)

/* Σ sign(s[e]) */
TM_HOT static int64_t sign_sum(const double *restrict s, size_t count) {
    int64_t sum = 0;
    for (size_t e = 0; e < count; e++) sum += (s[e] > 0) - (s[e] < 0);
    return sum;
}

/* The |value|s whose keys are under the prefix, compacted to the front of out (which may be v
 * itself: out[m] is written at m ≤ the index just read, below every index still to read);
 * returns how many. In
 * groups of 64: the tests are a vectorised loop into bytes, packed into a mask whose set bits
 * are then visited, so the cost goes with the values kept (a bin's: a few in a hundred). */
#define DEFINE_COLLECT(name, T, VALUE)                                                               \
    TM_HOT static size_t name(double *out, const T *v, const double *sub, size_t count, unsigned bits, uint64_t prefix) { \
        size_t m = 0;                                                                                \
        for (size_t e0 = 0; e0 < count; e0 += 64) {                                                  \
            const size_t g = count - e0 < 64 ? count - e0 : 64;                                      \
            uint8_t in[64];                                                                          \
            for (size_t i = 0; i < g; i++) in[i] = tm_topk_key(VALUE(v, sub, e0 + i)) >> (64 - bits) == prefix; \
            for (size_t i = g; i < 64; i++) in[i] = 0;                                               \
            for (uint64_t mask = tm_pack64(in); mask; mask &= mask - 1)                              \
                out[m++] = fabs(VALUE(v, sub, e0 + (size_t)__builtin_ctzll(mask)));                  \
        }                                                                                            \
        return m;                                                                                    \
    }
DEFINE_COLLECT(collect_block, double, TM_VALUE_PLAIN)
DEFINE_COLLECT(collect_block_f32, float, TM_VALUE_F32_DELTA)

void tm_ties_global_reduce(const tm_sparse_method *s, const tm_method_tensor *t, const double *state, uint64_t begin,
                           size_t count, double *sum, double *scratch) {
    const double *model = t->model;
    if (model[G_PHASE] == PH_SIGN) {
        double *b = scratch + count, *k = scratch + 2 * count;
        tm_kernel_load_f64(t->base, begin, count, b, k);
        for (size_t c0 = 0; c0 < count; c0 += TM_SPARSE_CHUNK) {
            const size_t m = count - c0 < TM_SPARSE_CHUNK ? count - c0 : TM_SPARSE_CHUNK;
            tm_sparse_score(s, t, state, begin, c0, m, b, k, scratch + c0);
        }
        sum[G_SIGNSUM] += (double)sign_sum(scratch, count); /* exact: integers below 2⁵³ */
        return;
    }
    if (model[G_PHASE] != PH_SELECT) return;
    double *b = scratch + count, *d = scratch, *k = scratch + 2 * count;
    tm_kernel_load_f64(t->base, begin, count, b, k);
    for (size_t j = 0; j < t->n; j++) {
        const size_t i = t->input[j];
        const double *mi = cin_state(model, i);
        double *si = in_state(sum, i);
        if (mi[I_PHASE] == IN_DONE) continue;
        const float *xf = tm_kernel_f32_at(&t->in[j], begin); /* float32: no δ row */
        if (!xf) tm_kernel_delta_f64(&t->in[j], begin, count, b, d, k);
        const unsigned bits = (unsigned)mi[I_BITS];
        const uint64_t prefix = get_bits(&mi[I_PREFIX]);
        if (mi[I_PHASE] == IN_HIST) {
            if (bits == 0) si[I_D] += (double)count;
            if (xf) hist_block_f32(si + I_HIST, xf, b, count, bits, prefix);
            else hist_block(si + I_HIST, d, NULL, count, bits, prefix);
        } else { /* collect the bin's values, compacted into d */
            const size_t m =
                xf ? collect_block_f32(d, xf, b, count, bits, prefix) : collect_block(d, d, NULL, count, bits, prefix);
            if (tm_method_collect(t, i, d, m)) return; /* model_end reports the lost memory */
        }
    }
}

/* The r-th largest (1-based) of keys[0, m): Hoare's selection. */
static uint64_t select_key(uint64_t *c, size_t m, size_t r) {
    ptrdiff_t lo = 0, hi = (ptrdiff_t)m - 1, want = (ptrdiff_t)r - 1;
    while (lo < hi) {
        const uint64_t pivot = c[lo + (hi - lo) / 2];
        ptrdiff_t i = lo - 1, j = hi + 1;
        for (;;) {
            do i++; while (c[i] > pivot);
            do j--; while (c[j] < pivot);
            if (i >= j) break;
            uint64_t x = c[i];
            c[i] = c[j];
            c[j] = x;
        }
        if (want <= j) hi = j;
        else lo = j + 1;
    }
    return c[want];
}

/* After a HIST or COLLECT pass of input i (mi: its model state, si: the pass's sums). */
static tm_status end_input(double *mi, const double *si, const double *values, size_t n_values, double density,
                           tm_error *err) {
    if (mi[I_PHASE] == IN_HIST && mi[I_BITS] == 0) {
        mi[I_D] = si[I_D];
        const double d = si[I_D], kept = (double)(uint64_t)(d * density);
        if (kept >= d) { /* density 1 (FusionBench: an error): everything */
            set_bits(&mi[I_MINKEY], 0);
            mi[I_PHASE] = IN_DONE;
            return TM_OK;
        }
        mi[I_TOP] = kept + 1; /* the threshold is the (⌊d·density⌋ + 1)-th largest */
    }
    const uint64_t left = (uint64_t)(mi[I_TOP] - mi[I_ABOVE]);
    if (mi[I_PHASE] == IN_COLLECT) {
        uint64_t *keys = malloc((n_values ? n_values : 1) * sizeof *keys);
        if (!keys) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory (the global TIES threshold)");
        for (size_t e = 0; e < n_values; e++) keys[e] = tm_topk_key(values[e]);
        set_bits(&mi[I_MINKEY], select_key(keys, n_values, (size_t)left));
        free(keys);
        mi[I_PHASE] = IN_DONE;
        return TM_OK;
    }
    const double *hist = si + I_HIST;
    uint64_t rem = left, bin = 65535;
    for (; (uint64_t)hist[bin] < rem; bin--) {
        rem -= (uint64_t)hist[bin];
        mi[I_ABOVE] += hist[bin];
    }
    const unsigned bits = (unsigned)mi[I_BITS] + 16;
    const uint64_t prefix = bits == 16 ? bin : get_bits(&mi[I_PREFIX]) << 16 | bin;
    set_bits(&mi[I_PREFIX], prefix);
    mi[I_BITS] = bits;
    if (bits == 64 || (uint64_t)hist[bin] == rem) { /* every key of the bin from its lowest */
        set_bits(&mi[I_MINKEY], bits == 64 ? prefix : prefix << (64 - bits));
        mi[I_PHASE] = IN_DONE;
    } else if ((uint64_t)hist[bin] <= COLLECT_CAP) {
        mi[I_PHASE] = IN_COLLECT;
    }
    return TM_OK;
}

tm_status tm_ties_global_end(const tm_sparse_method *s, const tm_param_values *p, double *model, const double *sum,
                             const tm_model_lists *lists, int *again, tm_error *err) {
    if (model[G_PHASE] == PH_SIGN) {
        model[G_ZERO_SIGN] = tm_consensus_sigma(sum[G_SIGNSUM], 0);
        model[G_PHASE] = PH_DONE;
        *again = 0;
        return TM_OK;
    }
    int selecting = 0;
    for (size_t i = 0; i < p->n_inputs; i++) {
        double *mi = in_state(model, i);
        if (mi[I_PHASE] == IN_DONE) continue;
        size_t n_values = 0;
        const double *values = tm_model_list(lists, i, &n_values);
        const double density = p->values[p->at[s->p_density] + (p->count[s->p_density] > 1 ? i : 0)];
        tm_status st = end_input(mi, in_state((double *)sum, i), values, n_values, density, err);
        if (st) return st;
        selecting |= mi[I_PHASE] != IN_DONE;
    }
    if (!selecting) model[G_PHASE] = PH_SIGN;
    *again = 1;
    return TM_OK;
}
