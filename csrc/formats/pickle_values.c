/* Safe unpickler, the inert value tree: the arena every value of one pickle lives in, the
 * constructors the opcodes and calls use, insertion-ordered dicts that deduplicate keys like
 * Python, and what APPEND/SETITEMS/BUILD do to a container or placeholder object.
 *
 * Every value created and every container slot filled counts toward max_items here, in one
 * place, so memory stays proportional to the limit whichever opcode or call made the value. */
#define _POSIX_C_SOURCE 200809L

#include "formats/pickle_internal.h"

#include <stdlib.h>
#include <string.h>

/* ---- Arena -------------------------------------------------------------------------------- */

struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    max_align_t data[];
};

#define ARENA_CHUNK_BYTES ((size_t)64 * 1024)
#define ARENA_ALIGN ((size_t)16)

static void *arena_alloc(arena *a, size_t size) {
    if (size == 0) size = 1;
    if (size > SIZE_MAX - ARENA_ALIGN) return NULL;
    size = (size + ARENA_ALIGN - 1) & ~(ARENA_ALIGN - 1);
    arena_chunk *c = a->head;
    if (c && c->cap - c->used >= size) {
        void *p = (char *)c->data + c->used;
        c->used += size;
        return p;
    }
    /* Big blocks get their own chunk so they do not waste the tail of the bump chunk. */
    int dedicated = size > ARENA_CHUNK_BYTES / 4;
    size_t cap = dedicated ? size : ARENA_CHUNK_BYTES;
    if (cap > SIZE_MAX - sizeof(arena_chunk)) return NULL;
    arena_chunk *n = malloc(sizeof(arena_chunk) + cap);
    if (!n) return NULL;
    n->cap = cap;
    n->used = size;
    if (dedicated && c) {
        n->next = c->next;
        c->next = n;
    } else {
        n->next = c;
        a->head = n;
    }
    return n->data;
}

void pk_arena_free(arena *a) {
    arena_chunk *c = a->head;
    while (c) {
        arena_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->head = NULL;
}

/* ---- Values -------------------------------------------------------------------------------- */

const char *tm_pk_kind_name(tm_pk_kind k) {
    switch (k) {
    case TM_PK_NONE: return "None";
    case TM_PK_BOOL: return "bool";
    case TM_PK_INT: return "int";
    case TM_PK_BIGINT: return "int";
    case TM_PK_FLOAT: return "float";
    case TM_PK_STRING: return "str";
    case TM_PK_BYTES: return "bytes";
    case TM_PK_TUPLE: return "tuple";
    case TM_PK_LIST: return "list";
    case TM_PK_DICT: return "dict";
    case TM_PK_SET: return "set";
    case TM_PK_GLOBAL: return "global";
    case TM_PK_OBJECT: return "object";
    case TM_PK_STORAGE: return "storage";
    case TM_PK_TENSOR: return "tensor";
    }
    return "?";
}

/* Counts toward max_items: both new values and container slots, so memory stays proportional
 * to the limit whatever mix of opcodes the input uses. */
tm_status pk_count_items(parser *p, size_t n) {
    if (n > p->lim.max_items || p->nitems > p->lim.max_items - n)
        return pk_err(p, TM_ERROR_LIMIT, "more than %zu values (limit)", p->lim.max_items);
    p->nitems += n;
    return TM_OK;
}

void *pk_alloc(parser *p, size_t size) { return arena_alloc(&p->pk->arena, size); }

tm_status pk_new_value(parser *p, tm_pk_kind kind, tm_pk_value **out) {
    TRY(pk_count_items(p, 1));
    node *n = pk_alloc(p, sizeof(node));
    if (!n) return pk_nomem(p);
    memset(n, 0, sizeof *n);
    n->dtype = -1;
    n->v.kind = kind;
    *out = &n->v;
    return TM_OK;
}

/* Copies len bytes into the arena with a terminating NUL. */
tm_status pk_strdup(parser *p, const void *s, size_t len, char **out) {
    if (len == SIZE_MAX) return pk_nomem(p);
    char *d = pk_alloc(p, len + 1);
    if (!d) return pk_nomem(p);
    if (len) memcpy(d, s, len);
    d[len] = 0;
    *out = d;
    return TM_OK;
}

tm_status pk_new_str(parser *p, tm_pk_kind kind, const void *s, size_t len,
                     tm_pk_value **out) {
    tm_pk_value *v = NULL;
    char *d = NULL;
    TRY(pk_new_value(p, kind, &v));
    TRY(pk_strdup(p, s, len, &d));
    v->u.str.data = d;
    v->u.str.len = len;
    *out = v;
    return TM_OK;
}

tm_status pk_new_int(parser *p, int64_t x, tm_pk_value **out) {
    if (x >= 0 && x < 256) {
        if (!p->small_int[x]) {
            TRY(pk_new_value(p, TM_PK_INT, &p->small_int[x]));
            p->small_int[x]->u.integer = x;
        }
        *out = p->small_int[x];
        return TM_OK;
    }
    TRY(pk_new_value(p, TM_PK_INT, out));
    (*out)->u.integer = x;
    return TM_OK;
}

tm_status pk_new_seq(parser *p, tm_pk_kind kind, tm_pk_value *const *items, size_t n,
                     tm_pk_value **out) {
    if (kind == TM_PK_TUPLE && n == 0 && p->empty_tuple_v) {
        *out = p->empty_tuple_v;
        return TM_OK;
    }
    tm_pk_value *v = NULL;
    TRY(pk_new_value(p, kind, &v));
    if (n) {
        TRY(pk_count_items(p, n));
        if (n > SIZE_MAX / sizeof(tm_pk_value *)) return pk_nomem(p);
        v->u.seq.items = pk_alloc(p, n * sizeof(tm_pk_value *));
        if (!v->u.seq.items) return pk_nomem(p);
        memcpy(v->u.seq.items, items, n * sizeof(tm_pk_value *));
        v->u.seq.n = v->u.seq.cap = n;
    }
    *out = v;
    return TM_OK;
}

static tm_status seq_reserve(parser *p, tm_pk_value *s, size_t extra) {
    if (extra > SIZE_MAX - s->u.seq.n) return pk_nomem(p);
    size_t want = s->u.seq.n + extra;
    if (want <= s->u.seq.cap) return TM_OK;
    size_t cap = s->u.seq.cap ? s->u.seq.cap : 4;
    while (cap < want) {
        if (cap > SIZE_MAX / 2) { cap = want; break; }
        cap *= 2;
    }
    if (cap > SIZE_MAX / sizeof(tm_pk_value *)) return pk_nomem(p);
    /* The old array is left in the arena: geometric growth bounds the waste to 2x. */
    tm_pk_value **items = pk_alloc(p, cap * sizeof(tm_pk_value *));
    if (!items) return pk_nomem(p);
    if (s->u.seq.n) memcpy(items, s->u.seq.items, s->u.seq.n * sizeof(tm_pk_value *));
    s->u.seq.items = items;
    s->u.seq.cap = cap;
    return TM_OK;
}

tm_status pk_seq_extend(parser *p, tm_pk_value *s, tm_pk_value *const *items, size_t n) {
    if (!n) return TM_OK;
    TRY(pk_count_items(p, n));
    TRY(seq_reserve(p, s, n));
    memcpy(s->u.seq.items + s->u.seq.n, items, n * sizeof(tm_pk_value *));
    s->u.seq.n += n;
    return TM_OK;
}

/* ---- Dicts: insertion-ordered, keys deduplicated like Python for the key types that matter -- */

/* Keys of other kinds (tuples, floats, objects) are not deduplicated: a real pickle never
 * repeats a key, and comparing them structurally would cost more than it is worth. */
static int key_hash(const tm_pk_value *k, uint64_t *h) {
    switch (k->kind) {
    case TM_PK_STRING: *h = tm_hash_bytes(k->u.str.data, k->u.str.len, 1); return 1;
    case TM_PK_BYTES: *h = tm_hash_bytes(k->u.str.data, k->u.str.len, 2); return 1;
    case TM_PK_INT: *h = tm_hash_mix64((uint64_t)k->u.integer); return 1;
    case TM_PK_BOOL: *h = tm_hash_mix64((uint64_t)(k->u.boolean != 0)); return 1; /* True == 1 */
    case TM_PK_NONE: *h = 0x9e3779b97f4a7c15ULL; return 1;
    default: return 0;
    }
}

static int key_eq(const tm_pk_value *a, const tm_pk_value *b) {
    if (a == b) return 1;
    int ai = a->kind == TM_PK_INT || a->kind == TM_PK_BOOL;
    int bi = b->kind == TM_PK_INT || b->kind == TM_PK_BOOL;
    if (ai && bi) {
        int64_t x = a->kind == TM_PK_INT ? a->u.integer : (a->u.boolean != 0);
        int64_t y = b->kind == TM_PK_INT ? b->u.integer : (b->u.boolean != 0);
        return x == y;
    }
    if (a->kind != b->kind) return 0;
    switch (a->kind) {
    case TM_PK_STRING:
    case TM_PK_BYTES:
        return a->u.str.len == b->u.str.len &&
               (a->u.str.len == 0 || memcmp(a->u.str.data, b->u.str.data, a->u.str.len) == 0);
    case TM_PK_NONE: return 1;
    default: return 0;
    }
}

#define DICT_INDEX_MIN 8

static tm_status dict_build_index(parser *p, tm_pk_value *d, size_t need) {
    node *nd = NODE(d);
    size_t cap = 16;
    while (cap < need * 2) {
        if (cap > (size_t)UINT32_MAX / 2) return pk_err(p, TM_ERROR_LIMIT, "dict too large");
        cap *= 2;
    }
    uint32_t *tab = pk_alloc(p, cap * sizeof(uint32_t));
    if (!tab) return pk_nomem(p);
    memset(tab, 0, cap * sizeof(uint32_t));
    for (size_t i = 0; i < d->u.dict.n; i++) {
        uint64_t h;
        if (!key_hash(d->u.dict.keys[i], &h)) continue;
        size_t j = (size_t)h & (cap - 1);
        while (tab[j]) j = (j + 1) & (cap - 1);
        tab[j] = (uint32_t)(i + 1);
    }
    nd->index = tab;
    nd->index_cap = (uint32_t)cap;
    return TM_OK;
}

tm_status pk_dict_set(parser *p, tm_pk_value *d, tm_pk_value *k, tm_pk_value *v) {
    node *nd = NODE(d);
    uint64_t h = 0;
    int hashable = key_hash(k, &h);
    if (hashable) {
        if (nd->index) {
            size_t mask = (size_t)nd->index_cap - 1;
            for (size_t j = (size_t)h & mask; nd->index[j]; j = (j + 1) & mask) {
                size_t e = nd->index[j] - 1;
                if (key_eq(d->u.dict.keys[e], k)) {
                    d->u.dict.values[e] = v; /* Python keeps the first position, last value */
                    return TM_OK;
                }
            }
        } else {
            for (size_t e = 0; e < d->u.dict.n; e++)
                if (key_eq(d->u.dict.keys[e], k)) {
                    d->u.dict.values[e] = v;
                    return TM_OK;
                }
        }
    }
    TRY(pk_count_items(p, 1));
    if (d->u.dict.n == d->u.dict.cap) {
        size_t cap = d->u.dict.cap ? d->u.dict.cap * 2 : 4;
        if (cap > SIZE_MAX / sizeof(tm_pk_value *) || cap > UINT32_MAX - 1) return pk_nomem(p);
        tm_pk_value **keys = pk_alloc(p, cap * sizeof(tm_pk_value *));
        tm_pk_value **vals = pk_alloc(p, cap * sizeof(tm_pk_value *));
        if (!keys || !vals) return pk_nomem(p);
        if (d->u.dict.n) {
            memcpy(keys, d->u.dict.keys, d->u.dict.n * sizeof(tm_pk_value *));
            memcpy(vals, d->u.dict.values, d->u.dict.n * sizeof(tm_pk_value *));
        }
        d->u.dict.keys = keys;
        d->u.dict.values = vals;
        d->u.dict.cap = cap;
    }
    size_t e = d->u.dict.n++;
    d->u.dict.keys[e] = k;
    d->u.dict.values[e] = v;
    if (nd->index && (size_t)nd->index_cap >= 2 * d->u.dict.n) {
        if (hashable) {
            size_t mask = (size_t)nd->index_cap - 1;
            size_t j = (size_t)h & mask;
            while (nd->index[j]) j = (j + 1) & mask;
            nd->index[j] = (uint32_t)(e + 1);
        }
    } else if (d->u.dict.n >= DICT_INDEX_MIN) {
        TRY(dict_build_index(p, d, d->u.dict.n * 2));
    }
    return TM_OK;
}

const tm_pk_value *tm_pk_dict_get(const tm_pk_value *d, const char *key) {
    if (!d || !key || d->kind != TM_PK_DICT) return NULL;
    size_t len = strlen(key);
    for (size_t i = 0; i < d->u.dict.n; i++) {
        const tm_pk_value *k = d->u.dict.keys[i];
        if (k->kind == TM_PK_STRING && k->u.str.len == len && memcmp(k->u.str.data, key, len) == 0)
            return d->u.dict.values[i];
    }
    return NULL;
}

/* ---- Container mutation opcodes -------------------------------------------------------- */

tm_status pk_append_items(parser *p, tm_pk_value *target, tm_pk_value *const *items,
                          size_t n) {
    if (target->kind == TM_PK_LIST) return pk_seq_extend(p, target, items, n);
    if (target->kind == TM_PK_OBJECT) {
        /* list subclasses: items collected beside the object */
        if (!target->u.object.items)
            TRY(pk_new_seq(p, TM_PK_LIST, NULL, 0, &target->u.object.items));
        if (target->u.object.items->kind != TM_PK_LIST)
            return pk_err(p, TM_ERROR_FORMAT, "appending to an object that has dict items");
        return pk_seq_extend(p, target->u.object.items, items, n);
    }
    return pk_err(p, TM_ERROR_FORMAT, "appending to a %s", tm_pk_kind_name(target->kind));
}

tm_status pk_set_items(parser *p, tm_pk_value *target, tm_pk_value *const *items, size_t n) {
    if (n % 2) return pk_err(p, TM_ERROR_FORMAT, "odd number of items (%zu) for a dict", n);
    tm_pk_value *d = target;
    if (target->kind == TM_PK_OBJECT) {
        /* dict subclasses (e.g. Lightning's AttributeDict) */
        if (!target->u.object.items) TRY(pk_new_value(p, TM_PK_DICT, &target->u.object.items));
        d = target->u.object.items;
        if (d->kind != TM_PK_DICT)
            return pk_err(p, TM_ERROR_FORMAT, "setting items of an object that has list items");
    } else if (target->kind != TM_PK_DICT) {
        return pk_err(p, TM_ERROR_FORMAT, "setting items of a %s", tm_pk_kind_name(target->kind));
    }
    for (size_t i = 0; i < n; i += 2) TRY(pk_dict_set(p, d, items[i], items[i + 1]));
    return TM_OK;
}

tm_status pk_build(parser *p, tm_pk_value *inst, tm_pk_value *state) {
    switch (inst->kind) {
    case TM_PK_OBJECT:
        inst->u.object.state = state;
        return TM_OK;
    /* OrderedDict's _metadata, tensor/parameter __dict__, attributes of container subclasses:
     * nothing a checkpoint reader needs. */
    case TM_PK_DICT:
    case TM_PK_TENSOR:
    case TM_PK_STORAGE:
    case TM_PK_LIST:
    case TM_PK_SET:
    case TM_PK_BYTES:
        return TM_OK;
    default:
        return pk_err(p, TM_ERROR_FORMAT, "BUILD on a %s", tm_pk_kind_name(inst->kind));
    }
}
