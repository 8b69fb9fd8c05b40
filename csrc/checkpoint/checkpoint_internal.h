/* What the merge engine (C++) needs from an opened checkpoint beyond the public getters:
 * page-level hints so mapped tensor bytes are prefetched before use and dropped after. */
#ifndef TM_CHECKPOINT_INTERNAL_H
#define TM_CHECKPOINT_INTERNAL_H

#include "torchmerge.h"
#include "core/error.h"
#include "core/internal_export.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The largest recipe read: by tm_merge_recipe, and beside a folder output we wrote. */
#define TM_RECIPE_MAX_BYTES ((size_t)16 << 20)

/* Tensor i as tm_checkpoint_tensor describes it (zeroed when out of range), for the library's
 * own callers, which need no struct_size handshake. */
TM_INTERNAL tm_tensor_info tm_checkpoint_info(const tm_checkpoint *ckpt, size_t i);

/* Same as tm_checkpoint_open but reports through err instead of publishing to tm_errmsg(). */
TM_INTERNAL tm_status tm_checkpoint_open_err(const char *path, const tm_open_options *opts,
                                 tm_checkpoint **out, tm_error *err);
/* 1 when the file is a TorchScript module (torch.jit.save archive). */
int tm_checkpoint_is_module(const tm_checkpoint *ckpt);
/* Where tensor i's storage bytes start in the (single) file the checkpoint was read from: 1 and
 * *file_offset, or 0 for multi-file checkpoints. */
int tm_checkpoint_storage_location(const tm_checkpoint *ckpt, size_t i, uint64_t *file_offset);
/* Prefetch / release the mapped bytes tensor i reads (its elements' range in its storage). */
void tm_checkpoint_prefetch_tensor(const tm_checkpoint *ckpt, size_t i);
void tm_checkpoint_release_tensor(const tm_checkpoint *ckpt, size_t i);
/* The same for the whole storage tensor i lives in (a storage merged whole). */
void tm_checkpoint_prefetch_storage(const tm_checkpoint *ckpt, size_t i);
void tm_checkpoint_release_storage(const tm_checkpoint *ckpt, size_t i);
/* The Hugging Face folder the checkpoint was opened from (its config and tokenizer files are
 * copied beside a folder output), or NULL for a plain file. Owned by ckpt. */
const char *tm_checkpoint_folder(const tm_checkpoint *ckpt);
/* Number of distinct storages. */
size_t tm_checkpoint_n_storages(const tm_checkpoint *ckpt);

#ifdef __cplusplus
}
#endif
#endif
