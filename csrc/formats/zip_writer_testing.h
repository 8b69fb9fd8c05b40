/* Test-only hooks into the zip writer; not part of any public API. Real zip64 archives need
 * members or offsets of 4 GiB, too slow for unit tests, so tests lower the threshold at which
 * the writer switches to zip64 records. C11. */
#ifndef TM_FORMATS_ZIP_WRITER_TESTING_H
#define TM_FORMATS_ZIP_WRITER_TESTING_H

#include <stdint.h>

#include "formats/zip_writer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Sizes, offsets and (capped at 0xFFFF) the entry count at or above threshold get zip64
 * records; the default is 0xFFFFFFFF. Call before the first member. */
void tm_zip_writer_set_zip64_threshold(tm_zip_writer *zw, uint64_t threshold);

#ifdef __cplusplus
}
#endif
#endif
