/* Finds the state dict inside an unpickled checkpoint and flattens it to (name, tensor) pairs:
 * a flat dict of tensors; a nested training checkpoint ({'epoch':…, 'state_dict':{…}, …}) whose
 * one state-dict-like entry is picked automatically, or by key; a pickled nn.Module (walks
 * _parameters/_buffers/_modules); a TorchScript module object (walks its attributes). C11. */
#ifndef TM_FORMATS_STATE_DICT_WALK_H
#define TM_FORMATS_STATE_DICT_WALK_H

#include "formats/pickle.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_named_tensor {
    char *name;               /* malloc'd */
    const tm_pk_value *tensor; /* TM_PK_TENSOR, owned by the tm_pickle */
} tm_named_tensor;

typedef struct tm_named_tensors {
    tm_named_tensor *items;
    size_t n, cap;
    char *key; /* malloc'd: the nested key used ("" for a flat state dict) */
} tm_named_tensors;

/* key: NULL for automatic choice. label prefixes errors ("model.pt"). */
tm_status tm_state_dict_walk(const tm_pk_value *root, const char *key, const char *label,
                             tm_named_tensors *out, tm_error *err);
void tm_named_tensors_free(tm_named_tensors *t);

/* The keys a nested checkpoint's state dicts sit under (the top-level entries that are state
 * dicts: {'actor': sd, 'critic': sd} gives "actor", "critic"), in file order; none when root is
 * itself a state dict. *keys (malloc'd, each key malloc'd) and *n are set on success. */
tm_status tm_state_dict_candidates(const tm_pk_value *root, const char *label, char ***keys,
                                   size_t *n, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
