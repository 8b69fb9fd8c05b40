/* A buffered, strictly sequential writer over a file descriptor: what the zip and safetensors
 * writers put their bytes through. On a regular file that starts empty it writes full buffers
 * with O_DIRECT, so a merge's output goes from our buffer to the disk without first being
 * copied into freshly allocated page-cache pages (on this machine that copy cost as much as
 * the whole merge arithmetic, and the fsync that follows then has nothing left to flush).
 * Falls back to ordinary writes wherever O_DIRECT is refused (tmpfs on older kernels, pipes,
 * unaligned tails), or everywhere when TORCHMERGE_DIRECT_IO=0. C11. */
#ifndef TM_CORE_OUTPUT_STREAM_H
#define TM_CORE_OUTPUT_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/internal_export.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_output_stream {
    int fd;            /* borrowed: the caller opens and closes it */
    const char *label; /* borrowed: names the file in errors */
    uint8_t *buf;      /* owned, page-aligned */
    size_t len, cap;
    uint64_t pos;      /* bytes accepted so far (buffered ones included) */
    int direct;        /* O_DIRECT is set on fd */
    int failed;
} tm_output_stream;

/* Sets up s over fd (which must be at offset 0 when O_DIRECT is to be used). */
TM_INTERNAL tm_status tm_output_stream_init(tm_output_stream *s, int fd, const char *label, tm_error *err);
/* Appends n bytes. */
TM_INTERNAL tm_status tm_output_stream_put(tm_output_stream *s, const void *data, size_t n, tm_error *err);
/* Writes out everything buffered; leaves fd without O_DIRECT. Call once, at the end. */
TM_INTERNAL tm_status tm_output_stream_flush(tm_output_stream *s, tm_error *err);
/* Frees the buffer (the fd stays open). */
TM_INTERNAL void tm_output_stream_free(tm_output_stream *s);

#ifdef __cplusplus
}
#endif
#endif
