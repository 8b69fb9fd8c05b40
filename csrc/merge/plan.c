#define _GNU_SOURCE
#include "merge/plan.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static tm_tensor_info info_of(tm_checkpoint *ck, int64_t idx) {
    return tm_checkpoint_info(ck, (size_t)idx);
}

/* Appends "'a', 'b', … (N in all)" to buf. */
static void append_names(char *buf, size_t cap, const char **names, size_t n) {
    size_t used = strlen(buf);
    for (size_t i = 0; i < n && i < 8 && used < cap; i++)
        used += (size_t)snprintf(buf + used, cap - used, "%s'%s'", i ? ", " : "", names[i]);
    if (n > 8 && used < cap) snprintf(buf + used, cap - used, ", … (%zu in all)", n);
}

/* The strict policy's error: what the first input whose names differ from input 0's lacks and
 * has in excess. Only built once a difference is known. */
static tm_status strict_mismatch(tm_checkpoint *const *in, size_t n, const char **order, size_t n_order,
                                 tm_error *err) {
    char msg[TM_ERROR_MSG_MAX] = "";
    size_t cap = n_order;
    for (size_t i = 1; i < n; i++)
        if (tm_checkpoint_n_tensors(in[i]) > cap) cap = tm_checkpoint_n_tensors(in[i]);
    const char **names = malloc((cap ? cap : 1) * sizeof *names);
    if (!names) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    const char *culprit = NULL;
    for (size_t i = 1; i < n && !culprit; i++) {
        size_t nl = 0;
        for (size_t k = 0; k < n_order; k++)
            if (tm_checkpoint_find(in[i], order[k]) < 0) names[nl++] = order[k];
        if (nl) {
            size_t u = strlen(msg);
            snprintf(msg + u, sizeof msg - u, "; it lacks ");
            append_names(msg, sizeof msg, names, nl);
        }
        size_t ne = 0;
        for (size_t t = 0; t < tm_checkpoint_n_tensors(in[i]); t++) {
            const char *name = info_of(in[i], (int64_t)t).name;
            if (tm_checkpoint_find(in[0], name) < 0) names[ne++] = name;
        }
        if (ne) {
            size_t u = strlen(msg);
            snprintf(msg + u, sizeof msg - u, "; it has what %s lacks: ", tm_checkpoint_path(in[0]));
            append_names(msg, sizeof msg, names, ne);
        }
        if (nl || ne) culprit = tm_checkpoint_path(in[i]);
    }
    free(names);
    return tm_error_set(err, TM_ERROR_MISMATCH, "%s: tensor names differ from %s%s (see --keys intersection|union)",
                        culprit ? culprit : "", tm_checkpoint_path(in[0]), msg);
}

/* The names to merge, in order: input 0's, then (union) each later input's new ones, each
 * located in every input by one hash probe: O(inputs² · tensors) for union, O(inputs · tensors)
 * otherwise. */
static tm_status plan_keys(tm_plan *p, tm_checkpoint *const *in, size_t n, const tm_merge_options *opts,
                           tm_error *err) {
    tm_key_policy policy = opts->keys;
    size_t n0 = tm_checkpoint_n_tensors(in[0]), cap = n0;
    if (policy == TM_KEYS_UNION)
        for (size_t i = 1; i < n; i++) cap += tm_checkpoint_n_tensors(in[i]);
    const char **order = malloc((cap ? cap : 1) * sizeof *order);
    p->keys = malloc((cap ? cap : 1) * sizeof *p->keys);
    p->where = malloc((cap ? cap : 1) * n * sizeof *p->where);
    size_t *found = calloc(n, sizeof *found); /* per input: how many of order it has */
    tm_status st = TM_OK;
    if (!order || !p->keys || !p->where || !found) {
        st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        goto out;
    }
    size_t n_order = 0;
    for (size_t t = 0; t < n0; t++) order[n_order++] = info_of(in[0], (int64_t)t).name;
    if (policy == TM_KEYS_UNION)
        for (size_t i = 1; i < n; i++)
            for (size_t t = 0; t < tm_checkpoint_n_tensors(in[i]); t++) {
                const char *name = info_of(in[i], (int64_t)t).name;
                int seen = 0;
                for (size_t j = 0; j < i && !seen; j++) seen = tm_checkpoint_find(in[j], name) >= 0;
                if (!seen) order[n_order++] = name;
            }
    /* where[] for every name first (input 0's own names are its tensors 0..n0-1), compacted below
     * to the names kept. */
    for (size_t k = 0; k < n_order; k++)
        for (size_t i = 0; i < n; i++) {
            int64_t w = i == 0 ? (k < n0 ? (int64_t)k : -1) : tm_checkpoint_find(in[i], order[k]);
            p->where[k * n + i] = w;
            found[i] += w >= 0;
        }
    /* Names are unique within a checkpoint: input i has input 0's names exactly when it has all
     * of them and nothing else. */
    if (policy == TM_KEYS_STRICT)
        for (size_t i = 1; i < n; i++)
            if (found[i] != n_order || tm_checkpoint_n_tensors(in[i]) != n_order) {
                st = strict_mismatch(in, n, order, n_order, err);
                goto out;
            }
    for (size_t k = 0; k < n_order; k++) {
        size_t present = 0;
        for (size_t i = 0; i < n; i++) present += p->where[k * n + i] >= 0;
        if (policy == TM_KEYS_INTERSECTION && present != n) continue;
        if (opts->include_tensor && !opts->include_tensor(opts->rules_user, order[k])) continue;
        memmove(p->where + p->n_keys * n, p->where + k * n, n * sizeof *p->where);
        p->keys[p->n_keys++] = order[k];
    }
    if (!p->n_keys)
        st = tm_error_set(err, TM_ERROR_MISMATCH, "%s: the inputs have no tensor name in common",
                          tm_checkpoint_path(in[0]));
out:
    free(order);
    free(found);
    return st;
}

static void shape_text(const tm_tensor_info *t, char *buf, size_t cap) {
    size_t u = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < t->ndim && u < cap; d++) u += (size_t)snprintf(buf + u, cap - u, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
    if (u < cap) snprintf(buf + u, cap - u, "]");
}

static int is_complex(tm_dtype d) { return d == TM_COMPLEX64 || d == TM_COMPLEX128; }

/* Merged as real values: floating tensors, and quantized ones when dequantizing. */
static int merged_as_real(tm_dtype d, int dequantize) {
    return tm_dtype_is_floating(d) || (dequantize && tm_dtype_is_quantized(d));
}

/* Quantized tensors are merged only on request (--dequantize): their integers are not the
 * values, and the merge of real values can only be written as floats. */
static tm_status check_quantized(const tm_tensor_info *t, const char *path, const char *key, int dequantize,
                                 tm_error *err) {
    if (!tm_dtype_is_quantized(t->dtype) || dequantize) return TM_OK;
    return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                        "%s: tensor '%s': quantized (%s, %s); merge with --dequantize (dequantize: true in a "
                        "recipe) to merge its real values and write float32",
                        path, key, tm_dtype_name(t->dtype), tm_qscheme_name(t->qscheme));
}

/* b (key in file b_path) can be merged with a (in a_path): same shape, both floating (or both
 * complex) or both not. */
static tm_status compare(const tm_tensor_info *a, const char *a_path, const tm_tensor_info *b, const char *b_path,
                         const char *key, int dequantize, tm_error *err) {
    int same = a->ndim == b->ndim;
    for (int d = 0; same && d < a->ndim; d++) same = a->shape[d] == b->shape[d];
    if (!same) {
        char sa[256], sb[256];
        shape_text(a, sa, sizeof sa);
        shape_text(b, sb, sizeof sb);
        return tm_error_set(err, TM_ERROR_MISMATCH, "%s: tensor '%s': shape %s differs from %s's %s", b_path, key, sb,
                            a_path, sa);
    }
    if (merged_as_real(a->dtype, dequantize) != merged_as_real(b->dtype, dequantize) ||
        is_complex(a->dtype) != is_complex(b->dtype))
        return tm_error_set(err, TM_ERROR_MISMATCH, "%s: tensor '%s': dtype %s cannot be averaged with %s's %s", b_path,
                            key, tm_dtype_name(b->dtype), a_path, tm_dtype_name(a->dtype));
    return TM_OK;
}

static tm_status check_compatible(const tm_plan *p, tm_checkpoint *const *in, tm_error *err) {
    for (size_t k = 0; k < p->n_keys; k++) {
        int64_t ref = -1;
        tm_tensor_info a;
        for (size_t i = 0; i < p->n_inputs; i++) {
            int64_t idx = tm_plan_where(p, k, i);
            if (idx < 0) continue;
            tm_tensor_info b = info_of(in[i], idx);
            tm_status st = check_quantized(&b, tm_checkpoint_path(in[i]), p->keys[k], p->dequantize, err);
            if (st) return st;
            if (ref < 0) { ref = (int64_t)i; a = b; continue; }
            st = compare(&a, tm_checkpoint_path(in[ref]), &b, tm_checkpoint_path(in[i]), p->keys[k], p->dequantize, err);
            if (st) return st;
        }
    }
    return TM_OK;
}

static tm_dtype output_dtype(tm_dtype first, const tm_merge_options *o) {
    if (tm_dtype_is_quantized(first)) return o->has_dtype ? o->dtype : TM_FLOAT32; /* dequantized */
    if (!tm_dtype_is_floating(first) || !o->has_dtype || is_complex(first)) return first;
    return o->dtype;
}

/* Per input, how many planned keys use each of its storages: a storage may be merged whole only
 * when no other merged tensor lives in it. */
static int count_storage_users(const tm_plan *p, tm_checkpoint *const *in, size_t ***out) {
    size_t **users = *out = calloc(p->n_inputs, sizeof *users);
    if (!users) return -1;
    for (size_t i = 0; i < p->n_inputs; i++) {
        size_t ns = tm_checkpoint_n_storages(in[i]);
        if (!(users[i] = calloc(ns ? ns : 1, sizeof **users))) return -1; /* the caller frees */
        for (size_t k = 0; k < p->n_keys; k++) {
            int64_t idx = tm_plan_where(p, k, i);
            if (idx >= 0) users[i][info_of(in[i], idx).storage_id]++;
        }
    }
    return 0;
}

/* The keys of group (all keys on one storage of input 0) share one storage the same way in every
 * input, and nothing else uses it. O(ng · inputs). */
static int shared_identically(const tm_plan *p, tm_checkpoint *const *in, size_t *const *users,
                              const size_t *group, size_t ng) {
    for (size_t i = 0; i < p->n_inputs; i++) {
        int64_t sid = -1;
        tm_dtype dt = TM_FLOAT32;
        uint64_t snumel = 0;
        for (size_t g = 0; g < ng; g++) {
            int64_t idx = tm_plan_where(p, group[g], i);
            if (idx < 0) return 0;
            tm_tensor_info t = info_of(in[i], idx), r = info_of(in[0], tm_plan_where(p, group[g], 0));
            /* A quantized storage's values depend on each view's own scale and zero point. */
            if (tm_dtype_is_quantized(t.dtype) || tm_dtype_is_quantized(r.dtype)) return 0;
            uint64_t sn = t.storage_nbytes / tm_dtype_size(t.dtype);
            if (g == 0) { sid = t.storage_id; dt = t.dtype; snumel = sn; }
            else if (t.storage_id != sid || t.dtype != dt || sn != snumel) return 0;
            if (sn != r.storage_nbytes / tm_dtype_size(r.dtype) || t.storage_offset != r.storage_offset) return 0;
            for (int d = 0; d < t.ndim; d++)
                if (t.stride[d] != r.stride[d]) return 0;
        }
        if (users[i][sid] != ng) return 0;
    }
    return 1;
}

static int same_view(const tm_tensor_info *a, const tm_tensor_info *b) {
    if (a->ndim != b->ndim || a->storage_offset != b->storage_offset || a->dtype != b->dtype) return 0;
    for (int d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d] || a->stride[d] != b->stride[d]) return 0;
    return 1;
}

/* Keys grouped by input 0's storage, in key order, as one array: the keys of storage s are
 * by_storage[start[s] .. start[s + 1]). A counting sort, so O(keys + storages). */
typedef struct storage_groups {
    size_t *start, *by_storage;
} storage_groups;

static int group_by_storage(const tm_plan *p, tm_checkpoint *const *in, storage_groups *g) {
    size_t ns = tm_checkpoint_n_storages(in[0]);
    g->start = calloc(ns + 2, sizeof *g->start);
    g->by_storage = malloc((p->n_keys ? p->n_keys : 1) * sizeof *g->by_storage);
    if (!g->start || !g->by_storage) return -1;
    for (size_t k = 0; k < p->n_keys; k++) {
        int64_t idx = tm_plan_where(p, k, 0);
        if (idx >= 0) g->start[info_of(in[0], idx).storage_id + 2]++;
    }
    for (size_t s = 2; s < ns + 2; s++) g->start[s] += g->start[s - 1];
    for (size_t k = 0; k < p->n_keys; k++) {
        int64_t idx = tm_plan_where(p, k, 0);
        if (idx >= 0) g->by_storage[g->start[info_of(in[0], idx).storage_id + 1]++] = k;
    }
    return 0;
}

/* Fills units: only the first key of each input-0 storage can open a group (its storage's whole
 * key list); every later key of that storage is a unit of its own, or an alias found then. */
static tm_status plan_units(tm_plan *p, tm_checkpoint *const *in, const tm_merge_options *o, int split_shared,
                            tm_error *err) {
    size_t nk = p->n_keys;
    storage_groups sg = {NULL, NULL};
    size_t **users = NULL;
    char *done = calloc(nk ? nk : 1, 1);
    p->alias_of = malloc((nk ? nk : 1) * sizeof *p->alias_of);
    p->unit_of = malloc((nk ? nk : 1) * sizeof *p->unit_of);
    p->units = calloc(nk ? nk : 1, sizeof *p->units);
    tm_status st = TM_OK;
    if (!done || !p->alias_of || !p->unit_of || !p->units || group_by_storage(p, in, &sg) ||
        count_storage_users(p, in, &users)) {
        st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t k = 0; k < nk; k++) {
        p->alias_of[k] = -1;
        p->unit_of[k] = SIZE_MAX;
    }
    for (size_t k = 0; k < nk; k++) {
        if (done[k]) continue;
        const size_t *group = &k;
        size_t ng = 1;
        int64_t idx0 = tm_plan_where(p, k, 0);
        if (idx0 >= 0) {
            int64_t sid = info_of(in[0], idx0).storage_id;
            if (sg.by_storage[sg.start[sid]] == k) { /* first key of its storage */
                group = sg.by_storage + sg.start[sid];
                ng = sg.start[sid + 1] - sg.start[sid];
            }
        }
        int shared = ng >= 2 && shared_identically(p, in, users, group, ng);
        if (split_shared && shared) {
            /* Exact aliases of the group's first key are written once. */
            tm_tensor_info first = info_of(in[0], idx0);
            for (size_t g = 1; g < ng; g++) {
                tm_tensor_info t = info_of(in[0], tm_plan_where(p, group[g], 0));
                if (same_view(&first, &t)) {
                    p->alias_of[group[g]] = (int64_t)k;
                    done[group[g]] = 1;
                }
            }
        }
        tm_unit *u = &p->units[p->n_units];
        if (!split_shared && shared) {
            tm_tensor_info r = info_of(in[0], idx0);
            u->whole_storage = 1;
            u->numel = (int64_t)(r.storage_nbytes / tm_dtype_size(r.dtype));
        } else {
            group = &k;
            ng = 1;
            size_t i = 0;
            while (tm_plan_where(p, k, i) < 0) i++;
            u->numel = (int64_t)info_of(in[i], tm_plan_where(p, k, i)).numel;
        }
        size_t i = 0;
        while (tm_plan_where(p, group[0], i) < 0) i++;
        tm_tensor_info r = info_of(in[i], tm_plan_where(p, group[0], i));
        u->floating = merged_as_real(r.dtype, p->dequantize);
        u->out_dtype = output_dtype(r.dtype, o);
        if (!(u->keys = malloc(ng * sizeof *u->keys))) {
            st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
            goto out;
        }
        memcpy(u->keys, group, ng * sizeof *group);
        u->n_keys = ng;
        for (size_t g = 0; g < ng; g++) {
            done[group[g]] = 1;
            p->unit_of[group[g]] = p->n_units;
        }
        p->n_units++;
    }
out:
    for (size_t i = 0; users && i < p->n_inputs; i++) free(users[i]);
    free(users);
    free(sg.start);
    free(sg.by_storage);
    free(done);
    return st;
}

tm_status tm_plan_build(tm_plan *plan, tm_checkpoint *const *inputs, size_t n,
                        const tm_merge_options *opts, int split_shared, tm_error *err) {
    memset(plan, 0, sizeof *plan);
    plan->n_inputs = n;
    plan->dequantize = opts->dequantize != 0;
    tm_status st = plan_keys(plan, inputs, n, opts, err);
    if (!st) st = check_compatible(plan, inputs, err);
    if (!st) st = plan_units(plan, inputs, opts, split_shared, err);
    return st;
}

/* The first input holding key k, and its tensor there. */
static tm_tensor_info first_holder(const tm_plan *p, tm_checkpoint *const *in, size_t k, size_t *input) {
    size_t i = 0;
    while (tm_plan_where(p, k, i) < 0) i++;
    *input = i;
    return info_of(in[i], tm_plan_where(p, k, i));
}

tm_status tm_plan_check_base(tm_plan *p, tm_checkpoint *const *in, tm_checkpoint *base, tm_error *err) {
    p->base_where = malloc((p->n_keys ? p->n_keys : 1) * sizeof *p->base_where);
    if (!p->base_where) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    const char *bp = tm_checkpoint_path(base);
    for (size_t k = 0; k < p->n_keys; k++) {
        int64_t idx = p->base_where[k] = tm_checkpoint_find(base, p->keys[k]);
        if (idx < 0)
            return tm_error_set(err, TM_ERROR_MISMATCH,
                                "%s: the base model lacks tensor '%s' (it must hold every merged tensor)", bp,
                                p->keys[k]);
        size_t i;
        tm_tensor_info a = first_holder(p, in, k, &i), b = info_of(base, idx);
        tm_status st = check_quantized(&b, bp, p->keys[k], p->dequantize, err);
        if (!st) st = compare(&a, tm_checkpoint_path(in[i]), &b, bp, p->keys[k], p->dequantize, err);
        if (st) return st;
    }
    /* A storage merged whole (tied weights, views) must be laid out the same way in the base. */
    for (size_t u = 0; u < p->n_units; u++) {
        const tm_unit *un = &p->units[u];
        if (!un->whole_storage) continue;
        tm_tensor_info b0 = info_of(base, p->base_where[un->keys[0]]);
        int same = b0.storage_nbytes / tm_dtype_size(b0.dtype) == (uint64_t)un->numel;
        for (size_t j = 0; j < un->n_keys && same; j++) {
            tm_tensor_info b = info_of(base, p->base_where[un->keys[j]]), r = info_of(in[0], tm_plan_where(p, un->keys[j], 0));
            same = b.storage_id == b0.storage_id && b.dtype == b0.dtype && b.storage_offset == r.storage_offset;
            for (int d = 0; same && d < b.ndim; d++) same = b.stride[d] == r.stride[d];
        }
        if (!same)
            return tm_error_set(err, TM_ERROR_MISMATCH,
                                "%s: tensor '%s' does not share its storage with '%s' as in the inputs (tied weights); "
                                "a safetensors output merges them one by one",
                                bp, p->keys[un->keys[0]], p->keys[un->keys[un->n_keys > 1]]);
    }
    return TM_OK;
}

void tm_plan_free(tm_plan *plan) {
    if (!plan) return;
    free(plan->base_where);
    for (size_t u = 0; u < plan->n_units; u++) free(plan->units[u].keys);
    free(plan->units);
    free(plan->keys);
    free(plan->where);
    free(plan->alias_of);
    free(plan->unit_of);
    memset(plan, 0, sizeof *plan);
}

void tm_plan_output_layout(const tm_plan *plan, tm_checkpoint *const *inputs, size_t k,
                           int64_t *stride, int64_t *storage_offset) {
    size_t i;
    tm_tensor_info r = first_holder(plan, inputs, k, &i);
    if (plan->unit_of[k] != SIZE_MAX && plan->units[plan->unit_of[k]].whole_storage) {
        memcpy(stride, r.stride, (size_t)r.ndim * sizeof *stride);
        *storage_offset = r.storage_offset;
        return;
    }
    int64_t s = 1;
    for (int d = r.ndim - 1; d >= 0; d--) {
        stride[d] = s;
        s *= r.shape[d] > 1 ? r.shape[d] : 1;
    }
    *storage_offset = 0;
}
