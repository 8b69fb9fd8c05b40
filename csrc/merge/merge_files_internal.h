/* tm_merge_files for the library's own callers (greedy soup, recipes): reports through err
 * instead of publishing, and records label as the output's method ("greedy_soup" for a soup
 * whose arithmetic is simple_average). C11. */
#ifndef TM_MERGE_MERGE_FILES_INTERNAL_H
#define TM_MERGE_MERGE_FILES_INTERNAL_H

#include "core/error.h"
#include "merge/cross_rank.h"
#include "torchmerge.h"

#ifdef __cplusplus
extern "C" {
#endif

tm_status tm_merge_files_as(const char *const *inputs, size_t n, const char *output, const tm_merge_options *opts,
                            const char *label, tm_error *err);

/* The merge itself, after the struct_size check: opts is complete (tm_merge_options_init'ed);
 * xr: a merge across hosts (distributed.c), or NULL. */
tm_status tm_merge_files_xr(const char *const *inputs, size_t n, const char *output, const tm_merge_options *opts,
                            const char *label, const tm_cross_rank *xr, tm_error *err);

/* tm_merge_files with opts->distributed set (distributed.c); opts complete. */
tm_status tm_merge_distributed(const char *const *inputs, size_t n, const char *output, const tm_merge_options *opts,
                               const char *label, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
