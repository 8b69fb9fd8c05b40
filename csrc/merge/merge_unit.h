/* The arithmetic of one output unit (a tensor, or a storage shared by several): the inputs'
 * weights, their normalisation, and the block-by-block weighted sum of floating tensors (or the
 * copy of non-floating ones from the first input). The only merge file that knows what merging
 * computes: the pipeline calls tm_merge_unit per unit and moves the bytes. C11. */
#ifndef TM_MERGE_MERGE_UNIT_H
#define TM_MERGE_MERGE_UNIT_H

#include "merge/kernel.h"
#include "merge/merge_ctx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What one merging thread owns: its scratch and its share of the profile. */
typedef struct tm_merge_worker {
    double *acc;          /* 2 * TM_BLOCK_ELEMS doubles: the float64 (complex128) sums */
    /* One per input, for the unit at hand: */
    double *rule_weights; /* the weights after the per-tensor rule, all inputs */
    double *weights;      /* the inputs holding the unit: their (normalised) weights */
    tm_view *views;       /* and their views */
    int64_t *shapes, *strides; /* 1-d shape and stride of a view over a whole storage */
    double merge_seconds; /* in the arithmetic only, not waiting for a free block */
    size_t merge_calls;
} tm_merge_worker;

tm_status tm_merge_worker_init(tm_merge_worker *w, size_t n_inputs);
void tm_merge_worker_free(tm_merge_worker *w);

/* Where a unit's blocks go, in order. next(user) returns the buffer the next block is computed
 * into (TM_BLOCK_BYTES), or NULL when the merge is cancelled; put(user, block, len) hands on its
 * first len bytes. */
typedef struct tm_block_out {
    void *(*next)(void *user);
    tm_status (*put)(void *user, const void *block, size_t len, tm_error *err);
    void *user;
} tm_block_out;

/* Checks the options' weights and fills c->weights (as given, or 1/n each when none). */
tm_status tm_merge_weights(merge_ctx *c, tm_error *err);

/* Computes unit u into out, block by block. Thread-safe for distinct workers. */
tm_status tm_merge_unit(merge_ctx *c, tm_merge_worker *w, const tm_unit *u, const tm_block_out *out, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
