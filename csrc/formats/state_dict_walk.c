#define _GNU_SOURCE
#include "formats/state_dict_walk.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Modules nest a few levels; a deeper chain is hostile input, not a model. */
#define MAX_MODULE_DEPTH 256
/* Bounds on one walk, whatever the pickle. Pickled values may be shared (the memo makes any
 * DAG, and objects may even form cycles), and every path is walked as state_dict() would, so
 * without them a few KiB could name 2^256 tensors or make the search quadratic. The largest
 * models have around 10^5 tensors, with names under 200 bytes. */
#define MAX_MODULE_VISITS ((size_t)100000)
#define MAX_TENSORS ((size_t)1000000)
#define MAX_NAME_BYTES ((size_t)65536)
#define MAX_TOTAL_NAME_BYTES ((size_t)256 << 20)
#define MAX_WORK ((size_t)200000000) /* dict entries, set items and modules looked at */

typedef struct walk_ctx {
    tm_named_tensors *out;
    const char *label;
    tm_error *err;
    size_t visits, name_bytes, work;
    int over;                                      /* MAX_WORK reached */
    const tm_pk_value *path[MAX_MODULE_DEPTH + 2]; /* modules from the root to the current one */
} walk_ctx;

static int is_str(const tm_pk_value *v) { return v && v->kind == TM_PK_STRING; }

/* Charges n steps; 0 (and c->over set) once the budget is spent, so that predicates answer
 * "no" from then on and the walk ends with the limit error. */
static int spend(walk_ctx *c, size_t n) {
    if (c->over || n > MAX_WORK - c->work) {
        c->over = 1;
        return 0;
    }
    c->work += n;
    return 1;
}

static tm_status over_error(walk_ctx *c) {
    return tm_error_set(c->err, TM_ERROR_LIMIT,
                        "%s: the checkpoint's structure takes more than %zu steps to search (limit)",
                        c->label, MAX_WORK);
}

/* tm_pk_dict_get, charged for the entries it looks at. */
static const tm_pk_value *dict_get(walk_ctx *c, const tm_pk_value *d, const char *key) {
    if (!d || d->kind != TM_PK_DICT || !spend(c, d->u.dict.n + 1)) return NULL;
    return tm_pk_dict_get(d, key);
}

static tm_status push(walk_ctx *c, const char *prefix, const char *name, const tm_pk_value *t) {
    tm_named_tensors *out = c->out;
    size_t len = strlen(prefix) + strlen(name);
    if (out->n >= MAX_TENSORS)
        return tm_error_set(c->err, TM_ERROR_LIMIT, "%s: more than %zu tensors (limit)", c->label,
                            MAX_TENSORS);
    if (len > MAX_NAME_BYTES)
        return tm_error_set(c->err, TM_ERROR_LIMIT,
                            "%s: a tensor name of %zu bytes, more than %zu (limit): '%.64s...'",
                            c->label, len, MAX_NAME_BYTES, *prefix ? prefix : name);
    if (c->name_bytes + len > MAX_TOTAL_NAME_BYTES)
        return tm_error_set(c->err, TM_ERROR_LIMIT,
                            "%s: tensor names of more than %zu bytes in all (limit)", c->label,
                            MAX_TOTAL_NAME_BYTES);
    c->name_bytes += len;
    if (out->n == out->cap) {
        size_t cap = out->cap ? out->cap * 2 : 64;
        tm_named_tensor *p = realloc(out->items, cap * sizeof *p);
        if (!p) return tm_error_set(c->err, TM_ERROR_NOMEM, "%s: out of memory", c->label);
        out->items = p;
        out->cap = cap;
    }
    char *full = NULL;
    if (asprintf(&full, "%s%s", prefix, name) < 0)
        return tm_error_set(c->err, TM_ERROR_NOMEM, "%s: out of memory", c->label);
    out->items[out->n].name = full;
    out->items[out->n].tensor = t;
    out->n++;
    return TM_OK;
}

/* A dict whose keys are strings and whose values are all tensors (at least one). */
static int is_flat_state_dict(walk_ctx *c, const tm_pk_value *v) {
    if (!v || v->kind != TM_PK_DICT || v->u.dict.n == 0) return 0;
    for (size_t i = 0; i < v->u.dict.n; i++)
        if (!spend(c, 1) || !is_str(v->u.dict.keys[i]) || v->u.dict.values[i]->kind != TM_PK_TENSOR)
            return 0;
    return 1;
}

static const tm_pk_value *object_state(const tm_pk_value *v) {
    if (!v || v->kind != TM_PK_OBJECT) return NULL;
    const tm_pk_value *s = v->u.object.state;
    return s && s->kind == TM_PK_DICT ? s : NULL;
}

/* torch.save(model): an nn.Module pickled whole keeps its tensors in _parameters/_buffers. */
static int is_nn_module(walk_ctx *c, const tm_pk_value *v) {
    const tm_pk_value *s = object_state(v);
    return s && dict_get(c, s, "_parameters") && dict_get(c, s, "_modules");
}

/* torch.jit.save: modules are __torch__.* objects whose state is a dict of attributes. */
static int is_script_module(const tm_pk_value *v) {
    return object_state(v) && strncmp(v->u.object.module, "__torch__", 9) == 0;
}

static int is_candidate(walk_ctx *c, const tm_pk_value *v) {
    return is_flat_state_dict(c, v) || is_nn_module(c, v) || is_script_module(v);
}

static int in_set(walk_ctx *c, const tm_pk_value *set, const char *name) {
    if (!set || set->kind != TM_PK_SET || !spend(c, set->u.seq.n)) return 0;
    for (size_t i = 0; i < set->u.seq.n; i++) {
        const tm_pk_value *it = set->u.seq.items[i];
        if (is_str(it) && strcmp(it->u.str.data, name) == 0) return 1;
    }
    return 0;
}

static tm_status walk_module(walk_ctx *c, const tm_pk_value *m, const char *prefix, int depth);

/* TorchScript custom-class objects (__torch__.torch.classes.*) pickle the tuple their
 * __getstate__ returns: quantized modules' packed weights (LinearPackedParamsBase: (weight,
 * bias); the conv ones: (version, [tensors], [optional tensors])). Their tensors are named by
 * position under the attribute ("fc._packed_params._packed_params.0"), the path of the tuple
 * that eager PyTorch's state_dict() holds there. */
static int is_seq(const tm_pk_value *v) { return v->kind == TM_PK_TUPLE || v->kind == TM_PK_LIST; }

static int is_custom_class_state(const tm_pk_value *v) {
    return v && v->kind == TM_PK_OBJECT && strncmp(v->u.object.module, "__torch__.torch.classes.", 24) == 0 &&
           v->u.object.state && is_seq(v->u.object.state);
}

static tm_status walk_custom_state(walk_ctx *c, const tm_pk_value *seq, const char *name, int level) {
    for (size_t i = 0; i < seq->u.seq.n; i++) {
        const tm_pk_value *v = seq->u.seq.items[i];
        if (!spend(c, 1)) return over_error(c);
        if (v->kind != TM_PK_TENSOR && !(is_seq(v) && level < 2)) continue;
        char *sub = NULL;
        if (strlen(name) > MAX_NAME_BYTES)
            return tm_error_set(c->err, TM_ERROR_LIMIT, "%s: a tensor name of more than %zu bytes (limit): '%.64s...'",
                                c->label, MAX_NAME_BYTES, name);
        if (asprintf(&sub, "%s.%zu", name, i) < 0)
            return tm_error_set(c->err, TM_ERROR_NOMEM, "%s: out of memory", c->label);
        tm_status st = v->kind == TM_PK_TENSOR ? push(c, "", sub, v) : walk_custom_state(c, v, sub, level + 1);
        free(sub);
        if (st) return st;
    }
    return TM_OK;
}

/* Walks submodule v, named prefix + key + ".". */
static tm_status walk_sub(walk_ctx *c, const tm_pk_value *v, const char *prefix, const char *key,
                          int depth) {
    if (strlen(prefix) + strlen(key) + 1 > MAX_NAME_BYTES)
        return tm_error_set(c->err, TM_ERROR_LIMIT,
                            "%s: a module name of more than %zu bytes (limit): '%.64s...'",
                            c->label, MAX_NAME_BYTES, *prefix ? prefix : key);
    char *sub = NULL;
    if (asprintf(&sub, "%s%s.", prefix, key) < 0)
        return tm_error_set(c->err, TM_ERROR_NOMEM, "%s: out of memory", c->label);
    tm_status st = walk_module(c, v, sub, depth + 1);
    free(sub);
    return st;
}

static tm_status walk_module(walk_ctx *c, const tm_pk_value *m, const char *prefix, int depth) {
    if (depth > MAX_MODULE_DEPTH)
        return tm_error_set(c->err, TM_ERROR_LIMIT, "%s: modules nested deeper than %d", c->label,
                            MAX_MODULE_DEPTH);
    /* A module inside itself has no state_dict() (PyTorch would recurse forever). */
    for (int i = 0; i < depth; i++)
        if (c->path[i] == m)
            return tm_error_set(c->err, TM_ERROR_FORMAT, "%s: module '%.200s' contains itself",
                                c->label, prefix);
    c->path[depth] = m;
    if (++c->visits > MAX_MODULE_VISITS)
        return tm_error_set(c->err, TM_ERROR_LIMIT, "%s: more than %zu modules to walk (limit)",
                            c->label, MAX_MODULE_VISITS);
    const tm_pk_value *s = object_state(m);
    tm_status st;
    if (is_nn_module(c, m)) {
        const tm_pk_value *groups[2] = {dict_get(c, s, "_parameters"), dict_get(c, s, "_buffers")};
        const tm_pk_value *non_persistent = dict_get(c, s, "_non_persistent_buffers_set");
        for (int g = 0; g < 2; g++) {
            const tm_pk_value *d = groups[g];
            if (!d || d->kind != TM_PK_DICT) continue;
            for (size_t i = 0; i < d->u.dict.n; i++) {
                const tm_pk_value *k = d->u.dict.keys[i], *v = d->u.dict.values[i];
                if (!spend(c, 1)) return over_error(c);
                if (!is_str(k) || v->kind != TM_PK_TENSOR) continue; /* None: unset parameter */
                if (g == 1 && in_set(c, non_persistent, k->u.str.data)) continue;
                if ((st = push(c, prefix, k->u.str.data, v))) return st;
            }
        }
        const tm_pk_value *mods = dict_get(c, s, "_modules");
        if (mods && mods->kind == TM_PK_DICT) {
            for (size_t i = 0; i < mods->u.dict.n; i++) {
                const tm_pk_value *k = mods->u.dict.keys[i], *v = mods->u.dict.values[i];
                if (!spend(c, 1)) return over_error(c);
                if (!is_str(k) || !object_state(v)) continue;
                if ((st = walk_sub(c, v, prefix, k->u.str.data, depth))) return st;
            }
        }
        return c->over ? over_error(c) : TM_OK;
    }
    if (c->over) return over_error(c);
    /* TorchScript object: every tensor attribute, recursing into submodule objects. */
    for (size_t i = 0; i < s->u.dict.n; i++) {
        const tm_pk_value *k = s->u.dict.keys[i], *v = s->u.dict.values[i];
        if (!spend(c, 1)) return over_error(c);
        if (!is_str(k)) continue;
        if (v->kind == TM_PK_TENSOR) {
            if ((st = push(c, prefix, k->u.str.data, v))) return st;
        } else if (is_custom_class_state(v)) {
            char *name = NULL;
            if (asprintf(&name, "%s%s", prefix, k->u.str.data) < 0)
                return tm_error_set(c->err, TM_ERROR_NOMEM, "%s: out of memory", c->label);
            st = walk_custom_state(c, v->u.object.state, name, 0);
            free(name);
            if (st) return st;
        } else if (object_state(v)) {
            if ((st = walk_sub(c, v, prefix, k->u.str.data, depth))) return st;
        }
    }
    return TM_OK;
}

static tm_status flatten(walk_ctx *c, const tm_pk_value *v) {
    if (v->kind == TM_PK_DICT) {
        for (size_t i = 0; i < v->u.dict.n; i++) {
            tm_status st = push(c, "", v->u.dict.keys[i]->u.str.data, v->u.dict.values[i]);
            if (st) return st;
        }
        return TM_OK;
    }
    return walk_module(c, v, "", 0);
}

/* Follows a dotted key ("model.ema") through nested dicts. */
static const tm_pk_value *lookup_path(walk_ctx *c, const tm_pk_value *root, const char *key) {
    const tm_pk_value *cur = root;
    char *copy = strdup(key), *save = NULL;
    if (!copy) return NULL;
    for (char *part = strtok_r(copy, ".", &save); part && cur; part = strtok_r(NULL, ".", &save)) {
        const tm_pk_value *d = cur->kind == TM_PK_OBJECT ? object_state(cur) : cur;
        cur = dict_get(c, d, part);
    }
    free(copy);
    /* A whole dotted name may also be a single key ("model.ema" literally). */
    if (!cur) cur = dict_get(c, root, key);
    return cur;
}

static void list_candidates(walk_ctx *c, const tm_pk_value *root, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = '\0';
    if (!root || root->kind != TM_PK_DICT) return;
    for (size_t i = 0; i < root->u.dict.n && used + 1 < size; i++) {
        const tm_pk_value *k = root->u.dict.keys[i];
        if (!is_str(k) || !is_candidate(c, root->u.dict.values[i])) continue;
        int w = snprintf(buf + used, size - used, "%s'%.200s'", used ? ", " : "", k->u.str.data);
        if (w < 0) break;
        used += (size_t)w;
    }
}

static tm_status walk(walk_ctx *c, const tm_pk_value *root, const char *key) {
    tm_named_tensors *out = c->out;
    const char *label = c->label;
    tm_error *err = c->err;
    const char *chosen = "";
    const tm_pk_value *sd = NULL;
    char cands[512];

    if (root->kind == TM_PK_TENSOR) {
        /* torch.save(tensor) or torch.save(nn.Parameter): a one-tensor state dict. */
        out->key = strdup("");
        if (!out->key) return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
        return push(c, "", "", root);
    }
    if (root->kind == TM_PK_DICT && root->u.dict.n == 0) {
        /* torch.save({}): a state dict without tensors (inspect shows 0; a merge finds no name
         * in common). */
        out->key = strdup("");
        return out->key ? TM_OK : tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
    }
    if (is_flat_state_dict(c, root) || is_nn_module(c, root) || is_script_module(root)) {
        sd = root; /* already a state dict: --key does not apply */
    } else if (c->over) {
        return over_error(c);
    } else if (key && *key) {
        sd = lookup_path(c, root, key);
        if (!sd) {
            list_candidates(c, root, cands, sizeof cands);
            if (c->over) return over_error(c);
            return tm_error_set(err, TM_ERROR_NOT_FOUND, "%s: no key '%.200s' in the checkpoint%s%s%s",
                                label, key, *cands ? " (state dicts found: " : "", cands,
                                *cands ? ")" : "");
        }
        if (!is_candidate(c, sd))
            return c->over ? over_error(c)
                           : tm_error_set(err, TM_ERROR_FORMAT,
                                          "%s: '%.200s' is not a state dict (a dict of tensors or a module)",
                                          label, key);
        chosen = key;
    } else if (root->kind == TM_PK_DICT) {
        size_t found = 0;
        for (size_t i = 0; i < root->u.dict.n; i++) {
            const tm_pk_value *k = root->u.dict.keys[i], *v = root->u.dict.values[i];
            if (is_str(k) && is_candidate(c, v)) {
                if (found++ == 0) { sd = v; chosen = k->u.str.data; }
            }
        }
        if (c->over) return over_error(c);
        if (found > 1) {
            list_candidates(c, root, cands, sizeof cands);
            if (c->over) return over_error(c);
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
            if (!out->key) return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
            for (size_t i = 0; i < root->u.dict.n; i++) {
                if (root->u.dict.values[i]->kind != TM_PK_TENSOR) continue;
                tm_status st = push(c, "", root->u.dict.keys[i]->u.str.data, root->u.dict.values[i]);
                if (st) return st;
            }
            return TM_OK;
        }
    } else {
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: no state dict found (the checkpoint holds no dict of tensors)", label);
    }
    out->key = strdup(chosen);
    if (!out->key) return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
    return flatten(c, sd);
}

tm_status tm_state_dict_candidates(const tm_pk_value *root, const char *label, char ***keys,
                                   size_t *n, tm_error *err) {
    *keys = NULL;
    *n = 0;
    if (!label) label = "";
    tm_named_tensors unused = {0};
    walk_ctx *c = calloc(1, sizeof *c);
    if (!c) return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
    c->out = &unused;
    c->label = label;
    c->err = err;
    tm_status st = TM_OK;
    /* Only a dict that is not itself a state dict holds candidates, as walk() picks them. */
    if (root->kind == TM_PK_DICT && !is_flat_state_dict(c, root) && !is_nn_module(c, root) &&
        !is_script_module(root)) {
        for (size_t i = 0; i < root->u.dict.n && !st; i++) {
            const tm_pk_value *k = root->u.dict.keys[i];
            if (!is_str(k) || !is_candidate(c, root->u.dict.values[i])) continue;
            char **grown = realloc(*keys, (*n + 1) * sizeof *grown);
            char *copy = grown ? strdup(k->u.str.data) : NULL;
            if (grown) *keys = grown;
            if (!copy) st = tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
            else (*keys)[(*n)++] = copy;
        }
    }
    if (!st && c->over) st = over_error(c);
    free(c);
    if (st) {
        for (size_t i = 0; i < *n; i++) free((*keys)[i]);
        free(*keys);
        *keys = NULL;
        *n = 0;
    }
    return st;
}

tm_status tm_state_dict_walk(const tm_pk_value *root, const char *key, const char *label,
                             tm_named_tensors *out, tm_error *err) {
    memset(out, 0, sizeof *out);
    if (!label) label = "";
    walk_ctx *c = calloc(1, sizeof *c);
    if (!c) return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
    c->out = out;
    c->label = label;
    c->err = err;
    tm_status st = walk(c, root, key);
    free(c);
    return st;
}

void tm_named_tensors_free(tm_named_tensors *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n; i++) free(t->items[i].name);
    free(t->items);
    free(t->key);
    memset(t, 0, sizeof *t);
}
