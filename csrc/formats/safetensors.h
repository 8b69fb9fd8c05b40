/* safetensors reader and writer. C11, no LibTorch.
 *
 * File layout (https://github.com/huggingface/safetensors):
 *   1. 8 bytes: n, the header length, an unsigned little-endian 64-bit integer.
 *   2. n bytes: the header, UTF-8 JSON text starting with '{', possibly padded at the end with
 *      spaces (writers pad so the data section starts 8-byte aligned). It is one object:
 *        { "__metadata__": {"format": "pt", ...},            optional, string -> string
 *          "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ... }
 *   3. The data section: every tensor's bytes, row-major little-endian, at
 *      [begin, end) relative to the start of the section (offset 8 + n in the file).
 *
 * The reader validates the whole header inside tm_safetensors_open, as the reference
 * implementation does: n <= 100,000,000 and 8 + n <= file size; the JSON parses and is an
 * object; every tensor has a known dtype, a shape of at most TM_MAX_NDIM non-negative integers
 * and end - begin == numel * itemsize (overflow-checked); names are unique; the byte ranges,
 * sorted by begin, tile the data section exactly (from 0, no gap, no overlap, the last one ends
 * at its end). A tensor that opens is therefore safe to read at data + data_offset + begin.
 *
 * The writer knows every tensor up front: it writes the header (tensors in the given order,
 * contiguous offsets, "__metadata__" first, padded with spaces to a multiple of 8 bytes), then
 * streams the tensors' bytes in that order to a file descriptor through the output stream (core/output_stream.h). */
#ifndef TM_FORMATS_SAFETENSORS_H
#define TM_FORMATS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The largest header the reader accepts, in bytes (the reference implementation's limit). */
#define TM_SAFETENSORS_MAX_HEADER 100000000u

/* 1 if data starts like a safetensors file: an 8-byte little-endian length n with
 * 8 + n <= size and data[8] == '{'. Reads at most 9 bytes. */
int tm_safetensors_looks_like(const uint8_t *data, size_t size);

/* ---- Reader ---------------------------------------------------------------------------- */

typedef struct tm_st_tensor {
    const char *name;             /* NUL-terminated UTF-8 copy, owned by the reader */
    tm_dtype dtype;
    int32_t ndim;                 /* 0 for a scalar (shape []) */
    int64_t shape[TM_MAX_NDIM];   /* ndim entries used */
    uint64_t numel;               /* product of shape (1 for a scalar) */
    uint64_t begin, end;          /* byte offsets relative to the data section start */
} tm_st_tensor;

typedef struct tm_safetensors tm_safetensors;

/* Parses and fully validates the header of data[0..size) (usually the mapped file). label
 * (usually the path) prefixes error messages. The reader borrows data: it must outlive the
 * reader. On failure *out is NULL and err holds a one-line message naming label and, where
 * one is involved, the tensor. Statuses: TM_ERROR_FORMAT (malformed), TM_ERROR_UNSUPPORTED (a
 * dtype torchmerge has no equivalent for, e.g. F8_E4M3), TM_ERROR_LIMIT (header longer than
 * TM_SAFETENSORS_MAX_HEADER), TM_ERROR_NOMEM, TM_ERROR_INVALID_ARGUMENT. */
tm_status tm_safetensors_open(const uint8_t *data, size_t size, const char *label,
                              tm_safetensors **out, tm_error *err);
/* Accepts NULL. */
void tm_safetensors_free(tm_safetensors *st);

size_t tm_safetensors_count(const tm_safetensors *st);
/* Tensor i (0 <= i < count) in the header's JSON key order; NULL when i is out of range.
 * Owned by st. */
const tm_st_tensor *tm_safetensors_tensor(const tm_safetensors *st, size_t i);
/* Index of the tensor named name (exact bytes), or -1. */
int64_t tm_safetensors_find(const tm_safetensors *st, const char *name);
/* First byte of tensor i's data inside the borrowed buffer (end - begin bytes); NULL when i
 * is out of range. */
const uint8_t *tm_safetensors_tensor_data(const tm_safetensors *st, size_t i);
/* Offset of the data section in the file: 8 + header length. */
uint64_t tm_safetensors_data_offset(const tm_safetensors *st);
/* Bytes in the data section: file size - data offset. */
uint64_t tm_safetensors_data_size(const tm_safetensors *st);

/* "__metadata__" entries in header order (0 when absent). Strings owned by st; NULL when i
 * is out of range. */
size_t tm_safetensors_metadata_count(const tm_safetensors *st);
const char *tm_safetensors_metadata_key(const tm_safetensors *st, size_t i);
const char *tm_safetensors_metadata_value(const tm_safetensors *st, size_t i);
/* Value of metadata key, or NULL. */
const char *tm_safetensors_metadata_find(const tm_safetensors *st, const char *key);

/* ---- Writer ---------------------------------------------------------------------------- */

typedef struct tm_st_out_tensor {
    const char *name;      /* UTF-8, unique, not "__metadata__" */
    tm_dtype dtype;        /* any but TM_COMPLEX128, which safetensors cannot name */
    int32_t ndim;          /* 0..TM_MAX_NDIM */
    const int64_t *shape;  /* ndim entries (may be NULL when ndim == 0) */
} tm_st_out_tensor;

typedef struct tm_st_writer tm_st_writer;

/* The header of a safetensors file holding the n tensors (data in their order, contiguous) and
 * metadata pairs, validated as tm_st_writer_open does: *header (malloc'd, *header_len bytes, a
 * multiple of 8) is followed by *data_size bytes of data. For writers that place the data
 * themselves (at *header_len + the tensor's offset). */
tm_status tm_safetensors_header(const char *label, const tm_st_out_tensor *tensors, size_t n,
                                const char *const *meta_keys, const char *const *meta_values, size_t n_meta,
                                uint8_t **header, size_t *header_len, uint64_t *data_size, tm_error *err);

/* Validates the n tensors and n_meta metadata pairs (all borrowed for this call only), builds
 * the header and starts writing to fd (borrowed; not closed) at its current position. label
 * (the output path) prefixes error messages. meta_keys/meta_values may be NULL when n_meta is
 * 0; when n_meta > 0 "__metadata__" is written first. */
tm_status tm_st_writer_open(int fd, const char *label, const tm_st_out_tensor *tensors,
                            size_t n, const char *const *meta_keys,
                            const char *const *meta_values, size_t n_meta, tm_st_writer **out,
                            tm_error *err);
/* Appends len bytes of tensor data: the tensors' bytes concatenated in the order given to
 * open, in as many calls of any size as convenient. Fails (and poisons the writer) on more
 * bytes than the tensors hold or on a write error. */
tm_status tm_st_writer_write(tm_st_writer *w, const void *data, size_t len, tm_error *err);
/* Total data bytes expected and written so far. */
uint64_t tm_st_writer_data_size(const tm_st_writer *w);
uint64_t tm_st_writer_data_written(const tm_st_writer *w);
/* Fails unless exactly every byte was written; flushes the buffer. Does not fsync or close
 * fd. */
tm_status tm_st_writer_finish(tm_st_writer *w, tm_error *err);
/* Accepts NULL; does not close fd. */
void tm_st_writer_free(tm_st_writer *w);

/* ---- Dtype names ------------------------------------------------------------------------ */

/* "F32" -> TM_FLOAT32 etc. (F64 F32 F16 BF16 C64 I64 I32 I16 I8 U8 BOOL). Other safetensors
 * dtypes (F8_E4M3, F8_E5M2, F8_E8M0, F6_E2M3, F6_E3M2, F4, U16, U32, U64) give
 * TM_ERROR_UNSUPPORTED with "dtype F8_E4M3 is not supported by this LibTorch"; an unknown
 * name gives TM_ERROR_UNSUPPORTED with "unknown dtype 'X'". err may be NULL. */
tm_status tm_safetensors_dtype_from_string(const char *s, tm_dtype *out, tm_error *err);
/* "F32" etc.; NULL for TM_COMPLEX128 (safetensors has no complex128) and out-of-range values. */
const char *tm_safetensors_dtype_string(tm_dtype d);

#ifdef __cplusplus
}
#endif
#endif
