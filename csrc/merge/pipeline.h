/* The streaming pipeline: merging threads compute units (through tm_merge_unit) into rings of
 * block slots while the calling thread drains them into a sink in a fixed order, so the output
 * bytes do not depend on the number of threads. It prefetches the next unit's input pages and
 * drops each unit's pages once merged. It knows nothing of the arithmetic or the format. C11. */
#ifndef TM_MERGE_PIPELINE_H
#define TM_MERGE_PIPELINE_H

#include "merge/merge_ctx.h"
#include "merge/sink.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Merges units order[u0 .. u1) (units u0 .. u1 when order is NULL) and writes them through snk.
 * *done counts the units written and feeds the progress callback (out of all the plan's units). */
tm_status tm_pipeline_run(merge_ctx *c, const size_t *order, size_t u0, size_t u1, const tm_sink *snk, size_t *done,
                          tm_error *err);

/* Merging threads for n_units units: the CPUs (TORCHMERGE_THREADS caps it), at most 8. */
size_t tm_pipeline_threads(size_t n_units);

/* Asks the kernel to read unit u's input pages ahead, or to drop them once merged (release), so
 * memory stays near one unit per input whatever the model size. */
void tm_pipeline_touch_unit(const merge_ctx *c, const tm_unit *u, int release);

#ifdef __cplusplus
}
#endif
#endif
