#include "merge/methods/sparse.h"

#include <math.h>
#include <string.h>

#include "merge/hot.h"
#include "merge/merge_ctx.h"
#include "merge/methods/consensus.h"
#include "merge/methods/fused4.h"
#include "merge/methods/ties_global.h"
#include "merge/methods/weights.h"
#include "merge/random.h"

enum { MODE_NONE, MODE_SELECT, MODE_NORM, MODE_CUSTOM };

#define CHUNK TM_SPARSE_CHUNK

static tm_sparse_header *header(double *state) { return (tm_sparse_header *)state; }
static tm_sparse_input *inputs(double *state) { return (tm_sparse_input *)(state + TM_SPARSE_STATE_FIXED); }
static const tm_sparse_header *cheader(const double *state) { return (const tm_sparse_header *)state; }
static const tm_sparse_input *cinputs(const double *state) {
    return (const tm_sparse_input *)(state + TM_SPARSE_STATE_FIXED);
}

/* The method memory: n rows of a block of doubles (the weighted δ' of each input for the
 * consensus; row 0 is δ for the others), n blocks of keep bytes, with DARE's l1 rescale the
 * masks of the whole tensor (n × numel bytes: drawn once in the norms' pass, read by apply),
 * then the selections' bytes, or a custom sparsification's (it has no selections; its masks
 * are its own, never the saved DARE masks). */
static size_t rows_bytes(size_t n) { return (n ? n : 1) * TM_BLOCK_ELEMS * sizeof(double); }
static size_t keep_bytes(size_t n) { return (n ? n : 1) * TM_BLOCK_ELEMS; }
static int saves_masks(const tm_sparse_method *s, const tm_sparse_header *h) {
    return s->sparsify == TM_SPARSIFY_RANDOM && h->rescale == TM_RESCALE_L1;
}
static size_t masks_bytes(const tm_sparse_method *s, const tm_sparse_header *h, const tm_method_tensor *t) {
    return saves_masks(s, h) ? ((size_t)t->n * (size_t)t->numel + 7) & ~(size_t)7 : 0;
}
static size_t prefix_bytes(const tm_sparse_method *s, const tm_sparse_header *h, const tm_method_tensor *t) {
    return rows_bytes(t->n) + keep_bytes(t->n) + masks_bytes(s, h, t);
}
/* Input j's keep bytes for the block at begin: its saved mask, or its row of keep bytes. */
static uint8_t *keep_of(const tm_sparse_method *s, const tm_sparse_header *h, const tm_method_tensor *t, size_t j,
                        uint64_t begin) {
    uint8_t *keep = (uint8_t *)t->memory->data + rows_bytes(t->n);
    if (saves_masks(s, h)) return keep + keep_bytes(t->n) + j * (size_t)t->numel + begin;
    return keep + j * (size_t)TM_BLOCK_ELEMS;
}
/* A custom sparsification's bytes: after the prefix (no selections take bytes there). */
static size_t custom_offset(const tm_sparse_method *s, const tm_sparse_header *h, const tm_method_tensor *t) {
    return prefix_bytes(s, h, t);
}

static double param1(const tm_method_tensor *t, int p, double dflt) { return p < 0 ? dflt : tm_tensor_param1(t, (size_t)p); }

/* Places each selection's bytes for its next pass after the prefix (a custom sparsification's at
 * the prefix: it has no selections), reserves them, clears the histograms, and at prepare (first)
 * zeroes the custom bytes. */
static tm_status layout(const tm_sparse_method *s, const tm_method_tensor *t, size_t prefix, tm_sparse_input *in,
                        int first, tm_error *err) {
    size_t off = prefix;
    for (size_t j = 0; j < t->n; j++)
        for (int q = 0; q < 2; q++) {
            in[j].sel[q].offset = off;
            off += (tm_topk_bytes(&in[j].sel[q]) + 7) & ~(size_t)7;
        }
    const size_t custom = s->sparsify == TM_SPARSIFY_CUSTOM ? (s->custom->bytes(t) + 7) & ~(size_t)7 : 0;
    off += custom;
    uint8_t *mem = tm_method_memory_reserve(t->memory, off);
    if (!mem)
        return tm_error_set(err, TM_ERROR_NOMEM, "tensor '%s': out of memory (%zu bytes for its selection)", t->name,
                            off);
    for (size_t j = 0; j < t->n; j++)
        for (int q = 0; q < 2; q++)
            memset(mem + in[j].sel[q].offset, 0, tm_topk_zeroed_bytes(&in[j].sel[q]));
    if (first && custom) memset(mem + prefix, 0, custom);
    return TM_OK;
}

static int selecting(const tm_sparse_input *in, size_t n) {
    for (size_t j = 0; j < n; j++)
        if (in[j].sel[0].phase != TM_TOPK_DONE || in[j].sel[1].phase != TM_TOPK_DONE) return 1;
    return 0;
}

/* The next reduce pass: the selections', then a custom sparsification's (which sums the norms
 * too) or the norms' when rescale is l1, then none. */
static int next_mode(const tm_sparse_method *s, const tm_sparse_header *h, const tm_sparse_input *in, size_t n) {
    if (selecting(in, n)) return MODE_SELECT;
    if (h->mode == MODE_NORM || h->mode == MODE_CUSTOM) return MODE_NONE;
    if (s->sparsify == TM_SPARSIFY_CUSTOM) return MODE_CUSTOM;
    return h->rescale == TM_RESCALE_L1 ? MODE_NORM : MODE_NONE;
}

int tm_sparse_agg(const tm_sparse_method *s, const double *params, const size_t *param_at) {
    int agg = s->p_merge_func >= 0 ? (int)params[param_at[s->p_merge_func]] : TM_AGG_MEAN;
    if (agg == TM_AGG_MEAN && s->p_normalize >= 0 && !params[param_at[s->p_normalize]]) agg = TM_AGG_SUM;
    return agg;
}

tm_status tm_sparse_prepare(const tm_sparse_method *s, const tm_method_tensor *t, double *state, tm_error *err) {
    const size_t n = t->n;
    tm_sparse_header *h = header(state);
    tm_sparse_input *in = inputs(state);
    if (t->in[0].dtype == TM_COMPLEX64 || t->in[0].dtype == TM_COMPLEX128)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED, "tensor '%s': %s does not merge complex tensors", t->name,
                            s->name);
    memset(h, 0, sizeof *h);
    h->lambda = param1(t, s->p_lambda, 1);
    h->rescale = (int)param1(t, s->p_rescale, TM_RESCALE_NONE);
    h->sign_rule = (int)param1(t, s->p_sign, TM_SIGN_SUM);
    h->agg = tm_sparse_agg(s, t->params, t->param_at);
    const int linear = s->consensus == TM_CONSENSUS_LINEAR;
    double coef[n ? n : 1];
    tm_status st = tm_method_weights(t, t->params + t->param_at[s->p_weights],
                                     linear && tm_tensor_param1(t, (size_t)s->p_normalize) != 0, coef, err);
    if (st) return st;
    const int global = tm_ties_global(t);
    for (size_t j = 0; j < n; j++) {
        tm_sparse_input *x = &in[j];
        memset(x, 0, sizeof *x);
        x->coef = linear ? coef[j] * h->lambda : coef[j];
        x->density = tm_tensor_param(t, (size_t)s->p_density, t->input[j]);
        const uint64_t numel = t->numel, keep = (uint64_t)(x->density * (double)numel);
        tm_topk_init(&x->sel[0], numel, numel); /* keeps everything */
        tm_topk_init(&x->sel[1], numel, numel);
        if (s->p_seed >= 0)
            x->key = tm_random_key((uint64_t)tm_tensor_param1(t, (size_t)s->p_seed), t->input[j], t->name);
        if (s->sparsify == TM_SPARSIFY_RANDOM) {
            x->threshold = tm_random_threshold(x->density);
        } else if (s->sparsify == TM_SPARSIFY_MAGNITUDE && !global) {
            tm_topk_init(&x->sel[0], numel, keep);
        } else if (s->sparsify == TM_SPARSIFY_OUTLIERS) {
            /* mergekit: n_top = ⌊gamma·numel⌋ largest dropped, then the smallest so that ⌊density·numel⌋
             * remain (gamma + density ≤ 1 is checked; the min guards rounding) */
            uint64_t top = (uint64_t)(tm_tensor_param(t, (size_t)s->p_gamma, t->input[j]) * (double)numel);
            if (top > numel - keep) top = numel - keep;
            tm_topk_init(&x->sel[0], numel, top);
            tm_topk_init(&x->sel[1], numel, top + keep);
        }
    }
    h->mode = MODE_NONE;
    h->mode = next_mode(s, h, in, n);
    return layout(s, t, prefix_bytes(s, h, t), in, 1, err);
}

/* δ = x − b over the block (b already in float64). */
static void delta(const tm_method_tensor *t, size_t j, uint64_t begin, size_t count, const double *b, double *d,
                  double *k) {
    tm_kernel_delta_f64(&t->in[j], begin, count, b, d, k);
}

/* keep[e] = tm_random_keep(key, begin + e, threshold), 16 coins from 8 mixes at a time. */
TM_HOT static void random_keep(uint64_t key, uint64_t threshold, uint64_t begin, size_t count, uint8_t *restrict keep) {
    size_t e = 0;
#ifdef TM_RANDOM_COINS16
    if ((begin & 1) && count) keep[e++] = (uint8_t)tm_random_keep(key, begin, threshold);
    const uint32_t last = tm_random_last_kept(threshold);
    for (; threshold && e + 16 <= count; e += 16) {
        tm_random_v16u32 m;
        tm_random_coins16(key, (begin + e) >> 1, &m);
        tm_random_bytes16(m <= last, keep + e);
    }
#endif
    for (; e < count; e++) keep[e] = (uint8_t)tm_random_keep(key, begin + e, threshold);
}

/* The magnitude sparsifications as one test: kept when the element is in the top set hi and not in
 * the top set lo, a set being {key > cut_key, or key == cut_key and index < cut_end} (topk.h).
 * MAGNITUDE: hi = its selection, lo empty; OUTLIERS: hi = top + keep, lo = top; a global
 * threshold: hi = {key ≥ min_key}. */
typedef struct band {
    uint64_t hk, he, lk, le;
} band;

/* The test on element i of key k, in bitwise operations so that the loops vectorise. */
static inline uint8_t band_test(band w, uint64_t k, uint64_t i) {
    const int in_hi = (k > w.hk) | ((k == w.hk) & (i < w.he)), in_lo = (k > w.lk) | ((k == w.lk) & (i < w.le));
    return (uint8_t)(in_hi & !in_lo);
}

static int band_of(const tm_sparse_method *s, const tm_method_tensor *t, size_t j, const tm_sparse_input *x, band *out) {
    const band none = {0, 0, UINT64_MAX, 0}; /* lo: no key is above UINT64_MAX */
    *out = none;
    if (s->sparsify == TM_SPARSIFY_OUTLIERS) {
        *out = (band){x->sel[1].cut_key, x->sel[1].cut_end, x->sel[0].cut_key, x->sel[0].cut_end};
    } else if (s->sparsify == TM_SPARSIFY_MAGNITUDE && tm_ties_global(t)) {
        out->hk = tm_ties_global_min_key(t, t->input[j]);
        out->he = UINT64_MAX;
    } else if (s->sparsify == TM_SPARSIFY_MAGNITUDE) {
        out->hk = x->sel[0].cut_key;
        out->he = x->sel[0].cut_end;
    } else {
        return 0;
    }
    return 1;
}

/* tm_topk_kept(hi) and not tm_topk_kept(lo). */
TM_HOT static void outliers_keep(const tm_topk *lo, const tm_topk *hi, const double *restrict d, uint64_t begin,
                                 size_t count, uint8_t *restrict keep) {
    const band w = {hi->cut_key, hi->cut_end, lo->cut_key, lo->cut_end};
    for (size_t e = 0; e < count; e++) keep[e] = band_test(w, tm_topk_key(d[e]), begin + e);
}

/* The band test of δ = x − b over a float32 input, the base in float64 or (suffix _f32) float32. */
#define DEFINE_BAND_KEEP(name, B)                                                                   \
    TM_HOT static void name(const float *restrict x, const B *restrict b, band w, uint64_t begin, size_t m, \
                            uint8_t *restrict keep) {                                              \
        for (size_t e = 0; e < m; e++) keep[e] = band_test(w, tm_topk_key((double)x[e] - (double)b[e]), begin + e); \
    }
DEFINE_BAND_KEEP(band_keep_f32, double)
DEFINE_BAND_KEEP(band_keep_f32_f32, float)

TM_HOT static void threshold_keep(uint64_t min_key, const double *restrict d, size_t count, uint8_t *restrict keep) {
    for (size_t e = 0; e < count; e++) keep[e] = (uint8_t)(tm_topk_key(d[e]) >= min_key);
}

/* Whether the sparsification's mask ignores δ (DARE's, DELLA's): it can then be drawn before δ is
 * computed, in the loops that compute it. */
static int mask_without_delta(const tm_sparse_method *s) {
    return s->sparsify == TM_SPARSIFY_RANDOM || s->sparsify == TM_SPARSIFY_CUSTOM;
}

/* keep[e]: whether the sparsification keeps element begin + e of input j's δ. */
static void keep_block(const tm_sparse_method *s, const tm_sparse_header *h, const tm_method_tensor *t, size_t j,
                       const tm_sparse_input *x, const double *d, uint64_t begin, size_t count, uint8_t *keep) {
    if (s->sparsify == TM_SPARSIFY_RANDOM) random_keep(x->key, x->threshold, begin, count, keep);
    else if (s->sparsify == TM_SPARSIFY_OUTLIERS) outliers_keep(&x->sel[0], &x->sel[1], d, begin, count, keep);
    else if (s->sparsify == TM_SPARSIFY_CUSTOM)
        s->custom->keep(t, j, x, (const uint8_t *)t->memory->data + custom_offset(s, h, t), begin, count, keep);
    else if (tm_ties_global(t)) threshold_keep(tm_ties_global_min_key(t, t->input[j]), d, count, keep);
    else tm_topk_keep(&x->sel[0], d, begin, count, keep);
}

/* Σ|d| over the block, and over its kept elements, of 4 inputs: each sum kept as 8 lanes in
 * sparse.h's order (chunks start at multiples of 8), so the additions vectorise. */
typedef struct l1_lanes {
    double all[4][TM_L1_LANES], kept[4][TM_L1_LANES];
} l1_lanes;

/* name(x, b, keep, count, lanes) over 4 inputs x of element type T, δ = DELTA(x, b, e): from δ rows
 * (b unused) or from float32 inputs and the base of element type B (topk.h's TM_VALUE_*). */
#define DEFINE_L1_NORMS4(name, T, B, DELTA)                                                         \
    TM_HOT static void name(const T *const *x, const B *restrict b, const uint8_t *const *keep, size_t count, \
                            l1_lanes *lanes) {                                                      \
        for (size_t i = 0; i < 4; i++) {                                                            \
            const T *restrict xi = x[i];                                                            \
            const uint8_t *restrict ki = keep[i];                                                   \
            TM_L1_LANES_LOOP(xi, b, ki, count, lanes->all[i], lanes->kept[i], DELTA);               \
        }                                                                                           \
    }
DEFINE_L1_NORMS4(l1_norms4, double, double, TM_VALUE_PLAIN)
DEFINE_L1_NORMS4(l1_norms4_f32, float, double, TM_VALUE_F32_DELTA)
DEFINE_L1_NORMS4(l1_norms4_f32_f32, float, float, TM_VALUE_F32_DELTA) /* a float32 base: no float64 copy */

/* The block's base in float64 in b, loaded when first asked for (*loaded). */
static const double *base_f64(const tm_method_tensor *t, uint64_t begin, size_t count, double *b, double *k,
                              int *loaded) {
    if (!*loaded) tm_kernel_load_f64(t->base, begin, count, b, k);
    *loaded = 1;
    return b;
}

/* The norms' pass over a block, chunk by chunk: every input's δ and keep bytes, then their norms
 * 4 inputs at a time (a group of fewer repeats its first input and drops the copies' sums); each
 * block's sums carry over its chunks in element order. b: count doubles for the base, filled only
 * when a float32 base cannot be read as it is. */
static void norms_block(const tm_sparse_method *s, const tm_method_tensor *t, tm_sparse_header *h, tm_sparse_input *in,
                        double *b, uint64_t begin, size_t count, double *k) {
    double *rows = (double *)t->memory->data;
    const float *bf = tm_kernel_f32_at(t->base, begin);
    int loaded = 0;
    for (size_t j0 = 0; j0 < t->n; j0 += 4) {
        const size_t g = t->n - j0 < 4 ? t->n - j0 : 4;
        l1_lanes lanes;
        memset(&lanes, 0, sizeof lanes);
        for (size_t c0 = 0; c0 < count; c0 += CHUNK) {
            const size_t m = count - c0 < CHUNK ? count - c0 : CHUNK;
            const double *d[4];
            const uint8_t *keep[4];
            /* masks that do not look at δ over float32 inputs: no δ rows */
            const float *xf[4];
            int fused = mask_without_delta(s);
            for (size_t i = 0; i < 4 && fused; i++)
                fused = (xf[i] = tm_kernel_f32_at(&t->in[j0 + (i < g ? i : 0)], begin + c0)) != NULL;
            if (fused) {
                for (size_t i = 0; i < 4; i++) {
                    uint8_t *kj = keep_of(s, h, t, j0 + (i < g ? i : 0), begin) + c0;
                    if (i < g) keep_block(s, h, t, j0 + i, &in[j0 + i], NULL, begin + c0, m, kj);
                    keep[i] = kj;
                }
                if (bf) l1_norms4_f32_f32(xf, bf + c0, keep, m, &lanes);
                else l1_norms4_f32(xf, base_f64(t, begin, count, b, k, &loaded) + c0, keep, m, &lanes);
                continue;
            }
            for (size_t i = 0; i < 4; i++) {
                double *row = rows + (i < g ? i : 0) * CHUNK;
                uint8_t *kj = keep_of(s, h, t, j0 + (i < g ? i : 0), begin) + c0;
                if (i < g) {
                    delta(t, j0 + i, begin + c0, m, base_f64(t, begin, count, b, k, &loaded) + c0, row, k);
                    keep_block(s, h, t, j0 + i, &in[j0 + i], row, begin + c0, m, kj);
                }
                d[i] = row;
                keep[i] = kj;
            }
            l1_norms4(d, NULL, keep, m, &lanes);
        }
        for (size_t i = 0; i < g; i++) {
            in[j0 + i].l1_all += tm_l1_lanes_sum(lanes.all[i]);
            in[j0 + i].l1_kept += tm_l1_lanes_sum(lanes.kept[i]);
        }
    }
}

void tm_sparse_reduce(const tm_sparse_method *s, const tm_method_tensor *t, double *state, uint64_t begin,
                      size_t count, double *scratch) {
    tm_sparse_header *h = header(state);
    tm_sparse_input *in = inputs(state);
    if (h->mode == MODE_NONE) return;
    uint8_t *mem = t->memory->data;
    double *d = (double *)mem, *b = scratch, *k = scratch + count;
    if (h->mode == MODE_CUSTOM) {
        s->custom->pass(t, in, h->rescale == TM_RESCALE_L1, mem + custom_offset(s, h, t), begin, count);
        return;
    }
    if (h->mode == MODE_NORM) {
        norms_block(s, t, h, in, b, begin, count, k);
        return;
    }
    tm_kernel_load_f64(t->base, begin, count, b, k);
    for (size_t j = 0; j < t->n; j++) {
        tm_sparse_input *x = &in[j];
        if (x->sel[0].phase == TM_TOPK_DONE && x->sel[1].phase == TM_TOPK_DONE) continue;
        /* in chunks, but the first block whole: the selections' guess reads it */
        const size_t chunk = begin == 0 ? count : CHUNK;
        for (size_t c0 = 0; c0 < count; c0 += chunk) {
            const size_t m = count - c0 < chunk ? count - c0 : chunk;
            const float *xf = tm_kernel_f32_at(&t->in[j], begin + c0);
            int have_delta = 0;
            for (int sel = 0; sel < 2; sel++) {
                tm_topk *q = &x->sel[sel];
                if (q->phase == TM_TOPK_DONE) continue;
                if (xf && tm_topk_scanning(q, m)) { /* float32: the candidates straight from x and b */
                    tm_topk_scan_f32(q, mem, xf, b + c0, begin + c0, m);
                    continue;
                }
                if (!have_delta) delta(t, j, begin + c0, m, b + c0, d, k);
                have_delta = 1;
                tm_topk_block(q, mem, d, begin + c0, m);
            }
        }
    }
}

tm_status tm_sparse_reduce_end(const tm_sparse_method *s, const tm_method_tensor *t, double *state, int *again,
                               tm_error *err) {
    tm_sparse_header *h = header(state);
    tm_sparse_input *in = inputs(state);
    if (h->mode == MODE_SELECT)
        for (size_t j = 0; j < t->n; j++)
            for (int sel = 0; sel < 2; sel++) tm_topk_end(&in[j].sel[sel], t->memory->data);
    h->mode = next_mode(s, h, in, t->n);
    *again = h->mode != MODE_NONE;
    return *again ? layout(s, t, prefix_bytes(s, h, t), in, 0, err) : TM_OK;
}

/* The rescale factor of input x (after the norms' pass). */
static double rescale_of(const tm_sparse_header *h, const tm_sparse_input *x) {
    if (h->rescale == TM_RESCALE_INVERSE) return 1 / x->density;
    if (h->rescale == TM_RESCALE_L1) return x->l1_kept > 0 ? x->l1_all / x->l1_kept : 0;
    return 1;
}

/* The base added last: b + λ·acc (ties; a float32 base under ties is merged whole by
 * fused_merge), or acc + b (linear) from the base in float64 or a float32 base read as it is
 * (suffix _f32). */
TM_HOT static void add_scaled(double *restrict acc, const double *restrict b, double lambda, size_t count) {
    for (size_t e = 0; e < count; e++) acc[e] = b[e] + lambda * acc[e];
}
#define DEFINE_ADD_BASE(suffix, B)                                                                  \
    TM_HOT static void add_base##suffix(double *restrict acc, const B *restrict b, size_t count) { \
        for (size_t e = 0; e < count; e++) acc[e] += (double)b[e];                                 \
    }
DEFINE_ADD_BASE(, double)
DEFINE_ADD_BASE(_f32, float)

/* c·δ on the kept elements, +0 elsewhere, added to acc (linear) or written to out (ties' rows; out
 * may be the δ rows themselves), δ = VALUE(x, sub, e): δ rows, or float32 inputs less the base
 * (topk.h's TM_VALUE_*; fused, the same operations as delta then these, so the same bits). The
 * product is computed whatever the mask and masked to +0: GCC will not speculate the float
 * arithmetic of a conditional, and a branch on a random mask mispredicts. */
#define DEFINE_KEPT(suffix, T, VALUE)                                                                \
    TM_HOT static void add_kept##suffix(double *restrict acc, const T *x, const double *sub,         \
                                        const uint8_t *restrict keep, double c, size_t count) {      \
        for (size_t e = 0; e < count; e++) acc[e] += tm_kept_or_zero(c * VALUE(x, sub, e), keep[e]);   \
    }                                                                                                \
    TM_HOT static void scale_kept##suffix(double *out, const T *x, const double *sub, const uint8_t *restrict keep, \
                                          double c, size_t count) {                                  \
        for (size_t e = 0; e < count; e++) out[e] = tm_kept_or_zero(c * VALUE(x, sub, e), keep[e]);   \
    }
DEFINE_KEPT(, double, TM_VALUE_PLAIN)
DEFINE_KEPT(_f32, float, TM_VALUE_F32_DELTA)

/* Input j's keep bytes for elements [c0, c0 + m) of the block at begin (drawn now unless saved)
 * and the factor of its kept δ. */
static const uint8_t *masked_input(const tm_sparse_method *s, const tm_sparse_header *h, const tm_method_tensor *t,
                                   const tm_sparse_input *in, size_t j, uint64_t begin, size_t c0, size_t m,
                                   const double *b, const float *bf, double *c) {
    uint8_t *kj = keep_of(s, h, t, j, begin) + c0;
    band w;
    if (band_of(s, t, j, &in[j], &w)) { /* a magnitude mask: the test on δ, over a float32 input */
        const float *x = tm_kernel_f32_at(&t->in[j], begin + c0);
        if (bf) band_keep_f32_f32(x, bf, w, begin + c0, m, kj);
        else band_keep_f32(x, b, w, begin + c0, m, kj);
    } else if (!saves_masks(s, h)) {
        keep_block(s, h, t, j, &in[j], NULL, begin + c0, m, kj);
    }
    *c = in[j].coef * rescale_of(h, &in[j]);
    return kj;
}

/* The fused loops' 4 inputs (fused4.h) for elements [c0, c0 + m) of the block at begin (the base
 * from c0: b in float64, or bf, float32): the g ≤ 4 float32 inputs from j0, their keep bytes,
 * factors and weights, the rest missing. Returns 0 (nothing done) unless all g are float32. */
static int fused4_inputs(const tm_sparse_method *s, const tm_sparse_header *h, const tm_method_tensor *t,
                         const tm_sparse_input *in, size_t j0, size_t g, uint64_t begin, size_t c0, size_t m,
                         const double *b, const float *bf, tm_fused4 *f) {
    static const uint8_t none[TM_SPARSE_CHUNK]; /* the mask of a missing input */
    for (size_t i = 0; i < 4; i++) {
        f->x[i] = i < g ? tm_kernel_f32_at(&t->in[j0 + i], begin + c0) : f->x[0];
        if (!f->x[i]) return 0;
        f->keep[i] = none;
        f->c[i] = f->w[i] = 0;
    }
    for (size_t i = 0; i < g; i++) {
        f->keep[i] = masked_input(s, h, t, in, j0 + i, begin, c0, m, b, bf, &f->c[i]);
        f->w[i] = in[j0 + i].coef;
    }
    return 1;
}

/* Linear over the 4 float32 inputs from j at once (any of the family's masks), added to acc (from
 * c0); returns 0 (nothing done) unless all 4 are float32. */
static int masked_linear4_f32(const tm_sparse_method *s, const tm_sparse_header *h, const tm_method_tensor *t,
                              const tm_sparse_input *in, size_t j, uint64_t begin, size_t c0, size_t m,
                              const double *b, const float *bf, double *acc) {
    tm_fused4 f;
    if (!fused4_inputs(s, h, t, in, j, 4, begin, c0, m, b, bf, &f)) return 0;
    tm_fused4_add_kept(acc, &f, b, bf, m);
    return 1;
}

/* Whether fused_merge takes TIES over n inputs (1 to 4; fused4.h has no max). */
static int ties4_takes(const tm_sparse_header *h, size_t n) { return n >= 1 && n <= 4 && h->agg != TM_AGG_MAX; }

/* The whole merge of elements [c0, c0 + m) of the block at begin by one fused loop (fused4.h),
 * where tm_sparse_apply's `whole` says it applies: TIES over 1 to 4 float32 inputs, or linear
 * over exactly 4, any of the family's masks, a float32 base bf (from c0); θ into out from c0,
 * float32 when to_f32, else float64. Returns 0 (nothing done) when an input is not float32. */
static int fused_merge(const tm_sparse_method *s, const tm_sparse_header *h, const tm_method_tensor *t,
                       const tm_sparse_input *in, uint64_t begin, size_t c0, size_t m, const float *bf, void *out,
                       int to_f32) {
    tm_fused4 f;
    if (!fused4_inputs(s, h, t, in, 0, t->n, begin, c0, m, NULL, bf, &f)) return 0;
    if (s->consensus == TM_CONSENSUS_TIES) tm_fused4_ties(out, to_f32, &f, bf, m, h->sign_rule, h->agg, tm_ties_global_zero_sign(t), h->lambda);
    else tm_fused4_linear(out, to_f32, &f, bf, m);
    return 1;
}

void tm_sparse_score(const tm_sparse_method *s, const tm_method_tensor *t, const double *state, uint64_t begin,
                     size_t c0, size_t m, const double *b, double *k, double *out) {
    const tm_sparse_header *h = cheader(state);
    tm_fused4 f;
    if (t->n >= 1 && t->n <= 4 && fused4_inputs(s, h, t, cinputs(state), 0, t->n, begin, c0, m, b + c0, NULL, &f)) {
        tm_fused4_score(out, &f, b + c0, m, h->sign_rule);
        return;
    }
    tm_consensus_score(tm_sparse_rows(s, t, state, begin, c0, m, b, k, NULL), t->n, m, h->sign_rule, out);
}

/* The block's float32 base when every loop of its apply can read it as it is (float32 inputs and
 * base, inputs in the fused loops' groups: 4 at a time linear, 1 to 4 ties),
 * else NULL: the base is then widened to float64 first. */
static const float *apply_base_f32(const tm_sparse_method *s, const tm_sparse_header *h, const tm_method_tensor *t,
                                   uint64_t begin) {
    const int ties = s->consensus == TM_CONSENSUS_TIES;
    if (ties ? !ties4_takes(h, t->n) : t->n % 4 != 0) return NULL;
    for (size_t j = 0; j < t->n; j++)
        if (!tm_kernel_f32_at(&t->in[j], begin)) return NULL;
    return tm_kernel_f32_at(t->base, begin);
}

double *tm_sparse_rows(const tm_sparse_method *s, const tm_method_tensor *t, const double *state, uint64_t begin,
                       size_t c0, size_t m, const double *b, double *k, double *acc) {
    const size_t n = t->n;
    const tm_sparse_header *h = cheader(state);
    const tm_sparse_input *in = cinputs(state);
    const int ties = s->consensus == TM_CONSENSUS_TIES;
    double *rows = (double *)t->memory->data;
    size_t j0 = 0;
    if (!ties) /* linear: 4 float32 inputs per pass over acc */
        while (j0 + 4 <= n && masked_linear4_f32(s, h, t, in, j0, begin, c0, m, b + c0, NULL, acc + c0)) j0 += 4;
    for (size_t j = j0; j < n; j++) {
        const tm_sparse_input *x = &in[j];
        double *d = ties ? rows + j * m : rows;
        uint8_t *keep = keep_of(s, h, t, j, begin) + c0;
        const float *xf = tm_kernel_f32_at(&t->in[j], begin + c0);
        if (xf) { /* float32 (the common case): the mask and the values without the δ row */
            double c;
            masked_input(s, h, t, in, j, begin, c0, m, b + c0, NULL, &c);
            if (ties) scale_kept_f32(d, xf, b + c0, keep, c, m);
            else add_kept_f32(acc + c0, xf, b + c0, keep, c, m);
            continue;
        }
        delta(t, j, begin + c0, m, b + c0, d, k);
        if (!saves_masks(s, h)) keep_block(s, h, t, j, x, d, begin + c0, m, keep);
        const double c = x->coef * rescale_of(h, x);
        if (ties) scale_kept(d, d, NULL, keep, c, m);
        else add_kept(acc + c0, d, NULL, keep, c, m);
    }
    return rows;
}

void tm_sparse_apply(const tm_sparse_method *s, const tm_method_tensor *t, const double *state, uint64_t begin,
                     size_t count, void *out, double *scratch) {
    const size_t n = t->n;
    const tm_sparse_header *h = cheader(state);
    const tm_sparse_input *in = cinputs(state);
    const int ties = s->consensus == TM_CONSENSUS_TIES;
    double *acc = scratch, *b = scratch + count, *k = scratch + 2 * count;
    double w[n ? n : 1];
    for (size_t j = 0; j < n; j++) w[j] = in[j].coef;
    const float *bf = apply_base_f32(s, h, t, begin);
    /* one fused loop merges the block whole (fused_merge's cases: the base added there, float32
     * outputs written there) */
    const int whole = bf && (ties || n == 4), to_f32 = whole && t->out_dtype == TM_FLOAT32;
    if (!ties && !whole)
        for (size_t e = 0; e < count; e++) acc[e] = 0;
    if (!bf) tm_kernel_load_f64(t->base, begin, count, b, k);
    for (size_t c0 = 0; c0 < count; c0 += TM_SPARSE_CHUNK) {
        const size_t m = count - c0 < TM_SPARSE_CHUNK ? count - c0 : TM_SPARSE_CHUNK;
        if (whole && fused_merge(s, h, t, in, begin, c0, m, bf + c0,
                                 to_f32 ? (void *)((float *)out + c0) : (void *)(acc + c0), to_f32))
            continue;
        if (bf && !ties) { /* apply_base_f32: every group of 4 is fused */
            for (size_t j0 = 0; j0 < n; j0 += 4)
                masked_linear4_f32(s, h, t, in, j0, begin, c0, m, NULL, bf + c0, acc + c0);
            continue;
        }
        double *rows = tm_sparse_rows(s, t, state, begin, c0, m, b, k, acc);
        if (ties) tm_consensus_merge(rows, w, n, m, h->sign_rule, h->agg, tm_ties_global_zero_sign(t), acc + c0);
    }
    for (size_t j = 0; j < n; j++) tm_method_mask(t, j, begin, count, keep_of(s, h, t, j, begin));
    if (to_f32) return; /* written by fused_merge */
    if (!whole && ties) add_scaled(acc, b, h->lambda, count);
    else if (!whole && bf) add_base_f32(acc, bf, count);
    else if (!whole) add_base(acc, b, count);
    tm_kernel_store_f64(acc, count, t->out_dtype, out); /* rounded once */
}

tm_status tm_sparse_check(const tm_sparse_method *s, const tm_param_values *p, tm_error *err) {
    if (s->consensus == TM_CONSENSUS_LINEAR) {
        tm_status st = tm_method_check_weights(p, (size_t)s->p_weights, (size_t)s->p_normalize, err);
        if (st) return st;
    }
    if (s->p_gamma >= 0)
        for (size_t i = 0; i < p->n_inputs; i++) {
            const double g = p->values[p->at[s->p_gamma] + (p->count[s->p_gamma] > 1 ? i : 0)];
            const double d = p->values[p->at[s->p_density] + (p->count[s->p_density] > 1 ? i : 0)];
            if (g + d > 1)
                return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                    "gamma + density: %g + %g is over 1 (input %zu): gamma drops the largest, density "
                                    "keeps the next",
                                    g, d, i);
        }
    return TM_OK;
}
