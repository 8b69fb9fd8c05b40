/* A read-only memory mapping of a whole file. Tensor bytes are read through it without
 * copying; tm_mapped_file_release() drops pages already used so resident memory stays near
 * one tensor while streaming. C11, POSIX. */
#ifndef TM_FORMATS_MAPPED_FILE_H
#define TM_FORMATS_MAPPED_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_mapped_file {
    const uint8_t *data; /* NULL for an empty file */
    size_t size;
} tm_mapped_file;

/* Opens path read-only (O_RDONLY, never written) and maps it. Errors name path. */
tm_status tm_mapped_file_open(const char *path, tm_mapped_file *out, tm_error *err);
void tm_mapped_file_close(tm_mapped_file *f);
/* Hints that [offset, offset+len) will be read soon (MADV_WILLNEED). */
void tm_mapped_file_prefetch(const tm_mapped_file *f, uint64_t offset, uint64_t len);
/* Drops the whole pages inside [offset, offset+len) from this process's resident set
 * (MADV_DONTNEED on a read-only private mapping: they are re-read from the file if touched). */
void tm_mapped_file_release(const tm_mapped_file *f, uint64_t offset, uint64_t len);

#ifdef __cplusplus
}
#endif
#endif
