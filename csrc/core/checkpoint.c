/* tm_checkpoint: one opened file, its format recognised, its state dict flattened into a table
 * of strided views over the mapped bytes. Nothing is copied at open; tensor bytes are read
 * when the caller uses them. */
#define _GNU_SOURCE
#include "core/checkpoint_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/legacy_pt.h"
#include "formats/mapped_file.h"
#include "formats/pickle.h"
#include "formats/state_dict_walk.h"
#include "formats/zip_reader.h"

/* data.pkl of a checkpoint is metadata only; a larger one is hostile or not a checkpoint. */
#define MAX_PICKLE_BYTES ((uint64_t)1 << 30)

typedef struct ckpt_tensor {
    char *name;
    tm_dtype dtype;
    int32_t ndim;
    int64_t shape[TM_MAX_NDIM], stride[TM_MAX_NDIM];
    int64_t storage_offset;
    size_t storage;   /* index into storages */
    uint64_t numel;
} ckpt_tensor;

typedef struct ckpt_storage {
    const tm_pk_value *pk;   /* identity: same pointer = same storage */
    const uint8_t *data;
    uint64_t file_offset;
    uint64_t nbytes;
} ckpt_storage;

struct tm_checkpoint {
    char *path;
    char *key;
    const char *format;
    int is_module;
    tm_mapped_file map;
    ckpt_tensor *tensors;
    size_t n_tensors;
    ckpt_storage *storages;
    size_t n_storages;
};

void tm_open_options_init(tm_open_options *opts) {
    if (opts) memset(opts, 0, sizeof *opts);
}

/* Finds "<prefix>/data.pkl" (the prefix is arbitrary: "archive", the file stem, …). */
static const tm_zip_entry *find_data_pkl(const tm_zip_reader *zr, char *prefix, size_t cap) {
    const tm_zip_entry *best = NULL;
    for (size_t i = 0; i < tm_zip_reader_count(zr); i++) {
        const tm_zip_entry *e = tm_zip_reader_entry(zr, i);
        const char *slash = strchr(e->name, '/');
        if (!slash || strcmp(slash, "/data.pkl") != 0) continue;
        if (!best || strlen(e->name) < strlen(best->name)) best = e;
    }
    if (best) {
        size_t len = (size_t)(strchr(best->name, '/') - best->name);
        if (len >= cap) len = cap - 1;
        memcpy(prefix, best->name, len);
        prefix[len] = '\0';
    }
    return best;
}

static int has_member_prefix(const tm_zip_reader *zr, const char *prefix, const char *sub) {
    size_t pl = strlen(prefix), sl = strlen(sub);
    for (size_t i = 0; i < tm_zip_reader_count(zr); i++) {
        const char *n = tm_zip_reader_entry(zr, i)->name;
        if (strncmp(n, prefix, pl) == 0 && n[pl] == '/' && strncmp(n + pl + 1, sub, sl) == 0)
            return 1;
    }
    return 0;
}

static uint64_t checked_mul(uint64_t a, uint64_t b, int *overflow) {
    if (a && b > UINT64_MAX / a) { *overflow = 1; return 0; }
    return a * b;
}

/* Where storage records live: zip members, or the raw records after a legacy file's pickles. */
typedef struct storage_source {
    const tm_zip_reader *zr;
    const char *prefix;
    const tm_legacy_pt *legacy;
} storage_source;

static tm_status locate_storage(const tm_checkpoint *ck, const storage_source *src, const tm_pk_value *pk,
                                const char *tname, uint64_t *offset, uint64_t *size, tm_error *err) {
    if (src->legacy) {
        tm_status st = tm_legacy_pt_storage(src->legacy, pk, offset, size, err);
        if (st) tm_error_prefix(err, ck->path);
        return st;
    }
    char name[1024];
    snprintf(name, sizeof name, "%s/data/%s", src->prefix, pk->u.storage.key);
    const tm_zip_entry *e = tm_zip_reader_find(src->zr, name);
    if (!e) {
        /* Mobile (.ptl) archives keep tensors under constants/<key>. */
        snprintf(name, sizeof name, "%s/constants/%s", src->prefix, pk->u.storage.key);
        e = tm_zip_reader_find(src->zr, name);
    }
    if (!e)
        return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor '%s': storage record '%s/data/%s' is missing",
                            ck->path, tname, src->prefix, pk->u.storage.key);
    if (e->method != 0)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                            "%s: tensor '%s': storage record '%s' is compressed", ck->path, tname, name);
    *offset = e->data_offset;
    *size = e->size;
    return TM_OK;
}

static tm_status add_storage(tm_checkpoint *ck, const storage_source *src, const tm_pk_value *pk,
                             tm_dtype tensor_dtype, size_t *index, const char *tname, tm_error *err) {
    for (size_t i = 0; i < ck->n_storages; i++)
        if (ck->storages[i].pk == pk) { *index = i; return TM_OK; }
    uint64_t offset = 0, size = 0;
    tm_status st = locate_storage(ck, src, pk, tname, &offset, &size, err);
    if (st) return st;
    tm_dtype sd = pk->u.storage.has_dtype ? pk->u.storage.dtype : tensor_dtype;
    int of = 0;
    uint64_t need = pk->u.storage.has_dtype
                        ? checked_mul((uint64_t)pk->u.storage.numel, tm_dtype_size(sd), &of)
                        : (uint64_t)pk->u.storage.numel;
    if (pk->u.storage.numel < 0 || of || need > size)
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: tensor '%s': storage '%s' declares %lld elements of %s but the record holds %llu bytes",
                            ck->path, tname, pk->u.storage.key, (long long)pk->u.storage.numel,
                            tm_dtype_name(sd), (unsigned long long)size);
    if (ck->n_storages % 64 == 0) {
        ckpt_storage *p = realloc(ck->storages, (ck->n_storages + 64) * sizeof *p);
        if (!p) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        ck->storages = p;
    }
    ckpt_storage *s = &ck->storages[ck->n_storages];
    s->pk = pk;
    s->file_offset = offset;
    s->data = ck->map.data + offset;
    s->nbytes = need;
    *index = ck->n_storages++;
    return TM_OK;
}

static tm_status build_table(tm_checkpoint *ck, const storage_source *src,
                             const tm_named_tensors *nt, tm_error *err) {
    ck->tensors = calloc(nt->n ? nt->n : 1, sizeof *ck->tensors);
    if (!ck->tensors) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t i = 0; i < nt->n; i++) {
        const tm_pk_value *t = nt->items[i].tensor;
        const char *tname = nt->items[i].name;
        for (size_t j = 0; j < i; j++)
            if (strcmp(ck->tensors[j].name, tname) == 0)
                return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor name '%s' appears twice",
                                    ck->path, tname);
        ckpt_tensor *ct = &ck->tensors[ck->n_tensors];
        ct->name = strdup(tname);
        if (!ct->name) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        ck->n_tensors++;
        ct->dtype = t->u.tensor.dtype;
        ct->ndim = t->u.tensor.ndim;
        ct->storage_offset = t->u.tensor.offset;
        uint64_t numel = 1;
        int of = 0;
        uint64_t last = (uint64_t)t->u.tensor.offset; /* highest element index reached */
        for (int d = 0; d < ct->ndim; d++) {
            ct->shape[d] = t->u.tensor.shape[d];
            ct->stride[d] = t->u.tensor.stride[d];
            numel = checked_mul(numel, (uint64_t)ct->shape[d], &of);
        }
        ct->numel = numel;
        if (numel > 0)
            for (int d = 0; d < ct->ndim; d++) {
                uint64_t span = checked_mul((uint64_t)(ct->shape[d] - 1), (uint64_t)ct->stride[d], &of);
                if (last > UINT64_MAX - span) of = 1; else last += span;
            }
        tm_status st = add_storage(ck, src, t->u.tensor.storage, ct->dtype, &ct->storage, tname, err);
        if (st) return st;
        uint64_t itemsize = tm_dtype_size(ct->dtype);
        uint64_t end = checked_mul(last + 1, itemsize, &of);
        if (of || (numel > 0 && end > ck->storages[ct->storage].nbytes))
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: tensor '%s': view reaches past the end of its storage (%llu bytes)",
                                ck->path, tname,
                                (unsigned long long)ck->storages[ct->storage].nbytes);
    }
    return TM_OK;
}

static tm_status open_zip(tm_checkpoint *ck, const tm_open_options *opts, tm_error *err) {
    tm_zip_reader *zr = NULL;
    tm_pickle *pk = NULL;
    tm_named_tensors nt = {0};
    uint8_t *owned = NULL;
    tm_status st = tm_zip_reader_open(ck->map.data, ck->map.size, ck->path, &zr, err);
    if (st) goto done;
    char prefix[512];
    const tm_zip_entry *e = find_data_pkl(zr, prefix, sizeof prefix);
    if (!e) {
        if (has_member_prefix(zr, "", "model.json") || tm_zip_reader_find(zr, "model.json"))
            st = tm_error_set(err, TM_ERROR_UNSUPPORTED,
                              "%s: TorchScript archive from PyTorch < 1.3 (model.json) is not supported",
                              ck->path);
        else
            st = tm_error_set(err, TM_ERROR_FORMAT,
                              "%s: zip archive without a data.pkl record: not a PyTorch checkpoint", ck->path);
        goto done;
    }
    ck->is_module = has_member_prefix(zr, prefix, "code/") || has_member_prefix(zr, prefix, "constants.pkl");
    ck->format = ck->is_module ? "torchscript" : "pt";
    const uint8_t *bytes = NULL;
    if ((st = tm_zip_reader_read(zr, e, MAX_PICKLE_BYTES, &bytes, &owned, err))) goto done;
    char label[600];
    snprintf(label, sizeof label, "%s: %s", ck->path, e->name);
    if ((st = tm_pickle_load(bytes, e->size, label, NULL, &pk, NULL, err))) goto done;
    if ((st = tm_state_dict_walk(tm_pickle_root(pk), opts ? opts->key : NULL, ck->path, &nt, err)))
        goto done;
    ck->key = nt.key;
    nt.key = NULL;
    storage_source src = {zr, prefix, NULL};
    st = build_table(ck, &src, &nt, err);
done:
    tm_named_tensors_free(&nt);
    tm_pickle_free(pk);
    free(owned);
    tm_zip_reader_free(zr);
    return st;
}

static tm_status open_legacy(tm_checkpoint *ck, const tm_open_options *opts, tm_error *err) {
    tm_legacy_pt *lp = NULL;
    tm_named_tensors nt = {0};
    ck->format = "pt-legacy";
    tm_status st = tm_legacy_pt_open(ck->map.data, ck->map.size, ck->path, &lp, err);
    if (!st) st = tm_state_dict_walk(tm_legacy_pt_root(lp), opts ? opts->key : NULL, ck->path, &nt, err);
    if (!st) {
        ck->key = nt.key;
        nt.key = NULL;
        storage_source src = {NULL, NULL, lp};
        st = build_table(ck, &src, &nt, err);
    }
    tm_named_tensors_free(&nt);
    /* The table keeps storages by pointer identity only during build; values are not used after. */
    tm_legacy_pt_free(lp);
    return st;
}

tm_status tm_checkpoint_open_err(const char *path, const tm_open_options *opts,
                                 tm_checkpoint **out, tm_error *err) {
    *out = NULL;
    if (!path) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "path is NULL");
    tm_checkpoint *ck = calloc(1, sizeof *ck);
    if (!ck || !(ck->path = strdup(path))) {
        free(ck);
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    tm_status st = tm_mapped_file_open(path, &ck->map, err);
    if (!st) {
        if (ck->map.size == 0)
            st = tm_error_set(err, TM_ERROR_FORMAT, "%s: empty file", path);
        else if (tm_zip_looks_like_zip(ck->map.data, ck->map.size))
            st = open_zip(ck, opts, err);
        else if (tm_legacy_pt_looks_like(ck->map.data, ck->map.size))
            st = open_legacy(ck, opts, err);
        else
            st = tm_error_set(err, TM_ERROR_FORMAT,
                              "%s: not a PyTorch checkpoint (unrecognised file signature)", path);
    }
    if (st) {
        tm_checkpoint_close(ck);
        return st;
    }
    *out = ck;
    return TM_OK;
}

tm_status tm_checkpoint_open(const char *path, const tm_open_options *opts, tm_checkpoint **out) {
    tm_error err = {0};
    if (!out) {
        tm_error_set(&err, TM_ERROR_INVALID_ARGUMENT, "tm_checkpoint_open: out is NULL");
        return tm_error_publish(&err);
    }
    tm_status st = tm_checkpoint_open_err(path, opts, out, &err);
    return st ? tm_error_publish(&err) : TM_OK;
}

void tm_checkpoint_close(tm_checkpoint *ck) {
    if (!ck) return;
    for (size_t i = 0; i < ck->n_tensors; i++) free(ck->tensors[i].name);
    free(ck->tensors);
    free(ck->storages);
    tm_mapped_file_close(&ck->map);
    free(ck->key);
    free(ck->path);
    free(ck);
}

const char *tm_checkpoint_format(const tm_checkpoint *ck) { return ck ? ck->format : ""; }
const char *tm_checkpoint_path(const tm_checkpoint *ck) { return ck ? ck->path : ""; }
const char *tm_checkpoint_key(const tm_checkpoint *ck) { return ck && ck->key ? ck->key : ""; }
size_t tm_checkpoint_n_tensors(const tm_checkpoint *ck) { return ck ? ck->n_tensors : 0; }
size_t tm_checkpoint_n_storages(const tm_checkpoint *ck) { return ck ? ck->n_storages : 0; }
int tm_checkpoint_is_module(const tm_checkpoint *ck) { return ck && ck->is_module; }

tm_status tm_checkpoint_tensor(const tm_checkpoint *ck, size_t i, tm_tensor_info *out) {
    tm_error err = {0};
    if (!ck || !out || i >= ck->n_tensors) {
        tm_error_set(&err, TM_ERROR_INVALID_ARGUMENT, "tm_checkpoint_tensor: index %zu out of range", i);
        return tm_error_publish(&err);
    }
    const ckpt_tensor *t = &ck->tensors[i];
    const ckpt_storage *s = &ck->storages[t->storage];
    out->name = t->name;
    out->dtype = t->dtype;
    out->ndim = t->ndim;
    out->shape = t->shape;
    out->stride = t->stride;
    out->storage_offset = t->storage_offset;
    out->storage_data = s->data;
    out->storage_nbytes = s->nbytes;
    out->storage_id = (int64_t)t->storage;
    out->numel = t->numel;
    out->nbytes = t->numel * tm_dtype_size(t->dtype);
    return TM_OK;
}

int64_t tm_checkpoint_find(const tm_checkpoint *ck, const char *name) {
    if (!ck || !name) return -1;
    for (size_t i = 0; i < ck->n_tensors; i++)
        if (strcmp(ck->tensors[i].name, name) == 0) return (int64_t)i;
    return -1;
}

tm_status tm_checkpoint_read(const tm_checkpoint *ck, size_t i, void *dst, size_t dst_size) {
    tm_tensor_info info;
    tm_status st = tm_checkpoint_tensor(ck, i, &info);
    if (st) return st;
    if (dst_size < info.nbytes || (!dst && info.nbytes)) {
        tm_error err = {0};
        tm_error_set(&err, TM_ERROR_INVALID_ARGUMENT, "%s: tensor '%s': buffer of %zu bytes is smaller than %llu",
                     ck->path, info.name, dst_size, (unsigned long long)info.nbytes);
        return tm_error_publish(&err);
    }
    size_t item = tm_dtype_size(info.dtype);
    const uint8_t *base = (const uint8_t *)info.storage_data;
    uint8_t *o = dst;
    int64_t idx[TM_MAX_NDIM] = {0};
    for (uint64_t n = 0; n < info.numel; n++) {
        int64_t off = info.storage_offset;
        for (int d = 0; d < info.ndim; d++) off += idx[d] * info.stride[d];
        memcpy(o + n * item, base + (uint64_t)off * item, item);
        for (int d = info.ndim - 1; d >= 0; d--) {
            if (++idx[d] < info.shape[d]) break;
            idx[d] = 0;
        }
    }
    return TM_OK;
}

void tm_checkpoint_prefetch_tensor(const tm_checkpoint *ck, size_t i) {
    if (!ck || i >= ck->n_tensors) return;
    const ckpt_storage *s = &ck->storages[ck->tensors[i].storage];
    tm_mapped_file_prefetch(&ck->map, s->file_offset, s->nbytes);
}

void tm_checkpoint_release_tensor(const tm_checkpoint *ck, size_t i) {
    if (!ck || i >= ck->n_tensors) return;
    const ckpt_storage *s = &ck->storages[ck->tensors[i].storage];
    tm_mapped_file_release(&ck->map, s->file_offset, s->nbytes);
}
