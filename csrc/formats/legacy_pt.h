/* Reader for the legacy (non-zip) torch.save format: PyTorch < 1.6, or a newer torch with
 * _use_new_zipfile_serialization=False.
 *
 * Layout: five pickles in a row
 *   1. the magic number 0x1950a86a20f9469cfc6c (LONG1),
 *   2. the protocol version 1001,
 *   3. sys_info {'protocol_version': 1001, 'little_endian': True, 'type_sizes': {...}},
 *   4. the object, whose storages are persistent ids
 *      ('storage', StorageType, key, location, numel, view_metadata),
 *   5. the list of storage keys, in the order their bytes follow;
 * then, for each listed key, an int64 little-endian element count followed by count *
 * element-size raw bytes (no alignment). The element size is that of the storage type the key
 * was first seen with in pickle 4, as torch.load does.
 *
 * Nothing is copied: the reader borrows the caller's bytes (normally the file mapping) and
 * reports byte ranges into them. Storage views (non-None view_metadata, written by PyTorch
 * before 0.4) are refused with TM_ERROR_UNSUPPORTED. C11. */
#ifndef TM_FORMATS_LEGACY_PT_H
#define TM_FORMATS_LEGACY_PT_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "formats/pickle.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when data starts with the legacy magic-number pickle: PROTO 2..5 (optionally a FRAME)
 * then LONG1 0x1950a86a20f9469cfc6c, i.e. for torch's default protocol 2 the bytes
 * 80 02 8a 0a 6c fc 9c 46 f9 20 6a a8 50 19; or the protocol 0/1 text form
 * "L119547037146038801333356L\n". Never reads past size. */
int tm_legacy_pt_looks_like(const uint8_t *data, size_t size);

typedef struct tm_legacy_pt tm_legacy_pt;

/* Parses the five pickles and the storage table. Every listed key must name a storage the
 * object references and every referenced storage must be listed; each record's element count
 * must match the persistent id and count * element size must lie inside data (overflow-safe).
 * Big-endian files (sys_info little_endian False) -> TM_ERROR_UNSUPPORTED. label (may be NULL)
 * prefixes error messages, normally the path. data is borrowed and must outlive *out. On
 * failure *out is NULL. */
tm_status tm_legacy_pt_open(const uint8_t *data, size_t size, const char *label,
                            tm_legacy_pt **out, tm_error *err);

/* The object (pickle 4). Owned by lp. */
const tm_pk_value *tm_legacy_pt_root(const tm_legacy_pt *lp);

/* Byte range [*file_offset, *file_offset + *nbytes) of data holding storage (a TM_PK_STORAGE
 * from tm_legacy_pt_root's tree). Distinct storages never share a range, so file_offset
 * identifies the storage; two TM_PK_STORAGE values of one key (one storage seen through two
 * dtypes) share it. nbytes is the whole record, at least numel * element size of storage. */
tm_status tm_legacy_pt_storage(const tm_legacy_pt *lp, const tm_pk_value *storage,
                               uint64_t *file_offset, uint64_t *nbytes, tm_error *err);

/* Number of storage records (the length of the key list) and record i's key and range, in file
 * order. */
size_t tm_legacy_pt_n_storages(const tm_legacy_pt *lp);
tm_status tm_legacy_pt_storage_at(const tm_legacy_pt *lp, size_t i, const char **key,
                                  uint64_t *file_offset, uint64_t *nbytes);

void tm_legacy_pt_free(tm_legacy_pt *lp);

#ifdef __cplusplus
}
#endif
#endif
