#include "formats/archive_rewriter.h"

#include <stdlib.h>
#include <string.h>

#include "core/atomic_output.h"
#include "formats/mapped_file.h"
#include "formats/zip_reader.h"
#include "formats/zip_writer.h"

struct tm_archive_rewriter {
    char *template_path;
    tm_mapped_file map;
    tm_zip_reader *zr;
    unsigned char *replaced;
    size_t n, next; /* records; the first not yet written */
    tm_atomic_output out;
    tm_zip_writer *zw;
    int started, committed;
};

tm_status tm_archive_rewriter_open(const char *template_path, tm_archive_rewriter **out, tm_error *err) {
    *out = NULL;
    tm_archive_rewriter *rw = calloc(1, sizeof *rw);
    if (!rw || !(rw->template_path = strdup(template_path))) {
        free(rw);
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    rw->out.fd = -1;
    tm_status st = tm_mapped_file_open(template_path, &rw->map, err);
    if (!st) st = tm_zip_reader_open(rw->map.data, rw->map.size, template_path, &rw->zr, err);
    if (st) {
        tm_archive_rewriter_free(rw);
        return st;
    }
    rw->n = tm_zip_reader_count(rw->zr);
    *out = rw;
    return TM_OK;
}

size_t tm_archive_rewriter_count(const tm_archive_rewriter *rw) { return rw->n; }

int64_t tm_archive_rewriter_find_record(const tm_archive_rewriter *rw, uint64_t data_offset, uint64_t size) {
    for (size_t i = 0; i < rw->n; i++) {
        const tm_zip_entry *e = tm_zip_reader_entry(rw->zr, i);
        if (e->data_offset == data_offset) return e->method == 0 && e->size == size ? (int64_t)i : -1;
    }
    return -1;
}

tm_status tm_archive_rewriter_start(tm_archive_rewriter *rw, const char *path, const unsigned char *replaced,
                                    tm_error *err) {
    if (rw->started) return tm_error_set(err, TM_ERROR_INTERNAL, "%s: output already started", path);
    rw->replaced = malloc(rw->n + 1);
    if (!rw->replaced) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    memcpy(rw->replaced, replaced, rw->n);
    rw->started = 1;
    tm_status st = tm_atomic_output_open(path, &rw->out, err);
    if (!st) st = tm_zip_writer_open(rw->out.fd, path, &rw->zw, err);
    return st;
}

/* Kept records are copied as they are (inflated if the template compressed them), and their
 * pages dropped again: a module's constants can be large. */
static tm_status copy_kept_until(tm_archive_rewriter *rw, size_t end, tm_error *err) {
    tm_status st = TM_OK;
    for (; rw->next < end && !st; rw->next++) {
        if (rw->replaced[rw->next]) continue;
        const tm_zip_entry *e = tm_zip_reader_entry(rw->zr, rw->next);
        const uint8_t *bytes;
        uint8_t *owned = NULL;
        st = tm_zip_reader_read(rw->zr, e, UINT64_MAX, &bytes, &owned, err);
        if (!st) st = tm_zip_writer_add(rw->zw, e->name, bytes, (size_t)e->size, err);
        free(owned);
        tm_mapped_file_release(&rw->map, e->data_offset, e->comp_size);
    }
    return st;
}

tm_status tm_archive_rewriter_begin(tm_archive_rewriter *rw, size_t i, tm_error *err) {
    if (!rw->started || i >= rw->n || i < rw->next || !rw->replaced[i])
        return tm_error_set(err, TM_ERROR_INTERNAL, "%s: record %zu written out of order", rw->out.target, i);
    tm_status st = copy_kept_until(rw, i, err);
    if (st) return st;
    const tm_zip_entry *e = tm_zip_reader_entry(rw->zr, i);
    rw->next = i + 1;
    return tm_zip_writer_begin(rw->zw, e->name, e->size, err);
}

tm_status tm_archive_rewriter_write_crc(tm_archive_rewriter *rw, const void *data, size_t len, uint32_t data_crc,
                                        tm_error *err) {
    return tm_zip_writer_write_crc(rw->zw, data, len, data_crc, err);
}

tm_status tm_archive_rewriter_end(tm_archive_rewriter *rw, tm_error *err) { return tm_zip_writer_end(rw->zw, err); }

tm_status tm_archive_rewriter_commit(tm_archive_rewriter *rw, tm_error *err) {
    if (!rw->started) return tm_error_set(err, TM_ERROR_INTERNAL, "%s: output not started", rw->template_path);
    tm_status st = TM_OK;
    for (size_t i = rw->next; i < rw->n && !st; i++)
        if (rw->replaced[i])
            st = tm_error_set(err, TM_ERROR_INTERNAL, "%s: record '%s' was never written", rw->out.target,
                              tm_zip_reader_entry(rw->zr, i)->name);
    if (!st) st = copy_kept_until(rw, rw->n, err);
    if (!st) st = tm_zip_writer_finish(rw->zw, err);
    if (!st) st = tm_atomic_output_commit(&rw->out, err);
    if (!st) rw->committed = 1;
    return st;
}

void tm_archive_rewriter_free(tm_archive_rewriter *rw) {
    if (!rw) return;
    tm_zip_writer_free(rw->zw);
    if (rw->started && !rw->committed) tm_atomic_output_abort(&rw->out);
    tm_zip_reader_free(rw->zr);
    tm_mapped_file_close(&rw->map);
    free(rw->replaced);
    free(rw->template_path);
    free(rw);
}
