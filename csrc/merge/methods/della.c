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
 * whole tensor are stored, one bit per element per input. The norms (same pass) and the apply
 * read them. Memory: n·numel/8 bytes of bits, 8 bytes per element of a slab for the |δ| keys,
 * 8 per fibre element for the fibre's keys and sort, and 3 × CHUNK doubles. C11. */
#include "merge/methods/methods.h"
#include "merge/methods/sparse.h"
#include "merge/methods/weights.h"

#include <math.h>
#include <string.h>

#include "merge/hot.h"
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
/* Fibres up to this long are sorted by insertion, longer ones by radix (the same order). */
#define SHORT_FIBRE 48

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

/* One element of a fibre being sorted: its |δ| key and its place in the fibre. */
typedef struct ranked {
    uint64_t key;
    uint64_t at;
} ranked;

static size_t align8(size_t b) { return (b + 7) & ~(size_t)7; }
static size_t bits_bytes(uint64_t numel) { return align8((size_t)((numel + 7) / 8)); }

/* The sparsifier's memory: n bit masks, the slab's keys (inner > 1: fibres are strided; else
 * the keys go straight into the fibre), a fibre's (key, index) pairs twice for the sort, the
 * chunk buffers. */
static size_t slab_bytes(const geometry *g) { return g->inner > 1 ? g->slab * sizeof(uint64_t) : 0; }

typedef struct area {
    uint8_t *bits;
    uint64_t *slab;
    ranked *fibre, *tmp;
    double *x, *b, *k;
} area;

static area area_of(const tm_method_tensor *t, const geometry *g, uint8_t *mem) {
    area a;
    a.bits = mem;
    mem += t->n * bits_bytes(t->numel);
    a.slab = (uint64_t *)mem;
    mem += slab_bytes(g);
    a.fibre = (ranked *)mem;
    a.tmp = a.fibre + g->len;
    mem += 2 * g->len * sizeof(ranked);
    a.x = (double *)mem;
    a.b = a.x + CHUNK;
    a.k = a.b + CHUNK;
    return a;
}

static size_t bytes(const tm_method_tensor *t) {
    const geometry g = geometry_of(t);
    return t->n * bits_bytes(t->numel) + slab_bytes(&g) + 2 * g.len * sizeof(ranked) + 3 * CHUNK * sizeof(double);
}

/* keys[e] = the bits of |x − b| (topk.h's key: monotone in |δ|, NaN above every number). */
TM_HOT static void keys_of(uint64_t *restrict keys, const double *restrict x, const double *restrict b, size_t count) {
    for (size_t e = 0; e < count; e++) keys[e] = tm_topk_key(x[e] - b[e]);
}

/* Sorts v[0, len) by key ascending, stably (v comes in fibre order, so among equal keys the
 * lower index stays first); tmp: len more. Returns the sorted array (v or tmp). Insertion for
 * short fibres; else LSD radix by bytes, all histograms in one read, skipping the bytes every
 * key shares. */
static ranked *sort_fibre(ranked *v, ranked *tmp, size_t len) {
    if (len <= SHORT_FIBRE) {
        for (size_t i = 1; i < len; i++) {
            const ranked x = v[i];
            size_t j = i;
            for (; j > 0 && v[j - 1].key > x.key; j--) v[j] = v[j - 1];
            v[j] = x;
        }
        return v;
    }
    static const size_t digits = 8;
    size_t count[8][256];
    memset(count, 0, sizeof count);
    for (size_t i = 0; i < len; i++)
        for (size_t d = 0; d < digits; d++) count[d][(v[i].key >> (8 * d)) & 0xff]++;
    for (size_t d = 0; d < digits; d++) {
        const unsigned shift = (unsigned)(8 * d);
        if (count[d][(v[0].key >> shift) & 0xff] == len) continue; /* one value of this byte */
        size_t at = 0;
        for (size_t c = 0; c < 256; c++) {
            const size_t k = count[d][c];
            count[d][c] = at;
            at += k;
        }
        for (size_t i = 0; i < len; i++) tmp[count[d][(v[i].key >> shift) & 0xff]++] = v[i];
        ranked *swap = v;
        v = tmp;
        tmp = swap;
    }
    return v;
}

static void set_bit(uint8_t *bits, uint64_t i, int v) {
    if (v) bits[i >> 3] |= (uint8_t)(1u << (i & 7));
}

/* Ranks the inner fibres of slab o of input x and sets their keep bits. */
static void rank_slab(const tm_method_tensor *t, const geometry *g, const area *a, size_t j,
                      const tm_sparse_input *x, uint64_t o) {
    const uint64_t start = o * g->slab, len = g->len;
    for (uint64_t e = 0; e < g->slab; e += CHUNK) {
        const size_t c = (size_t)(g->slab - e < CHUNK ? g->slab - e : CHUNK);
        tm_kernel_load_f64(&t->in[j], start + e, c, a->x, a->k);
        tm_kernel_load_f64(t->base, start + e, c, a->b, a->k);
        if (g->inner > 1) {
            keys_of(a->slab + e, a->x, a->b, c);
        } else {
            for (size_t i = 0; i < c; i++) a->fibre[e + i] = (ranked){tm_topk_key(a->x[i] - a->b[i]), e + i};
        }
    }
    const double lo = x->density - tm_tensor_param(t, P_EPSILON, t->input[j]);
    const double two_eps = 2 * tm_tensor_param(t, P_EPSILON, t->input[j]);
    uint8_t *bits = a->bits + j * bits_bytes(t->numel);
    for (uint64_t q = 0; q < g->inner; q++) {
        if (g->inner > 1)
            for (uint64_t r = 0; r < len; r++) a->fibre[r] = (ranked){a->slab[q + r * g->inner], r};
        const ranked *order = sort_fibre(a->fibre, a->tmp, (size_t)len);
        for (uint64_t pos = 0; pos < len; pos++) {
            /* mergekit: rank_norm = (rank − min rank)/(max rank − min rank), p = (d − ε) + rank_norm·2·ε */
            const double p = len == 1 ? x->density : lo + (double)pos / (double)(len - 1) * two_eps;
            const uint64_t i = start + q + order[pos].at * g->inner;
            set_bit(bits, i, tm_random_keep(x->key, i, tm_random_threshold(p)));
        }
    }
}

/* Ranks every slab whose first element is in [begin, begin + count): blocks come in order, so
 * the bits of a block are all known once it is seen. */
static void pass(const tm_method_tensor *t, const tm_sparse_input *in, uint8_t *mem, uint64_t begin, size_t count) {
    const geometry g = geometry_of(t);
    if (g.slab == 0) return;
    const area a = area_of(t, &g, mem);
    for (uint64_t o = (begin + g.slab - 1) / g.slab; o * g.slab < begin + count; o++)
        for (size_t j = 0; j < t->n; j++)
            if (in[j].density < 1) rank_slab(t, &g, &a, j, &in[j], o);
}

TM_HOT static void unpack(const uint8_t *restrict bits, uint64_t begin, size_t count, uint8_t *restrict keep) {
    for (size_t e = 0; e < count; e++) keep[e] = (uint8_t)((bits[(begin + e) >> 3] >> ((begin + e) & 7)) & 1);
}

static void keep(const tm_method_tensor *t, size_t j, const tm_sparse_input *x, const uint8_t *mem, uint64_t begin,
                 size_t count, uint8_t *out) {
    if (x->density >= 1) {
        memset(out, 1, count);
        return;
    }
    unpack(mem + j * bits_bytes(t->numel), begin, count, out);
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
