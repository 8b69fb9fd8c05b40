/* The sparse methods' callbacks across hosts (sparse_cross_rank.c; method_xr.h), and a table
 * entry's tm_method_xr PREFIX##_xr over the method's descriptor DESC (sparse.h's
 * SPARSE_ENTRY_CALLBACKS defines it). C11. */
#ifndef TM_MERGE_METHODS_SPARSE_CROSS_RANK_H
#define TM_MERGE_METHODS_SPARSE_CROSS_RANK_H

#include "merge/cross_rank.h"
#include "merge/method_xr.h"
#include "merge/methods/sparse.h"

/* tm_sparse_prepare, with a linear consensus's weights normalised over every rank's inputs. */
tm_status tm_sparse_xr_prepare(const tm_sparse_method *s, const tm_method_tensor *t, double *state, const tm_xr *x,
                               tm_error *err);
/* A block: the linear sum, or TIES' two rounds, chained in the global input order. */
tm_status tm_sparse_xr_apply(const tm_sparse_method *s, const tm_method_tensor *t, const double *state,
                             const tm_xr *x, uint64_t begin, size_t count, void *out, double *scratch, tm_error *err);

#define SPARSE_XR_CALLBACKS(PREFIX, DESC)                                                           \
    static tm_status PREFIX##_xr_prepare(const tm_method_tensor *t, double *state, const tm_xr *x, tm_error *err) { \
        return tm_sparse_xr_prepare(&DESC, t, state, x, err);                                        \
    }                                                                                                \
    static tm_status PREFIX##_xr_apply(const tm_method_tensor *t, const double *state, const tm_xr *x, uint64_t begin, \
                                       size_t count, void *out, double *scratch, tm_error *err) {    \
        return tm_sparse_xr_apply(&DESC, t, state, x, begin, count, out, scratch, err);              \
    }                                                                                                \
    static const tm_method_xr PREFIX##_xr = {.prepare = PREFIX##_xr_prepare, .apply = PREFIX##_xr_apply};

#endif
