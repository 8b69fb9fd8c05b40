/* tm_checkpoint: one opened file, its format recognised, its state dict flattened into a table
 * of strided views over the mapped bytes. Nothing is copied at open; tensor bytes are read
 * when the caller uses them. */
#define _GNU_SOURCE
#include "checkpoint/checkpoint_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <sys/stat.h>

#include "core/fs.h"
#include "core/struct_size.h"
#include "core/name_map.h"
#include "formats/legacy_pt.h"
#include "formats/safetensors.h"
#include "formats/mapped_file.h"
#include "formats/pickle.h"
#include "formats/state_dict_walk.h"
#include "formats/zip_reader.h"

#define CUR_PATH(ck) ((ck)->map_paths[(ck)->cur])
#define CUR_MAP(ck) (&(ck)->maps[(ck)->cur])

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
    tm_qscheme qscheme;          /* quantized tensors: see tm_tensor_info */
    double q_scale;
    int64_t q_zero_point;
    int32_t q_axis;
    double *q_scales, *q_zero_points; /* per channel: shape[q_axis] each, malloc'd */
} ckpt_tensor;

typedef struct ckpt_storage {
    const tm_pk_value *pk;   /* identity while building the table (not dereferenced after) */
    size_t same_key;         /* while building: the next storage of this file with pk's key (another
                                dtype of a legacy typed storage), or SIZE_MAX */
    size_t map;              /* which mapped file */
    const uint8_t *data;
    uint64_t file_offset;
    uint64_t nbytes;
} ckpt_storage;

struct tm_checkpoint {
    char *path;
    char *key;
    const char *format;
    int is_module;
    char *folder;            /* the Hugging Face folder a sharded checkpoint came from, or NULL */
    tm_mapped_file *maps;    /* one per file (several for sharded checkpoints) */
    char **map_paths;
    size_t n_maps;
    size_t cur;              /* the file being read while opening */
    char **meta;             /* key, value, key, value, … (safetensors __metadata__, recipe) */
    size_t n_meta, meta_cap;
    tm_name_map meta_index;  /* metadata key → its pair's index in meta */
    tm_name_map index;       /* tensor name → tensor index */
    ckpt_tensor *tensors;
    size_t n_tensors;
    ckpt_storage *storages;
    size_t n_storages, storages_cap;
    int list_keys;           /* tm_checkpoint_list_keys: find the candidate keys, build nothing */
    char **keys;             /* what it found (the first file's) */
    size_t n_keys;
};

void tm_open_options_init(tm_open_options *opts) { TM_STRUCT_INIT(opts); }

void tm_tensor_info_init(tm_tensor_info *info) { TM_STRUCT_INIT(info); }

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
        if (st) tm_error_prefix(err, CUR_PATH(ck));
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
                            CUR_PATH(ck), tname, src->prefix, pk->u.storage.key);
    if (e->method != 0)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                            "%s: tensor '%s': storage record '%s' is compressed", CUR_PATH(ck), tname, name);
    *offset = e->data_offset;
    *size = e->size;
    return TM_OK;
}

/* Room for one more storage (capacity doubles: 10⁵ storages are common). */
static ckpt_storage *next_storage(tm_checkpoint *ck) {
    if (ck->n_storages == ck->storages_cap) {
        size_t cap = ck->storages_cap ? 2 * ck->storages_cap : 64;
        ckpt_storage *p = cap < SIZE_MAX / sizeof *p ? realloc(ck->storages, cap * sizeof *p) : NULL;
        if (!p) return NULL;
        ck->storages = p;
        ck->storages_cap = cap;
    }
    return &ck->storages[ck->n_storages];
}

/* by_key: this file's storages by key (the pickle reader gives one pk per key and dtype, so a
 * key's chain through same_key is at most one storage per dtype long). */
static tm_status add_storage(tm_checkpoint *ck, const storage_source *src, tm_name_map *by_key,
                             const tm_pk_value *pk, tm_dtype tensor_dtype, size_t *index, const char *tname,
                             tm_error *err) {
    size_t first = SIZE_MAX;
    if (tm_name_map_find(by_key, pk->u.storage.key, &first))
        for (size_t i = first; i != SIZE_MAX; i = ck->storages[i].same_key)
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
                            CUR_PATH(ck), tname, pk->u.storage.key, (long long)pk->u.storage.numel,
                            tm_dtype_name(sd), (unsigned long long)size);
    ckpt_storage *s = next_storage(ck);
    if (!s) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    s->pk = pk;
    s->same_key = SIZE_MAX;
    if (first != SIZE_MAX) { /* chain it after the key's first storage */
        s->same_key = ck->storages[first].same_key;
        ck->storages[first].same_key = ck->n_storages;
    } else if (tm_name_map_insert(by_key, pk->u.storage.key, ck->n_storages, NULL) < 0) {
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    s->file_offset = offset;
    s->map = ck->cur;
    s->data = ck->maps[ck->cur].data + offset;
    s->nbytes = need;
    *index = ck->n_storages++;
    return TM_OK;
}

/* One element of a real (non-complex, non-quantized) dtype as a double. */
static int load_number(const uint8_t *p, tm_dtype d, double *out) {
    switch (d) {
    case TM_FLOAT64: { double v; memcpy(&v, p, 8); *out = v; return 1; }
    case TM_FLOAT32: { float v; memcpy(&v, p, 4); *out = v; return 1; }
    case TM_INT64: { int64_t v; memcpy(&v, p, 8); *out = (double)v; return 1; }
    case TM_INT32: { int32_t v; memcpy(&v, p, 4); *out = v; return 1; }
    case TM_INT16: { int16_t v; memcpy(&v, p, 2); *out = v; return 1; }
    case TM_INT8: *out = (int8_t)*p; return 1;
    case TM_UINT8: *out = *p; return 1;
    default: return 0;
    }
}

/* The values of a quantized tensor's per-channel scales or zero points (a small 1-d tensor
 * stored beside it, not part of the state dict), read at open into *out (n doubles). */
static tm_status read_channel_values(const tm_checkpoint *ck, const storage_source *src, const tm_pk_value *t,
                                     const char *tname, const char *what, double **out, tm_error *err) {
    const tm_pk_value *pk = t->u.tensor.storage;
    uint64_t offset = 0, size = 0;
    tm_status st = locate_storage(ck, src, pk, tname, &offset, &size, err);
    if (st) return st;
    tm_dtype d = t->u.tensor.dtype;
    uint64_t item = tm_dtype_size(d), n = (uint64_t)t->u.tensor.shape[0];
    double *v = malloc((n ? n : 1) * sizeof *v);
    if (!v) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (uint64_t i = 0; i < n; i++) {
        uint64_t e = (uint64_t)t->u.tensor.offset + i * (uint64_t)t->u.tensor.stride[0]; /* bounded at parse */
        if ((e + 1) * item > size || !load_number(CUR_MAP(ck)->data + offset + e * item, d, &v[i])) {
            free(v);
            return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor '%s': its per-channel %s (%s) %s", CUR_PATH(ck),
                                tname, what, tm_dtype_name(d),
                                (e + 1) * item > size ? "reach past the end of their storage" : "are not real numbers");
        }
    }
    *out = v;
    return TM_OK;
}

/* A quantized tensor's scheme and parameters, from its _rebuild_qtensor call. */
static tm_status set_quantization(const tm_checkpoint *ck, const storage_source *src, ckpt_tensor *ct,
                                  const tm_pk_value *t, tm_error *err) {
    ct->qscheme = t->u.tensor.qscheme;
    if (ct->qscheme == TM_QSCHEME_PER_TENSOR_AFFINE) {
        ct->q_scale = t->u.tensor.q_scale;
        ct->q_zero_point = t->u.tensor.q_zero_point;
        return TM_OK;
    }
    ct->q_axis = t->u.tensor.q_axis;
    size_t n = (size_t)ct->shape[ct->q_axis];
    const tm_pk_value *tensors[2] = {t->u.tensor.q_scales_t, t->u.tensor.q_zero_points_t};
    const double *lists[2] = {t->u.tensor.q_scales, t->u.tensor.q_zero_points};
    double **dst[2] = {&ct->q_scales, &ct->q_zero_points};
    for (int k = 0; k < 2; k++) {
        if (tensors[k]) {
            tm_status st = read_channel_values(ck, src, tensors[k], ct->name, k ? "zero points" : "scales", dst[k], err);
            if (st) return st;
        } else {
            if (!(*dst[k] = malloc((n ? n : 1) * sizeof(double)))) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
            memcpy(*dst[k], lists[k], n * sizeof(double));
        }
    }
    return TM_OK;
}

static tm_status reserve_tensors(tm_checkpoint *ck, size_t more, tm_error *err) {
    ckpt_tensor *p = realloc(ck->tensors, (ck->n_tensors + more + 1) * sizeof *p);
    if (!p) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    memset(p + ck->n_tensors, 0, (more + 1) * sizeof *p);
    ck->tensors = p;
    return TM_OK;
}

static tm_status build_rows(tm_checkpoint *ck, const storage_source *src, tm_named_tensors *nt,
                            tm_name_map *by_key, tm_error *err);

/* Adds one file's walked tensors; the state dict's key (--key or found) comes from the first. */
static tm_status build_table(tm_checkpoint *ck, const storage_source *src, tm_named_tensors *nt,
                             tm_error *err) {
    if (!ck->key) {
        ck->key = nt->key;
        nt->key = NULL;
    }
    tm_status st = reserve_tensors(ck, nt->n, err);
    if (st) return st;
    tm_name_map by_key = TM_NAME_MAP_INIT;
    st = build_rows(ck, src, nt, &by_key, err);
    tm_name_map_free(&by_key);
    return st;
}

static tm_status build_rows(tm_checkpoint *ck, const storage_source *src, tm_named_tensors *nt,
                            tm_name_map *by_key, tm_error *err) {
    tm_status st = TM_OK;
    for (size_t i = 0; i < nt->n; i++) {
        const tm_pk_value *t = nt->items[i].tensor;
        const char *tname = nt->items[i].name;
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
        /* Byte counts (numel * itemsize) and contiguous strides must fit in int64, also for
         * an empty tensor: the product of the non-zero dimensions is bounded. */
        uint64_t nonzero = 1;
        int too_big = of;
        for (int d = 0; d < ct->ndim && !too_big; d++)
            if (ct->shape[d] > 0) nonzero = checked_mul(nonzero, (uint64_t)ct->shape[d], &too_big);
        if (too_big || nonzero > (uint64_t)INT64_MAX / tm_dtype_size(ct->dtype))
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: tensor '%s': its shape has more elements of %s than fit in 64-bit byte counts",
                                CUR_PATH(ck), tname, tm_dtype_name(ct->dtype));
        if (numel > 0)
            for (int d = 0; d < ct->ndim; d++) {
                uint64_t span = checked_mul((uint64_t)(ct->shape[d] - 1), (uint64_t)ct->stride[d], &of);
                if (last > UINT64_MAX - span) of = 1; else last += span;
            }
        st = add_storage(ck, src, by_key, t->u.tensor.storage, ct->dtype, &ct->storage, tname, err);
        if (!st && tm_dtype_is_quantized(ct->dtype)) st = set_quantization(ck, src, ct, t, err);
        if (st) return st;
        uint64_t itemsize = tm_dtype_size(ct->dtype);
        uint64_t end = checked_mul(last + 1, itemsize, &of);
        if (of || (numel > 0 && end > ck->storages[ct->storage].nbytes))
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: tensor '%s': view reaches past the end of its storage (%llu bytes)",
                                CUR_PATH(ck), tname,
                                (unsigned long long)ck->storages[ct->storage].nbytes);
    }
    return TM_OK;
}

static tm_status open_zip(tm_checkpoint *ck, const tm_open_options *opts, tm_error *err) {
    tm_zip_reader *zr = NULL;
    tm_pickle *pk = NULL;
    tm_named_tensors nt = {0};
    uint8_t *owned = NULL;
    tm_status st = tm_zip_reader_open(CUR_MAP(ck)->data, CUR_MAP(ck)->size, CUR_PATH(ck), &zr, err);
    if (st) goto done;
    char prefix[512];
    const tm_zip_entry *e = find_data_pkl(zr, prefix, sizeof prefix);
    if (!e) {
        if (has_member_prefix(zr, "", "model.json") || tm_zip_reader_find(zr, "model.json"))
            st = tm_error_set(err, TM_ERROR_UNSUPPORTED,
                              "%s: TorchScript archive from PyTorch < 1.3 (model.json) is not supported",
                              CUR_PATH(ck));
        else
            st = tm_error_set(err, TM_ERROR_FORMAT,
                              "%s: zip archive without a data.pkl record: not a PyTorch checkpoint", CUR_PATH(ck));
        goto done;
    }
    ck->is_module = has_member_prefix(zr, prefix, "code/") || has_member_prefix(zr, prefix, "constants.pkl");
    ck->format = ck->is_module ? "torchscript" : "pt";
    const uint8_t *bytes = NULL;
    if ((st = tm_zip_reader_read(zr, e, MAX_PICKLE_BYTES, &bytes, &owned, err))) goto done;
    char label[600];
    snprintf(label, sizeof label, "%s: %s", CUR_PATH(ck), e->name);
    /* torch.save memoizes 8 objects per tensor (one per 16 bytes of pickle), so the default cap
     * of 10⁶ entries refuses mixture-of-experts state dicts of 200k tensors. One entry per 8
     * bytes of the (already capped) pickle keeps memory proportional to the file and still
     * refuses a pickle that does little but memoize. */
    tm_pickle_limits lim;
    tm_pickle_limits_default(&lim);
    if (lim.max_memo < e->size / 8) lim.max_memo = (size_t)(e->size / 8);
    if ((st = tm_pickle_load(bytes, e->size, label, &lim, &pk, NULL, err))) goto done;
    if (ck->list_keys) {
        if (!ck->keys) st = tm_state_dict_candidates(tm_pickle_root(pk), CUR_PATH(ck), &ck->keys, &ck->n_keys, err);
        goto done;
    }
    if ((st = tm_state_dict_walk(tm_pickle_root(pk), opts ? opts->key : NULL, CUR_PATH(ck), &nt, err)))
        goto done;
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
    tm_status st = tm_legacy_pt_open(CUR_MAP(ck)->data, CUR_MAP(ck)->size, CUR_PATH(ck), &lp, err);
    if (!st && ck->list_keys) {
        if (!ck->keys) st = tm_state_dict_candidates(tm_legacy_pt_root(lp), CUR_PATH(ck), &ck->keys, &ck->n_keys, err);
        tm_legacy_pt_free(lp);
        return st;
    }
    if (!st) st = tm_state_dict_walk(tm_legacy_pt_root(lp), opts ? opts->key : NULL, CUR_PATH(ck), &nt, err);
    if (!st) {
        storage_source src = {NULL, NULL, lp};
        st = build_table(ck, &src, &nt, err);
    }
    tm_named_tensors_free(&nt);
    /* The table keeps storages by pointer identity only during build; values are not used after. */
    tm_legacy_pt_free(lp);
    return st;
}

/* Adds key = value unless key is there (the first file's value wins); -1 out of memory. A header
 * may hold many entries: looked up through the name map, stored with doubling capacity. */
static int add_meta(tm_checkpoint *ck, const char *key, const char *value) {
    size_t i;
    if (tm_name_map_find(&ck->meta_index, key, &i)) return 0;
    if (ck->n_meta == ck->meta_cap) {
        size_t cap = ck->meta_cap ? 2 * ck->meta_cap : 8;
        char **m = cap < SIZE_MAX / 2 / sizeof *m ? realloc(ck->meta, 2 * cap * sizeof *m) : NULL;
        if (!m) return -1;
        ck->meta = m;
        ck->meta_cap = cap;
    }
    char *k = strdup(key), *v = strdup(value);
    if (!k || !v || tm_name_map_insert(&ck->meta_index, k, ck->n_meta, NULL) < 0) {
        free(k);
        free(v);
        return -1;
    }
    ck->meta[2 * ck->n_meta] = k;
    ck->meta[2 * ck->n_meta + 1] = v;
    ck->n_meta++;
    return 0;
}

/* safetensors: every tensor is contiguous in its own byte range. */
static tm_status open_safetensors(tm_checkpoint *ck, tm_error *err) {
    tm_safetensors *st = NULL;
    tm_status s = tm_safetensors_open(CUR_MAP(ck)->data, CUR_MAP(ck)->size, CUR_PATH(ck), &st, err);
    if (s) return s;
    size_t n = tm_safetensors_count(st);
    s = reserve_tensors(ck, n, err);
    for (size_t i = 0; !s && i < tm_safetensors_metadata_count(st); i++)
        if (add_meta(ck, tm_safetensors_metadata_key(st, i), tm_safetensors_metadata_value(st, i)))
            s = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    uint64_t base = tm_safetensors_data_offset(st);
    for (size_t i = 0; i < n && !s; i++) {
        const tm_st_tensor *t = tm_safetensors_tensor(st, i);
        ckpt_storage *sto = next_storage(ck);
        if (!sto) { s = tm_error_set(err, TM_ERROR_NOMEM, "out of memory"); break; }
        sto->pk = NULL;
        sto->map = ck->cur;
        sto->file_offset = base + t->begin;
        sto->data = CUR_MAP(ck)->data + sto->file_offset;
        sto->nbytes = t->end - t->begin;
        ckpt_tensor *ct = &ck->tensors[ck->n_tensors];
        if (!(ct->name = strdup(t->name))) { s = tm_error_set(err, TM_ERROR_NOMEM, "out of memory"); break; }
        ck->n_tensors++;
        ct->dtype = t->dtype;
        ct->ndim = t->ndim;
        int64_t stride = 1;
        for (int d = t->ndim - 1; d >= 0; d--) {
            ct->shape[d] = t->shape[d];
            ct->stride[d] = stride;
            stride *= t->shape[d] > 1 ? t->shape[d] : 1;
        }
        ct->numel = t->numel;
        ct->storage = ck->n_storages++;
    }
    tm_safetensors_free(st);
    return s;
}

/* Maps path as file number ck->n_maps and adds its tensors to the table. */
static tm_status add_file(tm_checkpoint *ck, const char *path, const tm_open_options *opts, tm_error *err) {
    tm_mapped_file *maps = realloc(ck->maps, (ck->n_maps + 1) * sizeof *maps);
    char **paths = maps ? realloc(ck->map_paths, (ck->n_maps + 1) * sizeof *paths) : NULL;
    if (maps) ck->maps = maps;
    if (paths) ck->map_paths = paths;
    if (!maps || !paths) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    memset(&ck->maps[ck->n_maps], 0, sizeof *maps);
    if (!(ck->map_paths[ck->n_maps] = strdup(path))) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    ck->cur = ck->n_maps++;
    tm_status st = tm_mapped_file_open(path, CUR_MAP(ck), err);
    if (st) return st;
    const uint8_t *d = CUR_MAP(ck)->data;
    size_t size = CUR_MAP(ck)->size;
    if (size == 0) return tm_error_set(err, TM_ERROR_FORMAT, "%s: empty file", path);
    if (tm_zip_looks_like_zip(d, size)) return open_zip(ck, opts, err);
    if (tm_legacy_pt_looks_like(d, size)) return open_legacy(ck, opts, err);
    if (tm_safetensors_looks_like(d, size)) {
        ck->format = "safetensors";
        return open_safetensors(ck, err);
    }
    return tm_error_set(err, TM_ERROR_FORMAT, "%s: not a PyTorch checkpoint (unrecognised file signature)", path);
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Hugging Face index: {"metadata": {...}, "weight_map": {"name": "shard file", ...}}. Shards are
 * added in order of first appearance; each is mapped (not read) at open. */
static tm_status add_index(tm_checkpoint *ck, const char *index_path, const tm_open_options *opts, tm_error *err) {
    tm_mapped_file f;
    tm_status st = tm_mapped_file_open(index_path, &f, err);
    if (st) return st;
    cJSON *root = cJSON_ParseWithLength((const char *)f.data, f.size);
    tm_mapped_file_close(&f);
    const cJSON *map = root ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    if (!cJSON_IsObject(map)) {
        cJSON_Delete(root);
        return tm_error_set(err, TM_ERROR_FORMAT, "%s: not a sharded checkpoint index (no \"weight_map\" object)",
                            index_path);
    }
    char *dir = strdup(index_path);
    if (!dir) { cJSON_Delete(root); return tm_error_set(err, TM_ERROR_NOMEM, "out of memory"); }
    char *slash = strrchr(dir, '/');
    if (slash) *slash = '\0'; else strcpy(dir, ".");
    const cJSON *item;
    size_t shards_before = ck->n_maps;
    tm_name_map shards = TM_NAME_MAP_INIT; /* shard file names added (the index lists one per tensor) */
    cJSON_ArrayForEach(item, map) {
        if (!cJSON_IsString(item) || strchr(item->valuestring, '/') || strcmp(item->valuestring, "..") == 0) {
            st = tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor '%s': shard name must be a file name in the folder",
                              index_path, item->string);
            break;
        }
        int seen = tm_name_map_insert(&shards, item->valuestring, 0, NULL);
        if (seen < 0) { st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory"); break; }
        if (seen) continue;
        char *shard = NULL;
        if (asprintf(&shard, "%s/%s", dir, item->valuestring) < 0) { st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory"); break; }
        st = add_file(ck, shard, opts, err);
        free(shard);
        if (st) break;
    }
    tm_name_map_free(&shards);
    if (!st && ck->n_maps == shards_before)
        st = tm_error_set(err, TM_ERROR_FORMAT, "%s: the index lists no shards", index_path);
    if (!st) {
        ck->folder = dir;
        dir = NULL;
    }
    free(dir);
    cJSON_Delete(root);
    return st;
}

/* A folder: the index of a sharded checkpoint, or its single weights file. */
static tm_status add_folder(tm_checkpoint *ck, const char *dir, const tm_open_options *opts, tm_error *err) {
    static const char *const indexes[] = {"model.safetensors.index.json", "pytorch_model.bin.index.json"};
    static const char *const singles[] = {"model.safetensors", "pytorch_model.bin"};
    char path[4096];
    for (size_t i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, indexes[i]);
        if (file_exists(path)) return add_index(ck, path, opts, err);
    }
    for (size_t i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, singles[i]);
        if (file_exists(path)) {
            if (!(ck->folder = strdup(dir))) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
            return add_file(ck, path, opts, err);
        }
    }
    return tm_error_set(err, TM_ERROR_NOT_FOUND,
                        "%s: folder holds no model.safetensors, pytorch_model.bin or *.index.json", dir);
}

/* Builds the name index; refuses duplicate names (also across shards). */
static tm_status build_index(tm_checkpoint *ck, tm_error *err) {
    if (tm_name_map_reserve(&ck->index, ck->n_tensors)) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t i = 0; i < ck->n_tensors; i++) {
        int r = tm_name_map_insert(&ck->index, ck->tensors[i].name, i, NULL);
        if (r < 0) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        if (r > 0)
            return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor name '%s' appears twice", ck->path,
                                ck->tensors[i].name);
    }
    return TM_OK;
}

/* Opens path into ck (calloc'd by the caller, list_keys set or not). */
static tm_status open_into(tm_checkpoint *ck, const char *path, const tm_open_options *opts, tm_error *err);

tm_status tm_checkpoint_open_err(const char *path, const tm_open_options *opts,
                                 tm_checkpoint **out, tm_error *err) {
    *out = NULL;
    if (!path) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "path is NULL");
    tm_checkpoint *ck = calloc(1, sizeof *ck);
    if (!ck) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    tm_status st = open_into(ck, path, opts, err);
    if (st) {
        tm_checkpoint_free(ck);
        return st;
    }
    /* Opening touched a page here and there (zip headers, the pickle): recent kernels map a whole
     * large page-cache folio (up to 2 MiB) on such a touch, so much of a file's tensor data could
     * be resident before any is merged. Drop it all; what is read later is mapped again. */
    for (size_t m = 0; m < ck->n_maps; m++) tm_mapped_file_release(&ck->maps[m], 0, ck->maps[m].size);
    *out = ck;
    return TM_OK;
}

void tm_key_list_init(tm_key_list *list) { TM_STRUCT_INIT(list); }

void tm_key_list_free(tm_key_list *list) {
    if (!list) return;
    for (size_t i = 0; list->keys && i < list->n; i++) free(list->keys[i]);
    free(list->keys);
    list->keys = NULL;
    list->n = 0;
}

tm_status tm_checkpoint_list_keys(const char *path, tm_key_list *out) {
    tm_error err = {0};
    if (!out || TM_STRUCT_CHECK(out, &err)) {
        if (!out) tm_error_set(&err, TM_ERROR_INVALID_ARGUMENT, "tm_checkpoint_list_keys: out is NULL");
        return tm_error_publish(&err);
    }
    tm_key_list list;
    tm_key_list_init(&list);
    TM_STRUCT_COPY_OUT(out, &list);
    if (!path) {
        tm_error_set(&err, TM_ERROR_INVALID_ARGUMENT, "path is NULL");
        return tm_error_publish(&err);
    }
    tm_checkpoint *ck = calloc(1, sizeof *ck);
    if (!ck) {
        tm_error_set(&err, TM_ERROR_NOMEM, "out of memory");
        return tm_error_publish(&err);
    }
    ck->list_keys = 1;
    tm_status st = open_into(ck, path, NULL, &err);
    if (!st) {
        list.keys = ck->keys;
        list.n = ck->n_keys;
        ck->keys = NULL;
        ck->n_keys = 0;
        TM_STRUCT_COPY_OUT(out, &list);
    }
    tm_checkpoint_free(ck);
    return st ? tm_error_publish(&err) : TM_OK;
}

static tm_status open_into(tm_checkpoint *ck, const char *path, const tm_open_options *opts, tm_error *err) {
    if (!(ck->path = strdup(path))) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    struct stat sb;
    size_t len = strlen(path);
    tm_status st;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
        st = add_folder(ck, path, opts, err);
    else if (len > 11 && strcmp(path + len - 11, ".index.json") == 0)
        st = add_index(ck, path, opts, err);
    else
        st = add_file(ck, path, opts, err);
    if (!st && ck->list_keys) return TM_OK;
    if (!st && ck->n_maps > 1) {
        const char *first = ck->format;
        ck->format = strcmp(first, "safetensors") == 0 ? "safetensors-sharded" : "pt-sharded";
    }
    if (!st) st = build_index(ck, err);
    if (!st && ck->folder && !tm_checkpoint_metadata(ck, "torchmerge_recipe")) {
        char *recipe = NULL, *text = NULL;
        size_t len = 0;
        tm_error ignored;
        /* the recipe beside a folder we wrote; a missing or unreadable one is no error */
        if (asprintf(&recipe, "%s/torchmerge_recipe.yaml", ck->folder) >= 0 && file_exists(recipe) &&
            tm_fs_read_file(recipe, TM_RECIPE_MAX_BYTES, "the recipe", &text, &len, &ignored) == TM_OK && len &&
            add_meta(ck, "torchmerge_recipe", text))
            st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        free(text);
        free(recipe);
    }
    return st;
}

tm_status tm_checkpoint_open(const char *path, const tm_open_options *opts, tm_checkpoint **out) {
    tm_error err = {0};
    if (!out) {
        tm_error_set(&err, TM_ERROR_INVALID_ARGUMENT, "tm_checkpoint_open: out is NULL");
        return tm_error_publish(&err);
    }
    *out = NULL;
    tm_open_options o; /* the caller's fields over the defaults */
    tm_open_options_init(&o);
    if (opts && TM_STRUCT_CHECK(opts, &err)) return tm_error_publish(&err);
    if (opts) TM_STRUCT_COPY_IN(&o, opts);
    tm_status st = tm_checkpoint_open_err(path, &o, out, &err);
    return st ? tm_error_publish(&err) : TM_OK;
}

void tm_checkpoint_free(tm_checkpoint *ck) {
    if (!ck) return;
    for (size_t i = 0; i < ck->n_tensors; i++) {
        free(ck->tensors[i].name);
        free(ck->tensors[i].q_scales);
        free(ck->tensors[i].q_zero_points);
    }
    free(ck->tensors);
    free(ck->storages);
    for (size_t m = 0; m < ck->n_maps; m++) {
        tm_mapped_file_close(&ck->maps[m]);
        free(ck->map_paths[m]);
    }
    free(ck->maps);
    free(ck->map_paths);
    tm_name_map_free(&ck->index);
    free(ck->folder);
    for (size_t i = 0; i < 2 * ck->n_meta; i++) free(ck->meta[i]);
    free(ck->meta);
    tm_name_map_free(&ck->meta_index);
    free(ck->key);
    free(ck->path);
    for (size_t i = 0; i < ck->n_keys; i++) free(ck->keys[i]);
    free(ck->keys);
    free(ck);
}

const char *tm_checkpoint_format(const tm_checkpoint *ck) { return ck ? ck->format : ""; }
const char *tm_checkpoint_path(const tm_checkpoint *ck) { return ck ? ck->path : ""; }
const char *tm_checkpoint_key(const tm_checkpoint *ck) { return ck && ck->key ? ck->key : ""; }
size_t tm_checkpoint_n_tensors(const tm_checkpoint *ck) { return ck ? ck->n_tensors : 0; }
size_t tm_checkpoint_n_storages(const tm_checkpoint *ck) { return ck ? ck->n_storages : 0; }
int tm_checkpoint_is_module(const tm_checkpoint *ck) { return ck && ck->is_module; }

int tm_checkpoint_storage_location(const tm_checkpoint *ck, size_t i, uint64_t *file_offset) {
    if (!ck || i >= ck->n_tensors || ck->n_maps != 1) return 0;
    *file_offset = ck->storages[ck->tensors[i].storage].file_offset;
    return 1;
}

tm_tensor_info tm_checkpoint_info(const tm_checkpoint *ck, size_t i) {
    tm_tensor_info out;
    tm_tensor_info_init(&out);
    if (!ck || i >= ck->n_tensors) return out;
    const ckpt_tensor *t = &ck->tensors[i];
    const ckpt_storage *s = &ck->storages[t->storage];
    out.name = t->name;
    out.dtype = t->dtype;
    out.ndim = t->ndim;
    out.shape = t->shape;
    out.stride = t->stride;
    out.storage_offset = t->storage_offset;
    out.storage_data = s->data;
    out.storage_nbytes = s->nbytes;
    out.storage_id = (int64_t)t->storage;
    out.numel = t->numel;
    out.nbytes = t->numel * tm_dtype_size(t->dtype);
    out.qscheme = t->qscheme;
    out.q_scale = t->q_scale;
    out.q_zero_point = t->q_zero_point;
    out.q_axis = t->q_axis;
    out.q_scales = t->q_scales;
    out.q_zero_points = t->q_zero_points;
    return out;
}

tm_status tm_checkpoint_tensor(const tm_checkpoint *ck, size_t i, tm_tensor_info *out) {
    tm_error err = {0};
    if (TM_STRUCT_CHECK(out, &err)) return tm_error_publish(&err);
    if (!ck || i >= ck->n_tensors) {
        tm_error_set(&err, TM_ERROR_INVALID_ARGUMENT, "tm_checkpoint_tensor: index %zu out of range", i);
        return tm_error_publish(&err);
    }
    tm_tensor_info info = tm_checkpoint_info(ck, i);
    TM_STRUCT_COPY_OUT(out, &info);
    return TM_OK;
}

int64_t tm_checkpoint_find(const tm_checkpoint *ck, const char *name) {
    size_t i;
    return ck && tm_name_map_find(&ck->index, name, &i) ? (int64_t)i : -1;
}

const char *tm_checkpoint_folder(const tm_checkpoint *ck) { return ck ? ck->folder : NULL; }

const char *tm_checkpoint_metadata(const tm_checkpoint *ck, const char *key) {
    if (!ck || !key) return NULL;
    size_t i;
    return tm_name_map_find(&ck->meta_index, key, &i) ? ck->meta[2 * i + 1] : NULL;
}

tm_status tm_checkpoint_read(const tm_checkpoint *ck, size_t i, void *dst, size_t dst_size) {
    tm_tensor_info info;
    tm_tensor_info_init(&info);
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

/* The bytes of its storage that tensor t reads, from its lowest to past its highest element
 * (bounds were checked against the storage at open). */
static void view_bytes(const ckpt_tensor *t, uint64_t *begin, uint64_t *len) {
    int64_t lo = t->storage_offset, hi = t->storage_offset;
    for (int d = 0; d < t->ndim && t->numel; d++) {
        int64_t span = (t->shape[d] - 1) * t->stride[d];
        if (span < 0) lo += span; else hi += span;
    }
    uint64_t item = tm_dtype_size(t->dtype);
    *begin = (uint64_t)lo * item;
    *len = t->numel ? (uint64_t)(hi - lo + 1) * item : 0;
}

/* Prefetches or drops tensor i's bytes in its mapped file: its own elements, or (whole) its whole
 * storage. A merge of views one by one (an output without shared storage) touches each view's
 * own bytes: touching the whole storage per view would cost quadratic time in the views. */
static void touch(const tm_checkpoint *ck, size_t i, int whole, int release) {
    if (!ck || i >= ck->n_tensors) return;
    const ckpt_storage *s = &ck->storages[ck->tensors[i].storage];
    uint64_t begin = 0, len = s->nbytes;
    if (!whole) view_bytes(&ck->tensors[i], &begin, &len);
    if (release) tm_mapped_file_release(&ck->maps[s->map], s->file_offset + begin, len);
    else tm_mapped_file_prefetch(&ck->maps[s->map], s->file_offset + begin, len);
}

void tm_checkpoint_prefetch_tensor(const tm_checkpoint *ck, size_t i) { touch(ck, i, 0, 0); }
void tm_checkpoint_release_tensor(const tm_checkpoint *ck, size_t i) { touch(ck, i, 0, 1); }
void tm_checkpoint_prefetch_storage(const tm_checkpoint *ck, size_t i) { touch(ck, i, 1, 0); }
void tm_checkpoint_release_storage(const tm_checkpoint *ck, size_t i) { touch(ck, i, 1, 1); }
