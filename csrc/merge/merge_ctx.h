/* The state of one tm_merge_files call, shared by its parts: the entry point (merge_files.c)
 * fills it, the pipeline and the per-unit arithmetic read it, the sinks write from it. Internal
 * to the merge engine. C11. */
#ifndef TM_MERGE_MERGE_CTX_H
#define TM_MERGE_MERGE_CTX_H

#include "merge/cross_rank.h"
#include "merge/method.h"
#include "merge/plan.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Elements per block: large enough for long sequential writes, small enough for the cache. A
 * block buffer holds TM_BLOCK_ELEMS of the widest dtype (complex128, 16 bytes). */
#define TM_BLOCK_ELEMS ((size_t)1 << 16)
#define TM_BLOCK_BYTES (TM_BLOCK_ELEMS * 16)

/* Names for one warning line: the first ten, then only counted. */
typedef struct tm_name_list {
    char text[768];
    size_t count;
} tm_name_list;
void tm_name_list_add(tm_name_list *l, const char *name);

typedef struct merge_ctx {
    const tm_merge_options *o; /* the caller's options over the defaults (struct_size applied) */
    const char *label;         /* what the output records as its method ("greedy_soup"), or NULL */
    tm_checkpoint **in;
    tm_checkpoint *base;    /* the base model, or NULL */
    size_t n;
    const tm_method *method;
    tm_param_values params; /* the method's parameters for the whole merge: merge_unit.c */
    tm_plan plan;
    double *model;          /* the method's model-wide state (model_passes.c), or NULL */
    tm_mask_writer *masks;  /* the --masks-out file being written (mask_writer.c), or NULL */
    tm_profile prof;
    tm_name_list differing; /* non-floating tensors whose values differ between inputs */
    tm_name_list ignored;   /* TorchScript output: tensors the module has no place for */
    const tm_cross_rank *xr; /* a merge across hosts: the block sums' reduction, or NULL */
} merge_ctx;

/* Monotonic seconds, for the profile. */
double tm_merge_now(void);
/* Tensor idx of ck (zeroed when out of range). */
tm_tensor_info tm_merge_tensor(tm_checkpoint *ck, int64_t idx);
/* Key k as the first input holding it has it: the output's shape comes from there. */
tm_tensor_info tm_merge_key_tensor(const merge_ctx *c, size_t k);

#ifdef __cplusplus
}
#endif
#endif
