/* DELLA (Deep, Bhatt et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
 * Magnitude-Based Sampling"; mergekit's della / della_linear, sparsification della_magprune):
 * each element of δᵢ = θᵢ − b is kept with a probability that grows with its magnitude's rank
 * along dimension 1 (mergekit's dim=1; 0-d and 1-D tensors, and storages shared by several
 * views, are one row):
 *   rank r ∈ 1..L of |δ| ascending within its fibre of L elements (equal magnitudes: the lower
 *   index first — mergekit's argsort is unstable), p = (densityᵢ − εᵢ) + (r − 1)/(L − 1)·2·εᵢ
 *   (L = 1: p = densityᵢ; mergekit divides 0 by 0 there and fails), kept when u < p with u the
 *   counter-based uniform of merge/random.h (the same function as DARE's, keyed by seed, input,
 *   tensor name, at the element's row-major index);
 * then rescaled (l1 by default, as mergekit's rescale: true) and merged as TIES (della) or
 * linearly (della_linear): entries of the generalized task arithmetic in sparse.c.
 * densityᵢ = 1 keeps everything; otherwise densityᵢ ± εᵢ must lie inside (0, 1) (mergekit raises).
 *
 * The mask (a tm_sparsifier): in its reduce pass, each fibre is ranked when the block holding
 * the first element of its slab is seen — a slab is the L·inner contiguous elements of one index
 * of dimension 0 (inner: the product of the dimensions after 1), holding inner fibres of stride
 * inner — from the mapped inputs directly (a slab may span blocks), and the keep bits of the
 * whole tensor are stored, one bit per element per input; with rescale l1 the same pass sums the
 * L1 norms from the ranked keys (sparse.h's lane order). The apply reads the bits. Most fibres
 * are not sorted: only the coins between the lowest and the highest threshold depend on the
 * rank; for those, the keys go into buckets whose ranks are known as a range, and the coin
 * against the thresholds of its bucket's first and last rank decides, except for a few whose
 * exact rank is then counted (keep_by_buckets). The others (short or long fibres, keys crowded
 * into few buckets) are sorted by a radix sort of 24 bits of each key (exponent and 12 bits of
 * mantissa) packed with the element's place in 64-bit words, runs of equal 24 bits then ordered
 * by the whole key. Either way the decisions are those of a sort on the whole key. Memory:
 * n·numel/8 bytes of bits, 16 doubles per input per block of the tensor (the norms' lanes), 8
 * bytes per element of a slab for the |δ| keys, 28 per fibre element (sort words twice,
 * thresholds, ranks; 8 more for its keys when strided), and chunk buffers (3 × CHUNK doubles,
 * CHUNK keys, CHUNK bytes). C11. */
#include "merge/methods/methods.h"
#include "merge/methods/sparse.h"
#include "merge/methods/weights.h"

#include <math.h>
#include <string.h>

#include "merge/hot.h"
#include "merge/merge_ctx.h"
#include "merge/methods/bitpack.h"
#include "merge/random.h"

enum { P_WEIGHTS, P_LAMBDA, P_DENSITY, P_EPSILON, P_RESCALE, P_SEED, P_NORMALIZE, P_SIGN };

#define DELLA_PARAMS                                                                                \
    [P_WEIGHTS] = TM_DECL_TASK_WEIGHTS, [P_LAMBDA] = TM_DECL_LAMBDA,                                \
    [P_DENSITY] = TM_DECL_DENSITY(0, "1", "the mean probability of keeping an element of a task vector"), \
    [P_EPSILON] = {.name = "epsilon", .kind = TM_PARAM_NUMBER, .per_input = 1, .default_value = "0.15", .min = 0, \
                   .max = 1, .max_exclusive = 1,                                                    \
                   .help = "keep probabilities run from density - epsilon (smallest |delta| of a row) to "   \
                           "density + epsilon (largest)"},                                          \
    [P_RESCALE] = TM_DECL_RESCALE("l1"), [P_SEED] = TM_DECL_SEED

static const tm_param_decl linear_params[] = {DELLA_PARAMS, [P_NORMALIZE] = TM_DECL_NORMALIZE("false")};
static const tm_param_decl ties_params[] = {
    DELLA_PARAMS,
    [P_NORMALIZE] = {.name = "normalize", .kind = TM_PARAM_BOOL, .default_value = "true",
                     .help = "divide each element by the sum of the weights of the inputs whose sign agrees"},
    [P_SIGN] = TM_DECL_MAJORITY_SIGN,
};

/* ---- the fibres ------------------------------------------------------------------------------ */

/* Elements |δ| are read in chunks of CHUNK (the kernel's loads need count doubles of scratch). */
#define CHUNK 4096

typedef struct geometry {
    uint64_t len, inner, slab; /* L, the stride of a fibre, L·inner */
} geometry;

static geometry geometry_of(const tm_method_tensor *t) {
    const tm_view *v = &t->in[0];
    geometry g = {t->numel, 1, t->numel};
    if (v->ndim >= 2 && t->numel > 0) {
        g.len = (uint64_t)v->shape[1];
        for (int32_t d = 2; d < v->ndim; d++) g.inner *= (uint64_t)v->shape[d];
        g.slab = g.len * g.inner;
    }
    return g;
}

static size_t align8(size_t b) { return (b + 7) & ~(size_t)7; }
static size_t bits_bytes(uint64_t numel) { return align8((size_t)((numel + 7) / 8)); }

/* The sparsifier's memory: n bit masks; the slab's |δ| keys; a fibre's keys when fibres are
 * strided (inner > 1; else the slab is the fibre); the fibre's sort words twice; its ranks; the
 * keep thresholds by rank; the chunk buffers. */
typedef struct area {
    uint8_t *bits;
    double *lanes; /* per input, per block: the L1 norms' lanes, all then kept (sparse.h) */
    uint64_t *slab, *keys, *words, *tmp, *thr;
    uint32_t *rank;
    double *x, *b, *k;
    uint64_t *chunk_keys; /* CHUNK keys: the norms of an input kept whole */
    uint8_t *chunk_keep;  /* CHUNK keep bytes: the norms' */
} area;

static uint64_t blocks_of(uint64_t numel) { return (numel + TM_BLOCK_ELEMS - 1) / TM_BLOCK_ELEMS; }
#define LANES_PER_BLOCK (2 * TM_L1_LANES)

static area area_of(const tm_method_tensor *t, const geometry *g, uint8_t *mem) {
    area a;
    a.bits = mem;
    mem += t->n * bits_bytes(t->numel);
    a.lanes = (double *)mem;
    mem += t->n * blocks_of(t->numel) * LANES_PER_BLOCK * sizeof(double);
    a.slab = (uint64_t *)mem;
    mem += g->slab * sizeof(uint64_t);
    a.keys = g->inner > 1 ? (uint64_t *)mem : a.slab;
    mem += g->inner > 1 ? g->len * sizeof(uint64_t) : 0;
    a.words = (uint64_t *)mem;
    a.tmp = a.words + g->len;
    a.thr = a.tmp + g->len;
    mem += 3 * g->len * sizeof(uint64_t);
    a.rank = (uint32_t *)mem;
    mem += align8(g->len * sizeof(uint32_t));
    a.x = (double *)mem;
    a.b = a.x + CHUNK;
    a.k = a.b + CHUNK;
    a.chunk_keys = (uint64_t *)(a.k + CHUNK);
    a.chunk_keep = (uint8_t *)(a.chunk_keys + CHUNK);
    return a;
}

static size_t bytes(const tm_method_tensor *t) {
    const geometry g = geometry_of(t);
    return t->n * bits_bytes(t->numel) + t->n * blocks_of(t->numel) * LANES_PER_BLOCK * sizeof(double) +
           g.slab * sizeof(uint64_t) + (g.inner > 1 ? g.len * sizeof(uint64_t) : 0) +
           3 * g.len * sizeof(uint64_t) + align8(g.len * sizeof(uint32_t)) + 3 * CHUNK * sizeof(double) +
           CHUNK * (sizeof(uint64_t) + 1);
}

/* keys[e] = the bits of |x − b| (topk.h's key: monotone in |δ|, NaN above every number), from
 * float64 rows or, fused (no rows written; the same δ), from float32 inputs and bases. */
TM_HOT static void keys_of(uint64_t *restrict keys, const double *restrict x, const double *restrict b, size_t count) {
    for (size_t e = 0; e < count; e++) keys[e] = tm_topk_key(x[e] - b[e]);
}
TM_HOT static void keys_of_f32(uint64_t *restrict keys, const float *restrict x, const float *restrict b,
                               size_t count) {
    for (size_t e = 0; e < count; e++) keys[e] = tm_topk_key((double)x[e] - (double)b[e]);
}

/* The sort word of fibre element r: its key's top 24 bits (sign 0, the exponent and 12 bits of
 * mantissa: monotone in the key) above its index. Sorting the words orders the fibre by |δ|
 * to 12 bits, and among equal words by index; refine() then orders each run of equal top bits
 * by the whole key. */
#define TOP_SHIFT 40
TM_HOT static void words_of(uint64_t *restrict w, const uint64_t *restrict keys, size_t len) {
    for (size_t r = 0; r < len; r++) w[r] = (keys[r] >> TOP_SHIFT) << 32 | (uint64_t)r;
}

/* Sorts the words w[0, len) ascending by their top bits, stably (they come in index order);
 * tmp: len more. Returns the sorted array (w or tmp). LSD radix by the 3 bytes of the top bits,
 * skipping the bytes every word shares (found first: counting a byte that never changes would
 * make every increment wait for the previous one's store). */
TM_HOT static uint64_t varying_top_bits(const uint64_t *restrict w, size_t len) {
    const uint64_t first = w[0] >> 32;
    uint64_t diff = 0;
    for (size_t i = 0; i < len; i++) diff |= (w[i] >> 32) ^ first;
    return diff;
}

static uint64_t *sort_words(uint64_t *w, uint64_t *tmp, size_t len) {
    const uint64_t diff = varying_top_bits(w, len);
    for (unsigned d = 0; d < 3; d++) {
        const unsigned shift = 32 + 8 * d;
        if (!((diff >> (8 * d)) & 0xff)) continue;
        size_t count[256] = {0};
        for (size_t i = 0; i < len; i++) count[(w[i] >> shift) & 0xff]++;
        size_t at = 0;
        for (size_t c = 0; c < 256; c++) {
            const size_t k = count[c];
            count[c] = at;
            at += k;
        }
        for (size_t i = 0; i < len; i++) tmp[count[(w[i] >> shift) & 0xff]++] = w[i];
        uint64_t *swap = w;
        w = tmp;
        tmp = swap;
    }
    return w;
}

/* Orders each run of words with equal top bits by the whole key (keys: by index), stably: an
 * insertion sort of the run, which is in index order. The runs are short: |δ| equal to 12 bits. */
static void refine(uint64_t *w, const uint64_t *keys, size_t len) {
    for (size_t s = 0; s < len;) {
        size_t e = s + 1;
        while (e < len && (w[e] >> 32) == (w[s] >> 32)) e++;
        for (size_t i = s + 1; i < e; i++) {
            const uint64_t x = w[i], kx = keys[(uint32_t)x];
            size_t j = i;
            for (; j > s && keys[(uint32_t)w[j - 1]] > kx; j--) w[j] = w[j - 1];
            w[j] = x;
        }
        s = e;
    }
}

/* thr[r] = the keep threshold (random.h) of rank r of a fibre of len: mergekit's
 * rank_norm = (rank − min rank)/(max rank − min rank), p = (d − ε) + rank_norm·2·ε. */
static void thresholds(uint64_t *thr, size_t len, double density, double epsilon) {
    const double lo = density - epsilon, two_eps = 2 * epsilon;
    for (size_t r = 0; r < len; r++)
        thr[r] = tm_random_threshold(len == 1 ? density : lo + (double)r / (double)(len - 1) * two_eps);
}

/* keep[r] for the fibre's elements in index order: element r (flat index first + r·inner) is
 * kept when its uniform is below the threshold of its rank. */
TM_HOT static void keep_fibre(uint8_t *restrict keep, uint64_t key, uint64_t first, uint64_t inner,
                              const uint32_t *restrict rank, const uint64_t *restrict thr, size_t len) {
    for (size_t r = 0; r < len; r++) keep[r] = (uint8_t)tm_random_keep(key, first + r * inner, thr[rank[r]]);
}

/* The keep decisions of a fibre without sorting it, for the usual fibre (keys: its |δ| keys, in
 * index order; thr: the thresholds by rank, rising). An element whose coin is below thr[0] is
 * kept and one at or above thr[len − 1] dropped whatever its rank: only the band between (2ε of
 * the elements) needs a rank. For those, the keys are put in NB ≥ len buckets by their distance
 * to the smallest nonzero key (a monotone map; exact zeros, frequent in 16-bit fine-tunes, in a
 * bucket of their own below), so a bucket's elements hold a known range of ranks [lo, hi], and a
 * coin below thr[lo] or at or above thr[hi] decides; a zero's rank is its place among the zeros.
 * Only the rest (a few per fibre: the coin must fall between the thresholds of its bucket's first
 * and last rank) need their exact rank, counted over the fibre. Returns 0, having decided
 * nothing, when more than UNDECIDED_MAX would need it (keys crowded into few buckets): the caller
 * sorts the fibre then. a->rank and a->words are its scratch (keep may be a->tmp). */
#define UNDECIDED_MAX 64
#define COINS 512 /* coin flips hashed per piece */
#define BUCKETS_MIN_LEN 64 /* shorter fibres are sorted, */
#define BUCKETS_MAX_LEN 65535 /* and longer ones: the buckets' first ranks are 16-bit */

TM_HOT static void key_range(const uint64_t *restrict keys, size_t len, uint64_t *lo, uint64_t *hi) {
    uint64_t mn = UINT64_MAX, mx = 0;
    for (size_t r = 0; r < len; r++) {
        const uint64_t k = keys[r], below = k - 1; /* 0 wraps to the largest: the smallest nonzero key */
        mn = below < mn ? below : mn;
        mx = k > mx ? k : mx;
    }
    *lo = mn + 1; /* 0 when every key is 0 */
    *hi = mx;
}

/* bucket[r] of key r: 0 for a zero, else 1 + (k − kmin) >> shift. */
TM_HOT static void buckets_of(uint32_t *restrict bucket, const uint64_t *restrict keys, size_t len, uint64_t kmin,
                              unsigned shift) {
    for (size_t r = 0; r < len; r++) {
        const uint64_t k = keys[r];
        bucket[r] = k ? 1 + (uint32_t)((k - kmin) >> shift) : 0;
    }
}

/* coins[r] = the coin of element r of the fibre (random.h's m, tm_random_keep's left side); keep[r]:
 * it is below every threshold, lo; in_band[r]: it is not at or above all of them, hi, either
 * (lo ≤ hi). Vector loops (16 coins from 8 mixes where the fibre is contiguous); the band is
 * gathered after. */
static inline __attribute__((always_inline)) void flip_coin(uint64_t m, size_t r, uint32_t *restrict coins,
                                                             uint8_t *restrict keep, uint8_t *restrict in_band,
                                                             uint64_t lo, uint64_t hi) {
    coins[r] = (uint32_t)m;
    keep[r] = m < lo;
    in_band[r] = m - lo < hi - lo; /* lo ≤ m < hi */
}
TM_HOT static void flip_coins(uint32_t *restrict coins, uint8_t *restrict keep, uint8_t *restrict in_band, uint64_t key,
                              uint64_t first, uint64_t inner, size_t len, uint64_t lo, uint64_t hi) {
    size_t r = 0;
#ifdef TM_RANDOM_COINS16
    if (inner == 1) { /* neighbours: 16 coins from 8 mixes */
        if ((first & 1) && len) flip_coin(tm_random_coin(key, first), r++, coins, keep, in_band, lo, hi);
        const uint32_t lo_last = tm_random_last_kept(lo), hi_last = tm_random_last_kept(hi);
        const tm_random_v16i32 lo_any = (tm_random_v16i32){0} - (lo > 0), hi_any = (tm_random_v16i32){0} - (hi > 0);
        for (; r + 16 <= len; r += 16) {
            tm_random_v16u32 m;
            tm_random_coins16(key, (first + r) >> 1, &m);
            const tm_random_v16i32 below_lo = (m <= lo_last) & lo_any, below_hi = (m <= hi_last) & hi_any;
            memcpy(coins + r, &m, sizeof m);
            tm_random_bytes16(below_lo, keep + r);
            tm_random_bytes16(~below_lo & below_hi, in_band + r);
        }
    }
#endif
    for (; r < len; r++) flip_coin(tm_random_coin(key, first + r * inner), r, coins, keep, in_band, lo, hi);
}

/* The rank of element r (key k) in its fibre: the keys below k, and those equal to it earlier. */
TM_HOT static size_t rank_of(const uint64_t *restrict keys, size_t len, size_t r, uint64_t k) {
    size_t n = 0;
    for (size_t f = 0; f < r; f++) n += keys[f] <= k;
    for (size_t f = r; f < len; f++) n += keys[f] < k;
    return n;
}

/* s[i] = s[0] + … + s[i], 4 at a time in a 64-bit word: the word times 0x0001000100010001 holds
 * each lane's sum with the lanes below (no lane overflows: every sum is at most len < 2¹⁶), and
 * only the running total, broadcast to the 4 lanes, carries from word to word (one add each, not
 * one per bucket). n: a multiple of 4. */
static void prefix_sums16(uint16_t *s, size_t n) {
    const uint64_t lanes = 0x0001000100010001ull;
    uint64_t carry = 0;
    for (size_t i = 0; i < n; i += 4) {
        uint64_t w;
        memcpy(&w, s + i, sizeof w);
        const uint64_t within = w * lanes, out = within + carry;
        memcpy(s + i, &out, sizeof out);
        carry += (within >> 48) * lanes;
    }
}

static int keep_by_buckets(const uint64_t *keys, size_t len, const uint64_t *thr, uint64_t key, uint64_t first,
                           uint64_t inner, const area *a, uint8_t *keep) {
    uint64_t kmin, kmax;
    key_range(keys, len, &kmin, &kmax);
    unsigned log_nb = 0;
    while (((size_t)1 << log_nb) < len) log_nb++;
    const uint64_t range = kmax >= kmin ? kmax - kmin : 0; /* every key 0: kmin = kmax = 0 */
    const unsigned bits = range ? 64u - (unsigned)__builtin_clzll(range) : 0;
    const unsigned shift = bits > log_nb ? bits - log_nb : 0;
    uint32_t *bucket = a->rank;
    uint16_t *start = (uint16_t *)a->words; /* NB + 2 ≤ 2·len, rounded up to 4: within a->words' 4·len */
    const size_t nb = ((size_t)1 << log_nb) + 1, n_start = (nb + 1 + 3) & ~(size_t)3;
    buckets_of(bucket, keys, len, kmin, shift);
    memset(start, 0, n_start * sizeof *start);
    for (size_t r = 0; r < len; r++) start[bucket[r] + 1]++;
    prefix_sums16(start, n_start); /* start[b]: the bucket's first rank */
    const int has_zeros = start[1] > 0;
    const uint64_t band_lo = thr[0], band_hi = thr[len - 1];
    uint32_t undecided[UNDECIDED_MAX + 1], band[COINS];
    size_t n_undecided = 0, zeros = 0, zeros_to = 0; /* zeros: the zero keys before zeros_to */
    for (size_t r0 = 0; r0 < len; r0 += COINS) { /* the coins a piece at a time: memory bounded */
        const size_t m0 = len - r0 < COINS ? len - r0 : COINS;
        uint32_t coins[COINS];
        uint8_t in_band[COINS];
        flip_coins(coins, keep + r0, in_band, key, first + r0 * inner, inner, m0, band_lo, band_hi);
        size_t n_band = 0;
        for (size_t i = 0; i < m0; i++) { /* branch-free: the decisions are coin flips */
            band[n_band] = (uint32_t)i;
            n_band += in_band[i];
        }
        for (size_t u = 0; u < n_band; u++) {
            const size_t r = r0 + band[u];
            const uint64_t m = coins[band[u]];
            const uint32_t b = bucket[r];
            if (has_zeros)
                for (; zeros_to < r; zeros_to++) zeros += keys[zeros_to] == 0;
            const uint64_t lo = thr[b ? (size_t)start[b] : zeros], hi = thr[b ? (size_t)start[b + 1] - 1 : zeros];
            keep[r] = m < lo;
            undecided[n_undecided < UNDECIDED_MAX ? n_undecided : UNDECIDED_MAX] = (uint32_t)r;
            n_undecided += (m >= lo) & (m < hi);
        }
    }
    if (n_undecided > UNDECIDED_MAX) return 0;
    for (size_t u = 0; u < n_undecided; u++) {
        const size_t r = undecided[u];
        keep[r] = tm_random_keep(key, first + r * inner, thr[rank_of(keys, len, r, keys[r])]);
    }
    return 1;
}

static void set_bits(uint8_t *bits, const uint8_t *keep, uint64_t first, uint64_t inner, size_t len) {
    if (inner == 1) {
        tm_bits_pack(bits, first, keep, len);
        return;
    }
    for (size_t r = 0; r < len; r++) tm_bits_put(bits, first + r * inner, keep[r]);
}

/* |δ| from its key (the bits of fabs(δ)): the VALUE of TM_L1_LANES_LOOP over keys. */
static inline double key_value(uint64_t key) {
    double v;
    memcpy(&v, &key, sizeof v);
    return v;
}
#define KEY_VALUE(keys, unused, e) key_value((keys)[e])

TM_HOT static void add_norms(const uint64_t *restrict keys, const uint8_t *restrict keep, size_t count,
                             double *restrict all, double *restrict kept) {
    TM_L1_LANES_LOOP(keys, NULL, keep, count, all, kept, KEY_VALUE);
}

/* The L1 norms' lanes (sparse.h's order) of elements [start, start + count) of an input (keys from
 * start), block by block: |δ| from the keys, kept where its bit is set (bits: NULL keeps all). A
 * piece's first elements up to a multiple of 8 go one by one, the rest through add_norms; kb:
 * CHUNK bytes of scratch for the bits as bytes. */
static void norms_of(double *lanes, const uint64_t *keys, const uint8_t *bits, uint64_t start, uint64_t count,
                     uint8_t *kb) {
    for (uint64_t e = 0; e < count;) {
        const uint64_t block = (start + e) / TM_BLOCK_ELEMS, end = (block + 1) * TM_BLOCK_ELEMS - start;
        const uint64_t stop = end < count ? end : count;
        double *all = lanes + block * LANES_PER_BLOCK, *kept = all + TM_L1_LANES;
        for (; e < stop && (start + e) % TM_L1_LANES; e++) {
            const double v = key_value(keys[e]);
            all[(start + e) % TM_L1_LANES] += v;
            kept[(start + e) % TM_L1_LANES] += tm_kept_or_zero(v, bits ? tm_bit_at(bits, start + e) : 1);
        }
        for (; e < stop;) {
            const size_t c = (size_t)(stop - e < CHUNK ? stop - e : CHUNK);
            if (bits) tm_bits_unpack(bits, start + e, c, kb);
            else memset(kb, 1, c);
            add_norms(keys + e, kb, c, all, kept);
            e += c;
        }
    }
}

/* The |δ| keys of elements [start, start + count) of input j, from the mapped float32 input and
 * base directly, else through the chunk buffers. */
static void keys_at(const tm_method_tensor *t, const area *a, size_t j, uint64_t start, uint64_t count, uint64_t *keys) {
    const float *xf = tm_kernel_f32_at(&t->in[j], start), *bf = tm_kernel_f32_at(t->base, start);
    for (uint64_t e = 0; e < count; e += CHUNK) {
        const size_t c = (size_t)(count - e < CHUNK ? count - e : CHUNK);
        if (xf && bf) {
            keys_of_f32(keys + e, xf + e, bf + e, c);
            continue;
        }
        tm_kernel_load_f64(&t->in[j], start + e, c, a->x, a->k);
        tm_kernel_load_f64(t->base, start + e, c, a->b, a->k);
        keys_of(keys + e, a->x, a->b, c);
    }
}

/* Ranks the inner fibres of slab o of input j (a->thr: its thresholds) and sets their keep bits. */
static void rank_slab(const tm_method_tensor *t, const geometry *g, const area *a, size_t j,
                      const tm_sparse_input *x, uint64_t o) {
    const uint64_t start = o * g->slab;
    const size_t len = (size_t)g->len;
    keys_at(t, a, j, start, g->slab, a->slab);
    uint8_t *bits = a->bits + j * bits_bytes(t->numel), *keep = (uint8_t *)a->tmp; /* tmp is free after the sort */
    for (uint64_t q = 0; q < g->inner; q++) {
        if (g->inner > 1)
            for (size_t r = 0; r < len; r++) a->keys[r] = a->slab[q + r * g->inner];
        if (len >= BUCKETS_MIN_LEN && len <= BUCKETS_MAX_LEN &&
            keep_by_buckets(a->keys, len, a->thr, x->key, start + q, g->inner, a, keep)) {
            set_bits(bits, keep, start + q, g->inner, len);
            continue;
        }
        words_of(a->words, a->keys, len);
        uint64_t *order = sort_words(a->words, a->tmp, len);
        refine(order, a->keys, len);
        for (size_t pos = 0; pos < len; pos++) a->rank[(uint32_t)order[pos]] = (uint32_t)pos;
        uint8_t *kb = order == a->tmp ? (uint8_t *)a->words : keep;
        keep_fibre(kb, x->key, start + q, g->inner, a->rank, a->thr, len);
        set_bits(bits, kb, start + q, g->inner, len);
    }
}

/* Ranks every slab whose first element is in [begin, begin + count): blocks come in order, so
 * the bits of a block are all known once it is seen. With norms, sums each ranked slab's |δ| into
 * the lanes of the blocks it covers (an input kept whole: the block's), then adds up the block's
 * lanes: every slab covering it has been ranked by now. */
static void pass(const tm_method_tensor *t, tm_sparse_input *in, int norms, uint8_t *mem, uint64_t begin,
                 size_t count) {
    const geometry g = geometry_of(t);
    if (g.slab == 0) return;
    const area a = area_of(t, &g, mem);
    const uint64_t first = (begin + g.slab - 1) / g.slab, nblocks = blocks_of(t->numel);
    for (size_t j = 0; j < t->n; j++) {
        double *lanes = a.lanes + j * nblocks * LANES_PER_BLOCK;
        if (in[j].density >= 1) {
            for (uint64_t e = 0; e < count && norms; e += CHUNK) {
                const size_t c = (size_t)(count - e < CHUNK ? count - e : CHUNK);
                keys_at(t, &a, j, begin + e, c, a.chunk_keys);
                norms_of(lanes, a.chunk_keys, NULL, begin + e, c, a.chunk_keep);
            }
            continue;
        }
        if (first * g.slab >= begin + count) continue;
        thresholds(a.thr, (size_t)g.len, in[j].density, tm_tensor_param(t, P_EPSILON, t->input[j]));
        for (uint64_t o = first; o * g.slab < begin + count; o++) {
            rank_slab(t, &g, &a, j, &in[j], o);
            if (norms) norms_of(lanes, a.slab, a.bits + j * bits_bytes(t->numel), o * g.slab, g.slab, a.chunk_keep);
        }
    }
    for (size_t j = 0; j < t->n && norms; j++) {
        const double *l = a.lanes + (j * nblocks + begin / TM_BLOCK_ELEMS) * LANES_PER_BLOCK;
        in[j].l1_all += tm_l1_lanes_sum(l);
        in[j].l1_kept += tm_l1_lanes_sum(l + TM_L1_LANES);
    }
}

static void keep(const tm_method_tensor *t, size_t j, const tm_sparse_input *x, const uint8_t *mem, uint64_t begin,
                 size_t count, uint8_t *out) {
    if (x->density >= 1) {
        memset(out, 1, count);
        return;
    }
    tm_bits_unpack(mem + j * bits_bytes(t->numel), begin, count, out);
}

static const tm_sparsifier magprune = {.bytes = bytes, .pass = pass, .keep = keep};

/* ---- the two methods ------------------------------------------------------------------------- */

static const tm_sparse_method linear = {
    .name = "della_linear", .sparsify = TM_SPARSIFY_CUSTOM, .consensus = TM_CONSENSUS_LINEAR,
    .p_weights = P_WEIGHTS, .p_lambda = P_LAMBDA, .p_density = P_DENSITY, .p_normalize = P_NORMALIZE,
    .p_rescale = P_RESCALE, .p_seed = P_SEED, .p_gamma = -1, .p_sign = -1, .p_merge_func = -1,
    .custom = &magprune,
};
static const tm_sparse_method ties = {
    .name = "della", .sparsify = TM_SPARSIFY_CUSTOM, .consensus = TM_CONSENSUS_TIES,
    .p_weights = P_WEIGHTS, .p_lambda = P_LAMBDA, .p_density = P_DENSITY, .p_normalize = P_NORMALIZE,
    .p_rescale = P_RESCALE, .p_seed = P_SEED, .p_gamma = -1, .p_sign = P_SIGN, .p_merge_func = -1,
    .custom = &magprune,
};

SPARSE_ENTRY_CALLBACKS(linear, linear)
SPARSE_ENTRY_CALLBACKS(ties, ties)

/* density < 1 needs density ± epsilon inside (0, 1), as mergekit's della_magprune. */
static tm_status check_band(double density, double epsilon, const char *tensor, size_t input, tm_error *err) {
    if (density >= 1 || (density + epsilon < 1 && density - epsilon > 0)) return TM_OK;
    if (tensor)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "tensor '%s': density ± epsilon: %g ± %g leaves (0, 1) (input %zu): keep probabilities "
                            "must stay strictly between 0 and 1",
                            tensor, density, epsilon, input);
    return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                        "density ± epsilon: %g ± %g leaves (0, 1) (input %zu): keep probabilities must stay strictly "
                        "between 0 and 1",
                        density, epsilon, input);
}

static double value_of(const tm_param_values *p, int j, size_t i) {
    return p->values[p->at[j] + (p->count[j] > 1 ? i : 0)];
}

static tm_status check_params(const tm_param_values *p, tm_error *err) {
    for (size_t i = 0; i < p->n_inputs; i++) {
        tm_status st = check_band(value_of(p, P_DENSITY, i), value_of(p, P_EPSILON, i), NULL, i, err);
        if (st) return st;
    }
    return TM_OK;
}

/* Per-tensor values (recipes' filters) are checked again, naming the tensor. */
static tm_status check_tensor(const tm_method_tensor *t, tm_error *err) {
    if (geometry_of(t).len > UINT32_MAX) /* a sort word holds the place in 32 bits */
        return tm_error_set(err, TM_ERROR_UNSUPPORTED, "tensor '%s': della ranks fibres of at most 2^32 - 1 elements",
                            t->name);
    for (size_t j = 0; j < t->n; j++) {
        tm_status st = check_band(tm_tensor_param(t, P_DENSITY, t->input[j]), tm_tensor_param(t, P_EPSILON, t->input[j]),
                                  t->name, t->input[j], err);
        if (st) return st;
    }
    return TM_OK;
}

static tm_status della_linear_check(const tm_param_values *p, tm_error *err) {
    tm_status st = check_params(p, err);
    return st ? st : linear_check(p, err);
}
static tm_status della_ties_check(const tm_param_values *p, tm_error *err) {
    tm_status st = check_params(p, err);
    return st ? st : ties_check(p, err);
}
static tm_status della_linear_prepare(const tm_method_tensor *t, double *state, tm_error *err) {
    tm_status st = check_tensor(t, err);
    return st ? st : linear_prepare(t, state, err);
}
static tm_status della_ties_prepare(const tm_method_tensor *t, double *state, tm_error *err) {
    tm_status st = check_tensor(t, err);
    return st ? st : ties_prepare(t, state, err);
}

const tm_method tm_method_della = {
    .name = "della",
    .summary = "θ = b + λ · TIES consensus of wᵢ rescale(mask(θᵢ − b)), kept with probabilities rising with "
               "|θᵢ − b|'s rank along dim 1 (DELLA)",
    .params = ties_params,
    .n_params = sizeof ties_params / sizeof *ties_params,
    TM_SPARSE_METHOD_FIELDS(ties, della_ties, della_ties),
};

const tm_method tm_method_della_linear = {
    .name = "della_linear",
    .summary = "θ = b + λ Σ wᵢ rescale(mask(θᵢ − b)), kept with probabilities rising with |θᵢ − b|'s rank along "
               "dim 1 (DELLA)",
    .params = linear_params,
    .n_params = sizeof linear_params / sizeof *linear_params,
    TM_SPARSE_METHOD_FIELDS(linear, della_linear, della_linear),
};
