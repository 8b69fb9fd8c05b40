/* Fuzz target: the zip reader (csrc/formats/zip_reader.h): directory parsing, zip64, member
 * lookup, stored and deflated reads with size and CRC checks. */
#include "fuzz_common.h"

#include "formats/zip_reader.h"

#define MAX_MEMBER ((uint64_t)16 << 20)

int TM_FUZZ_ENTRY(const uint8_t *data, size_t size) {
    tm_error err = {0};
    tm_zip_reader *zr = NULL;
    (void)tm_zip_looks_like_zip(data, size);
    tm_status st = tm_zip_reader_open(data, size, "fuzz.pt", &zr, &err);
    tm_fuzz_check_error(st, &err);
    if (st) {
        if (zr) TM_FUZZ_FAIL("failed open returned a reader");
        return 0;
    }
    size_t n = tm_zip_reader_count(zr);
    for (size_t i = 0; i < n; i++) {
        const tm_zip_entry *e = tm_zip_reader_entry(zr, i);
        if (!e || !e->name) TM_FUZZ_FAIL("entry %zu missing", i);
        if (tm_zip_reader_find(zr, e->name) != e) TM_FUZZ_FAIL("find('%s') is another entry", e->name);
        if (e->data_offset > size || e->comp_size > size - e->data_offset)
            TM_FUZZ_FAIL("member '%s' outside the buffer", e->name);
        const uint8_t *bytes = NULL;
        uint8_t *owned = NULL;
        tm_error rerr = {0};
        st = tm_zip_reader_read(zr, e, MAX_MEMBER, &bytes, &owned, &rerr);
        tm_fuzz_check_error(st, &rerr);
        if (!st) {
            if (!bytes && e->size) TM_FUZZ_FAIL("read gave no bytes");
            if (!owned && (bytes < data || e->size > (uint64_t)(data + size - bytes)))
                TM_FUZZ_FAIL("stored member '%s' outside the buffer", e->name);
            tm_fuzz_touch(bytes, e->size);
        } else if (bytes || owned) {
            TM_FUZZ_FAIL("failed read returned bytes");
        }
        free(owned);
    }
    if (tm_zip_reader_entry(zr, n)) TM_FUZZ_FAIL("entry past the end");
    tm_zip_reader_free(zr);
    return 0;
}
