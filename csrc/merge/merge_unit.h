/* The arithmetic of one output unit (a tensor, or a storage shared by several), as the merge
 * method says: the method's parameters for this tensor (after per-tensor rules), its prepare,
 * reduce and apply steps block by block (floating tensors); non-floating tensors are copied from
 * the first input. The only merge file that calls the method: the pipeline calls tm_merge_unit
 * per unit and moves the bytes. C11. */
#ifndef TM_MERGE_MERGE_UNIT_H
#define TM_MERGE_MERGE_UNIT_H

#include "merge/merge_ctx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What one merging thread owns: its scratch and its share of the profile. */
typedef struct tm_merge_worker {
    double *acc;          /* TM_METHOD_SCRATCH * TM_BLOCK_ELEMS doubles: the methods' scratch */
    double *params;       /* this tensor's parameter values (c->params.n_values) */
    double *state;        /* the method's per-tensor state */
    tm_method_memory memory; /* the method's memory of any size (tm_method_memory_reserve) */
    tm_view *views;       /* one per input, and their 1-d shapes/strides for whole storages */
    int64_t *shape1, *stride1;
    size_t *input;
    /* Quantized inputs with dequantize: their real values (a float64 copy of each input's and the
     * base's tensor, deq_elems apiece, sized at init for the largest quantized unit) and the
     * contiguous strides of those copies. NULL when the merge has none. */
    double *deq;
    size_t deq_elems;
    int64_t (*deq_stride)[TM_MAX_NDIM];
    double merge_seconds; /* in the arithmetic only, not waiting for a free block */
    const tm_cross_rank *xr; /* a merge across hosts (cross_rank.h), or NULL */
    double *xr_sums, *xr_prev; /* then a block's float64 (complex128) sums and the other ranks' running sum */
    uint64_t xr_next;     /* the first rank: the next element of the tensor to compute and pass on */
    size_t *xr_input;     /* a method across hosts: its inputs' global indices (xr.c) */
    tm_method_memory xr_memory; /* and its exchange buffers */
    size_t merge_calls;
} tm_merge_worker;

tm_status tm_merge_worker_init(tm_merge_worker *w, const merge_ctx *c);
void tm_merge_worker_free(tm_merge_worker *w);

/* Where a unit's blocks go, in order. next(user) returns the buffer the next block is computed
 * into (TM_BLOCK_BYTES), or NULL when the merge is cancelled; put(user, block, len) hands on its
 * first len bytes. */
typedef struct tm_block_out {
    void *(*next)(void *user);
    tm_status (*put)(void *user, const void *block, size_t len, tm_error *err);
    void *user;
} tm_block_out;

/* Finds the method of the options and resolves its parameters into c (before any file is
 * opened, so a bad parameter costs nothing). */
tm_status tm_merge_method(merge_ctx *c, tm_error *err);

/* What the method sees of unit u (views into w's arrays; the tensor's parameters in
 * w->params for a floating unit). */
void tm_merge_unit_tensor(const merge_ctx *c, tm_merge_worker *w, const tm_unit *u, tm_method_tensor *t);

/* A floating tensor t with method m: prepare, the reduce passes, then apply block by block into
 * out. Also used on tensors in memory (tm_merge_tensors). */
tm_status tm_merge_floating(const tm_method *m, tm_merge_worker *w, const tm_method_tensor *t,
                            const tm_block_out *out, tm_error *err);

/* A method computed through its own code across hosts (xr.c; method_xr.h): its callbacks when
 * w merges across hosts with global parameters, else NULL; and the global view g of t (input
 * indices in the global list, no inputs on a rank without any) with the exchange context x. */
struct tm_method_xr;
struct tm_xr;
const struct tm_method_xr *tm_xr_method(const tm_method *m, const tm_merge_worker *w);
const tm_method_tensor *tm_xr_tensor(tm_merge_worker *w, const tm_method_tensor *t, tm_method_tensor *g,
                                     struct tm_xr *x);

/* Computes unit u into out, block by block. Thread-safe for distinct workers. */
tm_status tm_merge_unit(merge_ctx *c, tm_merge_worker *w, const tm_unit *u, const tm_block_out *out, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
