/* The keep-masks of a merge (tm_merge_options.masks_out, the CLI's --masks-out): a safetensors
 * file with one bool tensor "{input}.{tensor}" per merged floating tensor and input holding it
 * (input: the 0-based index of the input in the merge; tensor: the output name; a storage shared
 * by several tensors is one 1-d mask named after the first). 1 marks an element of the task
 * vector the method kept. The header is known from the plan, so it is written first and each
 * merging thread writes its masks at their place (pwrite), in any order; the file is renamed into
 * place only when the merge succeeds. C11. */
#ifndef TM_MERGE_MASK_WRITER_H
#define TM_MERGE_MASK_WRITER_H

#include "merge/merge_ctx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Starts path's temporary file (c->masks). Errors: the method keeps every element (no masks), a
 * path that is an input or the output. */
tm_status tm_mask_writer_open(merge_ctx *c, const char *path, const char *output, tm_error *err);
/* Renames the masks into place once the merge succeeded (a failed write is reported here). */
tm_status tm_mask_writer_commit(merge_ctx *c, tm_error *err);
/* Removes the temporary file; no-op when committed or never opened. */
void tm_mask_writer_abort(merge_ctx *c);

#ifdef __cplusplus
}
#endif
#endif
