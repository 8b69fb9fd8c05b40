/* What the merge engine (C++) needs from an opened checkpoint beyond the public getters:
 * page-level hints so mapped tensor bytes are prefetched before use and dropped after. */
#ifndef TM_CORE_CHECKPOINT_INTERNAL_H
#define TM_CORE_CHECKPOINT_INTERNAL_H

#include "torchmerge.h"
#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Same as tm_checkpoint_open but reports through err instead of publishing to tm_errmsg(). */
tm_status tm_checkpoint_open_err(const char *path, const tm_open_options *opts,
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
