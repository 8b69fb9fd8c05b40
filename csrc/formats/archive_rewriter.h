/* Writes a copy of a zip archive (a TorchScript module) in which chosen records are replaced by
 * bytes streamed in by the caller, every other record (code, pickles, constants, version) being
 * copied as it is. This is how a merged TorchScript module is written without LibTorch: the
 * template's program stays byte-for-byte, only its tensor storages change. Records come out in
 * the template's order, stored (uncompressed), into a temporary file renamed over the target on
 * commit. C11. */
#ifndef TM_FORMATS_ARCHIVE_REWRITER_H
#define TM_FORMATS_ARCHIVE_REWRITER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_archive_rewriter tm_archive_rewriter;

/* Maps and parses the template archive; no output yet. */
tm_status tm_archive_rewriter_open(const char *template_path, tm_archive_rewriter **out, tm_error *err);
/* Number of records in the template. */
size_t tm_archive_rewriter_count(const tm_archive_rewriter *rw);
/* The record whose stored bytes start at data_offset in the template file and are exactly
 * size bytes long, or -1 (compressed, or not a whole record). */
int64_t tm_archive_rewriter_find_record(const tm_archive_rewriter *rw, uint64_t data_offset, uint64_t size);
/* Creates the temporary output beside path. replaced[i] != 0 marks record i as one the caller
 * will stream with begin/write/end, in increasing record order; replaced is copied. */
tm_status tm_archive_rewriter_start(tm_archive_rewriter *rw, const char *path, const unsigned char *replaced,
                                    tm_error *err);
/* Copies the kept records before record i, then starts record i (same name, same size). */
tm_status tm_archive_rewriter_begin(tm_archive_rewriter *rw, size_t i, tm_error *err);
/* data_crc: the CRC-32 of data, already computed by the caller. */
tm_status tm_archive_rewriter_write_crc(tm_archive_rewriter *rw, const void *data, size_t len, uint32_t data_crc,
                                        tm_error *err);
tm_status tm_archive_rewriter_end(tm_archive_rewriter *rw, tm_error *err);
/* Copies the remaining kept records, finishes the archive, fsyncs and renames it into place. */
tm_status tm_archive_rewriter_commit(tm_archive_rewriter *rw, tm_error *err);
/* Frees; removes the temporary output unless committed. NULL-safe. */
void tm_archive_rewriter_free(tm_archive_rewriter *rw);

#ifdef __cplusplus
}
#endif
#endif
