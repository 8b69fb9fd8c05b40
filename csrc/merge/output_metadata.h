/* What an output records about the merge that made it (safetensors "__metadata__"): method,
 * its parameters, inputs, tied aliases, recipe. A growable list of key/value strings,
 * so new entries (method parameters) need no capacity change. C11. */
#ifndef TM_MERGE_OUTPUT_METADATA_H
#define TM_MERGE_OUTPUT_METADATA_H

#include "merge/merge_ctx.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_output_metadata {
    const char **keys; /* string literals */
    char **values;     /* malloc'd */
    size_t n, cap;
} tm_output_metadata;

/* Fills m (zero-initialised) from c; paths are the inputs as given (their base names are recorded). */
tm_status tm_output_metadata_build(const merge_ctx *c, const char *const *paths, tm_output_metadata *m,
                                   tm_error *err);
void tm_output_metadata_free(tm_output_metadata *m);

#ifdef __cplusplus
}
#endif
#endif
