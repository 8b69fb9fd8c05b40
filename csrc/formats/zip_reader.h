/* Zip archive reader over a memory buffer (the mapped file). Reads the central directory
 * (sizes in local headers are not trusted: torch writes them as 0 with a data descriptor),
 * supports stored and deflated members and zip64. Every offset and size is bounds-checked
 * against the buffer before use. C11. */
#ifndef TM_FORMATS_ZIP_READER_H
#define TM_FORMATS_ZIP_READER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_zip_entry {
    const char *name;      /* NUL-terminated copy, owned by the reader */
    uint64_t data_offset;  /* offset of the member's (possibly compressed) bytes in the buffer */
    uint64_t comp_size;
    uint64_t size;         /* uncompressed size */
    uint32_t crc32;
    uint16_t method;       /* 0 stored, 8 deflate */
} tm_zip_entry;

typedef struct tm_zip_reader tm_zip_reader;

/* 1 if data starts like a zip archive (local header or empty-archive EOCD signature). */
int tm_zip_looks_like_zip(const uint8_t *data, size_t size);

/* Parses the archive in data[0..size). label (usually the path) prefixes error messages.
 * The reader borrows data: it must outlive the reader. */
tm_status tm_zip_reader_open(const uint8_t *data, size_t size, const char *label,
                             tm_zip_reader **out, tm_error *err);
void tm_zip_reader_free(tm_zip_reader *zr);

size_t tm_zip_reader_count(const tm_zip_reader *zr);
const tm_zip_entry *tm_zip_reader_entry(const tm_zip_reader *zr, size_t i);
/* Exact name match, or NULL. */
const tm_zip_entry *tm_zip_reader_find(const tm_zip_reader *zr, const char *name);

/* Gives the member's uncompressed bytes. Stored members: *bytes points into the buffer and
 * *owned is NULL. Deflated: inflated into a malloc'd buffer returned in *owned (caller frees)
 * and *bytes == *owned. Refuses (TM_ERROR_LIMIT) a member whose size exceeds max_size, and
 * checks the inflated size and CRC-32 against the directory. */
tm_status tm_zip_reader_read(const tm_zip_reader *zr, const tm_zip_entry *e, uint64_t max_size,
                             const uint8_t **bytes, uint8_t **owned, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
