/* Safe unpickler, storages and tensors: the ('storage', type, key, location, numel) persistent
 * ids torch.save writes, interned so that shared storages share one value, and the
 * torch._utils._rebuild_tensor{,_v2,_v3} / _rebuild_parameter{,_with_state} / _rebuild_qtensor
 * calls, checked so
 * that every tensor's view lies inside its storage before anything reads a byte of data. */
#define _POSIX_C_SOURCE 200809L

#include "formats/pickle_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- Storages and tensors --------------------------------------------------------------- */

static uint64_t storage_hash(const char *key, int has_dtype, int dtype) {
    return tm_hash_mix64(tm_hash_bytes(key, strlen(key), 7) ^
                       (uint64_t)(has_dtype ? dtype + 1 : 0));
}

/* One TM_PK_STORAGE per (key, dtype) so callers can spot shared storages by pointer; torch 2.x
 * files may view one key through two dtypes, which then share the key but not the pointer. */
static tm_status intern_storage(parser *p, const char *key, int has_dtype, tm_dtype dtype,
                                const char *location, int64_t numel, tm_pk_value **out) {
    uint64_t h = storage_hash(key, has_dtype, (int)dtype);
    if (p->storage_index_cap) {
        size_t mask = p->storage_index_cap - 1;
        for (size_t j = (size_t)h & mask; p->storage_index[j]; j = (j + 1) & mask) {
            node *s = p->storages[p->storage_index[j] - 1];
            if (s->v.u.storage.has_dtype == has_dtype &&
                (!has_dtype || s->v.u.storage.dtype == dtype) &&
                strcmp(s->v.u.storage.key, key) == 0) {
                *out = &s->v; /* torch.load also keeps the first record of a key */
                return TM_OK;
            }
        }
    }
    tm_pk_value *v = NULL;
    TRY(pk_new_value(p, TM_PK_STORAGE, &v));
    v->u.storage.has_dtype = has_dtype;
    v->u.storage.dtype = has_dtype ? dtype : TM_UINT8;
    v->u.storage.key = key;
    v->u.storage.location = location;
    v->u.storage.numel = numel;
    if (p->nstorages == p->storages_cap) {
        /* entry + 1 must fit the uint32_t index */
        if (p->storages_cap && p->storages_cap * 2 > UINT32_MAX - 1) return pk_nomem(p);
        node **s = pk_grow(p->storages, &p->storages_cap, sizeof *s, 16);
        if (!s) return pk_nomem(p);
        p->storages = s;
    }
    p->storages[p->nstorages++] = NODE(v);
    if (p->nstorages * 2 > p->storage_index_cap) {
        size_t cap = p->storage_index_cap ? p->storage_index_cap * 2 : 32;
        uint32_t *tab = calloc(cap, sizeof(uint32_t));
        if (!tab) return pk_nomem(p);
        for (size_t i = 0; i < p->nstorages; i++) {
            const tm_pk_value *s = &p->storages[i]->v;
            size_t j = (size_t)storage_hash(s->u.storage.key, s->u.storage.has_dtype,
                                            (int)s->u.storage.dtype) &
                       (cap - 1);
            while (tab[j]) j = (j + 1) & (cap - 1);
            tab[j] = (uint32_t)(i + 1);
        }
        free(p->storage_index);
        p->storage_index = tab;
        p->storage_index_cap = cap;
    } else {
        size_t mask = p->storage_index_cap - 1;
        size_t j = (size_t)h & mask;
        while (p->storage_index[j]) j = (j + 1) & mask;
        p->storage_index[j] = (uint32_t)p->nstorages;
    }
    *out = v;
    return TM_OK;
}

/* pid = ('storage', storage_type, key, location, numel[, view_metadata]) as written by
 * torch.save (zip and legacy formats) and torch.jit.save. */
tm_status pk_persistent_load(parser *p, tm_pk_value *pid, tm_pk_value **out) {
    /* Legacy torch.save(model) records each module class as ('module', cls, source_file,
     * source) so it could check the source; the class (an inert global) is all we keep. */
    if (pid->kind == TM_PK_TUPLE && pid->u.seq.n == 4 && str_is(pid->u.seq.items[0], "module") &&
        pid->u.seq.items[1]->kind == TM_PK_GLOBAL) {
        *out = pid->u.seq.items[1];
        return TM_OK;
    }
    if (pid->kind != TM_PK_TUPLE || pid->u.seq.n < 1 || !str_is(pid->u.seq.items[0], "storage")) {
        if (pid->kind == TM_PK_TUPLE && pid->u.seq.n >= 1 &&
            pid->u.seq.items[0]->kind == TM_PK_STRING)
            return pk_err(p, TM_ERROR_UNSUPPORTED, "unsupported persistent id ('%.64s', ...)",
                          pid->u.seq.items[0]->u.str.data);
        return pk_err(p, TM_ERROR_UNSUPPORTED, "unsupported persistent id (a %s)",
                      tm_pk_kind_name(pid->kind));
    }
    tm_pk_value **it = pid->u.seq.items;
    size_t n = pid->u.seq.n;
    if (n != 5 && n != 6)
        return pk_err(p, TM_ERROR_FORMAT, "unsupported persistent id: storage tuple of %zu items",
                      n);
    if (it[1]->kind != TM_PK_GLOBAL || (NODE(it[1])->special != SP_STORAGE_TYPE &&
                                        NODE(it[1])->special != SP_UNTYPED_STORAGE)) {
        if (it[1]->kind == TM_PK_GLOBAL)
            return pk_err(p, TM_ERROR_UNSUPPORTED, "storage type %.100s.%.100s is not supported",
                          it[1]->u.global.module, it[1]->u.global.name);
        return pk_err(p, TM_ERROR_FORMAT, "persistent id: storage type is a %s",
                      tm_pk_kind_name(it[1]->kind));
    }
    const char *key;
    if (it[2]->kind == TM_PK_STRING) {
        key = it[2]->u.str.data;
    } else if (it[2]->kind == TM_PK_INT) {
        char buf[32];
        int len = snprintf(buf, sizeof buf, "%lld", (long long)it[2]->u.integer);
        char *k = NULL;
        TRY(pk_strdup(p, buf, (size_t)len, &k));
        key = k;
    } else {
        return pk_err(p, TM_ERROR_FORMAT, "persistent id: storage key is a %s",
                      tm_pk_kind_name(it[2]->kind));
    }
    if (strlen(key) != (it[2]->kind == TM_PK_STRING ? it[2]->u.str.len : strlen(key)))
        return pk_err(p, TM_ERROR_FORMAT, "persistent id: storage key contains NUL");
    if (it[3]->kind != TM_PK_STRING)
        return pk_err(p, TM_ERROR_FORMAT, "persistent id: location is a %s",
                      tm_pk_kind_name(it[3]->kind));
    if (it[4]->kind != TM_PK_INT || it[4]->u.integer < 0)
        return pk_err(p, TM_ERROR_FORMAT, "persistent id: storage size is not a non-negative int");
    if (n == 6 && it[5]->kind != TM_PK_NONE)
        return pk_err(p, TM_ERROR_UNSUPPORTED, "storage views (legacy view_metadata)");
    int has_dtype = NODE(it[1])->special == SP_STORAGE_TYPE;
    return intern_storage(p, key, has_dtype, has_dtype ? (tm_dtype)NODE(it[1])->dtype : TM_UINT8,
                          it[3]->u.str.data, it[4]->u.integer, out);
}

static int as_flag(const tm_pk_value *v, int *out) {
    if (v->kind == TM_PK_BOOL) { *out = v->u.boolean != 0; return 1; }
    if (v->kind == TM_PK_INT) { *out = v->u.integer != 0; return 1; }
    return 0;
}

/* storage, storage_offset, size, stride as given to torch._utils._rebuild_tensor*. */
static tm_status build_tensor(parser *p, const char *fn, tm_pk_value *const *a, int has_dtype,
                              tm_dtype dtype, int quantized, tm_pk_value **out) {
    const tm_pk_value *st = a[0], *off = a[1], *size = a[2], *stride = a[3];
    if (st->kind != TM_PK_STORAGE)
        return pk_err(p, TM_ERROR_FORMAT, "%s: storage argument is a %s", fn,
                      tm_pk_kind_name(st->kind));
    if (off->kind != TM_PK_INT || off->u.integer < 0)
        return pk_err(p, TM_ERROR_FORMAT, "%s: storage offset is not a non-negative int", fn);
    if (!is_seq(size) || !is_seq(stride))
        return pk_err(p, TM_ERROR_FORMAT, "%s: size and stride must be tuples", fn);
    if (size->u.seq.n != stride->u.seq.n)
        return pk_err(p, TM_ERROR_FORMAT, "%s: size has %zu dims but stride %zu", fn,
                      size->u.seq.n, stride->u.seq.n);
    size_t ndim = size->u.seq.n;
    if (ndim > TM_MAX_NDIM)
        return pk_err(p, TM_ERROR_UNSUPPORTED, "%s: %zu dimensions (at most %d)", fn, ndim,
                      TM_MAX_NDIM);
    if (has_dtype) {
        if (st->u.storage.has_dtype && st->u.storage.dtype != dtype)
            return pk_err(p, TM_ERROR_FORMAT, "%s: dtype %s differs from its storage's %s", fn,
                          tm_dtype_name(dtype), tm_dtype_name(st->u.storage.dtype));
    } else {
        if (!st->u.storage.has_dtype)
            return pk_err(p, TM_ERROR_UNSUPPORTED, "%s: untyped storage without a dtype", fn);
        dtype = st->u.storage.dtype;
    }
    /* The integers of a quantized storage mean nothing without the scale and zero point that
     * only _rebuild_qtensor carries. */
    if (tm_dtype_is_quantized(dtype) != quantized)
        return pk_err(p, TM_ERROR_FORMAT, "%s: %s storage", fn,
                      quantized ? "a quantized tensor needs a quantized" : "a plain tensor on a quantized");
    tm_pk_value *t = NULL;
    TRY(pk_new_value(p, TM_PK_TENSOR, &t));
    int64_t *shape = pk_alloc(p, (ndim ? ndim : 1) * sizeof(int64_t));
    int64_t *strides = pk_alloc(p, (ndim ? ndim : 1) * sizeof(int64_t));
    if (!shape || !strides) return pk_nomem(p);
    int empty = 0;
    for (size_t i = 0; i < ndim; i++) {
        const tm_pk_value *s = size->u.seq.items[i], *r = stride->u.seq.items[i];
        if (s->kind != TM_PK_INT || r->kind != TM_PK_INT)
            return pk_err(p, TM_ERROR_FORMAT, "%s: size and stride must hold ints", fn);
        if (s->u.integer < 0 || r->u.integer < 0)
            return pk_err(p, TM_ERROR_FORMAT, "%s: negative size or stride", fn);
        shape[i] = s->u.integer;
        strides[i] = r->u.integer;
        if (!shape[i]) empty = 1;
    }
    if (!empty) {
        int64_t numel = 1, last = off->u.integer;
        for (size_t i = 0; i < ndim; i++) {
            int64_t span;
            if (__builtin_mul_overflow(numel, shape[i], &numel) ||
                __builtin_mul_overflow(shape[i] - 1, strides[i], &span) ||
                __builtin_add_overflow(last, span, &last))
                return pk_err(p, TM_ERROR_FORMAT, "%s: tensor views elements outside its storage",
                              fn);
        }
        int64_t avail = st->u.storage.numel;
        if (!st->u.storage.has_dtype) avail /= (int64_t)tm_dtype_size(dtype);
        if (last >= avail)
            return pk_err(p, TM_ERROR_FORMAT,
                          "%s: tensor views elements outside its storage (element %lld of %lld)",
                          fn, (long long)last, (long long)avail);
    }
    t->u.tensor.storage = (tm_pk_value *)st;
    t->u.tensor.dtype = dtype;
    t->u.tensor.offset = off->u.integer;
    t->u.tensor.ndim = (int32_t)ndim;
    t->u.tensor.shape = shape;
    t->u.tensor.stride = strides;
    *out = t;
    return TM_OK;
}

tm_status pk_as_parameter(parser *p, const tm_pk_value *data, const tm_pk_value *rg,
                          tm_pk_value **out) {
    if (data->kind != TM_PK_TENSOR)
        return pk_err(p, TM_ERROR_FORMAT, "_rebuild_parameter: data is a %s",
                      tm_pk_kind_name(data->kind));
    int flag = data->u.tensor.requires_grad;
    if (rg && !as_flag(rg, &flag))
        return pk_err(p, TM_ERROR_FORMAT, "_rebuild_parameter: requires_grad is a %s",
                      tm_pk_kind_name(rg->kind));
    tm_pk_value *t = NULL;
    TRY(pk_new_value(p, TM_PK_TENSOR, &t));
    t->u.tensor = data->u.tensor; /* a copy: the data tensor may be shared through the memo */
    t->u.tensor.requires_grad = flag;
    t->u.tensor.is_parameter = 1;
    *out = t;
    return TM_OK;
}

/* ---- Quantized tensors ------------------------------------------------------------------ */

/* torch.per_tensor_affine etc., as the first item of _rebuild_qtensor's quantizer_params. */
static tm_qscheme qscheme_of(const tm_pk_value *g) {
    if (g->kind != TM_PK_GLOBAL || strcmp(g->u.global.module, "torch") != 0) return TM_QSCHEME_NONE;
    for (int q = TM_QSCHEME_PER_TENSOR_AFFINE; q <= TM_QSCHEME_PER_CHANNEL_AFFINE_FLOAT_QPARAMS; q++)
        if (strcmp(g->u.global.name, tm_qscheme_name((tm_qscheme)q)) == 0) return (tm_qscheme)q;
    return TM_QSCHEME_NONE;
}

static int as_real(const tm_pk_value *v, double *out) {
    if (v->kind == TM_PK_FLOAT) { *out = v->u.real; return 1; }
    if (v->kind == TM_PK_INT) { *out = (double)v->u.integer; return 1; }
    return 0;
}

/* Per-channel scales or zero points: a 1-d tensor of n elements (its values are read with the
 * storages, checkpoint.c), or a list of n numbers (torch before 1.6 wrote lists). */
static tm_status channel_params(parser *p, const char *what, const tm_pk_value *v, int64_t n,
                                const tm_pk_value **tensor, const double **values) {
    if (v->kind == TM_PK_TENSOR) {
        if (v->u.tensor.ndim != 1 || v->u.tensor.shape[0] != n ||
            tm_dtype_is_quantized(v->u.tensor.dtype) || v->u.tensor.dtype == TM_COMPLEX64 ||
            v->u.tensor.dtype == TM_COMPLEX128)
            return pk_err(p, TM_ERROR_FORMAT,
                          "_rebuild_qtensor: per-channel %s must be a real 1-d tensor of %lld elements",
                          what, (long long)n);
        *tensor = v;
        return TM_OK;
    }
    if (!is_seq(v) || (int64_t)v->u.seq.n != n)
        return pk_err(p, TM_ERROR_FORMAT,
                      "_rebuild_qtensor: per-channel %s must be a tensor or list of %lld numbers",
                      what, (long long)n);
    double *d = pk_alloc(p, (n ? (size_t)n : 1) * sizeof *d);
    if (!d) return pk_nomem(p);
    for (int64_t i = 0; i < n; i++)
        if (!as_real(v->u.seq.items[i], &d[i]))
            return pk_err(p, TM_ERROR_FORMAT, "_rebuild_qtensor: per-channel %s hold a %s", what,
                          tm_pk_kind_name(v->u.seq.items[i]->kind));
    *values = d;
    return TM_OK;
}

/* _rebuild_qtensor(storage, offset, size, stride, quantizer_params, requires_grad, hooks):
 * quantizer_params is (per_tensor_affine, scale, zero_point) or (per_channel_affine[_float_
 * qparams], scales, zero_points, axis); the storage's type gives the dtype (QInt8Storage, …). */
static tm_status build_qtensor(parser *p, const char *fn, tm_pk_value *const *a, tm_pk_value **out) {
    const tm_pk_value *qp = a[4];
    if (a[0]->kind == TM_PK_STORAGE && a[0]->u.storage.has_dtype &&
        !tm_dtype_is_quantized(a[0]->u.storage.dtype))
        return pk_err(p, TM_ERROR_FORMAT, "%s: storage of %s, not of a quantized dtype", fn,
                      tm_dtype_name(a[0]->u.storage.dtype));
    if (!is_seq(qp) || qp->u.seq.n < 1)
        return pk_err(p, TM_ERROR_FORMAT, "%s: quantizer parameters are a %s", fn,
                      tm_pk_kind_name(qp->kind));
    tm_qscheme qs = qscheme_of(qp->u.seq.items[0]);
    if (qs == TM_QSCHEME_NONE)
        return pk_err(p, TM_ERROR_UNSUPPORTED, "%s: quantization scheme %.100s is not supported", fn,
                      qp->u.seq.items[0]->kind == TM_PK_GLOBAL ? qp->u.seq.items[0]->u.global.name
                                                               : tm_pk_kind_name(qp->u.seq.items[0]->kind));
    TRY(build_tensor(p, fn, a, 0, TM_QINT8, 1, out));
    tm_pk_value *t = *out;
    tm_pk_value *const *q = qp->u.seq.items;
    t->u.tensor.qscheme = qs;
    if (qs == TM_QSCHEME_PER_TENSOR_AFFINE) {
        if (qp->u.seq.n != 3 || !as_real(q[1], &t->u.tensor.q_scale) || q[2]->kind != TM_PK_INT)
            return pk_err(p, TM_ERROR_FORMAT, "%s: per_tensor_affine wants (scheme, scale, zero_point)", fn);
        t->u.tensor.q_zero_point = q[2]->u.integer;
        return TM_OK;
    }
    if (qp->u.seq.n != 4 || q[3]->kind != TM_PK_INT)
        return pk_err(p, TM_ERROR_FORMAT, "%s: %s wants (scheme, scales, zero_points, axis)", fn,
                      tm_qscheme_name(qs));
    int64_t axis = q[3]->u.integer;
    if (axis < 0 || axis >= t->u.tensor.ndim)
        return pk_err(p, TM_ERROR_FORMAT, "%s: axis %lld of a %d-d tensor", fn, (long long)axis,
                      (int)t->u.tensor.ndim);
    t->u.tensor.q_axis = (int32_t)axis;
    int64_t n = t->u.tensor.shape[axis];
    TRY(channel_params(p, "scales", q[1], n, &t->u.tensor.q_scales_t, &t->u.tensor.q_scales));
    TRY(channel_params(p, "zero points", q[2], n, &t->u.tensor.q_zero_points_t,
                       &t->u.tensor.q_zero_points));
    /* torch writes per_channel_affine for float_qparams tensors too; on load, floating zero
     * points make the quantizer a float_qparams one (torch._empty_per_channel_affine_quantized). */
    if (qs == TM_QSCHEME_PER_CHANNEL_AFFINE && t->u.tensor.q_zero_points_t &&
        tm_dtype_is_floating(t->u.tensor.q_zero_points_t->u.tensor.dtype))
        t->u.tensor.qscheme = TM_QSCHEME_PER_CHANNEL_AFFINE_FLOAT_QPARAMS;
    return TM_OK;
}

/* Calls one of the torch._utils tensor rebuild functions (not _rebuild_from_type_v2 with a
 * nested _rebuild_from_type_v2, so input cannot drive recursion). */
tm_status pk_tensor_call(parser *p, const tm_pk_value *fn, const tm_pk_value *args,
                         tm_pk_value **out) {
    const char *name = fn->u.global.name;
    tm_pk_value *const *a = args->u.seq.items;
    size_t n = args->u.seq.n;
    switch ((special)NODE(fn)->special) {
    case SP_REBUILD_V1:
        if (n != 4) break;
        return build_tensor(p, name, a, 0, TM_FLOAT32, 0, out);
    case SP_REBUILD_V2:
    case SP_REBUILD_V3: {
        /* v3 adds a dtype after the backward hooks (for untyped storages) */
        int v3 = NODE(fn)->special == SP_REBUILD_V3;
        if (v3 ? (n != 7 && n != 8) : (n != 6 && n != 7)) break;
        int rg;
        if (!as_flag(a[4], &rg))
            return pk_err(p, TM_ERROR_FORMAT, "%s: requires_grad is a %s", name,
                          tm_pk_kind_name(a[4]->kind));
        tm_dtype dtype = TM_FLOAT32;
        if (v3) {
            const tm_pk_value *dt = a[6];
            if (dt->kind != TM_PK_GLOBAL || NODE(dt)->special != SP_DTYPE)
                return pk_err(p, TM_ERROR_FORMAT, "%s: dtype argument is a %s", name,
                              tm_pk_kind_name(dt->kind));
            if (NODE(dt)->dtype < 0)
                return pk_err(p, TM_ERROR_UNSUPPORTED, "dtype %.100s is not supported",
                              dt->u.global.name);
            dtype = (tm_dtype)NODE(dt)->dtype;
        }
        TRY(build_tensor(p, name, a, v3, dtype, 0, out));
        (*out)->u.tensor.requires_grad = rg;
        return TM_OK;
    }
    case SP_REBUILD_QTENSOR: {
        if (n != 7) break;
        int rg;
        if (!as_flag(a[5], &rg))
            return pk_err(p, TM_ERROR_FORMAT, "%s: requires_grad is a %s", name,
                          tm_pk_kind_name(a[5]->kind));
        TRY(build_qtensor(p, name, a, out));
        (*out)->u.tensor.requires_grad = rg;
        return TM_OK;
    }
    case SP_REBUILD_PARAM:
        if (n != 3) break;
        return pk_as_parameter(p, a[0], a[1], out);
    case SP_REBUILD_PARAM_STATE:
        if (n != 4) break;
        return pk_as_parameter(p, a[0], a[1], out);
    default:
        return pk_err(p, TM_ERROR_INTERNAL, "not a tensor function");
    }
    return pk_err(p, TM_ERROR_FORMAT, "%s called with %zu arguments", name, n);
}
