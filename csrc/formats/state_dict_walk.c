#define _GNU_SOURCE
#include "formats/state_dict_walk.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Modules nest a few levels; a deeper chain is hostile input, not a model. */
#define MAX_MODULE_DEPTH 256

static int is_str(const tm_pk_value *v) { return v && v->kind == TM_PK_STRING; }

static tm_status push(tm_named_tensors *out, const char *prefix, const char *name,
                      const tm_pk_value *t, tm_error *err) {
    if (out->n == out->cap) {
        size_t cap = out->cap ? out->cap * 2 : 64;
        tm_named_tensor *p = realloc(out->items, cap * sizeof *p);
        if (!p) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        out->items = p;
        out->cap = cap;
    }
    char *full = NULL;
    if (asprintf(&full, "%s%s", prefix, name) < 0)
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    out->items[out->n].name = full;
    out->items[out->n].tensor = t;
    out->n++;
    return TM_OK;
}

/* A dict whose keys are strings and whose values are all tensors (at least one). */
static int is_flat_state_dict(const tm_pk_value *v) {
    if (!v || v->kind != TM_PK_DICT || v->u.dict.n == 0) return 0;
    for (size_t i = 0; i < v->u.dict.n; i++)
        if (!is_str(v->u.dict.keys[i]) || v->u.dict.values[i]->kind != TM_PK_TENSOR) return 0;
    return 1;
}

static const tm_pk_value *object_state(const tm_pk_value *v) {
    if (!v || v->kind != TM_PK_OBJECT) return NULL;
    const tm_pk_value *s = v->u.object.state;
    return s && s->kind == TM_PK_DICT ? s : NULL;
}

/* torch.save(model): an nn.Module pickled whole keeps its tensors in _parameters/_buffers. */
static int is_nn_module(const tm_pk_value *v) {
    const tm_pk_value *s = object_state(v);
    return s && tm_pk_dict_get(s, "_parameters") && tm_pk_dict_get(s, "_modules");
}

/* torch.jit.save: modules are __torch__.* objects whose state is a dict of attributes. */
static int is_script_module(const tm_pk_value *v) {
    return object_state(v) && strncmp(v->u.object.module, "__torch__", 9) == 0;
}

static int in_set(const tm_pk_value *set, const char *name) {
    if (!set || set->kind != TM_PK_SET) return 0;
    for (size_t i = 0; i < set->u.seq.n; i++) {
        const tm_pk_value *it = set->u.seq.items[i];
        if (is_str(it) && strcmp(it->u.str.data, name) == 0) return 1;
    }
    return 0;
}

static tm_status walk_module(const tm_pk_value *m, const char *prefix, int depth,
                             tm_named_tensors *out, const char *label, tm_error *err) {
    if (depth > MAX_MODULE_DEPTH)
        return tm_error_set(err, TM_ERROR_LIMIT, "%s: modules nested deeper than %d", label,
                            MAX_MODULE_DEPTH);
    const tm_pk_value *s = object_state(m);
    tm_status st;
    if (is_nn_module(m)) {
        const tm_pk_value *groups[2] = {tm_pk_dict_get(s, "_parameters"), tm_pk_dict_get(s, "_buffers")};
        const tm_pk_value *non_persistent = tm_pk_dict_get(s, "_non_persistent_buffers_set");
        for (int g = 0; g < 2; g++) {
            const tm_pk_value *d = groups[g];
            if (!d || d->kind != TM_PK_DICT) continue;
            for (size_t i = 0; i < d->u.dict.n; i++) {
                const tm_pk_value *k = d->u.dict.keys[i], *v = d->u.dict.values[i];
                if (!is_str(k) || v->kind != TM_PK_TENSOR) continue; /* None: unset parameter */
                if (g == 1 && in_set(non_persistent, k->u.str.data)) continue;
                if ((st = push(out, prefix, k->u.str.data, v, err))) return st;
            }
        }
        const tm_pk_value *mods = tm_pk_dict_get(s, "_modules");
        if (mods && mods->kind == TM_PK_DICT) {
            for (size_t i = 0; i < mods->u.dict.n; i++) {
                const tm_pk_value *k = mods->u.dict.keys[i], *v = mods->u.dict.values[i];
                if (!is_str(k) || !object_state(v)) continue;
                char *sub = NULL;
                if (asprintf(&sub, "%s%s.", prefix, k->u.str.data) < 0)
                    return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
                st = walk_module(v, sub, depth + 1, out, label, err);
                free(sub);
                if (st) return st;
            }
        }
        return TM_OK;
    }
    /* TorchScript object: every tensor attribute, recursing into submodule objects. */
    for (size_t i = 0; i < s->u.dict.n; i++) {
        const tm_pk_value *k = s->u.dict.keys[i], *v = s->u.dict.values[i];
        if (!is_str(k)) continue;
        if (v->kind == TM_PK_TENSOR) {
            if ((st = push(out, prefix, k->u.str.data, v, err))) return st;
        } else if (object_state(v)) {
            char *sub = NULL;
            if (asprintf(&sub, "%s%s.", prefix, k->u.str.data) < 0)
                return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
            st = walk_module(v, sub, depth + 1, out, label, err);
            free(sub);
            if (st) return st;
        }
    }
    return TM_OK;
}

static int is_candidate(const tm_pk_value *v) {
    return is_flat_state_dict(v) || is_nn_module(v) || is_script_module(v);
}

static tm_status flatten(const tm_pk_value *v, tm_named_tensors *out, const char *label,
                         tm_error *err) {
    if (v->kind == TM_PK_DICT) {
        for (size_t i = 0; i < v->u.dict.n; i++) {
            tm_status st = push(out, "", v->u.dict.keys[i]->u.str.data, v->u.dict.values[i], err);
            if (st) return st;
        }
        return TM_OK;
    }
    return walk_module(v, "", 0, out, label, err);
}

/* Follows a dotted key ("model.ema") through nested dicts. */
static const tm_pk_value *lookup_path(const tm_pk_value *root, const char *key) {
    const tm_pk_value *cur = root;
    char *copy = strdup(key), *save = NULL;
    if (!copy) return NULL;
    for (char *part = strtok_r(copy, ".", &save); part && cur; part = strtok_r(NULL, ".", &save)) {
        const tm_pk_value *d = cur->kind == TM_PK_OBJECT ? object_state(cur) : cur;
        cur = tm_pk_dict_get(d, part);
    }
    free(copy);
    /* A whole dotted name may also be a single key ("model.ema" literally). */
    if (!cur) cur = tm_pk_dict_get(root, key);
    return cur;
}

static void list_candidates(const tm_pk_value *root, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = '\0';
    if (!root || root->kind != TM_PK_DICT) return;
    for (size_t i = 0; i < root->u.dict.n && used + 1 < size; i++) {
        const tm_pk_value *k = root->u.dict.keys[i];
        if (!is_str(k) || !is_candidate(root->u.dict.values[i])) continue;
        int w = snprintf(buf + used, size - used, "%s'%s'", used ? ", " : "", k->u.str.data);
        if (w < 0) break;
        used += (size_t)w;
    }
}

tm_status tm_state_dict_walk(const tm_pk_value *root, const char *key, const char *label,
                             tm_named_tensors *out, tm_error *err) {
    memset(out, 0, sizeof *out);
    const char *chosen = "";
    const tm_pk_value *sd = NULL;
    char cands[512];

    if (root->kind == TM_PK_TENSOR) {
        /* torch.save(tensor) or torch.save(nn.Parameter): a one-tensor state dict. */
        out->key = strdup("");
        tm_status st = push(out, "", "", root, err);
        return st;
    }
    if (root->kind == TM_PK_DICT && root->u.dict.n == 0)
        return tm_error_set(err, TM_ERROR_FORMAT, "%s: the checkpoint is an empty dict", label);
    if (is_flat_state_dict(root) || is_nn_module(root) || is_script_module(root)) {
        sd = root; /* already a state dict: --key does not apply */
    } else if (key && *key) {
        sd = lookup_path(root, key);
        if (!sd) {
            list_candidates(root, cands, sizeof cands);
            return tm_error_set(err, TM_ERROR_NOT_FOUND, "%s: no key '%s' in the checkpoint%s%s%s",
                                label, key, *cands ? " (state dicts found: " : "", cands,
                                *cands ? ")" : "");
        }
        if (!is_candidate(sd))
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: '%s' is not a state dict (a dict of tensors or a module)",
                                label, key);
        chosen = key;
    } else if (root->kind == TM_PK_DICT) {
        size_t found = 0;
        for (size_t i = 0; i < root->u.dict.n; i++) {
            const tm_pk_value *k = root->u.dict.keys[i], *v = root->u.dict.values[i];
            if (is_str(k) && is_candidate(v)) {
                if (found++ == 0) { sd = v; chosen = k->u.str.data; }
            }
        }
        if (found > 1) {
            list_candidates(root, cands, sizeof cands);
            return tm_error_set(err, TM_ERROR_AMBIGUOUS,
                                "%s: several state dicts in the checkpoint: %s; pick one with --key",
                                label, cands);
        }
        if (!sd) {
            /* A dict with some tensors among other values: take its tensor entries. */
            size_t tensors = 0, strkeys = 1;
            for (size_t i = 0; i < root->u.dict.n; i++) {
                if (root->u.dict.values[i]->kind == TM_PK_TENSOR) tensors++;
                if (!is_str(root->u.dict.keys[i])) strkeys = 0;
            }
            if (tensors == 0 || !strkeys)
                return tm_error_set(err, TM_ERROR_FORMAT, "%s: no state dict found in the checkpoint",
                                    label);
            out->key = strdup("");
            for (size_t i = 0; i < root->u.dict.n; i++) {
                if (root->u.dict.values[i]->kind != TM_PK_TENSOR) continue;
                tm_status st = push(out, "", root->u.dict.keys[i]->u.str.data,
                                    root->u.dict.values[i], err);
                if (st) return st;
            }
            return TM_OK;
        }
    } else {
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: no state dict found (the checkpoint holds no dict of tensors)", label);
    }
    out->key = strdup(chosen);
    if (!out->key) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    return flatten(sd, out, label, err);
}

void tm_named_tensors_free(tm_named_tensors *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n; i++) free(t->items[i].name);
    free(t->items);
    free(t->key);
    memset(t, 0, sizeof *t);
}
