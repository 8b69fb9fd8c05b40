/* tm_merge_files for the library's own callers (greedy soup, recipes): reports through err
 * instead of publishing, and records label as the output's method ("greedy_soup" for a soup
 * whose arithmetic is simple_average). C11. */
#ifndef TM_MERGE_MERGE_FILES_INTERNAL_H
#define TM_MERGE_MERGE_FILES_INTERNAL_H

#include "core/error.h"
#include "torchmerge.h"

#ifdef __cplusplus
extern "C" {
#endif

tm_status tm_merge_files_as(const char *const *inputs, size_t n, const char *output, const tm_merge_options *opts,
                            const char *label, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
