/* Generalized task arithmetic (mergekit's GeneralizedTaskArithmeticMerge), implemented once for
 * the methods that sparsify task vectors: for each input j holding the tensor,
 *   δⱼ = θⱼ − b;  δⱼ' = rescaleⱼ(maskⱼ ⊙ δⱼ)   (the sparsification: which entries are kept)
 * then a consensus of the weighted δⱼ':
 *   linear: θ = b + Σ λwⱼ δⱼ'            (wⱼ divided by Σ w with normalize; task arithmetic)
 *   ties:   θ = b + λ · consensus(wⱼδⱼ')  (consensus.h: sign election and disjoint mean)
 * Sparsifications:
 *   MAGNITUDE  the k = ⌊densityⱼ·numel⌋ entries of largest |δ| (ties at equal |δ|: the lower flat
 *              index first), exactly, by the streaming selection of topk.h;
 *   OUTLIERS   mergekit's magnitude_outliers (Breadcrumbs): in the same order, skip the first
 *              ⌊gamma·numel⌋ and keep the next ⌊density·numel⌋ (two selections);
 *   RANDOM     DARE: keep with probability density, by merge/random.h's counter-based mask;
 *   CUSTOM     a mask of the method's own (tm_sparsifier: DELLA's magnitude-ranked probabilities),
 *              computed in one pass of its own over the tensor.
 * Rescale (l1 | inverse | none): × ‖δⱼ‖₁/‖kept δⱼ‖₁ (0 when nothing is kept), ÷ densityⱼ, or 1.
 * The reduce passes: the selections' passes (topk.h), then one pass of the L1 norms when rescale
 * is l1 (CUSTOM: its pass, which also sums the norms). Each method file declares its parameters and a tm_sparse_method naming them, and its
 * table entry's callbacks call the tm_sparse_* below. C11. */
#ifndef TM_MERGE_METHODS_SPARSE_H
#define TM_MERGE_METHODS_SPARSE_H

#include <math.h>
#include <string.h>

#include "merge/method.h"
#include "merge/method_xr.h"
#include "merge/methods/topk.h"

enum { TM_SPARSIFY_MAGNITUDE, TM_SPARSIFY_OUTLIERS, TM_SPARSIFY_RANDOM, TM_SPARSIFY_CUSTOM };
enum { TM_CONSENSUS_LINEAR, TM_CONSENSUS_TIES };
enum { TM_RESCALE_L1, TM_RESCALE_INVERSE, TM_RESCALE_NONE }; /* the rescale choices, in order */

/* The family's parameters, declared once (with weights.h's weights, lambda and normalize). */
#define TM_DECL_DENSITY(req, dflt, what)                                                            \
    {.name = "density", .kind = TM_PARAM_NUMBER, .per_input = 1, .required = req, .default_value = dflt, \
     .min = 0, .max = 1, .min_exclusive = 1, .help = what}
#define TM_DECL_RESCALE(dflt)                                                                       \
    {.name = "rescale", .kind = TM_PARAM_CHOICE, .choices = "l1|inverse|none", .default_value = dflt, \
     .help = "how kept elements are scaled up: keep the L1 norm, divide by density, or not"}
/* DARE's: mergekit's default l1, FusionBench's ÷ density (its rescale: true) in FusionBench-shaped
 * recipes. */
#define TM_DECL_DARE_RESCALE                                                                        \
    {.name = "rescale", .kind = TM_PARAM_CHOICE, .choices = "l1|inverse|none", .default_value = "l1", \
     .fusionbench_default = "inverse",                                                              \
     .help = "how kept elements are scaled up: keep the L1 norm, divide by density, or not"}
#define TM_DECL_SEED                                                                                \
    {.name = "seed", .kind = TM_PARAM_INTEGER, .default_value = "0", .min = 0, .max = 9007199254740992.0, \
     .help = "the random masks' seed (they are a function of seed, input, tensor name, element)"}
#define TM_DECL_MAJORITY_SIGN                                                                       \
    {.name = "majority_sign", .aliases = {"consensus_method"}, .kind = TM_PARAM_CHOICE, .choices = "sum|count", \
     .default_value = "sum", .help = "elect each element's sign from the sum of the weighted values or the count of signs"}
#define TM_DECL_GAMMA                                                                               \
    {.name = "gamma", .kind = TM_PARAM_NUMBER, .per_input = 1, .default_value = "0.01", .min = 0, .max = 1, \
     .max_exclusive = 1, .help = "the fraction of largest-magnitude elements dropped as outliers"}

typedef struct tm_sparse_input tm_sparse_input;

/* a where keep is 1, else +0, by masking its bits: a branch on a random mask mispredicts half the
 * time. */
static inline double tm_kept_or_zero(double a, uint8_t keep) {
    uint64_t u;
    memcpy(&u, &a, sizeof u);
    u &= -(uint64_t)keep;
    double k;
    memcpy(&k, &u, sizeof k);
    return k;
}

/* The L1 norms' order of additions, fixed so that every machine, thread count and clone gets the
 * same bits: element i of a block (TM_BLOCK_ELEMS elements from a multiple of it) adds into lane
 * i mod 8, in element order; at the block's end its lanes are added up as below and the result
 * added to the norm, blocks in order. */
#define TM_L1_LANES 8
static inline double tm_l1_lanes_sum(const double *l) {
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* The lanes' loop, written once for every L1 norm: count values from a multiple of 8, element e
 * adding |VALUE(x, b, e)| (topk.h's TM_VALUE_* forms) to all[e mod 8], and to kept[e mod 8] where
 * keep[e]. The lanes are copied to locals so that they stay in registers and the loop vectorises. */
#define TM_L1_LANES_LOOP(x, b, keep, count, all, kept, VALUE)                                      \
    do {                                                                                           \
        double a_[TM_L1_LANES], s_[TM_L1_LANES];                                                   \
        memcpy(a_, (all), sizeof a_);                                                              \
        memcpy(s_, (kept), sizeof s_);                                                             \
        size_t e_ = 0;                                                                             \
        for (; e_ + TM_L1_LANES <= (count); e_ += TM_L1_LANES)                                     \
            for (size_t l_ = 0; l_ < TM_L1_LANES; l_++) {                                          \
                const double v_ = fabs(VALUE(x, b, e_ + l_));                                      \
                a_[l_] += v_;                                                                      \
                s_[l_] += tm_kept_or_zero(v_, (keep)[e_ + l_]);                                    \
            }                                                                                      \
        for (; e_ < (count); e_++) {                                                               \
            const double v_ = fabs(VALUE(x, b, e_));                                               \
            a_[e_ % TM_L1_LANES] += v_;                                                            \
            s_[e_ % TM_L1_LANES] += tm_kept_or_zero(v_, (keep)[e_]);                               \
        }                                                                                          \
        memcpy((all), a_, sizeof a_);                                                              \
        memcpy((kept), s_, sizeof s_);                                                             \
    } while (0)

/* A sparsification of the method's own (TM_SPARSIFY_CUSTOM). The core gives it bytes(t) of the
 * thread's method memory (mem below: 8-byte aligned, zeroed at prepare, kept until the last
 * apply), calls pass on every block of the tensor in order in one reduce pass (in[j]: the
 * inputs' state, density and mask key; with norms, pass also sums the inputs' L1 norms, all and
 * kept, into in[j].l1_all and l1_kept in the order above), and asks keep for a block's mask of
 * input j in the apply. */
typedef struct tm_sparsifier {
    size_t (*bytes)(const tm_method_tensor *t);
    void (*pass)(const tm_method_tensor *t, tm_sparse_input *in, int norms, uint8_t *mem, uint64_t begin,
                 size_t count);
    void (*keep)(const tm_method_tensor *t, size_t j, const tm_sparse_input *x, const uint8_t *mem, uint64_t begin,
                 size_t count, uint8_t *keep);
} tm_sparsifier;

/* A method of the family: how it sparsifies, its consensus, and where its parameters are (an
 * index into its params, or -1 when it has no such parameter). */
typedef struct tm_sparse_method {
    const char *name;
    int sparsify, consensus;
    int p_weights, p_lambda, p_density, p_normalize;
    int p_rescale;     /* -1: none */
    int p_seed;        /* RANDOM, CUSTOM: the masks' seed (-1: none) */
    int p_gamma;       /* OUTLIERS */
    int p_sign;        /* ties: majority_sign sum|count (-1: sum) */
    int p_merge_func;  /* ties: merge_func mean|sum|max (-1: from normalize) */
    const tm_sparsifier *custom; /* CUSTOM */
} tm_sparse_method;

/* Per input holding the tensor (method state: state_per_input doubles each). */
struct tm_sparse_input {
    double coef;            /* linear: λ·wⱼ (normalised); ties: wⱼ */
    double density;
    double l1_all, l1_kept; /* rescale l1: the reduce pass's norms */
    uint64_t key, threshold; /* RANDOM (key: CUSTOM too): the mask's key and integer threshold */
    tm_topk sel[2];          /* MAGNITUDE: sel[0] keeps; OUTLIERS: sel[1] keeps minus sel[0] */
};

/* The tensor's state before the inputs'. */
typedef struct tm_sparse_header {
    int mode;     /* what the current reduce pass does */
    int rescale, sign_rule, agg;
    double lambda;
} tm_sparse_header;

#define TM_SPARSE_DOUBLES(T) ((sizeof(T) + sizeof(double) - 1) / sizeof(double))
#define TM_SPARSE_STATE_FIXED TM_SPARSE_DOUBLES(tm_sparse_header)
#define TM_SPARSE_STATE_PER_INPUT TM_SPARSE_DOUBLES(tm_sparse_input)

tm_status tm_sparse_prepare(const tm_sparse_method *s, const tm_method_tensor *t, double *state, tm_error *err);
void tm_sparse_reduce(const tm_sparse_method *s, const tm_method_tensor *t, double *state, uint64_t begin,
                      size_t count, double *scratch);
tm_status tm_sparse_reduce_end(const tm_sparse_method *s, const tm_method_tensor *t, double *state, int *again,
                               tm_error *err);
void tm_sparse_apply(const tm_sparse_method *s, const tm_method_tensor *t, const double *state, uint64_t begin,
                     size_t count, void *out, double *scratch);

/* Blocks are worked in chunks of this many elements, so that every input's row of a chunk stays
 * in the L1 cache between the loops that read it (4 inputs' rows of 8 KiB; 4096 was ~5% slower). */
#define TM_SPARSE_CHUNK 1024

/* The weighted, sparsified δ of every input over elements [c0, c0 + m) of the block at begin
 * (m ≤ TM_SPARSE_CHUNK; b: the block's base in float64; k: count doubles of scratch): ties, rows
 * of m doubles in the method memory, returned; linear, their terms added into acc[c0, c0 + m).
 * The keep bytes of input j stay in the method memory for the block (the masks' report). */
double *tm_sparse_rows(const tm_sparse_method *s, const tm_method_tensor *t, const double *state, uint64_t begin,
                       size_t c0, size_t m, const double *b, double *k, double *acc);

/* TIES' score S (consensus.h) of the same elements into out[0, m): tm_consensus_score of the rows,
 * fused (no rows) over 1 to 4 float32 inputs. */
void tm_sparse_score(const tm_sparse_method *s, const tm_method_tensor *t, const double *state, uint64_t begin,
                     size_t c0, size_t m, const double *b, double *k, double *out);

/* The merge-wide checks of the family: weights (with normalize on a linear consensus), and
 * gamma + density ≤ 1. */
tm_status tm_sparse_check(const tm_sparse_method *s, const tm_param_values *p, tm_error *err);

/* Per-tensor consensus value of merge_func / normalize (TM_AGG_*). */
int tm_sparse_agg(const tm_sparse_method *s, const double *params, const size_t *param_at);

/* A table entry's callbacks, PREFIX_check/prepare/reduce/reduce_end/apply, calling the above
 * with the method's descriptor DESC. */
#define SPARSE_ENTRY_CALLBACKS(PREFIX, DESC)                                                        \
    static tm_status PREFIX##_check(const tm_param_values *p, tm_error *err) { return tm_sparse_check(&DESC, p, err); } \
    static tm_status PREFIX##_prepare(const tm_method_tensor *t, double *state, tm_error *err) {      \
        return tm_sparse_prepare(&DESC, t, state, err);                                              \
    }                                                                                                \
    static void PREFIX##_reduce(const tm_method_tensor *t, double *state, unsigned pass, uint64_t begin, size_t count, \
                                double *scratch) {                                                   \
        (void)pass;                                                                                  \
        tm_sparse_reduce(&DESC, t, state, begin, count, scratch);                                    \
    }                                                                                                \
    static tm_status PREFIX##_reduce_end(const tm_method_tensor *t, double *state, unsigned pass, int *again, \
                                         tm_error *err) {                                            \
        (void)pass;                                                                                  \
        return tm_sparse_reduce_end(&DESC, t, state, again, err);                                    \
    }                                                                                                \
    static void PREFIX##_apply(const tm_method_tensor *t, const double *state, uint64_t begin, size_t count, void *out, \
                               double *scratch) {                                                    \
        tm_sparse_apply(&DESC, t, state, begin, count, out, scratch);                                \
    }                                                                                                \
    SPARSE_XR_CALLBACKS(PREFIX, DESC)

/* The fields of a tm_method every sparse entry shares: a base, any number of inputs, masks, the
 * core's state, and the callbacks CHECK_PREFIX##_check, PREPARE_PREFIX##_prepare and PREFIX##_reduce,
 * _reduce_end, _apply (a method may check or prepare more before the core's). */
#define TM_SPARSE_METHOD_FIELDS(PREFIX, CHECK_PREFIX, PREPARE_PREFIX)                                 \
    .needs_base = 1, .min_inputs = 1, .has_masks = 1, .state_fixed = TM_SPARSE_STATE_FIXED,             \
    .state_per_input = TM_SPARSE_STATE_PER_INPUT, .check = CHECK_PREFIX##_check,                       \
    .prepare = PREPARE_PREFIX##_prepare, .reduce = PREFIX##_reduce, .reduce_end = PREFIX##_reduce_end, \
    .apply = PREFIX##_apply, .cross_rank = &PREFIX##_xr

#include "merge/methods/sparse_cross_rank.h" /* SPARSE_XR_CALLBACKS */

#endif
