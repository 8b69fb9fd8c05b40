/* Legacy (non-zip) torch.save reader: five pickles, then the raw storages in key-list order.
 * See legacy_pt.h for the layout. Mirrors torch.serialization._legacy_load: a key's element
 * size is that of the storage type the key was first seen with, and a record's element count
 * must equal the one in that persistent id ("storage has wrong byte size" in torch). */
#define _POSIX_C_SOURCE 200809L

#include "formats/legacy_pt.h"

#include "core/name_map.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 0x1950a86a20f9469cfc6c, little-endian two's complement, as LONG1 stores it. */
static const uint8_t k_magic_le[10] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
/* The same number as protocol 0/1 write it (LONG opcode, decimal text). */
static const char k_magic_text[] = "L119547037146038801333356L\n";

#define LEGACY_PROTOCOL_VERSION 1001

typedef struct uniq_storage {
    const tm_pk_value *first; /* first TM_PK_STORAGE with this key: gives the element size */
    size_t elsize;
    uint64_t offset, nbytes;  /* payload range in data */
    int placed;               /* seen in the key list */
} uniq_storage;

struct tm_legacy_pt {
    tm_pickle *obj;
    uniq_storage *uniq;   /* one per distinct key */
    size_t nuniq;
    size_t *order;        /* uniq indices in key-list (file) order; nuniq entries */
    tm_name_map index;    /* storage key -> uniq index */
};

/* ---- Helpers ------------------------------------------------------------------------------ */

static tm_status lerr(tm_error *err, tm_status st, const char *label, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

static tm_status lerr(tm_error *err, tm_status st, const char *label, const char *fmt, ...) {
    char msg[800];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *l = label ? label : "";
    return tm_error_set(err, st, "%s%s%s", l, *l ? ": " : "", msg);
}

static size_t storage_elsize(const tm_pk_value *s) {
    return s->u.storage.has_dtype ? tm_dtype_size(s->u.storage.dtype) : 1;
}

static uint64_t rd_le64(const uint8_t *b) {
    uint64_t x = 0;
    for (int i = 0; i < 8; i++) x |= (uint64_t)b[i] << (8 * i);
    return x;
}

/* Index of the distinct storage with this key, or SIZE_MAX. */
static size_t find_key(const tm_legacy_pt *lp, const char *key) {
    size_t e;
    return tm_name_map_find(&lp->index, key, &e) ? e : SIZE_MAX;
}

/* ---- Signature ---------------------------------------------------------------------------- */

int tm_legacy_pt_looks_like(const uint8_t *data, size_t size) {
    if (!data) return 0;
    size_t tl = sizeof k_magic_text - 1;
    if (size >= tl && memcmp(data, k_magic_text, tl) == 0) return 1;
    if (size < 2 || data[0] != 0x80 || data[1] < 2 || data[1] > 5) return 0;
    size_t pos = 2;
    if (size > pos && data[pos] == 0x95) pos += 9; /* FRAME + 8-byte length (protocol 4+) */
    if (size < pos + 2 + sizeof k_magic_le) return 0;
    return data[pos] == 0x8a && data[pos + 1] == sizeof k_magic_le &&
           memcmp(data + pos + 2, k_magic_le, sizeof k_magic_le) == 0;
}

/* ---- Header pickles ------------------------------------------------------------------------ */

static tm_status check_magic(const tm_pk_value *v, const char *label, tm_error *err) {
    if (v->kind == TM_PK_BIGINT && v->u.str.len == sizeof k_magic_le &&
        memcmp(v->u.str.data, k_magic_le, sizeof k_magic_le) == 0)
        return TM_OK;
    return lerr(err, TM_ERROR_FORMAT, label,
                "not a legacy torch.save file (the first pickle is not the magic number)");
}

static tm_status check_version(const tm_pk_value *v, const char *label, tm_error *err) {
    if (v->kind != TM_PK_INT)
        return lerr(err, TM_ERROR_FORMAT, label,
                    "legacy torch.save protocol version is a %s, not an int", tm_pk_kind_name(v->kind));
    if (v->u.integer != LEGACY_PROTOCOL_VERSION)
        return lerr(err, TM_ERROR_UNSUPPORTED, label,
                    "legacy torch.save protocol version %lld is not supported (expected %d)",
                    (long long)v->u.integer, LEGACY_PROTOCOL_VERSION);
    return TM_OK;
}

static tm_status check_sys_info(const tm_pk_value *v, const char *label, tm_error *err) {
    if (v->kind != TM_PK_DICT)
        return lerr(err, TM_ERROR_FORMAT, label, "legacy sys_info is a %s, not a dict",
                    tm_pk_kind_name(v->kind));
    const tm_pk_value *le = tm_pk_dict_get(v, "little_endian");
    if (!le) return TM_OK; /* torch.load ignores sys_info; every writer sets it */
    int little;
    if (le->kind == TM_PK_BOOL) little = le->u.boolean != 0;
    else if (le->kind == TM_PK_INT) little = le->u.integer != 0;
    else
        return lerr(err, TM_ERROR_FORMAT, label, "legacy sys_info little_endian is a %s",
                    tm_pk_kind_name(le->kind));
    if (!little)
        return lerr(err, TM_ERROR_UNSUPPORTED, label, "big-endian checkpoints are not supported");
    return TM_OK;
}

/* ---- Open ------------------------------------------------------------------------------------ */

static tm_status build_index(tm_legacy_pt *lp, const char *label, tm_error *err) {
    size_t n = tm_pickle_n_storages(lp->obj);
    if (n > (size_t)UINT32_MAX / 4)
        return lerr(err, TM_ERROR_LIMIT, label, "more than %u storages", (unsigned)(UINT32_MAX / 4));
    lp->uniq = calloc(n ? n : 1, sizeof *lp->uniq);
    lp->order = calloc(n ? n : 1, sizeof *lp->order);
    if (!lp->uniq || !lp->order || tm_name_map_reserve(&lp->index, n))
        return lerr(err, TM_ERROR_NOMEM, label, "out of memory");
    for (size_t i = 0; i < n; i++) {
        const tm_pk_value *s = tm_pickle_storage(lp->obj, i);
        /* reserved above: inserting cannot fail; 1 is the same key seen with another dtype */
        if (tm_name_map_insert(&lp->index, s->u.storage.key, lp->nuniq, NULL)) continue;
        uniq_storage *u = &lp->uniq[lp->nuniq];
        u->first = s;
        u->elsize = storage_elsize(s);
        lp->nuniq++;
    }
    return TM_OK;
}

/* Lays the storages out in key-list order starting at data[pos]. */
static tm_status place_storages(tm_legacy_pt *lp, const tm_pk_value *keys, const uint8_t *data,
                                size_t size, size_t pos, const char *label, tm_error *err) {
    if (keys->kind != TM_PK_LIST && keys->kind != TM_PK_TUPLE)
        return lerr(err, TM_ERROR_FORMAT, label,
                    "the legacy storage key list (fifth pickle) is a %s, not a list",
                    tm_pk_kind_name(keys->kind));
    size_t nkeys = keys->u.seq.n;
    uint64_t off = pos;
    for (size_t i = 0; i < nkeys; i++) {
        const tm_pk_value *k = keys->u.seq.items[i];
        char buf[32];
        const char *key;
        if (k->kind == TM_PK_STRING) {
            key = k->u.str.data;
            if (strlen(key) != k->u.str.len)
                return lerr(err, TM_ERROR_FORMAT, label, "storage key %zu contains NUL", i);
        } else if (k->kind == TM_PK_INT) {
            snprintf(buf, sizeof buf, "%lld", (long long)k->u.integer);
            key = buf;
        } else {
            return lerr(err, TM_ERROR_FORMAT, label, "storage key %zu of the key list is a %s", i,
                        tm_pk_kind_name(k->kind));
        }
        size_t e = find_key(lp, key);
        if (e == SIZE_MAX)
            return lerr(err, TM_ERROR_FORMAT, label,
                        "storage key '%.200s' (%zu of %zu in the key list) is not referenced by "
                        "the pickled object, so the size of its data is unknown",
                        key, i + 1, nkeys);
        uniq_storage *u = &lp->uniq[e];
        if (u->placed)
            return lerr(err, TM_ERROR_FORMAT, label, "storage key '%.200s' is listed twice", key);
        if ((uint64_t)size - off < 8)
            return lerr(err, TM_ERROR_FORMAT, label,
                        "truncated file: storage '%.200s' (%zu of %zu) starts at byte %llu but "
                        "the file has %zu bytes",
                        key, i + 1, nkeys, (unsigned long long)off, size);
        uint64_t raw = rd_le64(data + off);
        int64_t numel;
        memcpy(&numel, &raw, sizeof numel);
        int64_t want = u->first->u.storage.numel;
        if (numel != want)
            return lerr(err, TM_ERROR_FORMAT, label,
                        "storage '%.200s' at byte %llu holds %lld elements but its persistent id "
                        "says %lld",
                        key, (unsigned long long)off, (long long)numel, (long long)want);
        uint64_t nbytes;
        uint64_t avail = (uint64_t)size - off - 8;
        if (numel < 0 || __builtin_mul_overflow((uint64_t)numel, (uint64_t)u->elsize, &nbytes) ||
            nbytes > avail)
            return lerr(err, TM_ERROR_FORMAT, label,
                        "truncated file: storage '%.200s' (%zu of %zu) declares %lld elements of "
                        "%zu bytes at byte %llu but only %llu bytes remain",
                        key, i + 1, nkeys, (long long)numel, u->elsize,
                        (unsigned long long)(off + 8), (unsigned long long)avail);
        u->offset = off + 8;
        u->nbytes = nbytes;
        u->placed = 1;
        lp->order[i] = e;
        off = u->offset + nbytes;
    }
    for (size_t e = 0; e < lp->nuniq; e++)
        if (!lp->uniq[e].placed)
            return lerr(err, TM_ERROR_FORMAT, label,
                        "storage '%.200s' is referenced by the pickled object but missing from "
                        "the storage key list, so the file holds no data for it",
                        lp->uniq[e].first->u.storage.key);
    /* Every key now has a record: nkeys == nuniq. A key seen through a second dtype must fit. */
    for (size_t i = 0; i < tm_pickle_n_storages(lp->obj); i++) {
        const tm_pk_value *s = tm_pickle_storage(lp->obj, i);
        const uniq_storage *u = &lp->uniq[find_key(lp, s->u.storage.key)];
        uint64_t need;
        if (s->u.storage.numel < 0 ||
            __builtin_mul_overflow((uint64_t)s->u.storage.numel, (uint64_t)storage_elsize(s),
                                   &need) ||
            need > u->nbytes)
            return lerr(err, TM_ERROR_FORMAT, label,
                        "storage '%.200s' is used as %lld elements of %s but holds %llu bytes",
                        s->u.storage.key, (long long)s->u.storage.numel,
                        s->u.storage.has_dtype ? tm_dtype_name(s->u.storage.dtype) : "bytes",
                        (unsigned long long)u->nbytes);
    }
    return TM_OK;
}

tm_status tm_legacy_pt_open(const uint8_t *data, size_t size, const char *label,
                            tm_legacy_pt **out, tm_error *err) {
    static const char *const what[5] = {"magic number", "protocol version", "sys_info",
                                        "object", "storage key list"};
    if (out) *out = NULL;
    if (!out || (!data && size))
        return lerr(err, TM_ERROR_INVALID_ARGUMENT, label, "tm_legacy_pt_open: invalid argument");
    tm_legacy_pt *lp = calloc(1, sizeof *lp);
    if (!lp) return lerr(err, TM_ERROR_NOMEM, label, "out of memory");
    tm_pickle *pk[5] = {NULL, NULL, NULL, NULL, NULL};
    tm_status st = TM_OK;
    size_t pos = 0;
    const char *l = label ? label : "";
    for (int i = 0; i < 5 && st == TM_OK; i++) {
        char sub[700];
        snprintf(sub, sizeof sub, "%s%slegacy %s pickle at byte %zu", l, *l ? ": " : "", what[i],
                 pos);
        size_t used = 0;
        st = tm_pickle_load(data ? data + pos : data, size - pos, sub, NULL, &pk[i], &used, err);
        if (st) break;
        pos += used;
        const tm_pk_value *root = tm_pickle_root(pk[i]);
        if (i == 0) st = check_magic(root, label, err);
        else if (i == 1) st = check_version(root, label, err);
        else if (i == 2) st = check_sys_info(root, label, err);
    }
    if (st == TM_OK) {
        lp->obj = pk[3];
        pk[3] = NULL;
        st = build_index(lp, label, err);
    }
    if (st == TM_OK) st = place_storages(lp, tm_pickle_root(pk[4]), data, size, pos, label, err);
    for (int i = 0; i < 5; i++) tm_pickle_free(pk[i]);
    if (st) {
        tm_legacy_pt_free(lp);
        return st;
    }
    *out = lp;
    return TM_OK;
}

const tm_pk_value *tm_legacy_pt_root(const tm_legacy_pt *lp) {
    return lp ? tm_pickle_root(lp->obj) : NULL;
}

tm_status tm_legacy_pt_storage(const tm_legacy_pt *lp, const tm_pk_value *storage,
                               uint64_t *file_offset, uint64_t *nbytes, tm_error *err) {
    if (!lp || !storage || storage->kind != TM_PK_STORAGE || !file_offset || !nbytes)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "tm_legacy_pt_storage: invalid argument");
    size_t e = find_key(lp, storage->u.storage.key);
    if (e == SIZE_MAX)
        return tm_error_set(err, TM_ERROR_NOT_FOUND, "storage '%.200s' is not in this file",
                            storage->u.storage.key);
    const uniq_storage *u = &lp->uniq[e];
    /* Checked at open for this file's storages; repeated for a value from elsewhere. */
    uint64_t need;
    if (storage->u.storage.numel < 0 ||
        __builtin_mul_overflow((uint64_t)storage->u.storage.numel,
                               (uint64_t)storage_elsize(storage), &need) ||
        need > u->nbytes)
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "storage '%.200s' is used as %lld elements but holds %llu bytes",
                            storage->u.storage.key, (long long)storage->u.storage.numel,
                            (unsigned long long)u->nbytes);
    *file_offset = u->offset;
    *nbytes = u->nbytes;
    return TM_OK;
}

size_t tm_legacy_pt_n_storages(const tm_legacy_pt *lp) { return lp ? lp->nuniq : 0; }

tm_status tm_legacy_pt_storage_at(const tm_legacy_pt *lp, size_t i, const char **key,
                                  uint64_t *file_offset, uint64_t *nbytes) {
    if (!lp || i >= lp->nuniq) return TM_ERROR_INVALID_ARGUMENT;
    const uniq_storage *u = &lp->uniq[lp->order[i]];
    if (key) *key = u->first->u.storage.key;
    if (file_offset) *file_offset = u->offset;
    if (nbytes) *nbytes = u->nbytes;
    return TM_OK;
}

void tm_legacy_pt_free(tm_legacy_pt *lp) {
    if (!lp) return;
    tm_pickle_free(lp->obj);
    free(lp->uniq);
    free(lp->order);
    tm_name_map_free(&lp->index);
    free(lp);
}
