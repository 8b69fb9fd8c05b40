/* Writes a torch.save archive holding a plain dict of tensors, streaming: data.pkl first (all
 * metadata is known up front), then each storage record as its bytes are produced, into a
 * temporary file renamed over the target on commit. C11. */
#ifndef TM_FORMATS_PT_WRITER_H
#define TM_FORMATS_PT_WRITER_H

#include "formats/pickle_writer.h"
#include "core/internal_export.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_pt_writer tm_pt_writer;

/* Creates the temporary file and writes data.pkl for tensors (their storage_key must be the
 * decimal storage index "0", "1", …, and storages are then written in that order). */
TM_INTERNAL tm_status tm_pt_writer_open(const char *path, const tm_pk_out_tensor *tensors, size_t n,
                            tm_pt_writer **out, tm_error *err);
/* Starts storage record index (0, 1, … in order) of exactly nbytes bytes. */
TM_INTERNAL tm_status tm_pt_writer_begin_storage(tm_pt_writer *w, size_t index, uint64_t nbytes, tm_error *err);
TM_INTERNAL tm_status tm_pt_writer_write(tm_pt_writer *w, const void *data, size_t len, tm_error *err);
/* Same, with the CRC-32 of data already computed by the caller. */
tm_status tm_pt_writer_write_crc(tm_pt_writer *w, const void *data, size_t len, uint32_t data_crc, tm_error *err);
TM_INTERNAL tm_status tm_pt_writer_end_storage(tm_pt_writer *w, tm_error *err);
/* Finishes the archive, fsyncs and renames it into place. */
TM_INTERNAL tm_status tm_pt_writer_commit(tm_pt_writer *w, tm_error *err);
/* Frees; removes the temporary file unless committed. NULL-safe. */
TM_INTERNAL void tm_pt_writer_free(tm_pt_writer *w);

#ifdef __cplusplus
}
#endif
#endif
