/* Writes the data.pkl of a torch.save archive holding a plain dict name → tensor: exactly the
 * opcodes Python's torch.save emits for such a dict at protocol 2, using only what both
 * Python's torch.load(weights_only=True) and LibTorch 1.13's torch::pickle_load accept
 * (EMPTY_DICT + SETITEMS, _rebuild_tensor_v2, torch.*Storage, an empty OrderedDict for the
 * hooks; no OrderedDict as the container, no SETITEM/APPEND). C11. */
#ifndef TM_FORMATS_PICKLE_WRITER_H
#define TM_FORMATS_PICKLE_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_pk_out_tensor {
    const char *name;
    tm_dtype dtype;
    int32_t ndim;
    const int64_t *shape;
    const int64_t *stride;   /* in elements */
    int64_t storage_offset;  /* in elements */
    const char *storage_key; /* archive record data/<key>; tensors sharing a storage share it */
    int64_t storage_numel;   /* elements in that storage */
} tm_pk_out_tensor;

typedef struct tm_byte_buffer {
    uint8_t *data; /* malloc'd; caller frees */
    size_t size, cap;
} tm_byte_buffer;

/* Appends the pickle for the dict {t.name: tensor} in the given order to out. */
tm_status tm_pickle_write_state_dict(const tm_pk_out_tensor *tensors, size_t n,
                                     tm_byte_buffer *out, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
