#include "merge/methods/topk.h"

#include "merge/hot.h"
#include "merge/methods/bitpack.h"

typedef struct topk_pair {
    uint64_t key, index;
} topk_pair;

enum { SPEC_GUESS, SPEC_ON, SPEC_FULL, SPEC_OFF }; /* SPEC_FULL: the pairs did not fit */
#define SPEC_SPAN 2 /* bins after spec_lo: 3 in all */

static uint64_t spec_cap(uint64_t numel) { return numel / 8 + TM_TOPK_SMALL + 1; }

void tm_topk_init(tm_topk *s, uint64_t numel, uint64_t k) {
    memset(s, 0, sizeof *s);
    s->numel = numel;
    s->k = k;
    if (k == 0) { /* nothing kept: no key is above the largest */
        s->cut_key = UINT64_MAX;
        s->cut_end = 0;
        s->phase = TM_TOPK_DONE;
    } else if (k >= numel) { /* everything kept */
        s->cut_key = 0;
        s->cut_end = UINT64_MAX;
        s->phase = TM_TOPK_DONE;
    } else if (numel <= TM_TOPK_SMALL) {
        s->phase = TM_TOPK_COLLECT;
        s->expect = numel;
    } else {
        s->phase = TM_TOPK_HIST;
        s->spec_cap = spec_cap(numel);
    }
}

/* The pairs after a HIST pass's counters (first pass: the speculation's), or a COLLECT pass's. */
size_t tm_topk_bytes(const tm_topk *s) {
    if (s->phase == TM_TOPK_HIST)
        return TM_TOPK_BINS * sizeof(uint64_t) +
               (s->bits == 0 && s->spec != SPEC_OFF ? (size_t)s->spec_cap * sizeof(topk_pair) : 0);
    if (s->phase == TM_TOPK_COLLECT) return (size_t)s->expect * sizeof(topk_pair);
    return 0;
}

size_t tm_topk_zeroed_bytes(const tm_topk *s) { return s->phase == TM_TOPK_HIST ? TM_TOPK_BINS * sizeof(uint64_t) : 0; }

TM_HOT static void hist_block(uint64_t *restrict hist, const double *restrict v, size_t count, uint32_t bits,
                              uint64_t prefix, uint64_t *zeros) {
    const unsigned shift = 48 - bits;
    if (bits == 0) {
        uint64_t z = 0;
        for (size_t e = 0; e < count; e++) {
            uint64_t key = tm_topk_key(v[e]);
            hist[key >> 48]++;
            z += key == 0;
        }
        *zeros += z;
        return;
    }
    for (size_t e = 0; e < count; e++) {
        uint64_t key = tm_topk_key(v[e]);
        if ((key >> (64 - bits)) == prefix) hist[(key >> shift) & 0xffff]++;
    }
}

/* Appends to c the pairs whose key's (key >> shift) is in [lo, lo + span] (the top 64 − shift
 * bits == lo when span is 0, as a COLLECT pass), in element order, and adds to *above the count
 * of keys above that range; returns how many pairs. In groups of 64: the keys' tests are a
 * vectorised loop into bytes, packed into a mask whose set bits are then visited, so the cost
 * goes with the pairs kept (a few in a hundred), not with a store per element. */
#define DEFINE_COLLECT_RANGE(name, T, VALUE)                                                         \
    TM_HOT static size_t name(topk_pair *restrict c, const T *restrict v, const double *restrict sub, uint64_t begin, \
                              size_t count, unsigned shift, uint64_t lo, uint64_t span, uint64_t *above) { \
        size_t m = 0;                                                                                 \
        uint64_t a = 0;                                                                               \
        for (size_t e0 = 0; e0 < count; e0 += 64) {                                                   \
            const size_t g = count - e0 < 64 ? count - e0 : 64;                                       \
            uint8_t in[64];                                                                           \
            for (size_t i = 0; i < g; i++) {                                                          \
                const uint64_t bin = tm_topk_key(VALUE(v, sub, e0 + i)) >> shift;                     \
                a += bin > lo + span;                                                                 \
                in[i] = bin - lo <= span;                                                             \
            }                                                                                         \
            for (size_t i = g; i < 64; i++) in[i] = 0;                                                \
            for (uint64_t mask = tm_pack64(in); mask; mask &= mask - 1) {                             \
                const size_t i = (size_t)__builtin_ctzll(mask);                                       \
                c[m++] = (topk_pair){tm_topk_key(VALUE(v, sub, e0 + i)), begin + e0 + i};             \
            }                                                                                         \
        }                                                                                             \
        *above += a;                                                                                  \
        return m;                                                                                     \
    }
DEFINE_COLLECT_RANGE(collect_range, double, TM_VALUE_PLAIN)
DEFINE_COLLECT_RANGE(collect_range_f32, float, TM_VALUE_F32_DELTA)

static size_t collect_block(topk_pair *c, const double *v, uint64_t begin, size_t count, unsigned shift, uint64_t lo,
                            uint64_t span) {
    uint64_t above = 0;
    return collect_range(c, v, NULL, begin, count, shift, lo, span, &above);
}

/* The bin holding the left-th key from the top (1 ≤ left ≤ the keys counted): walks down in
 * groups of 64 bins summed at once (most bins of a tensor's keys are empty). *left becomes the
 * rank inside the bin; *above gains the keys of the bins above it. */
static uint64_t find_bin(const uint64_t *hist, uint64_t *left, uint64_t *above) {
    uint64_t l = *left, bin = TM_TOPK_BINS;
    for (; bin > 64; bin -= 64) {
        uint64_t sum = 0;
        for (unsigned i = 1; i <= 64; i++) sum += hist[bin - i];
        if (sum >= l) break;
        l -= sum;
        *above += sum;
    }
    for (bin--; hist[bin] < l; bin--) {
        l -= hist[bin];
        *above += hist[bin];
    }
    *left = l;
    return bin;
}

/* The speculation's guess after the first block's histogram: the bin of its k·count/numel-th
 * key; the pairs of the bins around it are collected from then on, and the keys above them
 * counted (here: the first block's). */
static void spec_guess(tm_topk *s, const uint64_t *hist, size_t count) {
    uint64_t want = (uint64_t)((double)s->k * (double)count / (double)s->numel) + 1, above = 0;
    if (want > count) want = count;
    const uint64_t bin = find_bin(hist, &want, &above);
    s->spec_lo = bin > SPEC_SPAN / 2 ? bin - SPEC_SPAN / 2 : 0;
    if (s->spec_lo + SPEC_SPAN >= TM_TOPK_BINS) s->spec_lo = TM_TOPK_BINS - 1 - SPEC_SPAN;
    for (uint64_t b = s->spec_lo + SPEC_SPAN + 1; b < TM_TOPK_BINS; b++) s->spec_above += hist[b];
    s->spec = SPEC_ON;
}

/* The speculation's pairs (after the counters), and whether count more may still fit. */
static topk_pair *spec_pairs(const tm_topk *s, uint8_t *mem) {
    return (topk_pair *)(mem + s->offset + TM_TOPK_BINS * sizeof(uint64_t));
}
static int spec_fits(const tm_topk *s, size_t count) { return s->spec_seen + count + 1 <= s->spec_cap; }

/* The first HIST pass with the speculation: the first block's histogram guesses, the others are
 * only scanned (a block that might not fit ends it: the pass then ends with a histogram of the
 * first block only, and tm_topk_end starts the usual passes over). */
static void first_hist(tm_topk *s, uint8_t *mem, const double *v, uint64_t begin, size_t count) {
    uint64_t *hist = (uint64_t *)(mem + s->offset);
    topk_pair *c = spec_pairs(s, mem) + s->spec_seen;
    if (s->spec == SPEC_GUESS) {
        hist_block(hist, v, count, 0, 0, &s->zeros);
        spec_guess(s, hist, count);
        s->spec_seen += collect_block(c, v, begin, count, 48, s->spec_lo, SPEC_SPAN);
        return;
    }
    if (s->spec == SPEC_ON && !spec_fits(s, count)) s->spec = SPEC_FULL;
    /* past the first block, without counters: the keys above the bins counted, the bins' pairs kept */
    if (s->spec == SPEC_ON)
        s->spec_seen += collect_range(c, v, NULL, begin, count, 48, s->spec_lo, SPEC_SPAN, &s->spec_above);
}

int tm_topk_scanning(const tm_topk *s, size_t count) {
    return s->phase == TM_TOPK_HIST && s->bits == 0 && s->spec == SPEC_ON && spec_fits(s, count);
}

void tm_topk_scan_f32(tm_topk *s, uint8_t *mem, const float *x, const double *b, uint64_t begin, size_t count) {
    topk_pair *c = spec_pairs(s, mem) + s->spec_seen;
    s->spec_seen += collect_range_f32(c, x, b, begin, count, 48, s->spec_lo, SPEC_SPAN, &s->spec_above);
}

void tm_topk_block(tm_topk *s, uint8_t *mem, const double *v, uint64_t begin, size_t count) {
    if (s->phase == TM_TOPK_HIST) {
        if (s->bits == 0 && s->spec != SPEC_OFF) first_hist(s, mem, v, begin, count);
        else hist_block((uint64_t *)(mem + s->offset), v, count, s->bits, s->prefix, &s->zeros);
    } else if (s->phase == TM_TOPK_COLLECT) {
        topk_pair *c = (topk_pair *)(mem + s->offset) + s->seen;
        if (s->bits == 0) { /* a small tensor: every pair */
            for (size_t e = 0; e < count; e++) c[e] = (topk_pair){tm_topk_key(v[e]), begin + e};
            s->seen += count;
        } else {
            s->seen += collect_block(c, v, begin, count, 64 - s->bits, s->prefix, 0);
        }
    } else if (s->phase == TM_TOPK_COUNT) {
        for (size_t e = 0; e < count; e++)
            if (tm_topk_key(v[e]) == s->cut_key && ++s->seen == s->expect) {
                s->cut_end = begin + e + 1;
                s->phase = TM_TOPK_DONE;
                return;
            }
    }
}

/* a ranks before b: larger key, or equal keys and the lower index. */
static inline int before(topk_pair a, topk_pair b) { return a.key > b.key || (a.key == b.key && a.index < b.index); }

/* Moves the r-th (0-based) of c[0, m) in the order `before` to c[r]: Hoare's selection with the
 * median of three as pivot (pairs are distinct, so each partition narrows the range). */
static void swap_pairs(topk_pair *a, topk_pair *b) {
    topk_pair t = *a;
    *a = *b;
    *b = t;
}

static void select_rth(topk_pair *c, size_t m, size_t r) {
    ptrdiff_t lo = 0, hi = (ptrdiff_t)m - 1;
    while (lo < hi) {
        ptrdiff_t mid = lo + (hi - lo) / 2;
        if (before(c[mid], c[lo])) swap_pairs(&c[mid], &c[lo]);
        if (before(c[hi], c[lo])) swap_pairs(&c[hi], &c[lo]);
        if (before(c[hi], c[mid])) swap_pairs(&c[hi], &c[mid]);
        const topk_pair pivot = c[mid];
        ptrdiff_t i = lo - 1, j = hi + 1;
        for (;;) {
            do i++; while (before(c[i], pivot));
            do j--; while (before(pivot, c[j]));
            if (i >= j) break;
            swap_pairs(&c[i], &c[j]);
        }
        /* c[lo, j] rank before c[j + 1, hi] */
        if ((ptrdiff_t)r <= j) hi = j;
        else lo = j + 1;
    }
}

void tm_topk_end(tm_topk *s, uint8_t *mem) {
    const uint64_t r = s->k - s->above; /* keys still to keep, ≥ 1, inside the prefix's range */
    if (s->phase == TM_TOPK_COLLECT) {
        topk_pair *c = (topk_pair *)(mem + s->offset);
        select_rth(c, (size_t)s->seen, (size_t)(r - 1));
        s->cut_key = c[r - 1].key;
        s->cut_end = c[r - 1].index + 1;
        s->phase = TM_TOPK_DONE;
        return;
    }
    if (s->phase != TM_TOPK_HIST) return;
    if (s->bits == 0 && s->spec != SPEC_OFF) {
        const uint64_t a = s->spec_above;
        if (s->spec == SPEC_ON && s->k > a && s->k - a <= s->spec_seen) {
            /* the k-th key is in the bins: every pair of them is here, select among them */
            topk_pair *c = spec_pairs(s, mem);
            uint64_t in_bin[SPEC_SPAN + 1] = {0}, rank = s->k - a, bin = SPEC_SPAN;
            for (uint64_t e = 0; e < s->spec_seen; e++) in_bin[(c[e].key >> 48) - s->spec_lo]++;
            for (; in_bin[bin] < rank; bin--) rank -= in_bin[bin];
            size_t m = 0; /* the bin's pairs only, for a smaller selection */
            for (uint64_t e = 0; e < s->spec_seen; e++) {
                c[m] = c[e];
                m += (c[e].key >> 48) - s->spec_lo == bin;
            }
            select_rth(c, m, (size_t)rank - 1);
            s->cut_key = c[rank - 1].key;
            s->cut_end = c[rank - 1].index + 1;
            s->phase = TM_TOPK_DONE;
        } else { /* a wrong guess or too many pairs: the usual first histogram, another pass */
            s->spec = SPEC_OFF;
            s->zeros = 0;
        }
        return;
    }
    const uint64_t *hist = (const uint64_t *)(mem + s->offset);
    uint64_t left = r;
    const uint64_t bin = find_bin(hist, &left, &s->above);
    const uint64_t in_bin = hist[bin];
    const int zero_bin = s->bits == 0 && bin == 0 && in_bin == s->zeros;
    s->bits += 16;
    s->prefix = s->bits == 16 ? bin : s->prefix << 16 | bin;
    if (in_bin == left) { /* the whole bin is kept: every key from its lowest */
        s->cut_key = s->bits == 64 ? s->prefix : s->prefix << (64 - s->bits);
        s->cut_end = UINT64_MAX;
        s->phase = TM_TOPK_DONE;
    } else if (s->bits == 64 || zero_bin) { /* one key, many times: cut by index */
        s->cut_key = s->bits == 64 ? s->prefix : 0;
        s->expect = left;
        s->seen = 0;
        s->phase = TM_TOPK_COUNT;
    } else if (in_bin <= (s->numel / 2 > TM_TOPK_SMALL ? s->numel / 2 : TM_TOPK_SMALL)) {
        s->expect = in_bin;
        s->seen = 0;
        s->phase = TM_TOPK_COLLECT;
    } /* else another histogram, of the next 16 bits */
}

/* A static clone behind a plain function: a cloned function's dispatcher would be exported. */
TM_HOT static void keep_loop(const tm_topk *s, const double *v, uint64_t begin, size_t count, uint8_t *keep) {
    const uint64_t key = s->cut_key, end = s->cut_end;
    for (size_t e = 0; e < count; e++) {
        uint64_t k = tm_topk_key(v[e]);
        keep[e] = (uint8_t)((k > key) | ((k == key) & (begin + e < end))); /* bitwise: vectorises */
    }
}

void tm_topk_keep(const tm_topk *s, const double *v, uint64_t begin, size_t count, uint8_t *keep) {
    keep_loop(s, v, begin, count, keep);
}
