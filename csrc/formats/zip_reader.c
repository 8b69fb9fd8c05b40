/* Zip reader over a read-only buffer. The buffer is untrusted: every offset read from it is
 * checked against the buffer (written as `a > size || b > size - a` so nothing overflows)
 * before anything at that offset is touched. Stored members are never copied. */
#define _POSIX_C_SOURCE 200809L /* strdup */
#include "formats/zip_reader.h"

#include "core/name_map.h"

#include "core/crc32.h"

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define SIG_LOCAL 0x04034b50u
#define SIG_CENTRAL 0x02014b50u
#define SIG_EOCD 0x06054b50u
#define SIG_EOCD64 0x06064b50u
#define SIG_EOCD64_LOCATOR 0x07064b50u

#define LOCAL_HEADER_SIZE 30u
#define CENTRAL_HEADER_SIZE 46u
#define EOCD_SIZE 22u
#define EOCD64_SIZE 56u
#define EOCD64_LOCATOR_SIZE 20u
#define MAX_COMMENT 65535u

#define ZIP64_EXTRA_ID 0x0001u

typedef unsigned long long ull;

struct tm_zip_reader {
    const uint8_t *data;
    size_t size;
    char *label;
    tm_zip_entry *entries;
    size_t count;
    tm_name_map by_name;         /* member name -> entry index */
    char *names;                 /* one block holding every NUL-terminated name */
};

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }

/* 1 if [off, off+len) lies inside [0, limit). */
static int in_range(uint64_t off, uint64_t len, uint64_t limit) {
    return off <= limit && len <= limit - off;
}

int tm_zip_looks_like_zip(const uint8_t *data, size_t size) {
    if (!data || size < 4) return 0;
    return memcmp(data, "PK\x03\x04", 4) == 0 || memcmp(data, "PK\x05\x06", 4) == 0;
}

/* The archive's end: where the central directory is and how many entries it holds. */
typedef struct zip_end {
    uint64_t count, cd_offset, cd_size;
    uint64_t end_start; /* first byte of the end records; the directory must stop before it */
} zip_end;

/* Scans backwards because the record is followed by a variable-length comment; takes the
 * last signature whose comment fits, as other readers do. */
static int find_eocd(const uint8_t *d, size_t size, size_t *pos) {
    if (size < EOCD_SIZE) return 0;
    size_t start = size - EOCD_SIZE;
    size_t lowest = start > MAX_COMMENT ? start - MAX_COMMENT : 0;
    for (size_t p = start + 1; p-- > lowest;) {
        if (rd32(d + p) == SIG_EOCD && rd16(d + p + 20) <= size - p - EOCD_SIZE) {
            *pos = p;
            return 1;
        }
    }
    return 0;
}

static tm_status read_end(const uint8_t *d, size_t size, const char *label, zip_end *end,
                          tm_error *err) {
    size_t eocd;
    if (!find_eocd(d, size, &eocd))
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: not a zip archive (no end of central directory record)", label);
    const uint8_t *e = d + eocd;
    uint64_t disk = rd16(e + 4), cd_disk = rd16(e + 6), disk_count = rd16(e + 8);
    end->count = rd16(e + 10);
    end->cd_size = rd32(e + 12);
    end->cd_offset = rd32(e + 16);
    end->end_start = eocd;

    /* The zip64 locator sits right before the classic record; when present its values win
     * (the classic fields then hold 0xFFFF/0xFFFFFFFF markers). */
    if (eocd >= EOCD64_LOCATOR_SIZE && rd32(e - EOCD64_LOCATOR_SIZE) == SIG_EOCD64_LOCATOR) {
        const uint8_t *loc = e - EOCD64_LOCATOR_SIZE;
        uint64_t rec = rd64(loc + 8);
        uint64_t limit = eocd - EOCD64_LOCATOR_SIZE;
        if (rd32(loc + 4) != 0 || rd32(loc + 16) > 1)
            return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                                "%s: zip: archives spanning several disks are not supported", label);
        if (!in_range(rec, EOCD64_SIZE, limit))
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: zip64 end of central directory record at offset %llu is "
                                "past its locator (offset %llu)",
                                label, (ull)rec, (ull)limit);
        const uint8_t *r = d + rec;
        if (rd32(r) != SIG_EOCD64)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: no zip64 end of central directory record at offset %llu",
                                label, (ull)rec);
        disk = rd32(r + 16);
        cd_disk = rd32(r + 20);
        disk_count = rd64(r + 24);
        end->count = rd64(r + 32);
        end->cd_size = rd64(r + 40);
        end->cd_offset = rd64(r + 48);
        end->end_start = rec;
    }
    if (disk != 0 || cd_disk != 0 || disk_count != end->count)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                            "%s: zip: archives spanning several disks are not supported", label);
    if (!in_range(end->cd_offset, end->cd_size, size))
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: zip: central directory extends past end of file (offset %llu, "
                            "size %llu, file %llu)",
                            label, (ull)end->cd_offset, (ull)end->cd_size, (ull)size);
    if (!in_range(end->cd_offset, end->cd_size, end->end_start))
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: zip: central directory (offset %llu, size %llu) overlaps the end "
                            "of central directory record at offset %llu",
                            label, (ull)end->cd_offset, (ull)end->cd_size, (ull)end->end_start);
    /* Bounds the allocation below by the file size, whatever the count field claims. */
    if (end->count > end->cd_size / CENTRAL_HEADER_SIZE)
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: zip: central directory of %llu bytes cannot hold %llu entries",
                            label, (ull)end->cd_size, (ull)end->count);
    return TM_OK;
}

/* Replaces the marked 32-bit values by the zip64 extra field's 64-bit ones. Fields appear
 * only for the values that carry a marker, always in this order. */
static tm_status apply_zip64_extra(const uint8_t *x, size_t xlen, uint64_t *size,
                                   uint64_t *comp_size, uint64_t *offset, int disk_marked,
                                   const char *label, const char *name, tm_error *err) {
    size_t i = 0;
    while (xlen - i >= 4) {
        uint16_t id = rd16(x + i), len = rd16(x + i + 2);
        i += 4;
        if (len > xlen - i)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: member '%s': extra field 0x%04x of %u bytes runs past "
                                "the end of the extra data",
                                label, name, id, len);
        if (id == ZIP64_EXTRA_ID) {
            uint64_t *fields[3] = {size, comp_size, offset};
            size_t j = 0;
            for (int f = 0; f < 3; f++) {
                if (*fields[f] != 0xFFFFFFFFu) continue;
                if (len - j < 8)
                    return tm_error_set(err, TM_ERROR_FORMAT,
                                        "%s: zip: member '%s': zip64 extra field too short", label,
                                        name);
                *fields[f] = rd64(x + i + j);
                j += 8;
            }
            if (disk_marked && len - j < 4)
                return tm_error_set(err, TM_ERROR_FORMAT,
                                    "%s: zip: member '%s': zip64 extra field too short", label, name);
            return TM_OK;
        }
        i += len;
    }
    return TM_OK;
}

static tm_status read_directory(tm_zip_reader *zr, const zip_end *end, tm_error *err) {
    const uint8_t *d = zr->data;
    const char *label = zr->label;
    uint64_t p = end->cd_offset, cd_end = end->cd_offset + end->cd_size;
    char *name_out = zr->names;
    for (size_t i = 0; i < zr->count; i++) {
        if (cd_end - p < CENTRAL_HEADER_SIZE)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: central directory ends inside entry %zu of %zu", label,
                                i, zr->count);
        const uint8_t *c = d + p;
        if (rd32(c) != SIG_CENTRAL)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: bad central directory entry signature at offset %llu",
                                label, (ull)p);
        uint16_t flags = rd16(c + 8), method = rd16(c + 10);
        uint32_t crc = rd32(c + 16);
        uint64_t comp_size = rd32(c + 20), size = rd32(c + 24);
        uint16_t nlen = rd16(c + 28), xlen = rd16(c + 30), clen = rd16(c + 32);
        uint16_t disk = rd16(c + 34);
        uint64_t local = rd32(c + 42);
        uint64_t total = (uint64_t)CENTRAL_HEADER_SIZE + nlen + xlen + clen;
        if (total > cd_end - p)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: central directory entry %zu at offset %llu runs past the "
                                "end of the directory",
                                label, i, (ull)p);
        const uint8_t *raw_name = c + CENTRAL_HEADER_SIZE;
        if (memchr(raw_name, 0, nlen))
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: central directory entry %zu has a name containing a NUL "
                                "byte",
                                label, i);
        /* Fits: each entry used at least 46 directory bytes for its name's 1 extra byte. */
        memcpy(name_out, raw_name, nlen);
        name_out[nlen] = '\0';
        const char *name = name_out;
        name_out += nlen + 1;

        tm_status st = apply_zip64_extra(raw_name + nlen, xlen, &size, &comp_size, &local,
                                         disk == 0xFFFF, label, name, err);
        if (st) return st;
        if (flags & 1u)
            return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                                "%s: zip: member '%s' is encrypted (not supported)", label, name);
        if (method == 0 && comp_size != size)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: stored member '%s' has compressed size %llu but size %llu",
                                label, name, (ull)comp_size, (ull)size);

        /* Local header sizes are not trusted (torch writes 0 there), only its name and extra
         * lengths, which place the data. */
        if (!in_range(local, LOCAL_HEADER_SIZE, zr->size))
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: member '%s': local header at offset %llu is past end of "
                                "file (%llu bytes)",
                                label, name, (ull)local, (ull)zr->size);
        const uint8_t *l = d + local;
        if (rd32(l) != SIG_LOCAL)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: member '%s': no local header at offset %llu", label, name,
                                (ull)local);
        uint16_t lnlen = rd16(l + 26), lxlen = rd16(l + 28);
        uint64_t data_offset = local + LOCAL_HEADER_SIZE + lnlen + lxlen;
        if (data_offset > zr->size)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: member '%s': local header at offset %llu extends past "
                                "end of file",
                                label, name, (ull)local);
        if (lnlen != nlen || memcmp(l + LOCAL_HEADER_SIZE, raw_name, nlen) != 0)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: member '%s': local header name differs from the central "
                                "directory's",
                                label, name);
        if (!in_range(data_offset, comp_size, end->cd_offset))
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: zip: member '%s': data (offset %llu, size %llu) extends past "
                                "the start of the central directory (offset %llu)",
                                label, name, (ull)data_offset, (ull)comp_size,
                                (ull)end->cd_offset);

        tm_zip_entry *e = &zr->entries[i];
        e->name = name;
        e->data_offset = data_offset;
        e->comp_size = comp_size;
        e->size = size;
        e->crc32 = crc;
        e->method = method;
        /* reserved for every entry at open: 1 means the name is there already */
        if (tm_name_map_insert(&zr->by_name, name, i, NULL))
            return tm_error_set(err, TM_ERROR_FORMAT, "%s: zip: duplicate member name '%s'", label, name);
        p += total;
    }
    return TM_OK;
}

tm_status tm_zip_reader_open(const uint8_t *data, size_t size, const char *label,
                             tm_zip_reader **out, tm_error *err) {
    *out = NULL;
    if (!label) label = "zip";
    if (!data) size = 0;
    zip_end end = {0, 0, 0, 0};
    tm_status st = read_end(data, size, label, &end, err);
    if (st) return st;

    tm_zip_reader *zr = calloc(1, sizeof *zr);
    if (!zr) return tm_error_set(err, TM_ERROR_NOMEM, "%s: zip: out of memory", label);
    zr->data = data;
    zr->size = size;
    zr->count = (size_t)end.count; /* <= cd_size / 46 <= size: fits size_t */
    size_t n = zr->count ? zr->count : 1;
    zr->label = strdup(label);
    zr->entries = calloc(n, sizeof *zr->entries);
    int no_map = tm_name_map_reserve(&zr->by_name, n);
    zr->names = malloc((size_t)end.cd_size + 1);
    if (!zr->label || !zr->entries || no_map || !zr->names) {
        tm_zip_reader_free(zr);
        return tm_error_set(err, TM_ERROR_NOMEM, "%s: zip: out of memory reading %llu entries",
                            label, (ull)end.count);
    }
    st = read_directory(zr, &end, err);
    if (st) {
        tm_zip_reader_free(zr);
        return st;
    }
    *out = zr;
    return TM_OK;
}

void tm_zip_reader_free(tm_zip_reader *zr) {
    if (!zr) return;
    free(zr->label);
    free(zr->entries);
    tm_name_map_free(&zr->by_name);
    free(zr->names);
    free(zr);
}

size_t tm_zip_reader_count(const tm_zip_reader *zr) { return zr ? zr->count : 0; }

const tm_zip_entry *tm_zip_reader_entry(const tm_zip_reader *zr, size_t i) {
    return zr && i < zr->count ? &zr->entries[i] : NULL;
}

const tm_zip_entry *tm_zip_reader_find(const tm_zip_reader *zr, const char *name) {
    size_t i;
    return zr && tm_name_map_find(&zr->by_name, name, &i) ? &zr->entries[i] : NULL;
}

/* Inflates exactly e->size bytes into out. The output window never extends past out's
 * declared size; a 1-byte scratch window afterwards detects a stream that would go on. */
static tm_status inflate_member(const tm_zip_reader *zr, const tm_zip_entry *e, uint8_t *out,
                                tm_error *err) {
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (inflateInit2(&zs, -MAX_WBITS) != Z_OK)
        return tm_error_set(err, TM_ERROR_NOMEM, "%s: zip: member '%s': cannot start inflate",
                            zr->label, e->name);
    const uint8_t *in = zr->data + e->data_offset;
    uint64_t in_left = e->comp_size, out_left = e->size;
    uint8_t *next_out = out;
    uint8_t scratch[1];
    int in_scratch = 0;
    tm_status st = TM_OK;
    for (;;) {
        if (zs.avail_in == 0 && in_left) {
            uInt chunk = in_left > UINT_MAX ? UINT_MAX : (uInt)in_left;
            zs.next_in = (Bytef *)(uintptr_t)in; /* zlib does not write through next_in */
            zs.avail_in = chunk;
            in += chunk;
            in_left -= chunk;
        }
        if (zs.avail_out == 0) {
            if (out_left) {
                uInt chunk = out_left > UINT_MAX ? UINT_MAX : (uInt)out_left;
                zs.next_out = next_out;
                zs.avail_out = chunk;
                next_out += chunk;
                out_left -= chunk;
            } else {
                zs.next_out = scratch;
                zs.avail_out = sizeof scratch;
                in_scratch = 1;
            }
        }
        int ret = inflate(&zs, Z_NO_FLUSH);
        if (in_scratch && zs.avail_out == 0) {
            st = tm_error_set(err, TM_ERROR_FORMAT,
                              "%s: zip: member '%s' inflates to more than its declared %llu bytes",
                              zr->label, e->name, (ull)e->size);
            break;
        }
        if (ret == Z_STREAM_END) {
            uint64_t produced = e->size - out_left - (in_scratch ? 0 : zs.avail_out);
            if (produced != e->size)
                st = tm_error_set(err, TM_ERROR_FORMAT,
                                  "%s: zip: member '%s' inflates to %llu bytes, not its declared "
                                  "%llu",
                                  zr->label, e->name, (ull)produced, (ull)e->size);
            break;
        }
        if (ret == Z_OK) continue;
        if (ret == Z_MEM_ERROR) {
            st = tm_error_set(err, TM_ERROR_NOMEM, "%s: zip: member '%s': out of memory inflating",
                              zr->label, e->name);
        } else if (ret == Z_BUF_ERROR && zs.avail_in == 0 && in_left == 0) {
            st = tm_error_set(err, TM_ERROR_FORMAT,
                              "%s: zip: member '%s': compressed data (%llu bytes) ends before the "
                              "deflate stream does",
                              zr->label, e->name, (ull)e->comp_size);
        } else {
            st = tm_error_set(err, TM_ERROR_FORMAT, "%s: zip: member '%s': corrupt deflate data%s%s",
                              zr->label, e->name, zs.msg ? ": " : "", zs.msg ? zs.msg : "");
        }
        break;
    }
    inflateEnd(&zs);
    return st;
}

static uint32_t crc_of(const uint8_t *p, uint64_t n) { return tm_crc32(0, p, (size_t)n); }

tm_status tm_zip_reader_read(const tm_zip_reader *zr, const tm_zip_entry *e, uint64_t max_size,
                             const uint8_t **bytes, uint8_t **owned, tm_error *err) {
    *bytes = NULL;
    *owned = NULL;
    uintptr_t base = (uintptr_t)(zr ? zr->entries : NULL), at = (uintptr_t)e;
    if (!zr || !e || at < base || (at - base) / sizeof *e >= zr->count ||
        (at - base) % sizeof *e != 0)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "zip: tm_zip_reader_read: entry does not belong to this reader");
    if (e->size > max_size)
        return tm_error_set(err, TM_ERROR_LIMIT,
                            "%s: zip: member '%s' is %llu bytes, more than the limit of %llu bytes",
                            zr->label, e->name, (ull)e->size, (ull)max_size);
    if (e->method == 0) {
        *bytes = zr->data + e->data_offset;
        return TM_OK;
    }
    if (e->method != 8)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                            "%s: zip: member '%s' uses compression method %u (only stored and "
                            "deflate are supported)",
                            zr->label, e->name, e->method);
    if (e->size > SIZE_MAX - 1)
        return tm_error_set(err, TM_ERROR_LIMIT,
                            "%s: zip: member '%s' is %llu bytes, too large for memory", zr->label,
                            e->name, (ull)e->size);
    uint8_t *buf = malloc(e->size ? (size_t)e->size : 1);
    if (!buf)
        return tm_error_set(err, TM_ERROR_NOMEM,
                            "%s: zip: member '%s': out of memory for %llu bytes", zr->label,
                            e->name, (ull)e->size);
    tm_status st = inflate_member(zr, e, buf, err);
    if (!st) {
        uint32_t crc = crc_of(buf, e->size);
        if (crc != e->crc32)
            st = tm_error_set(err, TM_ERROR_FORMAT,
                              "%s: zip: member '%s': CRC-32 mismatch (computed %08x, directory "
                              "says %08x)",
                              zr->label, e->name, crc, e->crc32);
    }
    if (st) {
        free(buf);
        return st;
    }
    *bytes = buf;
    *owned = buf;
    return TM_OK;
}
