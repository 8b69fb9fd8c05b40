/* A method across hosts (--distributed; docs/distributed.md): what a method that can be computed
 * from sums over the ranks implements (tm_method.cross_rank), and the chained sums it calls.
 *
 * Every rank runs the method on its local inputs with the global view of them: t->input[j] is
 * the input's index in the global list (rank 0's inputs first, then rank 1's, ...), t->params
 * the parameters of all N = t->n_inputs global inputs (per-input values indexed by that global
 * index), t->n the local inputs holding the tensor (0 on a rank without inputs, which still runs
 * every exchange). Every rank has the base (t->base).
 *
 * A chained sum is the single-host accumulation order spread over the ranks: tm_xr_receive gives
 * the running sum of the ranks before this one (or says this rank is the first, which then
 * initialises the buffer as one host would), the method adds its inputs' terms in order, then
 * tm_xr_deliver hands it on and brings the total to every rank (TM_XR_ALL: e.g. TIES' elected
 * signs) or to the ranks that write the output (TM_XR_OUTPUT: once per block, the last exchange
 * of the block). Every rank calls the same exchanges in the same order. C11. */
#ifndef TM_MERGE_METHOD_XR_H
#define TM_MERGE_METHOD_XR_H

#include "merge/method.h"

#ifdef __cplusplus
extern "C" {
#endif

struct tm_cross_rank;

/* The engine's side, given to the method's callbacks. */
typedef struct tm_xr {
    const struct tm_cross_rank *cr;
    tm_method_memory *memory; /* the thread's memory for the method's exchange buffers (beside t->memory) */
} tm_xr;

enum { TM_XR_ALL, TM_XR_OUTPUT };

/* buf[0 .. count) = the running sum of the ranks before this one; *first = 1 on the first rank
 * (buf untouched). */
tm_status tm_xr_receive(const tm_xr *x, double *buf, size_t count, int *first, tm_error *err);
/* Hands buf (the running sum with this rank's terms) on; on return buf holds the total on every
 * rank (TM_XR_ALL) or, with *has_total = 1, on the ranks that write the output (TM_XR_OUTPUT). */
tm_status tm_xr_deliver(const tm_xr *x, double *buf, size_t count, int to, int *has_total, tm_error *err);

/* values[0 .. len) = the sum over the ranks, in rank order, of each rank's values, on every rank
 * (per-tensor statistics: any length, in pieces of a block; tmp: a block of doubles). */
tm_status tm_xr_sum_all(const tm_xr *x, double *values, double *tmp, size_t len, tm_error *err);

/* sums[0 .. count) = prev + Σⱼ w[j]·in[j] over elements [begin, begin + count), accumulated as
 * tm_kernel_weighted_sum does on one host (prev NULL on the first rank: the first term starts
 * the sum; with no term either, −0.0, which adds to anything exactly). wide: TM_FLOAT64, or
 * TM_COMPLEX128 (two doubles per element). scratch: the kernel's (2·count doubles). */
void tm_xr_weighted_add(const tm_view *in, const double *w, size_t n, uint64_t begin, size_t count,
                        const double *prev, tm_dtype wide, double *sums, double *scratch);
/* out (out_dtype) = 1·sums + wb·base over elements [begin, begin + count): the single-host sum's
 * last term and its one rounding (sums: the block's float64 totals from element begin). */
void tm_xr_weighted_finish(const double *sums, const tm_view *base, double wb, uint64_t begin, size_t count,
                           tm_dtype out_dtype, void *out, double *scratch);

/* every = t as if this rank held every global input (every.n = t->n_inputs, input = all: the
 * t->n_inputs entries 0, 1, ...): for per-tensor coefficients over all inputs (normalised weights). */
void tm_xr_every_input(const tm_method_tensor *t, tm_method_tensor *every, size_t *all);

typedef struct tm_method_xr {
    /* Optional: refuses parameter values that cannot be computed across hosts (one line). */
    tm_status (*check)(const tm_param_values *p, tm_error *err);
    /* Per tensor, instead of the method's prepare (weights normalised over all N inputs). */
    tm_status (*prepare)(const tm_method_tensor *t, double *state, const tm_xr *x, tm_error *err);
    /* Optional: the whole-tensor statistics across ranks, instead of the method's reduce passes
     * (which run locally otherwise). scratch: TM_METHOD_SCRATCH × TM_BLOCK_ELEMS doubles. */
    tm_status (*reduce)(const tm_method_tensor *t, double *state, const tm_xr *x, double *scratch, tm_error *err);
    /* Elements [begin, begin + count): the exchanges, ending with one TM_XR_OUTPUT; on a rank
     * that has the total, the merged values into out (out_dtype), rounded once. */
    tm_status (*apply)(const tm_method_tensor *t, const double *state, const tm_xr *x, uint64_t begin, size_t count,
                       void *out, double *scratch, tm_error *err);
} tm_method_xr;

#ifdef __cplusplus
}
#endif
#endif
