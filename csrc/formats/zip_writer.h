/* Zip writer for torch.save archives: stored members whose data starts on a 64-byte boundary
 * (an extra field pads the local header, as PyTorch does, so readers can mmap tensors),
 * CRC-32 computed while streaming, zip64 records when an offset or size needs them. Members
 * are written one after another as their bytes are produced. Writes to a file descriptor
 * through a large buffer. C11. */
#ifndef TM_FORMATS_ZIP_WRITER_H
#define TM_FORMATS_ZIP_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_zip_writer tm_zip_writer;

/* Writes to fd (borrowed; not closed) starting at its current position, which must be 0.
 * label (the output path) prefixes error messages. */
tm_status tm_zip_writer_open(int fd, const char *label, tm_zip_writer **out, tm_error *err);
/* Frees the writer; does not close fd. */
void tm_zip_writer_free(tm_zip_writer *zw);

/* Starts member name whose size is exactly size bytes. */
tm_status tm_zip_writer_begin(tm_zip_writer *zw, const char *name, uint64_t size, tm_error *err);
/* Appends bytes to the current member. */
tm_status tm_zip_writer_write(tm_zip_writer *zw, const void *data, size_t len, tm_error *err);
/* Same, with the CRC-32 of data computed by the caller (e.g. on another thread while this one
 * writes): it is folded in with crc32_combine instead of being recomputed here. */
tm_status tm_zip_writer_write_crc(tm_zip_writer *zw, const void *data, size_t len, uint32_t data_crc,
                                  tm_error *err);
/* Ends the current member; fails if fewer or more bytes than declared were written. */
tm_status tm_zip_writer_end(tm_zip_writer *zw, tm_error *err);
/* begin + write + end. */
tm_status tm_zip_writer_add(tm_zip_writer *zw, const char *name, const void *data, size_t len,
                            tm_error *err);
/* Writes the central directory and end records and flushes. Does not fsync or close fd. */
tm_status tm_zip_writer_finish(tm_zip_writer *zw, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
