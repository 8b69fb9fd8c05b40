/* What a merge will write, decided before any tensor byte is read: which names (key policy),
 * checked for compatible shapes and dtypes, grouped into output storages ("units"): a tensor on
 * its own, or a storage shared identically by several tensors in every input (tied weights,
 * views), which is merged once so the views are rebuilt unchanged. C11. */
#ifndef TM_MERGE_PLAN_H
#define TM_MERGE_PLAN_H

#include "checkpoint/checkpoint_internal.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_unit {
    size_t *keys;      /* indices into plan keys, in key order */
    size_t n_keys;
    int whole_storage; /* merge the shared storage as a flat array */
    int floating;
    tm_dtype out_dtype;
    int64_t numel;     /* elements written for this unit */
} tm_unit;

typedef struct tm_plan {
    size_t n_inputs;
    const char **keys; /* borrowed from the checkpoints */
    size_t n_keys;
    int64_t *where;    /* where[k * n_inputs + i]: tensor index of key k in input i, or -1 */
    tm_unit *units;
    size_t n_units;
    int64_t *alias_of; /* formats without shared storage: alias_of[k] = the key k is the same
                          tensor as (tied weights), written once; -1 otherwise */
    size_t *unit_of;   /* unit_of[k]: the unit writing key k; SIZE_MAX for aliases */
    int64_t *base_where; /* with a base model: base_where[k], key k's tensor index in it */
    int dequantize;    /* tm_merge_options.dequantize: quantized tensors merge as real values */
} tm_plan;

/* split_shared: the output format cannot share storages (safetensors): tensors sharing a storage
 * become units of their own, except exact aliases, which are recorded in alias_of. */
tm_status tm_plan_build(tm_plan *plan, tm_checkpoint *const *inputs, size_t n,
                        const tm_merge_options *opts, int split_shared, tm_error *err);
void tm_plan_free(tm_plan *plan);

/* Checks a base model against the plan: it holds every key with the inputs' shape (and, for
 * storages merged whole, the inputs' layout); fills base_where. */
tm_status tm_plan_check_base(tm_plan *plan, tm_checkpoint *const *inputs, tm_checkpoint *base, tm_error *err);

static inline int64_t tm_plan_where(const tm_plan *p, size_t k, size_t i) {
    return p->where[k * p->n_inputs + i];
}

/* The output tensor for key k (contiguous for single units, the inputs' view for shared ones). */
void tm_plan_output_layout(const tm_plan *plan, tm_checkpoint *const *inputs, size_t k,
                           int64_t *stride, int64_t *storage_offset);

#ifdef __cplusplus
}
#endif
#endif
