/* The engine's one hook for merges across hosts (distributed.c sets it). A floating tensor's
 * block is a float64 sum over the global input list (rank 0's inputs, then rank 1's, ...),
 * accumulated in that order across the ranks, as one host accumulates it: before() gives the
 * running sum of the ranks before this one, this rank adds its terms, pass() hands the running
 * sum on, total() gives the total, which the engine rounds once to the output dtype. So the
 * output is the single-host merge's, bit for bit. Two users: the averages, which distributed.c
 * translates into weighted_average (Σ state[j]·in[j]; the first rank computes up to `ahead`
 * blocks of a tensor ahead of the total it waits for, so the ranks work on different blocks at
 * once), and the methods with their own cross-rank code (method_xr.h: params set), which chain
 * their sums through before() and deliver(). The pipeline runs one merging thread then, so
 * every rank exchanges its blocks in the plan's order. C11. */
#ifndef TM_MERGE_CROSS_RANK_H
#define TM_MERGE_CROSS_RANK_H

#include <stddef.h>

#include "core/error.h"
#include "torchmerge.h"

#ifdef __cplusplus
extern "C" {
#endif

struct merge_ctx;

typedef struct tm_cross_rank {
    /* prev[0 .. count) = the running sum of the ranks before this one for the block; *has_prev = 0
     * on the first rank (nothing received). count: doubles (two per complex element). */
    tm_status (*before)(void *user, double *prev, size_t count, int *has_prev, tm_error *err);
    /* sums[0 .. count) = prev + this rank's terms: handed on to the next rank. */
    tm_status (*pass)(void *user, const double *sums, size_t count, tm_error *err);
    /* Then, once per block in order: sums = the block's total over every rank on a rank that
     * writes the output (unchanged on the others). */
    tm_status (*total)(void *user, double *sums, size_t count, tm_error *err);
    int first;    /* 1: this rank starts the chain (no before()) */
    size_t ahead; /* the first rank: blocks passed on before it waits for a total (>= 1) */
    /* After the plan is built, before any tensor is read: the ranks agree on it. */
    tm_status (*agree)(void *user, const struct merge_ctx *c, tm_format format, tm_error *err);
    int discard_output; /* 1: this rank reduces with the others but writes nothing */
    /* The methods computed through their own code across hosts (tm_method.cross_rank,
     * method_xr.h): deliver hands a running sum (received with before()) on and brings the total
     * to every rank (TM_XR_ALL) or to the writing ranks (TM_XR_OUTPUT, *has_total = 1 there);
     * params: the parameters of the global input list (NULL for the averages, which distributed.c
     * translates); offset: this rank's first input in that list; no_inputs: this rank holds no
     * input (its one local "input" is the base, the plan's source only). */
    tm_status (*deliver)(void *user, double *buf, size_t count, int to, int *has_total, tm_error *err);
    const struct tm_param_values *params;
    size_t offset;
    int no_inputs;
    /* Optional: a non-floating block's bytes, replaced by rank 0's (the global first input's), so
     * that every writer takes them from where one host would (--output-on all without a base). */
    tm_status (*share)(void *user, void *bytes, size_t len, tm_error *err);
    void *user;
} tm_cross_rank;

/* Runs every unit of c's plan through the pipeline in plan order, writing nothing (a rank that
 * only contributes its sums). */
tm_status tm_cross_rank_discard(struct merge_ctx *c, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
