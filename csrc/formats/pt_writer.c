#include "formats/pt_writer.h"

#include <stdio.h>
#include <stdlib.h>

#include "core/atomic_output.h"
#include "formats/zip_writer.h"

/* Any prefix works for torch.load; "archive" is what torch.save used before 2.x. */
#define PREFIX "archive"

struct tm_pt_writer {
    tm_atomic_output out;
    tm_zip_writer *zip;
    size_t next_storage;
    int committed;
};

tm_status tm_pt_writer_open(const char *path, const tm_pk_out_tensor *tensors, size_t n,
                            tm_pt_writer **out, tm_error *err) {
    *out = NULL;
    tm_pt_writer *w = calloc(1, sizeof *w);
    if (!w) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    w->out.fd = -1;
    tm_byte_buffer buf = {0};
    tm_status st = tm_atomic_output_open(path, &w->out, err);
    if (!st) st = tm_zip_writer_open(w->out.fd, path, &w->zip, err);
    if (!st) st = tm_pickle_write_state_dict(tensors, n, &buf, err);
    if (!st) st = tm_zip_writer_add(w->zip, PREFIX "/data.pkl", buf.data, buf.size, err);
    free(buf.data);
    if (st) {
        tm_pt_writer_free(w);
        return st;
    }
    *out = w;
    return TM_OK;
}

tm_status tm_pt_writer_begin_storage(tm_pt_writer *w, size_t index, uint64_t nbytes, tm_error *err) {
    if (index != w->next_storage)
        return tm_error_set(err, TM_ERROR_INTERNAL, "%s: storage %zu written out of order", w->out.target, index);
    char name[64];
    snprintf(name, sizeof name, PREFIX "/data/%zu", index);
    w->next_storage++;
    return tm_zip_writer_begin(w->zip, name, nbytes, err);
}

tm_status tm_pt_writer_write(tm_pt_writer *w, const void *data, size_t len, tm_error *err) {
    return tm_zip_writer_write(w->zip, data, len, err);
}

tm_status tm_pt_writer_write_crc(tm_pt_writer *w, const void *data, size_t len, uint32_t data_crc, tm_error *err) {
    return tm_zip_writer_write_crc(w->zip, data, len, data_crc, err);
}

tm_status tm_pt_writer_end_storage(tm_pt_writer *w, tm_error *err) { return tm_zip_writer_end(w->zip, err); }

tm_status tm_pt_writer_commit(tm_pt_writer *w, tm_error *err) {
    tm_status st = tm_zip_writer_add(w->zip, PREFIX "/version", "3\n", 2, err);
    if (!st) st = tm_zip_writer_finish(w->zip, err);
    if (!st) st = tm_atomic_output_commit(&w->out, err);
    if (!st) w->committed = 1;
    return st;
}

void tm_pt_writer_free(tm_pt_writer *w) {
    if (!w) return;
    tm_zip_writer_free(w->zip);
    if (!w->committed) tm_atomic_output_abort(&w->out);
    free(w);
}
