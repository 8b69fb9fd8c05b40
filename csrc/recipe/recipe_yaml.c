/* Recipes, part 1: YAML text → tree (libyaml's event API), key=value overrides on the tree, and
 * the tree back to YAML text (libyaml's emitter). Every node keeps its origin and its 1-based
 * line and column so later errors can point at it. C11. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yaml.h>

#include "checkpoint/checkpoint_internal.h"
#include "core/fs.h"
#include "recipe/recipe.h"

/* Recipes are small; these bound what a hostile file can make us allocate. */
#define RECIPE_MAX_NODES ((size_t)100000)
#define RECIPE_MAX_DEPTH 200

static char *dup_n(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

static char *dup_s(const char *s) { return s ? dup_n(s, strlen(s)) : NULL; }

/* ---- nodes ------------------------------------------------------------------------------------ */

static void node_free(tm_rnode *n) {
    if (!n) return;
    for (size_t i = 0; i < n->n; i++) {
        node_free(n->items[i]);
        if (n->keys) node_free(n->keys[i]);
    }
    free(n->items);
    free(n->keys);
    free(n->text);
    free(n);
}

static tm_rnode *node_new(tm_rdoc *doc, tm_rnode_kind kind, const tm_rorigin *origin, size_t line, size_t col) {
    if (doc->n_nodes >= RECIPE_MAX_NODES) return NULL;
    tm_rnode *n = calloc(1, sizeof *n);
    if (!n) return NULL;
    doc->n_nodes++;
    n->kind = kind;
    n->origin = origin;
    n->line = line;
    n->column = col;
    return n;
}

/* Appends item (and key, for mappings). Returns 0, or -1 when out of memory. */
static int node_push(tm_rnode *parent, tm_rnode *key, tm_rnode *item) {
    tm_rnode **items = realloc(parent->items, (parent->n + 1) * sizeof *items);
    if (!items) return -1;
    parent->items = items;
    if (parent->kind == TM_RNODE_MAP) {
        tm_rnode **keys = realloc(parent->keys, (parent->n + 1) * sizeof *keys);
        if (!keys) return -1;
        parent->keys = keys;
        keys[parent->n] = key;
    }
    items[parent->n++] = item;
    return 0;
}

static tm_rnode *node_copy(tm_rdoc *doc, const tm_rnode *src) {
    tm_rnode *n = node_new(doc, src->kind, src->origin, src->line, src->column);
    if (!n) return NULL;
    n->plain = src->plain;
    n->style = src->style;
    n->flow = src->flow;
    if (src->text && !(n->text = dup_s(src->text))) goto fail;
    for (size_t i = 0; i < src->n; i++) {
        tm_rnode *k = NULL, *v = node_copy(doc, src->items[i]);
        if (!v) goto fail;
        if (src->kind == TM_RNODE_MAP && !(k = node_copy(doc, src->keys[i]))) {
            node_free(v);
            goto fail;
        }
        if (node_push(n, k, v)) {
            node_free(k);
            node_free(v);
            goto fail;
        }
    }
    return n;
fail:
    node_free(n);
    return NULL;
}

const tm_rnode *tm_rnode_get(const tm_rnode *map, const char *key) {
    if (!map || map->kind != TM_RNODE_MAP) return NULL;
    for (size_t i = 0; i < map->n; i++)
        if (strcmp(map->keys[i]->text, key) == 0) return map->items[i];
    return NULL;
}

static ptrdiff_t map_find(const tm_rnode *map, const char *key) {
    for (size_t i = 0; i < map->n; i++)
        if (strcmp(map->keys[i]->text, key) == 0) return (ptrdiff_t)i;
    return -1;
}

/* ---- parsing ---------------------------------------------------------------------------------- */

typedef struct anchor {
    char *name;
    tm_rnode *node; /* owned by the tree; copied on use */
} anchor;

typedef struct parse_ctx {
    yaml_parser_t parser;
    tm_rdoc *doc;
    const tm_rorigin *origin;
    anchor *anchors;
    size_t n_anchors;
    tm_error *err;
} parse_ctx;

/* "label:line:col: " for a node or mark of this origin; overrides have no useful position. */
static void where(char *buf, size_t cap, const tm_rorigin *o, size_t line, size_t col) {
    if (o->is_override || !line) snprintf(buf, cap, "%s", o->label);
    else snprintf(buf, cap, "%s:%zu:%zu", o->label, line, col);
}

static tm_status perr(parse_ctx *c, size_t line, size_t col, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static tm_status perr(parse_ctx *c, size_t line, size_t col, const char *fmt, ...) {
    char loc[512], msg[768];
    where(loc, sizeof loc, c->origin, line, col);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return tm_error_set(c->err, TM_ERROR_FORMAT, "%s: %s", loc, msg);
}

static tm_status nomem(parse_ctx *c) {
    if (c->doc->n_nodes >= RECIPE_MAX_NODES)
        return tm_error_set(c->err, TM_ERROR_LIMIT, "%s: the recipe has more than %zu YAML nodes (aliases count once "
                            "per use)", c->origin->label, RECIPE_MAX_NODES);
    return tm_error_set(c->err, TM_ERROR_NOMEM, "out of memory");
}

static tm_status next_event(parse_ctx *c, yaml_event_t *ev) {
    if (yaml_parser_parse(&c->parser, ev)) return TM_OK;
    yaml_parser_t *p = &c->parser;
    const char *problem = p->problem ? p->problem : "unknown problem";
    if (p->error == YAML_READER_ERROR) {
        if (p->problem_value != -1)
            return tm_error_set(c->err, TM_ERROR_FORMAT, "%s: invalid YAML: %s (#%X at byte %zu)", c->origin->label,
                                problem, (unsigned)p->problem_value, p->problem_offset);
        return tm_error_set(c->err, TM_ERROR_FORMAT, "%s: invalid YAML: %s at byte %zu", c->origin->label, problem,
                            p->problem_offset);
    }
    if (p->error == YAML_MEMORY_ERROR) return tm_error_set(c->err, TM_ERROR_NOMEM, "out of memory");
    if (p->context)
        return perr(c, p->problem_mark.line + 1, p->problem_mark.column + 1,
                    "invalid YAML: %s %s (which started at line %zu, column %zu)", problem, p->context,
                    (size_t)p->context_mark.line + 1, (size_t)p->context_mark.column + 1);
    return perr(c, p->problem_mark.line + 1, p->problem_mark.column + 1, "invalid YAML: %s", problem);
}

static tm_status remember_anchor(parse_ctx *c, const char *name, tm_rnode *node) {
    if (!name) return TM_OK;
    for (size_t i = 0; i < c->n_anchors; i++)
        if (strcmp(c->anchors[i].name, (const char *)name) == 0) {
            c->anchors[i].node = node; /* a later anchor of the same name wins */
            return TM_OK;
        }
    anchor *a = realloc(c->anchors, (c->n_anchors + 1) * sizeof *a);
    if (!a) return nomem(c);
    c->anchors = a;
    if (!(a[c->n_anchors].name = dup_s((const char *)name))) return nomem(c);
    a[c->n_anchors++].node = node;
    return TM_OK;
}

static tm_status parse_node(parse_ctx *c, yaml_event_t *ev, int depth, tm_rnode **out);

/* YAML merge keys ("<<: *defaults"): pairs of the merged mappings that this one lacks. */
static tm_status apply_merge(parse_ctx *c, tm_rnode *map, const tm_rnode *src, const tm_rnode *key) {
    if (src->kind == TM_RNODE_SEQ) {
        for (size_t i = 0; i < src->n; i++) {
            tm_status st = apply_merge(c, map, src->items[i], key);
            if (st) return st;
        }
        return TM_OK;
    }
    if (src->kind != TM_RNODE_MAP)
        return perr(c, key->line, key->column, "the value of a merge key (<<) must be a mapping or a list of mappings");
    for (size_t i = 0; i < src->n; i++) {
        if (map_find(map, src->keys[i]->text) >= 0) continue;
        tm_rnode *k = node_copy(c->doc, src->keys[i]), *v = node_copy(c->doc, src->items[i]);
        if (!k || !v || node_push(map, k, v)) {
            node_free(k);
            node_free(v);
            return nomem(c);
        }
    }
    return TM_OK;
}

static tm_status parse_mapping(parse_ctx *c, tm_rnode *map, int depth) {
    tm_rnode **merges = NULL, **merge_keys = NULL;
    size_t n_merges = 0;
    tm_status st = TM_OK;
    for (;;) {
        yaml_event_t ev;
        if ((st = next_event(c, &ev))) break;
        if (ev.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&ev);
            break;
        }
        tm_rnode *key = NULL, *value = NULL;
        if (ev.type != YAML_SCALAR_EVENT) {
            st = perr(c, ev.start_mark.line + 1, ev.start_mark.column + 1,
                      "mapping keys must be plain names, not %s",
                      ev.type == YAML_ALIAS_EVENT ? "aliases" : "lists or mappings");
            yaml_event_delete(&ev);
            break;
        }
        if ((st = parse_node(c, &ev, depth + 1, &key))) break;
        if ((st = next_event(c, &ev))) {
            node_free(key);
            break;
        }
        if ((st = parse_node(c, &ev, depth + 1, &value))) {
            node_free(key);
            break;
        }
        if (key->plain && strcmp(key->text, "<<") == 0) {
            tm_rnode **m = realloc(merges, (n_merges + 1) * sizeof *m), **mk = NULL;
            if (m) merges = m;
            if (m && (mk = realloc(merge_keys, (n_merges + 1) * sizeof *mk))) merge_keys = mk;
            if (!m || !mk) {
                node_free(key);
                node_free(value);
                st = nomem(c);
                break;
            }
            merges[n_merges] = value;
            merge_keys[n_merges++] = key;
            continue;
        }
        ptrdiff_t dup = map_find(map, key->text);
        if (dup >= 0) {
            st = perr(c, key->line, key->column, "duplicate key '%s' (first given at line %zu)", key->text,
                      map->keys[dup]->line);
            node_free(key);
            node_free(value);
            break;
        }
        if (node_push(map, key, value)) {
            node_free(key);
            node_free(value);
            st = nomem(c);
            break;
        }
    }
    for (size_t i = 0; i < n_merges; i++) {
        if (!st) st = apply_merge(c, map, merges[i], merge_keys[i]);
        node_free(merges[i]);
        node_free(merge_keys[i]);
    }
    free(merges);
    free(merge_keys);
    return st;
}

/* Builds the node that starts with event ev (consumed). */
static tm_status parse_node(parse_ctx *c, yaml_event_t *ev, int depth, tm_rnode **out) {
    *out = NULL;
    size_t line = ev->start_mark.line + 1, col = ev->start_mark.column + 1;
    tm_status st = TM_OK;
    if (depth > RECIPE_MAX_DEPTH) {
        yaml_event_delete(ev);
        return perr(c, line, col, "nested more than %d levels deep", RECIPE_MAX_DEPTH);
    }
    switch (ev->type) {
    case YAML_ALIAS_EVENT: {
        const char *name = (const char *)ev->data.alias.anchor;
        const tm_rnode *target = NULL;
        for (size_t i = c->n_anchors; i-- > 0;)
            if (strcmp(c->anchors[i].name, name) == 0) {
                target = c->anchors[i].node;
                break;
            }
        if (!target) st = perr(c, line, col, "unknown alias '*%s'", name);
        else if (!(*out = node_copy(c->doc, target))) st = nomem(c);
        break;
    }
    case YAML_SCALAR_EVENT: {
        tm_rnode *n = node_new(c->doc, TM_RNODE_SCALAR, c->origin, line, col);
        if (!n) {
            st = nomem(c);
            break;
        }
        const char *v = (const char *)ev->data.scalar.value;
        size_t len = ev->data.scalar.length;
        if (memchr(v, '\0', len)) {
            node_free(n);
            st = perr(c, line, col, "a string holds a NUL character");
            break;
        }
        const char *tag = (const char *)ev->data.scalar.tag;
        n->style = ev->data.scalar.style;
        n->plain = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
                   !(tag && (strcmp(tag, YAML_STR_TAG) == 0 || strcmp(tag, "!") == 0));
        if (!(n->text = dup_n(v, len))) {
            node_free(n);
            st = nomem(c);
            break;
        }
        *out = n;
        st = remember_anchor(c, (const char *)ev->data.scalar.anchor, n);
        break;
    }
    case YAML_SEQUENCE_START_EVENT: {
        tm_rnode *n = node_new(c->doc, TM_RNODE_SEQ, c->origin, line, col);
        if (!n) {
            st = nomem(c);
            break;
        }
        n->flow = ev->data.sequence_start.style == YAML_FLOW_SEQUENCE_STYLE;
        char *anchor_name = dup_s((const char *)ev->data.sequence_start.anchor); /* registered once complete */
        for (;;) {
            yaml_event_t item;
            if ((st = next_event(c, &item))) break;
            if (item.type == YAML_SEQUENCE_END_EVENT) {
                yaml_event_delete(&item);
                break;
            }
            tm_rnode *v;
            if ((st = parse_node(c, &item, depth + 1, &v))) break;
            if (node_push(n, NULL, v)) {
                node_free(v);
                st = nomem(c);
                break;
            }
        }
        if (!st) st = remember_anchor(c, anchor_name, n);
        free(anchor_name);
        if (st) node_free(n);
        else *out = n;
        break;
    }
    case YAML_MAPPING_START_EVENT: {
        tm_rnode *n = node_new(c->doc, TM_RNODE_MAP, c->origin, line, col);
        if (!n) {
            st = nomem(c);
            break;
        }
        n->flow = ev->data.mapping_start.style == YAML_FLOW_MAPPING_STYLE;
        char *anchor_name = dup_s((const char *)ev->data.mapping_start.anchor);
        st = parse_mapping(c, n, depth);
        if (!st) st = remember_anchor(c, anchor_name, n);
        free(anchor_name);
        if (st) node_free(n);
        else *out = n;
        break;
    }
    default:
        st = perr(c, line, col, "unexpected YAML event");
        break;
    }
    yaml_event_delete(ev);
    return st;
}

/* Parses text into *root (NULL for an empty document). */
static tm_status parse_text(tm_rdoc *doc, const tm_rorigin *origin, const char *text, size_t len, tm_rnode **root,
                            tm_error *err) {
    parse_ctx c;
    memset(&c, 0, sizeof c);
    c.doc = doc;
    c.origin = origin;
    c.err = err;
    *root = NULL;
    if (!yaml_parser_initialize(&c.parser)) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    yaml_parser_set_input_string(&c.parser, (const unsigned char *)text, len);
    tm_status st = TM_OK;
    int documents = 0;
    for (;;) {
        yaml_event_t ev;
        if ((st = next_event(&c, &ev))) break;
        yaml_event_type_t type = ev.type;
        size_t line = ev.start_mark.line + 1, col = ev.start_mark.column + 1;
        if (type == YAML_STREAM_END_EVENT) {
            yaml_event_delete(&ev);
            break;
        }
        if (type == YAML_DOCUMENT_START_EVENT && ++documents > 1) {
            yaml_event_delete(&ev);
            st = perr(&c, line, col, "a recipe is one YAML document; a second one starts here");
            break;
        }
        if (type == YAML_SCALAR_EVENT || type == YAML_SEQUENCE_START_EVENT || type == YAML_MAPPING_START_EVENT ||
            type == YAML_ALIAS_EVENT) {
            if ((st = parse_node(&c, &ev, 0, root))) break;
            continue;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&c.parser);
    for (size_t i = 0; i < c.n_anchors; i++) free(c.anchors[i].name);
    free(c.anchors);
    if (st) {
        node_free(*root);
        *root = NULL;
    }
    return st;
}

static tm_rorigin *add_origin(tm_rdoc *doc, const char *label, int is_override, const char *base_dir) {
    tm_rorigin **o = realloc(doc->origins, (doc->n_origins + 1) * sizeof *o);
    if (!o) return NULL;
    doc->origins = o;
    tm_rorigin *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->label = dup_s(label);
    r->base_dir = dup_s(base_dir);
    r->is_override = is_override;
    if (!r->label || !r->base_dir) {
        free(r->label);
        free(r->base_dir);
        free(r);
        return NULL;
    }
    o[doc->n_origins++] = r;
    return r;
}

static tm_status read_file(const char *path, char **out, size_t *len, tm_error *err) {
    return tm_fs_read_file(path, TM_RECIPE_MAX_BYTES, "the recipe", out, len, err);
}

tm_status tm_rdoc_parse(tm_rdoc *doc, const char *recipe, int is_path, tm_error *err) {
    memset(doc, 0, sizeof *doc);
    if (!recipe) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "recipe is NULL");
    char *dir = NULL;
    if (is_path) {
        const char *slash = strrchr(recipe, '/');
        dir = slash ? dup_n(recipe, (size_t)(slash - recipe) + 1) : dup_s("");
    } else {
        dir = dup_s("");
    }
    tm_rorigin *o = dir ? add_origin(doc, is_path ? recipe : "<recipe>", 0, dir) : NULL;
    free(dir);
    if (!o) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    char *text = NULL;
    size_t len = 0;
    tm_status st = TM_OK;
    if (is_path) st = read_file(recipe, &text, &len, err);
    if (!st) st = parse_text(doc, o, is_path ? text : recipe, is_path ? len : strlen(recipe), &doc->root, err);
    free(text);
    if (st) return st;
    if (!doc->root) return tm_error_set(err, TM_ERROR_FORMAT, "%s: the recipe is empty", o->label);
    if (doc->root->kind != TM_RNODE_MAP)
        return tm_error_set(err, TM_ERROR_FORMAT, "%s:%zu:%zu: a recipe is a mapping (name: value lines), not %s",
                            o->label, doc->root->line, doc->root->column,
                            doc->root->kind == TM_RNODE_SEQ ? "a list" : "a single value");
    return TM_OK;
}

void tm_rdoc_free(tm_rdoc *doc) {
    if (!doc) return;
    node_free(doc->root);
    for (size_t i = 0; i < doc->n_origins; i++) {
        free(doc->origins[i]->label);
        free(doc->origins[i]->base_dir);
        free(doc->origins[i]);
    }
    free(doc->origins);
    memset(doc, 0, sizeof *doc);
}

/* ---- overrides -------------------------------------------------------------------------------- */

static int is_index(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9') return 0;
    return 1;
}

static int is_null_scalar(const tm_rnode *n) {
    return n->kind == TM_RNODE_SCALAR && n->plain &&
           (!*n->text || !strcmp(n->text, "~") || !strcmp(n->text, "null") || !strcmp(n->text, "Null") ||
            !strcmp(n->text, "NULL"));
}

static tm_rnode *scalar_node(tm_rdoc *doc, const tm_rorigin *o, const char *text, int plain) {
    tm_rnode *n = node_new(doc, TM_RNODE_SCALAR, o, 0, 0);
    if (!n) return NULL;
    n->plain = plain;
    n->style = plain ? YAML_PLAIN_SCALAR_STYLE : YAML_ANY_SCALAR_STYLE;
    if (!(n->text = dup_s(text))) {
        node_free(n);
        return NULL;
    }
    return n;
}

/* Replaces child i of parent (freeing the old one). */
static void replace_child(tm_rnode *parent, size_t i, tm_rnode *value) {
    node_free(parent->items[i]);
    parent->items[i] = value;
}

tm_status tm_rdoc_override(tm_rdoc *doc, const char *override, tm_error *err) {
    if (!override) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "override is NULL");
    char label[600];
    snprintf(label, sizeof label, "%s: override '%s'", doc->origins[0]->label, override);
    tm_rorigin *o = add_origin(doc, label, 1, "");
    if (!o) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");

    const char *s = override;
    int delete = 0;
    if (*s == '~') {
        delete = 1;
        s++;
    } else {
        while (*s == '+') s++;
    }
    const char *eq = strchr(s, '=');
    if (!delete && !eq)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: expected KEY=VALUE", o->label);
    size_t key_len = eq ? (size_t)(eq - s) : strlen(s);
    char *path = dup_n(s, key_len);
    if (!path) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");

    /* Split the key at dots. */
    char *segs[64];
    size_t n_segs = 0;
    tm_status st = TM_OK;
    for (char *p = path, *next; p; p = next) {
        next = strchr(p, '.');
        if (next) *next++ = '\0';
        if (!*p) {
            st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: empty name in the key '%.*s'", o->label,
                              (int)key_len, s);
            break;
        }
        if (n_segs == 64) {
            st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: the key is nested too deeply", o->label);
            break;
        }
        segs[n_segs++] = p;
    }
    if (st) {
        free(path);
        return st;
    }

    tm_rnode *root = doc->root;
    size_t first = 0;
    /* A FusionBench method config is the `method` group itself: method.X means its top-level X. */
    if (!tm_rnode_get(root, "method") && tm_rnode_get(root, "name") && strcmp(segs[0], "method") == 0) {
        if (n_segs == 1) segs[0] = "name";
        else first = 1;
    }

    tm_rnode *value = NULL;
    if (!delete) {
        const char *v = eq + 1;
        st = parse_text(doc, o, v, strlen(v), &value, err);
        if (!st && !value && !(value = scalar_node(doc, o, "", 1))) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        if (st) {
            free(path);
            return st;
        }
    }

    tm_rnode *cur = root;
    for (size_t i = first; i < n_segs && !st; i++) {
        const char *seg = segs[i];
        int last = i + 1 == n_segs;
        if (cur->kind == TM_RNODE_SEQ) {
            if (!is_index(seg)) {
                st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: '%s' is a list: expected an index, got '%s'",
                                  o->label, i ? segs[i - 1] : "the recipe", seg);
                break;
            }
            errno = 0;
            unsigned long long idx = strtoull(seg, NULL, 10);
            if (errno || idx > cur->n || (idx == cur->n && (delete || !last))) {
                st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                  "%s: index %s is out of range ('%s' has %zu item%s)", o->label, seg,
                                  i ? segs[i - 1] : "the recipe", cur->n, cur->n == 1 ? "" : "s");
                break;
            }
            if (last) {
                if (delete) {
                    node_free(cur->items[idx]);
                    memmove(cur->items + idx, cur->items + idx + 1, (cur->n - idx - 1) * sizeof *cur->items);
                    cur->n--;
                } else if (idx == cur->n) {
                    if (node_push(cur, NULL, value)) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
                    else value = NULL;
                } else {
                    replace_child(cur, idx, value);
                    value = NULL;
                }
                break;
            }
            cur = cur->items[idx];
        } else if (cur->kind == TM_RNODE_MAP) {
            ptrdiff_t at = map_find(cur, seg);
            if (last) {
                if (delete) {
                    if (at < 0) {
                        st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: there is no '%.*s' to delete", o->label,
                                          (int)key_len, s);
                        break;
                    }
                    node_free(cur->items[at]);
                    node_free(cur->keys[at]);
                    memmove(cur->items + at, cur->items + at + 1, (cur->n - (size_t)at - 1) * sizeof *cur->items);
                    memmove(cur->keys + at, cur->keys + at + 1, (cur->n - (size_t)at - 1) * sizeof *cur->keys);
                    cur->n--;
                } else if (at >= 0) {
                    replace_child(cur, (size_t)at, value);
                    value = NULL;
                } else {
                    tm_rnode *k = scalar_node(doc, o, seg, 1);
                    if (!k || node_push(cur, k, value)) {
                        node_free(k);
                        st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
                    } else {
                        value = NULL;
                    }
                }
                break;
            }
            if (at < 0) {
                if (delete) {
                    st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: there is no '%.*s' to delete", o->label,
                                      (int)key_len, s);
                    break;
                }
                tm_rnode *k = scalar_node(doc, o, seg, 1), *m = node_new(doc, TM_RNODE_MAP, o, 0, 0);
                if (!k || !m || node_push(cur, k, m)) {
                    node_free(k);
                    node_free(m);
                    st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
                    break;
                }
                cur = m;
                continue;
            }
            tm_rnode *child = cur->items[at];
            if (child->kind == TM_RNODE_SCALAR) {
                if (is_null_scalar(child)) {
                    /* "method:" with nothing after it: becomes the mapping being written into */
                    tm_rnode *m = node_new(doc, TM_RNODE_MAP, o, child->line, child->column);
                    if (!m) {
                        st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
                        break;
                    }
                    replace_child(cur, (size_t)at, m);
                    child = m;
                } else if (cur == root && strcmp(seg, "method") == 0) {
                    /* method: weighted_average, then method.weights=[...]: method is {name: ...} */
                    tm_rnode *m = node_new(doc, TM_RNODE_MAP, child->origin, child->line, child->column);
                    tm_rnode *k = m ? scalar_node(doc, child->origin, "name", 1) : NULL;
                    if (!m || !k || node_push(m, k, child)) {
                        node_free(m);
                        node_free(k);
                        st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
                        break;
                    }
                    k->line = child->line;
                    k->column = child->column;
                    cur->items[at] = m;
                    child = m;
                } else {
                    st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: '%s' is a single value, not a mapping or a list",
                                      o->label, seg);
                    break;
                }
            }
            cur = child;
        } else {
            st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: '%s' is a single value, not a mapping or a list",
                              o->label, i ? segs[i - 1] : "the recipe");
        }
    }
    node_free(value);
    free(path);
    return st;
}

/* ---- emitting --------------------------------------------------------------------------------- */

typedef struct out_buf {
    char *data;
    size_t len, cap;
    int failed;
} out_buf;

static int out_write(void *user, unsigned char *bytes, size_t size) {
    out_buf *b = user;
    if (b->len + size + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + size + 1) cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) {
            b->failed = 1;
            return 0;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, bytes, size);
    b->len += size;
    b->data[b->len] = '\0';
    return 1;
}

static int emit_node(yaml_emitter_t *e, const tm_rnode *n) {
    yaml_event_t ev;
    switch (n->kind) {
    case TM_RNODE_SCALAR: {
        yaml_scalar_style_t style = n->plain ? YAML_ANY_SCALAR_STYLE : (yaml_scalar_style_t)n->style;
        if (!n->plain && style == YAML_PLAIN_SCALAR_STYLE) style = YAML_ANY_SCALAR_STYLE;
        if (!yaml_scalar_event_initialize(&ev, NULL, NULL, (yaml_char_t *)n->text, (int)strlen(n->text), n->plain, 1,
                                          style))
            return 0;
        return yaml_emitter_emit(e, &ev);
    }
    case TM_RNODE_SEQ:
        if (!yaml_sequence_start_event_initialize(&ev, NULL, NULL, 1,
                                                  n->flow ? YAML_FLOW_SEQUENCE_STYLE : YAML_BLOCK_SEQUENCE_STYLE) ||
            !yaml_emitter_emit(e, &ev))
            return 0;
        for (size_t i = 0; i < n->n; i++)
            if (!emit_node(e, n->items[i])) return 0;
        return yaml_sequence_end_event_initialize(&ev) && yaml_emitter_emit(e, &ev);
    case TM_RNODE_MAP:
        if (!yaml_mapping_start_event_initialize(&ev, NULL, NULL, 1,
                                                 n->flow ? YAML_FLOW_MAPPING_STYLE : YAML_BLOCK_MAPPING_STYLE) ||
            !yaml_emitter_emit(e, &ev))
            return 0;
        for (size_t i = 0; i < n->n; i++)
            if (!emit_node(e, n->keys[i]) || !emit_node(e, n->items[i])) return 0;
        return yaml_mapping_end_event_initialize(&ev) && yaml_emitter_emit(e, &ev);
    }
    return 0;
}

tm_status tm_rdoc_emit(const tm_rdoc *doc, const char *header, char **out, tm_error *err) {
    *out = NULL;
    out_buf b = {0};
    if (header && !out_write(&b, (unsigned char *)header, strlen(header)))
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    yaml_emitter_t e;
    if (!yaml_emitter_initialize(&e)) {
        free(b.data);
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    yaml_emitter_set_output(&e, out_write, &b);
    yaml_emitter_set_unicode(&e, 1);
    yaml_emitter_set_width(&e, -1);
    yaml_emitter_set_indent(&e, 2);
    yaml_event_t ev;
    int ok = yaml_stream_start_event_initialize(&ev, YAML_UTF8_ENCODING) && yaml_emitter_emit(&e, &ev) &&
             yaml_document_start_event_initialize(&ev, NULL, NULL, NULL, 1) && yaml_emitter_emit(&e, &ev) &&
             emit_node(&e, doc->root) && yaml_document_end_event_initialize(&ev, 1) && yaml_emitter_emit(&e, &ev) &&
             yaml_stream_end_event_initialize(&ev) && yaml_emitter_emit(&e, &ev) && yaml_emitter_flush(&e);
    const char *problem = e.problem;
    yaml_emitter_delete(&e);
    if (!ok || b.failed) {
        free(b.data);
        if (b.failed) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        return tm_error_set(err, TM_ERROR_INTERNAL, "cannot write the recipe as YAML: %s",
                            problem ? problem : "emitter error");
    }
    *out = b.data;
    return TM_OK;
}
