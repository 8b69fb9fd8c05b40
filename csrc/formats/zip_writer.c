/* Zip writer laid out like PyTorch's own (miniz) archives so torch.load, LibTorch and
 * Python's zipfile all accept the output: local headers carry flag 0x0008 with crc and sizes
 * left for a data descriptor, an "FB" extra field pads each member's data to a 64-byte
 * boundary, the central directory holds the real values. Output is byte-for-byte
 * reproducible (fixed timestamps, no host-dependent fields). */
#define _POSIX_C_SOURCE 200809L /* strdup */
#include "formats/zip_writer.h"

#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>
#include <zlib.h>

#include "core/crc32.h"
#include "core/name_map.h"
#include "core/output_stream.h"
#include "formats/zip_writer_testing.h"

#define SIG_LOCAL 0x04034b50u
#define SIG_DESCRIPTOR 0x08074b50u
#define SIG_CENTRAL 0x02014b50u
#define SIG_EOCD 0x06054b50u
#define SIG_EOCD64 0x06064b50u
#define SIG_EOCD64_LOCATOR 0x07064b50u

#define LOCAL_HEADER_SIZE 30u
#define CENTRAL_HEADER_SIZE 46u
#define ZIP64_EXTRA_ID 0x0001u
#define PAD_EXTRA_ID 0x4246u /* "FB", PyTorch's padding field */
#define DATA_ALIGNMENT 64u

/* Bit 3: crc and sizes follow the data in a descriptor; bit 11: names are UTF-8. PyTorch
 * sets both. */
#define ENTRY_FLAGS 0x0808u
#define VERSION_DEFAULT 20u
#define VERSION_ZIP64 45u
/* 1980-01-01 00:00, the DOS epoch: fixed so archives are reproducible. */
#define DOS_TIME 0u
#define DOS_DATE ((1u << 5) | 1u)


typedef unsigned long long ull;

typedef struct zw_entry {
    char *name;
    uint64_t offset, size;
    uint32_t crc;
} zw_entry;

struct tm_zip_writer {
    tm_output_stream out;
    char *label;
    zw_entry *entries;
    size_t count, cap;
    int in_member;
    uint64_t written;
    uint32_t crc;
    uint64_t zip64_threshold;
    int failed, finished;
};

static void wr16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static void wr32(uint8_t *p, uint32_t v) {
    wr16(p, v & 0xFFFFu);
    wr16(p + 2, v >> 16);
}
static void wr64(uint8_t *p, uint64_t v) {
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

static int needs64(const tm_zip_writer *zw, uint64_t v) { return v >= zw->zip64_threshold; }
static int count_needs64(const tm_zip_writer *zw, uint64_t n) {
    return n >= (zw->zip64_threshold < 0xFFFFu ? zw->zip64_threshold : 0xFFFFu);
}

static tm_status put(tm_zip_writer *zw, const void *data, size_t n, tm_error *err) {
    tm_status st = tm_output_stream_put(&zw->out, data, n, err);
    if (st) zw->failed = 1;
    return st;
}

static tm_status check_usable(const tm_zip_writer *zw, tm_error *err) {
    if (zw->failed)
        return tm_error_set(err, TM_ERROR_IO, "%s: zip: an earlier write failed", zw->label);
    if (zw->finished)
        return tm_error_set(err, TM_ERROR_INTERNAL, "%s: zip: archive already finished",
                            zw->label);
    return TM_OK;
}

tm_status tm_zip_writer_open(int fd, const char *label, tm_zip_writer **out, tm_error *err) {
    *out = NULL;
    if (!label) label = "zip";
    if (fd < 0)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: zip: invalid file descriptor",
                            label);
    /* Offsets are counted from 0; a pipe (ESPIPE) is fine since nothing seeks. */
    off_t at = lseek(fd, 0, SEEK_CUR);
    if (at > 0)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: zip: output must start at offset 0, not %lld", label,
                            (long long)at);
    tm_zip_writer *zw = calloc(1, sizeof *zw);
    if (!zw) return tm_error_set(err, TM_ERROR_NOMEM, "%s: zip: out of memory", label);
    zw->zip64_threshold = 0xFFFFFFFFu;
    zw->label = strdup(label);
    if (!zw->label) {
        tm_zip_writer_free(zw);
        return tm_error_set(err, TM_ERROR_NOMEM, "%s: zip: out of memory", label);
    }
    tm_status st = tm_output_stream_init(&zw->out, fd, zw->label, err);
    if (st) {
        tm_zip_writer_free(zw);
        return st;
    }
    *out = zw;
    return TM_OK;
}

void tm_zip_writer_free(tm_zip_writer *zw) {
    if (!zw) return;
    for (size_t i = 0; i < zw->count; i++) free(zw->entries[i].name);
    free(zw->entries);
    tm_output_stream_free(&zw->out);
    free(zw->label);
    free(zw);
}

void tm_zip_writer_set_zip64_threshold(tm_zip_writer *zw, uint64_t threshold) {
    if (zw) zw->zip64_threshold = threshold;
}

tm_status tm_zip_writer_begin(tm_zip_writer *zw, const char *name, uint64_t size, tm_error *err) {
    tm_status st = check_usable(zw, err);
    if (st) return st;
    if (zw->in_member)
        return tm_error_set(err, TM_ERROR_INTERNAL,
                            "%s: zip: cannot start member '%s' while '%s' is still open",
                            zw->label, name ? name : "", zw->entries[zw->count - 1].name);
    size_t nlen = name ? strlen(name) : 0;
    if (nlen == 0 || nlen > 0xFFFFu)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: zip: member name of %zu bytes (must be 1 to 65535)", zw->label,
                            nlen);
    if (zw->count == zw->cap) {
        size_t cap = zw->cap ? zw->cap * 2 : 64;
        zw_entry *p = realloc(zw->entries, cap * sizeof *p);
        if (!p) return tm_error_set(err, TM_ERROR_NOMEM, "%s: zip: out of memory", zw->label);
        zw->entries = p;
        zw->cap = cap;
    }
    zw_entry *e = &zw->entries[zw->count];
    e->name = strdup(name);
    if (!e->name) return tm_error_set(err, TM_ERROR_NOMEM, "%s: zip: out of memory", zw->label);
    e->offset = zw->out.pos;
    e->size = size;
    e->crc = 0;
    zw->count++;
    zw->in_member = 1;
    zw->written = 0;
    zw->crc = 0;

    int zip64_sizes = needs64(zw, size);
    int zip64 = zip64_sizes || needs64(zw, e->offset);
    uint32_t zip64_extra = zip64_sizes ? 4u + 16u : 0u;
    uint64_t data_start = e->offset + LOCAL_HEADER_SIZE + nlen + zip64_extra + 4u;
    uint32_t pad = (uint32_t)((DATA_ALIGNMENT - data_start % DATA_ALIGNMENT) % DATA_ALIGNMENT);

    uint8_t h[LOCAL_HEADER_SIZE];
    wr32(h, SIG_LOCAL);
    wr16(h + 4, zip64 ? VERSION_ZIP64 : VERSION_DEFAULT);
    wr16(h + 6, ENTRY_FLAGS);
    wr16(h + 8, 0); /* stored */
    wr16(h + 10, DOS_TIME);
    wr16(h + 12, DOS_DATE);
    wr32(h + 14, 0); /* crc: in the descriptor */
    /* Sizes belong to the descriptor (bit 3); the zip64 markers tell readers to expect the
     * zip64 extra and an 8-byte-size descriptor. */
    wr32(h + 18, zip64_sizes ? 0xFFFFFFFFu : 0);
    wr32(h + 22, zip64_sizes ? 0xFFFFFFFFu : 0);
    wr16(h + 26, (uint32_t)nlen);
    wr16(h + 28, zip64_extra + 4u + pad);

    uint8_t x[4 + 16 + 4 + DATA_ALIGNMENT];
    size_t xn = 0;
    if (zip64_sizes) {
        wr16(x, ZIP64_EXTRA_ID);
        wr16(x + 2, 16);
        wr64(x + 4, size);
        wr64(x + 12, size);
        xn = 20;
    }
    wr16(x + xn, PAD_EXTRA_ID);
    wr16(x + xn + 2, pad);
    memset(x + xn + 4, 'Z', pad);
    xn += 4 + pad;

    if ((st = put(zw, h, sizeof h, err)) || (st = put(zw, name, nlen, err)) ||
        (st = put(zw, x, xn, err)))
        return st;
    return TM_OK;
}

static tm_status write_checked(tm_zip_writer *zw, const void *data, size_t len, const uint32_t *data_crc,
                               tm_error *err) {
    tm_status st = check_usable(zw, err);
    if (st) return st;
    if (!zw->in_member)
        return tm_error_set(err, TM_ERROR_INTERNAL, "%s: zip: write outside a member", zw->label);
    zw_entry *e = &zw->entries[zw->count - 1];
    if (len > e->size - zw->written)
        return tm_error_set(err, TM_ERROR_INTERNAL,
                            "%s: zip: member '%s': writing %zu more bytes after %llu exceeds its "
                            "declared %llu bytes",
                            zw->label, e->name, len, (ull)zw->written, (ull)e->size);
    if (data_crc) {
        zw->crc = (uint32_t)crc32_combine(zw->crc, *data_crc, (z_off_t)len);
    } else {
        zw->crc = tm_crc32(zw->crc, data, len);
    }
    if (len && (st = put(zw, data, len, err))) return st;
    zw->written += len;
    return TM_OK;
}

tm_status tm_zip_writer_write(tm_zip_writer *zw, const void *data, size_t len, tm_error *err) {
    return write_checked(zw, data, len, NULL, err);
}

tm_status tm_zip_writer_write_crc(tm_zip_writer *zw, const void *data, size_t len, uint32_t data_crc,
                                  tm_error *err) {
    return write_checked(zw, data, len, &data_crc, err);
}

tm_status tm_zip_writer_end(tm_zip_writer *zw, tm_error *err) {
    tm_status st = check_usable(zw, err);
    if (st) return st;
    if (!zw->in_member)
        return tm_error_set(err, TM_ERROR_INTERNAL, "%s: zip: no member to end", zw->label);
    zw_entry *e = &zw->entries[zw->count - 1];
    if (zw->written != e->size)
        return tm_error_set(err, TM_ERROR_INTERNAL,
                            "%s: zip: member '%s': %llu bytes written but %llu declared",
                            zw->label, e->name, (ull)zw->written, (ull)e->size);
    e->crc = zw->crc;
    zw->in_member = 0;
    uint8_t d[24];
    wr32(d, SIG_DESCRIPTOR);
    wr32(d + 4, e->crc);
    size_t dn;
    if (needs64(zw, e->size)) {
        wr64(d + 8, e->size);
        wr64(d + 16, e->size);
        dn = 24;
    } else {
        wr32(d + 8, (uint32_t)e->size);
        wr32(d + 12, (uint32_t)e->size);
        dn = 16;
    }
    return put(zw, d, dn, err);
}

tm_status tm_zip_writer_add(tm_zip_writer *zw, const char *name, const void *data, size_t len,
                            tm_error *err) {
    tm_status st;
    if ((st = tm_zip_writer_begin(zw, name, len, err)) ||
        (st = tm_zip_writer_write(zw, data, len, err)))
        return st;
    return tm_zip_writer_end(zw, err);
}

/* Readers (ours included) reject an archive naming a member twice: catch it before the
 * directory is written rather than produce an unreadable file. */
static tm_status check_unique_names(const tm_zip_writer *zw, tm_error *err) {
    tm_name_map seen = TM_NAME_MAP_INIT;
    tm_status st = TM_OK;
    if (tm_name_map_reserve(&seen, zw->count)) st = tm_error_set(err, TM_ERROR_NOMEM, "%s: zip: out of memory", zw->label);
    for (size_t i = 0; i < zw->count && !st; i++)
        if (tm_name_map_insert(&seen, zw->entries[i].name, i, NULL)) /* reserved: 1 is a repeat */
            st = tm_error_set(err, TM_ERROR_INTERNAL, "%s: zip: member '%s' written twice",
                              zw->label, zw->entries[i].name);
    tm_name_map_free(&seen);
    return st;
}

static tm_status put_central_entry(tm_zip_writer *zw, const zw_entry *e, tm_error *err) {
    int big_size = needs64(zw, e->size), big_offset = needs64(zw, e->offset);
    uint32_t version = big_size || big_offset ? VERSION_ZIP64 : VERSION_DEFAULT;
    uint8_t x[4 + 24];
    size_t xn = 0;
    if (big_size || big_offset) {
        xn = 4;
        if (big_size) {
            wr64(x + xn, e->size);
            wr64(x + xn + 8, e->size);
            xn += 16;
        }
        if (big_offset) {
            wr64(x + xn, e->offset);
            xn += 8;
        }
        wr16(x, ZIP64_EXTRA_ID);
        wr16(x + 2, (uint32_t)(xn - 4));
    }
    size_t nlen = strlen(e->name);
    uint8_t h[CENTRAL_HEADER_SIZE];
    wr32(h, SIG_CENTRAL);
    wr16(h + 4, version); /* made by: MS-DOS host, so no Unix mode bits are implied */
    wr16(h + 6, version);
    wr16(h + 8, ENTRY_FLAGS);
    wr16(h + 10, 0);
    wr16(h + 12, DOS_TIME);
    wr16(h + 14, DOS_DATE);
    wr32(h + 16, e->crc);
    wr32(h + 20, big_size ? 0xFFFFFFFFu : (uint32_t)e->size);
    wr32(h + 24, big_size ? 0xFFFFFFFFu : (uint32_t)e->size);
    wr16(h + 28, (uint32_t)nlen);
    wr16(h + 30, (uint32_t)xn);
    wr16(h + 32, 0); /* comment */
    wr16(h + 34, 0); /* disk */
    wr16(h + 36, 0); /* internal attributes */
    wr32(h + 38, 0); /* external attributes */
    wr32(h + 42, big_offset ? 0xFFFFFFFFu : (uint32_t)e->offset);
    tm_status st;
    if ((st = put(zw, h, sizeof h, err)) || (st = put(zw, e->name, nlen, err)) ||
        (st = put(zw, x, xn, err)))
        return st;
    return TM_OK;
}

tm_status tm_zip_writer_finish(tm_zip_writer *zw, tm_error *err) {
    tm_status st = check_usable(zw, err);
    if (st) return st;
    if (zw->in_member)
        return tm_error_set(err, TM_ERROR_INTERNAL, "%s: zip: member '%s' is still open",
                            zw->label, zw->entries[zw->count - 1].name);
    if ((st = check_unique_names(zw, err))) return st;

    uint64_t cd_offset = zw->out.pos;
    for (size_t i = 0; i < zw->count; i++)
        if ((st = put_central_entry(zw, &zw->entries[i], err))) return st;
    uint64_t cd_size = zw->out.pos - cd_offset, count = zw->count;

    int big_count = count_needs64(zw, count);
    int big_cd_size = needs64(zw, cd_size), big_cd_offset = needs64(zw, cd_offset);
    if (big_count || big_cd_size || big_cd_offset) {
        uint64_t rec_offset = zw->out.pos;
        uint8_t r[56 + 20];
        wr32(r, SIG_EOCD64);
        wr64(r + 4, 56 - 12); /* size of the rest of the record */
        wr16(r + 12, VERSION_ZIP64);
        wr16(r + 14, VERSION_ZIP64);
        wr32(r + 16, 0); /* this disk */
        wr32(r + 20, 0); /* disk holding the directory */
        wr64(r + 24, count);
        wr64(r + 32, count);
        wr64(r + 40, cd_size);
        wr64(r + 48, cd_offset);
        uint8_t *loc = r + 56;
        wr32(loc, SIG_EOCD64_LOCATOR);
        wr32(loc + 4, 0);
        wr64(loc + 8, rec_offset);
        wr32(loc + 16, 1); /* total disks */
        if ((st = put(zw, r, sizeof r, err))) return st;
    }
    uint8_t e[22];
    wr32(e, SIG_EOCD);
    wr16(e + 4, 0);
    wr16(e + 6, 0);
    wr16(e + 8, big_count ? 0xFFFFu : (uint32_t)count);
    wr16(e + 10, big_count ? 0xFFFFu : (uint32_t)count);
    wr32(e + 12, big_cd_size ? 0xFFFFFFFFu : (uint32_t)cd_size);
    wr32(e + 16, big_cd_offset ? 0xFFFFFFFFu : (uint32_t)cd_offset);
    wr16(e + 20, 0); /* comment */
    if ((st = put(zw, e, sizeof e, err)) || (st = tm_output_stream_flush(&zw->out, err))) return st;
    zw->finished = 1;
    return TM_OK;
}
