/* Safe unpickler: an iterative pickle stack machine that builds an inert value tree.
 *
 * Nothing here imports or calls anything. Globals are either recognised (the handful torch
 * checkpoints need), refused (anything that could run code in a real unpickler, so a hostile
 * file is reported as such instead of being read half-way), or kept as inert placeholders.
 * Every value lives in one arena owned by tm_pickle, so freeing never walks the tree, and no
 * code path recurses on the structure of the input. */
#define _POSIX_C_SOURCE 200809L

#include "formats/pickle.h"

#include <limits.h>
#include <locale.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- Arena -------------------------------------------------------------------------------- */

typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    max_align_t data[];
} arena_chunk;

#define ARENA_CHUNK_BYTES ((size_t)64 * 1024)
#define ARENA_ALIGN ((size_t)16)

typedef struct arena {
    arena_chunk *head; /* bump-allocated chunk; dedicated big chunks are linked behind it */
} arena;

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

static void arena_free(arena *a) {
    arena_chunk *c = a->head;
    while (c) {
        arena_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->head = NULL;
}

/* ---- Values -------------------------------------------------------------------------------- */

/* What a recognised global means when it is called or used as an argument. */
typedef enum special {
    SP_NONE = 0,       /* inert placeholder */
    SP_ODICT,          /* collections.OrderedDict */
    SP_DICT,           /* builtins.dict */
    SP_LIST,           /* builtins.list */
    SP_TUPLE,          /* builtins.tuple */
    SP_SET,            /* builtins.set */
    SP_FROZENSET,      /* builtins.frozenset */
    SP_BYTES,          /* builtins.bytes */
    SP_BYTEARRAY,      /* builtins.bytearray */
    SP_ENCODE,         /* _codecs.encode: how protocol <3 stores bytes */
    SP_RECONSTRUCTOR,  /* copyreg._reconstructor: protocol 0/1 object creation */
    SP_NEWOBJ_FN,      /* copyreg.__newobj__ */
    SP_NEWOBJ_EX_FN,   /* copyreg.__newobj_ex__ */
    SP_FIRST_ARG,      /* torch.jit._pickle.build_*list / restore_type_tag: identity on arg 0 */
    SP_TORCH_SIZE,     /* torch.Size(tuple) */
    SP_REBUILD_V1,     /* torch._utils._rebuild_tensor */
    SP_REBUILD_V2,     /* torch._utils._rebuild_tensor_v2 */
    SP_REBUILD_V3,     /* torch._utils._rebuild_tensor_v3 */
    SP_REBUILD_PARAM,  /* torch._utils._rebuild_parameter */
    SP_REBUILD_PARAM_STATE, /* torch._utils._rebuild_parameter_with_state */
    SP_FROM_TYPE_V2,   /* torch._tensor._rebuild_from_type_v2 */
    SP_STORAGE_TYPE,   /* torch.FloatStorage etc.; node dtype says which */
    SP_UNTYPED_STORAGE,/* torch.storage.UntypedStorage */
    SP_DTYPE,          /* torch.float32 etc.; node dtype is -1 for dtypes we cannot hold */
    SP_PARAMETER_CLASS /* torch.nn.parameter.Parameter (as _rebuild_from_type_v2's new_type) */
} special;

/* Every value is allocated inside a node: the extra header carries what the public struct has
 * no room for (dict hash index, traversal state, meaning of a global). */
typedef struct node {
    uint32_t *index;       /* DICT: open-addressing table of entry positions + 1, or NULL */
    uint32_t index_cap;    /* power of two */
    uint32_t height;       /* set by the final depth/cycle check */
    uint8_t color;         /* 0 unvisited, 1 on the DFS path, 2 done */
    uint8_t special;       /* GLOBAL: enum special */
    int8_t dtype;          /* SP_STORAGE_TYPE / SP_DTYPE: tm_dtype, or -1 */
    tm_pk_value v;
} node;

#define NODE(val) ((node *)((char *)(val) - offsetof(node, v)))

struct tm_pickle {
    arena arena;
    tm_pk_value *root;
    node **storages;   /* distinct storages in order of creation (taken from the parser) */
    size_t nstorages;
};

/* ---- Parser state --------------------------------------------------------------------------- */

typedef struct memo_slot {
    uint64_t key;
    tm_pk_value *val; /* NULL: empty slot */
} memo_slot;

typedef struct parser {
    const uint8_t *data;
    size_t size, pos;
    size_t op_pos;
    uint8_t op;
    int in_op;
    const char *label;
    tm_pickle_limits lim;
    tm_error *err;
    tm_pickle *pk;

    tm_pk_value **stack;
    size_t sp, stack_cap;
    size_t *marks;
    size_t nmarks, marks_cap;

    /* Memo: pickles number entries 0, 1, 2, … so small keys live in a dense array whose size
     * is bounded by the entry count (never by a key the input chose); other keys go to an
     * open-addressing hash table. A key is in exactly one of the two. */
    tm_pk_value **memo_dense;
    size_t memo_dense_cap;
    memo_slot *memo;
    size_t memo_hash_n, memo_cap;
    size_t memo_n; /* distinct keys in both */

    node **storages;          /* distinct (key, dtype) storages */
    size_t nstorages, storages_cap;
    uint32_t *storage_index;  /* open addressing over storages, entry + 1 */
    size_t storage_index_cap;

    size_t nitems;            /* values created + container slots filled */

    tm_pk_value *none_v, *true_v, *false_v, *empty_tuple_v;
    tm_pk_value *small_int[256];
} parser;

#define TRY(expr)                                                                              \
    do {                                                                                       \
        tm_status try_st_ = (expr);                                                            \
        if (try_st_ != TM_OK) return try_st_;                                                  \
    } while (0)

static const char *op_name(uint8_t op) {
    switch (op) {
    case '(': return "MARK";
    case '.': return "STOP";
    case '0': return "POP";
    case '1': return "POP_MARK";
    case '2': return "DUP";
    case 'F': return "FLOAT";
    case 'I': return "INT";
    case 'J': return "BININT";
    case 'K': return "BININT1";
    case 'L': return "LONG";
    case 'M': return "BININT2";
    case 'N': return "NONE";
    case 'P': return "PERSID";
    case 'Q': return "BINPERSID";
    case 'R': return "REDUCE";
    case 'S': return "STRING";
    case 'T': return "BINSTRING";
    case 'U': return "SHORT_BINSTRING";
    case 'V': return "UNICODE";
    case 'X': return "BINUNICODE";
    case 'a': return "APPEND";
    case 'b': return "BUILD";
    case 'c': return "GLOBAL";
    case 'd': return "DICT";
    case '}': return "EMPTY_DICT";
    case 'e': return "APPENDS";
    case 'g': return "GET";
    case 'h': return "BINGET";
    case 'i': return "INST";
    case 'j': return "LONG_BINGET";
    case 'l': return "LIST";
    case ']': return "EMPTY_LIST";
    case 'o': return "OBJ";
    case 'p': return "PUT";
    case 'q': return "BINPUT";
    case 'r': return "LONG_BINPUT";
    case 's': return "SETITEM";
    case 't': return "TUPLE";
    case ')': return "EMPTY_TUPLE";
    case 'u': return "SETITEMS";
    case 'G': return "BINFLOAT";
    case 0x80: return "PROTO";
    case 0x81: return "NEWOBJ";
    case 0x82: return "EXT1";
    case 0x83: return "EXT2";
    case 0x84: return "EXT4";
    case 0x85: return "TUPLE1";
    case 0x86: return "TUPLE2";
    case 0x87: return "TUPLE3";
    case 0x88: return "NEWTRUE";
    case 0x89: return "NEWFALSE";
    case 0x8a: return "LONG1";
    case 0x8b: return "LONG4";
    case 'B': return "BINBYTES";
    case 'C': return "SHORT_BINBYTES";
    case 0x8c: return "SHORT_BINUNICODE";
    case 0x8d: return "BINUNICODE8";
    case 0x8e: return "BINBYTES8";
    case 0x8f: return "EMPTY_SET";
    case 0x90: return "ADDITEMS";
    case 0x91: return "FROZENSET";
    case 0x92: return "NEWOBJ_EX";
    case 0x93: return "STACK_GLOBAL";
    case 0x94: return "MEMOIZE";
    case 0x95: return "FRAME";
    case 0x96: return "BYTEARRAY8";
    case 0x97: return "NEXT_BUFFER";
    case 0x98: return "READONLY_BUFFER";
    default: return NULL;
    }
}

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

static tm_status perr(parser *p, tm_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static tm_status perr(parser *p, tm_status st, const char *fmt, ...) {
    char msg[640];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *lbl = (p->label && *p->label) ? p->label : "";
    const char *sep = *lbl ? ": " : "";
    if (p->in_op) {
        const char *name = op_name(p->op);
        if (name)
            return tm_error_set(p->err, st, "%s%spickle: %s at offset %zu: %s", lbl, sep, name,
                                p->op_pos, msg);
        return tm_error_set(p->err, st, "%s%spickle: opcode 0x%02x at offset %zu: %s", lbl, sep,
                            p->op, p->op_pos, msg);
    }
    return tm_error_set(p->err, st, "%s%spickle: %s", lbl, sep, msg);
}

static tm_status nomem(parser *p) { return perr(p, TM_ERROR_NOMEM, "out of memory"); }

/* Counts toward max_items: both new values and container slots, so memory stays proportional
 * to the limit whatever mix of opcodes the input uses. */
static tm_status count_items(parser *p, size_t n) {
    if (n > p->lim.max_items || p->nitems > p->lim.max_items - n)
        return perr(p, TM_ERROR_LIMIT, "more than %zu values (limit)", p->lim.max_items);
    p->nitems += n;
    return TM_OK;
}

static void *palloc(parser *p, size_t size) { return arena_alloc(&p->pk->arena, size); }

static tm_status new_value(parser *p, tm_pk_kind kind, tm_pk_value **out) {
    TRY(count_items(p, 1));
    node *n = palloc(p, sizeof(node));
    if (!n) return nomem(p);
    memset(n, 0, sizeof *n);
    n->dtype = -1;
    n->v.kind = kind;
    *out = &n->v;
    return TM_OK;
}

/* Copies len bytes into the arena with a terminating NUL. */
static tm_status arena_strdup(parser *p, const void *s, size_t len, char **out) {
    if (len == SIZE_MAX) return nomem(p);
    char *d = palloc(p, len + 1);
    if (!d) return nomem(p);
    if (len) memcpy(d, s, len);
    d[len] = 0;
    *out = d;
    return TM_OK;
}

static tm_status new_str(parser *p, tm_pk_kind kind, const void *s, size_t len,
                         tm_pk_value **out) {
    tm_pk_value *v = NULL;
    char *d = NULL;
    TRY(new_value(p, kind, &v));
    TRY(arena_strdup(p, s, len, &d));
    v->u.str.data = d;
    v->u.str.len = len;
    *out = v;
    return TM_OK;
}

static tm_status new_int(parser *p, int64_t x, tm_pk_value **out) {
    if (x >= 0 && x < 256) {
        if (!p->small_int[x]) {
            TRY(new_value(p, TM_PK_INT, &p->small_int[x]));
            p->small_int[x]->u.integer = x;
        }
        *out = p->small_int[x];
        return TM_OK;
    }
    TRY(new_value(p, TM_PK_INT, out));
    (*out)->u.integer = x;
    return TM_OK;
}

static tm_status new_seq(parser *p, tm_pk_kind kind, tm_pk_value *const *items, size_t n,
                         tm_pk_value **out) {
    if (kind == TM_PK_TUPLE && n == 0 && p->empty_tuple_v) {
        *out = p->empty_tuple_v;
        return TM_OK;
    }
    tm_pk_value *v = NULL;
    TRY(new_value(p, kind, &v));
    if (n) {
        TRY(count_items(p, n));
        if (n > SIZE_MAX / sizeof(tm_pk_value *)) return nomem(p);
        v->u.seq.items = palloc(p, n * sizeof(tm_pk_value *));
        if (!v->u.seq.items) return nomem(p);
        memcpy(v->u.seq.items, items, n * sizeof(tm_pk_value *));
        v->u.seq.n = v->u.seq.cap = n;
    }
    *out = v;
    return TM_OK;
}

static tm_status seq_reserve(parser *p, tm_pk_value *s, size_t extra) {
    if (extra > SIZE_MAX - s->u.seq.n) return nomem(p);
    size_t want = s->u.seq.n + extra;
    if (want <= s->u.seq.cap) return TM_OK;
    size_t cap = s->u.seq.cap ? s->u.seq.cap : 4;
    while (cap < want) {
        if (cap > SIZE_MAX / 2) { cap = want; break; }
        cap *= 2;
    }
    if (cap > SIZE_MAX / sizeof(tm_pk_value *)) return nomem(p);
    /* The old array is left in the arena: geometric growth bounds the waste to 2x. */
    tm_pk_value **items = palloc(p, cap * sizeof(tm_pk_value *));
    if (!items) return nomem(p);
    if (s->u.seq.n) memcpy(items, s->u.seq.items, s->u.seq.n * sizeof(tm_pk_value *));
    s->u.seq.items = items;
    s->u.seq.cap = cap;
    return TM_OK;
}

static tm_status seq_extend(parser *p, tm_pk_value *s, tm_pk_value *const *items, size_t n) {
    if (!n) return TM_OK;
    TRY(count_items(p, n));
    TRY(seq_reserve(p, s, n));
    memcpy(s->u.seq.items + s->u.seq.n, items, n * sizeof(tm_pk_value *));
    s->u.seq.n += n;
    return TM_OK;
}

/* ---- Dicts: insertion-ordered, keys deduplicated like Python for the key types that matter -- */

static uint64_t hash_bytes(const void *d, size_t n, uint64_t h) {
    const unsigned char *b = d;
    h ^= 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* Keys of other kinds (tuples, floats, objects) are not deduplicated: a real pickle never
 * repeats a key, and comparing them structurally would cost more than it is worth. */
static int key_hash(const tm_pk_value *k, uint64_t *h) {
    switch (k->kind) {
    case TM_PK_STRING: *h = hash_bytes(k->u.str.data, k->u.str.len, 1); return 1;
    case TM_PK_BYTES: *h = hash_bytes(k->u.str.data, k->u.str.len, 2); return 1;
    case TM_PK_INT: *h = mix64((uint64_t)k->u.integer); return 1;
    case TM_PK_BOOL: *h = mix64((uint64_t)(k->u.boolean != 0)); return 1; /* True == 1 */
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
        if (cap > (size_t)UINT32_MAX / 2) return perr(p, TM_ERROR_LIMIT, "dict too large");
        cap *= 2;
    }
    uint32_t *tab = palloc(p, cap * sizeof(uint32_t));
    if (!tab) return nomem(p);
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

static tm_status dict_set(parser *p, tm_pk_value *d, tm_pk_value *k, tm_pk_value *v) {
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
    TRY(count_items(p, 1));
    if (d->u.dict.n == d->u.dict.cap) {
        size_t cap = d->u.dict.cap ? d->u.dict.cap * 2 : 4;
        if (cap > SIZE_MAX / sizeof(tm_pk_value *) || cap > UINT32_MAX - 1) return nomem(p);
        tm_pk_value **keys = palloc(p, cap * sizeof(tm_pk_value *));
        tm_pk_value **vals = palloc(p, cap * sizeof(tm_pk_value *));
        if (!keys || !vals) return nomem(p);
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

/* ---- Stack, marks, memo ------------------------------------------------------------------- */

static size_t stack_avail(const parser *p) {
    return p->sp - (p->nmarks ? p->marks[p->nmarks - 1] : 0);
}

static tm_status push(parser *p, tm_pk_value *v) {
    if (p->sp >= p->lim.max_stack)
        return perr(p, TM_ERROR_LIMIT, "stack deeper than %zu (limit)", p->lim.max_stack);
    if (p->sp == p->stack_cap) {
        size_t cap = p->stack_cap ? p->stack_cap * 2 : 64;
        if (cap > SIZE_MAX / sizeof(*p->stack)) return nomem(p);
        tm_pk_value **s = realloc(p->stack, cap * sizeof(*p->stack));
        if (!s) return nomem(p);
        p->stack = s;
        p->stack_cap = cap;
    }
    p->stack[p->sp++] = v;
    return TM_OK;
}

static tm_status pop(parser *p, tm_pk_value **out) {
    if (!stack_avail(p)) return perr(p, TM_ERROR_FORMAT, "stack underflow");
    *out = p->stack[--p->sp];
    return TM_OK;
}

static tm_status top(parser *p, tm_pk_value **out) {
    if (!stack_avail(p)) return perr(p, TM_ERROR_FORMAT, "stack underflow");
    *out = p->stack[p->sp - 1];
    return TM_OK;
}

static tm_status push_mark(parser *p) {
    if (p->nmarks >= p->lim.max_depth)
        return perr(p, TM_ERROR_LIMIT, "nesting deeper than %zu (limit)", p->lim.max_depth);
    if (p->nmarks == p->marks_cap) {
        size_t cap = p->marks_cap ? p->marks_cap * 2 : 32;
        if (cap > SIZE_MAX / sizeof(*p->marks)) return nomem(p);
        size_t *m = realloc(p->marks, cap * sizeof(*p->marks));
        if (!m) return nomem(p);
        p->marks = m;
        p->marks_cap = cap;
    }
    p->marks[p->nmarks++] = p->sp;
    return TM_OK;
}

/* The items stay readable in p->stack[*base ..] until the next push. */
static tm_status pop_mark(parser *p, size_t *base, size_t *n) {
    if (!p->nmarks) return perr(p, TM_ERROR_FORMAT, "no MARK");
    *base = p->marks[--p->nmarks];
    *n = p->sp - *base;
    p->sp = *base;
    return TM_OK;
}

static tm_pk_value **memo_hash_find(parser *p, uint64_t key) {
    if (!p->memo_hash_n) return NULL;
    size_t mask = p->memo_cap - 1;
    for (size_t j = (size_t)mix64(key) & mask; p->memo[j].val; j = (j + 1) & mask)
        if (p->memo[j].key == key) return &p->memo[j].val;
    return NULL;
}

static tm_status memo_new_key(parser *p) {
    if (p->memo_n >= p->lim.max_memo)
        return perr(p, TM_ERROR_LIMIT, "more than %zu memo entries (limit)", p->lim.max_memo);
    p->memo_n++;
    return TM_OK;
}

static tm_status memo_put(parser *p, uint64_t key, tm_pk_value *v) {
    tm_pk_value **slot = memo_hash_find(p, key);
    if (slot) {
        *slot = v;
        return TM_OK;
    }
    if (key < p->memo_dense_cap) {
        if (!p->memo_dense[key]) TRY(memo_new_key(p));
        p->memo_dense[key] = v;
        return TM_OK;
    }
    if (key < (uint64_t)2 * p->memo_n + 1024) {
        size_t cap = p->memo_dense_cap ? p->memo_dense_cap : 1024;
        while (cap <= key) cap *= 2;
        if (cap > SIZE_MAX / sizeof(tm_pk_value *)) return nomem(p);
        tm_pk_value **d = realloc(p->memo_dense, cap * sizeof(tm_pk_value *));
        if (!d) return nomem(p);
        memset(d + p->memo_dense_cap, 0, (cap - p->memo_dense_cap) * sizeof(tm_pk_value *));
        p->memo_dense = d;
        p->memo_dense_cap = cap;
        TRY(memo_new_key(p));
        p->memo_dense[key] = v;
        return TM_OK;
    }
    TRY(memo_new_key(p));
    if ((p->memo_hash_n + 1) * 2 > p->memo_cap) {
        size_t cap = p->memo_cap ? p->memo_cap * 2 : 64;
        if (cap > SIZE_MAX / sizeof(memo_slot)) return nomem(p);
        memo_slot *m = calloc(cap, sizeof(memo_slot));
        if (!m) return nomem(p);
        for (size_t i = 0; i < p->memo_cap; i++) {
            if (!p->memo[i].val) continue;
            size_t j = (size_t)mix64(p->memo[i].key) & (cap - 1);
            while (m[j].val) j = (j + 1) & (cap - 1);
            m[j] = p->memo[i];
        }
        free(p->memo);
        p->memo = m;
        p->memo_cap = cap;
    }
    size_t mask = p->memo_cap - 1;
    size_t j = (size_t)mix64(key) & mask;
    while (p->memo[j].val) j = (j + 1) & mask;
    p->memo[j].key = key;
    p->memo[j].val = v;
    p->memo_hash_n++;
    return TM_OK;
}

static tm_status memo_get(parser *p, uint64_t key, tm_pk_value **out) {
    if (key < p->memo_dense_cap && p->memo_dense[key]) {
        *out = p->memo_dense[key];
        return TM_OK;
    }
    tm_pk_value **slot = memo_hash_find(p, key);
    if (slot) {
        *out = *slot;
        return TM_OK;
    }
    return perr(p, TM_ERROR_FORMAT, "memo index %llu not defined", (unsigned long long)key);
}

/* ---- Reading the input ----------------------------------------------------------------------- */

static size_t left(const parser *p) { return p->size - p->pos; }

static tm_status need(parser *p, size_t n) {
    if (left(p) < n)
        return perr(p, TM_ERROR_FORMAT, "truncated pickle (needs %zu bytes, %zu left)", n,
                    left(p));
    return TM_OK;
}

/* A declared length: checked against the input before the string limit, so a lying length is
 * reported as truncation. */
static tm_status need_len(parser *p, uint64_t n) {
    if (n > (uint64_t)left(p))
        return perr(p, TM_ERROR_FORMAT, "truncated pickle (length %llu but %zu bytes left)",
                    (unsigned long long)n, left(p));
    if (n > (uint64_t)p->lim.max_string)
        return perr(p, TM_ERROR_LIMIT, "length %llu exceeds the %zu-byte string limit",
                    (unsigned long long)n, p->lim.max_string);
    return TM_OK;
}

static uint8_t rd_u8(parser *p) { return p->data[p->pos++]; }

static uint64_t rd_le(parser *p, int n) {
    uint64_t x = 0;
    for (int i = 0; i < n; i++) x |= (uint64_t)p->data[p->pos + (size_t)i] << (8 * i);
    p->pos += (size_t)n;
    return x;
}

/* A text argument up to '\n' (not included). */
static tm_status read_line(parser *p, const char **s, size_t *len) {
    size_t avail = left(p);
    size_t scan = avail;
    if (p->lim.max_string < SIZE_MAX && scan > p->lim.max_string + 1) scan = p->lim.max_string + 1;
    const uint8_t *start = p->data + p->pos;
    const uint8_t *nl = scan ? memchr(start, '\n', scan) : NULL;
    if (!nl) {
        if (scan < avail)
            return perr(p, TM_ERROR_LIMIT, "text argument longer than %zu bytes (limit)",
                        p->lim.max_string);
        return perr(p, TM_ERROR_FORMAT, "truncated pickle (unterminated text argument)");
    }
    *s = (const char *)start;
    *len = (size_t)(nl - start);
    p->pos += *len + 1;
    return TM_OK;
}

/* ---- Integers ---------------------------------------------------------------------------- */

/* Little-endian two's complement (LONG1/LONG4 payload) to INT or, if wider than int64, BIGINT
 * holding the minimal encoding. */
static tm_status int_from_le(parser *p, const uint8_t *b, size_t n, tm_pk_value **out) {
    while (n > 1 && ((b[n - 1] == 0x00 && !(b[n - 2] & 0x80)) ||
                     (b[n - 1] == 0xff && (b[n - 2] & 0x80))))
        n--;
    if (n <= 8) {
        uint64_t x = 0;
        for (size_t i = 0; i < n; i++) x |= (uint64_t)b[i] << (8 * i);
        if (n && n < 8 && (b[n - 1] & 0x80)) x |= ~(uint64_t)0 << (8 * n);
        int64_t sx;
        memcpy(&sx, &x, sizeof sx);
        return new_int(p, sx, out);
    }
    return new_str(p, TM_PK_BIGINT, b, n, out);
}

/* Python refuses to convert longer decimal strings (sys.int_info.default_max_str_digits); the
 * conversion below is quadratic, so the same bound keeps it cheap. */
#define MAX_DECIMAL_DIGITS 4300

static int is_space(char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
}

static tm_status int_from_text(parser *p, const char *s, size_t len, tm_pk_value **out) {
    while (len && is_space(*s)) { s++; len--; }
    while (len && is_space(s[len - 1])) len--;
    int neg = 0;
    if (len && (*s == '-' || *s == '+')) {
        neg = *s == '-';
        s++;
        len--;
    }
    if (!len) return perr(p, TM_ERROR_FORMAT, "invalid integer literal");
    if (len > MAX_DECIMAL_DIGITS)
        return perr(p, TM_ERROR_LIMIT, "integer literal longer than %d digits",
                    MAX_DECIMAL_DIGITS);
    for (size_t i = 0; i < len; i++)
        if (s[i] < '0' || s[i] > '9') return perr(p, TM_ERROR_FORMAT, "invalid integer literal");
    uint64_t mag = 0;
    int fits = 1;
    for (size_t i = 0; i < len && fits; i++) {
        unsigned d = (unsigned)(s[i] - '0');
        if (mag > (UINT64_MAX - d) / 10) fits = 0;
        else mag = mag * 10 + d;
    }
    if (fits && (neg ? mag <= (uint64_t)INT64_MAX + 1 : mag <= (uint64_t)INT64_MAX)) {
        int64_t x = neg ? (mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag)
                        : (int64_t)mag;
        return new_int(p, x, out);
    }
    size_t cap = len / 9 + 2;
    uint32_t *limbs = calloc(cap, sizeof(uint32_t));
    if (!limbs) return nomem(p);
    size_t nl = 0;
    for (size_t i = 0; i < len; i++) {
        uint64_t carry = (uint64_t)(s[i] - '0');
        for (size_t j = 0; j < nl; j++) {
            uint64_t t = (uint64_t)limbs[j] * 10 + carry;
            limbs[j] = (uint32_t)t;
            carry = t >> 32;
        }
        if (carry) limbs[nl++] = (uint32_t)carry;
    }
    size_t nb = nl * 4 + 1;
    uint8_t *b = malloc(nb);
    if (!b) {
        free(limbs);
        return nomem(p);
    }
    for (size_t j = 0; j < nl; j++)
        for (int k = 0; k < 4; k++) b[j * 4 + (size_t)k] = (uint8_t)(limbs[j] >> (8 * k));
    b[nb - 1] = 0;
    if (neg) {
        unsigned carry = 1;
        for (size_t i = 0; i < nb; i++) {
            unsigned t = (unsigned)(uint8_t)~b[i] + carry;
            b[i] = (uint8_t)t;
            carry = t >> 8;
        }
    }
    tm_status st = int_from_le(p, b, nb, out);
    free(limbs);
    free(b);
    return st;
}

static tm_status parse_index(parser *p, const char *s, size_t len, uint64_t *out) {
    uint64_t x = 0;
    if (!len) return perr(p, TM_ERROR_FORMAT, "invalid memo index");
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return perr(p, TM_ERROR_FORMAT, "invalid memo index");
        unsigned d = (unsigned)(s[i] - '0');
        if (x > (UINT64_MAX - d) / 10) return perr(p, TM_ERROR_FORMAT, "memo index too large");
        x = x * 10 + d;
    }
    *out = x;
    return TM_OK;
}

static tm_status float_from_text(parser *p, const char *s, size_t len, tm_pk_value **out) {
    char buf[512];
    while (len && is_space(*s)) { s++; len--; }
    while (len && is_space(s[len - 1])) len--;
    if (!len || len >= sizeof buf) return perr(p, TM_ERROR_FORMAT, "invalid float literal");
    memcpy(buf, s, len);
    buf[len] = 0;
    /* strtod follows LC_NUMERIC; pickles always use '.'. */
    const char *dp = localeconv()->decimal_point;
    if (dp && dp[0] && dp[0] != '.' && !dp[1])
        for (size_t i = 0; i < len; i++)
            if (buf[i] == '.') buf[i] = dp[0];
    char *end = NULL;
    double x = strtod(buf, &end);
    if (end != buf + len) return perr(p, TM_ERROR_FORMAT, "invalid float literal");
    TRY(new_value(p, TM_PK_FLOAT, out));
    (*out)->u.real = x;
    return TM_OK;
}

/* ---- Text decoders --------------------------------------------------------------------- */

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Protocol-0 STRING: a quoted Python 2 str repr, decoded like codecs.escape_decode. */
static tm_status decode_string_repr(parser *p, const char *s, size_t len, tm_pk_value **out) {
    if (len < 2 || s[0] != s[len - 1] || (s[0] != '\'' && s[0] != '"'))
        return perr(p, TM_ERROR_FORMAT, "the STRING argument must be quoted");
    s++;
    len -= 2;
    char *o = palloc(p, len + 1);
    if (!o) return nomem(p);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c != '\\') { o[n++] = c; continue; }
        if (++i >= len) return perr(p, TM_ERROR_FORMAT, "trailing \\ in STRING");
        c = s[i];
        switch (c) {
        case '\n': break;
        case '\\': o[n++] = '\\'; break;
        case '\'': o[n++] = '\''; break;
        case '"': o[n++] = '"'; break;
        case 'a': o[n++] = '\a'; break;
        case 'b': o[n++] = '\b'; break;
        case 'f': o[n++] = '\f'; break;
        case 'n': o[n++] = '\n'; break;
        case 'r': o[n++] = '\r'; break;
        case 't': o[n++] = '\t'; break;
        case 'v': o[n++] = '\v'; break;
        case 'x': {
            int h1 = i + 1 < len ? hexval((unsigned char)s[i + 1]) : -1;
            int h2 = i + 2 < len ? hexval((unsigned char)s[i + 2]) : -1;
            if (h1 < 0 || h2 < 0) return perr(p, TM_ERROR_FORMAT, "invalid \\x escape in STRING");
            o[n++] = (char)(h1 * 16 + h2);
            i += 2;
            break;
        }
        default:
            if (c >= '0' && c <= '7') {
                unsigned v = (unsigned)(c - '0');
                for (int k = 0; k < 2 && i + 1 < len && s[i + 1] >= '0' && s[i + 1] <= '7'; k++)
                    v = v * 8 + (unsigned)(s[++i] - '0');
                o[n++] = (char)(v & 0xff);
            } else {
                o[n++] = '\\';
                o[n++] = c;
            }
        }
    }
    o[n] = 0;
    TRY(new_value(p, TM_PK_STRING, out));
    (*out)->u.str.data = o;
    (*out)->u.str.len = n;
    return TM_OK;
}

/* Protocol-0 UNICODE: raw-unicode-escape (bytes are Latin-1 code points; \uXXXX and
 * \UXXXXXXXX escapes count only after an odd run of backslashes), re-encoded as UTF-8. */
static tm_status decode_raw_unicode_escape(parser *p, const char *s, size_t len,
                                           tm_pk_value **out) {
    if (len > (SIZE_MAX - 1) / 2) return nomem(p);
    char *o = palloc(p, 2 * len + 1);
    if (!o) return nomem(p);
    size_t n = 0, i = 0;
    while (i < len) {
        unsigned char c = (unsigned char)s[i];
        if (c != '\\') {
            n += put_utf8(o + n, c);
            i++;
            continue;
        }
        size_t run = 0;
        while (i < len && s[i] == '\\') {
            o[n++] = '\\';
            i++;
            run++;
        }
        if (!(run & 1) || i >= len || (s[i] != 'u' && s[i] != 'U')) continue;
        n--; /* the last backslash introduces the escape */
        int digits = s[i] == 'u' ? 4 : 8;
        i++;
        if (len - i < (size_t)digits)
            return perr(p, TM_ERROR_FORMAT, "truncated \\u escape in UNICODE");
        uint32_t cp = 0;
        for (int k = 0; k < digits; k++) {
            int h = hexval((unsigned char)s[i + (size_t)k]);
            if (h < 0) return perr(p, TM_ERROR_FORMAT, "invalid \\u escape in UNICODE");
            cp = cp * 16 + (uint32_t)h;
        }
        if (cp > 0x10ffff) return perr(p, TM_ERROR_FORMAT, "\\U escape out of range in UNICODE");
        i += (size_t)digits;
        n += put_utf8(o + n, cp);
    }
    o[n] = 0;
    TRY(new_value(p, TM_PK_STRING, out));
    (*out)->u.str.data = o;
    (*out)->u.str.len = n;
    return TM_OK;
}

/* UTF-8 text to Latin-1 bytes: inverse of how Python 2-compatible pickles store bytes. */
static tm_status latin1_encode(parser *p, const tm_pk_value *s, tm_pk_value **out) {
    const unsigned char *in = (const unsigned char *)s->u.str.data;
    size_t len = s->u.str.len;
    char *o = palloc(p, len + 1);
    if (!o) return nomem(p);
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        unsigned c = in[i];
        if (c < 0x80) {
            o[n++] = (char)c;
            i++;
        } else if ((c & 0xe0) == 0xc0 && i + 1 < len && (in[i + 1] & 0xc0) == 0x80) {
            unsigned cp = ((c & 0x1f) << 6) | (in[i + 1] & 0x3f);
            if (cp < 0x80 || cp > 0xff)
                return perr(p, TM_ERROR_FORMAT, "_codecs.encode: text is not Latin-1");
            o[n++] = (char)cp;
            i += 2;
        } else {
            return perr(p, TM_ERROR_FORMAT, "_codecs.encode: text is not Latin-1");
        }
    }
    o[n] = 0;
    TRY(new_value(p, TM_PK_BYTES, out));
    (*out)->u.str.data = o;
    (*out)->u.str.len = n;
    return TM_OK;
}

static int str_is(const tm_pk_value *v, const char *s) {
    size_t n = strlen(s);
    return v && v->kind == TM_PK_STRING && v->u.str.len == n && memcmp(v->u.str.data, s, n) == 0;
}

/* bytes via _codecs.encode(text, encoding) */
static tm_status encode_text(parser *p, const tm_pk_value *text, const tm_pk_value *enc,
                             tm_pk_value **out) {
    if (text->kind != TM_PK_STRING)
        return perr(p, TM_ERROR_FORMAT, "_codecs.encode of a %s", tm_pk_kind_name(text->kind));
    if (!enc || str_is(enc, "utf-8") || str_is(enc, "utf8") || str_is(enc, "UTF-8"))
        return new_str(p, TM_PK_BYTES, text->u.str.data, text->u.str.len, out);
    if (str_is(enc, "latin1") || str_is(enc, "latin-1") || str_is(enc, "iso-8859-1") ||
        str_is(enc, "iso8859-1") || str_is(enc, "l1"))
        return latin1_encode(p, text, out);
    if (enc->kind == TM_PK_STRING)
        return perr(p, TM_ERROR_UNSUPPORTED, "_codecs.encode with encoding '%.64s'",
                    enc->u.str.data);
    return perr(p, TM_ERROR_FORMAT, "_codecs.encode with a %s encoding", tm_pk_kind_name(enc->kind));
}

/* ---- Globals: what is refused, what is understood ------------------------------------ */

/* Modules a pickle can use to run code, start processes, touch files or the network, or load
 * further pickles/code. No checkpoint needs them; seeing one means the file was crafted to
 * attack a real unpickler, so it is refused even though we would never call it. Submodules
 * (os.path, importlib.util, …) are covered too. */
static const char *const denied_modules[] = {
    "os", "posix", "nt", "posixpath", "ntpath",   /* os.system, os.popen, os.exec*, … */
    "subprocess", "_posixsubprocess", "commands", "popen2", "pty", /* process spawning */
    "sys",                                         /* sys.modules, sys.settrace, … */
    "shutil", "tempfile", "io", "_io", "shelve",   /* file access (shelve also unpickles) */
    "socket", "ssl", "http", "urllib", "urllib2", "ftplib", "smtplib", "telnetlib",
    "webbrowser", "requests",                      /* network */
    "importlib", "imp", "pkgutil", "zipimport", "runpy", "site", /* importing arbitrary code */
    "pickle", "_pickle", "cPickle", "marshal", "dill", "cloudpickle", /* nested unpickling */
    "code", "codeop", "pdb", "bdb", "timeit", "trace", "profile", "cProfile", "doctest",
    "pydoc", /* evaluate source text */
    "types",                                       /* FunctionType/CodeType build code */
    "operator",                                    /* attrgetter/methodcaller act as getattr */
    "ctypes", "_ctypes",                           /* raw memory, foreign calls */
    "multiprocessing", "concurrent", "threading", "_thread", "asyncio", "signal",
    "platform",                                    /* platform.popen */
    "distutils", "setuptools", "pip", "ensurepip", "venv", /* run build/install commands */
    "torch.hub", "torch.serialization",            /* download code / load nested pickles */
    "numpy.testing",                               /* numpy.testing...runstring execs text */
};

/* Builtins a pickle may name: plain constructors of inert data. Everything else in builtins
 * (eval, exec, compile, open, getattr, setattr, __import__, globals, vars, input, …) either
 * runs code or reaches arbitrary attributes. The Python 2 aliases are what protocol 0–2 pickles
 * written by Python 2 name. */
static const char *const allowed_builtins[] = {
    "set", "frozenset", "slice", "bytearray", "complex", "range", "int", "float", "str",
    "bytes", "bool", "list", "dict", "tuple", "object",
    "xrange", "unicode", "long", "basestring", /* Python 2 spellings */
};

/* A name segment (module or dotted attribute path) naming one of these reaches code execution
 * even from an innocent module (protocol 4 resolves "mod.os.system"-style paths attribute by
 * attribute). Leading underscores are ignored ("_os" is how many modules import os). */
static const char *const denied_segments[] = {
    "eval", "exec", "execfile", "compile", "open", "getattr", "setattr", "delattr", "system",
    "popen", "spawn", "import_module", "globals", "locals", "vars", "builtins", "__builtin__",
    "breakpoint",
};

static int module_denied(const char *m) {
    for (size_t i = 0; i < sizeof denied_modules / sizeof denied_modules[0]; i++) {
        size_t n = strlen(denied_modules[i]);
        if (strncmp(m, denied_modules[i], n) == 0 && (m[n] == 0 || m[n] == '.')) return 1;
    }
    return 0;
}

static int segment_denied(const char *s, size_t n) {
    while (n && *s == '_') { s++; n--; }
    for (size_t i = 0; i < sizeof denied_segments / sizeof denied_segments[0]; i++) {
        const char *d = denied_segments[i];
        while (*d == '_') d++;
        if (strlen(d) == n && memcmp(s, d, n) == 0) return 1;
    }
    for (size_t i = 0; i < sizeof denied_modules / sizeof denied_modules[0]; i++)
        if (!strchr(denied_modules[i], '.') && strlen(denied_modules[i]) == n &&
            memcmp(s, denied_modules[i], n) == 0)
            return 1;
    return 0;
}

static int is_dunder(const char *s, size_t n) {
    return n >= 4 && s[0] == '_' && s[1] == '_' && s[n - 2] == '_' && s[n - 1] == '_';
}

/* Returns 1 when (module, name) must be refused. name is the attribute path after the module. */
static int global_unsafe(const char *module, const char *name) {
    if (module_denied(module)) return 1;
    if (strcmp(module, "builtins") == 0) {
        for (size_t i = 0; i < sizeof allowed_builtins / sizeof allowed_builtins[0]; i++)
            if (strcmp(name, allowed_builtins[i]) == 0) return 0;
        return 1;
    }
    if (strcmp(module, "copyreg") == 0 &&
        (strcmp(name, "__newobj__") == 0 || strcmp(name, "__newobj_ex__") == 0))
        return 0; /* what protocol-2 object creation is defined as; we only use its meaning */
    /* Dunder attributes (__globals__, __builtins__, __class__, __subclasses__, __reduce__, …)
     * are the classic way from an innocent object to arbitrary code. Module names are exempt:
     * TorchScript classes live in "__torch__", scripts' classes in "__main__". */
    const char *seg = name;
    for (;;) {
        const char *dot = strchr(seg, '.');
        size_t n = dot ? (size_t)(dot - seg) : strlen(seg);
        if (is_dunder(seg, n)) return 1;
        if (dot && segment_denied(seg, n)) return 1; /* "os.system" inside another module */
        if (!dot) break;
        seg = dot + 1;
    }
    /* Module paths are not checked segment by segment: a module must be importable as such
     * ("argparse._os" is not), and torch's own "torch.jit._pickle" would look like "pickle". */
    return 0;
}

static const struct { const char *name; tm_dtype dtype; } storage_types[] = {
    {"DoubleStorage", TM_FLOAT64},        {"FloatStorage", TM_FLOAT32},
    {"HalfStorage", TM_FLOAT16},          {"BFloat16Storage", TM_BFLOAT16},
    {"LongStorage", TM_INT64},            {"IntStorage", TM_INT32},
    {"ShortStorage", TM_INT16},           {"CharStorage", TM_INT8},
    {"ByteStorage", TM_UINT8},            {"BoolStorage", TM_BOOL},
    {"ComplexFloatStorage", TM_COMPLEX64}, {"ComplexDoubleStorage", TM_COMPLEX128},
};

static const struct { const char *name; tm_dtype dtype; } dtype_globals[] = {
    {"float64", TM_FLOAT64}, {"float32", TM_FLOAT32},   {"float16", TM_FLOAT16},
    {"bfloat16", TM_BFLOAT16}, {"int64", TM_INT64},     {"int32", TM_INT32},
    {"int16", TM_INT16},     {"int8", TM_INT8},         {"uint8", TM_UINT8},
    {"bool", TM_BOOL},       {"complex64", TM_COMPLEX64}, {"complex128", TM_COMPLEX128},
};

static void classify_global(node *g, const char *m, const char *n) {
    int sp = SP_NONE;
    g->dtype = -1;
    if (strcmp(m, "torch._utils") == 0) {
        if (strcmp(n, "_rebuild_tensor") == 0) sp = SP_REBUILD_V1;
        else if (strcmp(n, "_rebuild_tensor_v2") == 0) sp = SP_REBUILD_V2;
        else if (strcmp(n, "_rebuild_tensor_v3") == 0) sp = SP_REBUILD_V3;
        else if (strcmp(n, "_rebuild_parameter") == 0) sp = SP_REBUILD_PARAM;
        else if (strcmp(n, "_rebuild_parameter_with_state") == 0) sp = SP_REBUILD_PARAM_STATE;
        else if (strcmp(n, "_rebuild_from_type_v2") == 0) sp = SP_FROM_TYPE_V2;
    } else if (strcmp(m, "torch._tensor") == 0) {
        if (strcmp(n, "_rebuild_from_type_v2") == 0) sp = SP_FROM_TYPE_V2;
    } else if (strcmp(m, "torch") == 0 || strcmp(m, "torch.cuda") == 0) {
        for (size_t i = 0; i < sizeof storage_types / sizeof storage_types[0]; i++)
            if (strcmp(n, storage_types[i].name) == 0) {
                sp = SP_STORAGE_TYPE;
                g->dtype = (int8_t)storage_types[i].dtype;
            }
        if (strcmp(m, "torch") == 0) {
            if (strcmp(n, "UntypedStorage") == 0 || strcmp(n, "_UntypedStorage") == 0)
                sp = SP_UNTYPED_STORAGE;
            else if (strcmp(n, "Size") == 0)
                sp = SP_TORCH_SIZE;
            else if (sp == SP_NONE) {
                /* Any other torch.X may be a dtype (torch.qint8, torch.complex32, …): only
                 * its use as a dtype decides, so mark it and keep the name for the message. */
                sp = SP_DTYPE;
                for (size_t i = 0; i < sizeof dtype_globals / sizeof dtype_globals[0]; i++)
                    if (strcmp(n, dtype_globals[i].name) == 0)
                        g->dtype = (int8_t)dtype_globals[i].dtype;
            }
        }
    } else if (strcmp(m, "torch.storage") == 0) {
        if (strcmp(n, "UntypedStorage") == 0 || strcmp(n, "_UntypedStorage") == 0)
            sp = SP_UNTYPED_STORAGE;
    } else if (strcmp(m, "torch.nn.parameter") == 0) {
        if (strcmp(n, "Parameter") == 0) sp = SP_PARAMETER_CLASS;
    } else if (strcmp(m, "torch.jit._pickle") == 0) {
        if (strncmp(n, "build_", 6) == 0 || strcmp(n, "restore_type_tag") == 0)
            sp = SP_FIRST_ARG;
    } else if (strcmp(m, "collections") == 0) {
        if (strcmp(n, "OrderedDict") == 0) sp = SP_ODICT;
    } else if (strcmp(m, "_codecs") == 0) {
        if (strcmp(n, "encode") == 0) sp = SP_ENCODE;
    } else if (strcmp(m, "copyreg") == 0) {
        if (strcmp(n, "_reconstructor") == 0) sp = SP_RECONSTRUCTOR;
        else if (strcmp(n, "__newobj__") == 0) sp = SP_NEWOBJ_FN;
        else if (strcmp(n, "__newobj_ex__") == 0) sp = SP_NEWOBJ_EX_FN;
    } else if (strcmp(m, "builtins") == 0) {
        if (strcmp(n, "set") == 0) sp = SP_SET;
        else if (strcmp(n, "frozenset") == 0) sp = SP_FROZENSET;
        else if (strcmp(n, "bytes") == 0) sp = SP_BYTES;
        else if (strcmp(n, "bytearray") == 0) sp = SP_BYTEARRAY;
        else if (strcmp(n, "dict") == 0) sp = SP_DICT;
        else if (strcmp(n, "list") == 0) sp = SP_LIST;
        else if (strcmp(n, "tuple") == 0) sp = SP_TUPLE;
    }
    g->special = (uint8_t)sp;
}

/* GLOBAL / STACK_GLOBAL / INST: validates, refuses, classifies. */
static tm_status make_global(parser *p, const char *m, size_t mlen, const char *n, size_t nlen,
                             tm_pk_value **out) {
    if (!mlen || !nlen || memchr(m, 0, mlen) || memchr(n, 0, nlen))
        return perr(p, TM_ERROR_FORMAT, "invalid global name");
    /* Python 2 module names, as Python's unpickler maps them (fix_imports). */
    if (mlen == 11 && memcmp(m, "__builtin__", 11) == 0) { m = "builtins"; mlen = 8; }
    else if (mlen == 8 && memcmp(m, "copy_reg", 8) == 0) { m = "copyreg"; mlen = 7; }
    char *ms = NULL, *ns = NULL;
    TRY(arena_strdup(p, m, mlen, &ms));
    TRY(arena_strdup(p, n, nlen, &ns));
    if (global_unsafe(ms, ns))
        return perr(p, TM_ERROR_UNSAFE, "refusing global %.200s.%.200s", ms, ns);
    tm_pk_value *g = NULL;
    TRY(new_value(p, TM_PK_GLOBAL, &g));
    g->u.global.module = ms;
    g->u.global.name = ns;
    classify_global(NODE(g), ms, ns);
    *out = g;
    return TM_OK;
}

/* ---- Storages and tensors --------------------------------------------------------------- */

static uint64_t storage_hash(const char *key, int has_dtype, int dtype) {
    return mix64(hash_bytes(key, strlen(key), 7) ^ (uint64_t)(has_dtype ? dtype + 1 : 0));
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
    TRY(new_value(p, TM_PK_STORAGE, &v));
    v->u.storage.has_dtype = has_dtype;
    v->u.storage.dtype = has_dtype ? dtype : TM_UINT8;
    v->u.storage.key = key;
    v->u.storage.location = location;
    v->u.storage.numel = numel;
    if (p->nstorages == p->storages_cap) {
        size_t cap = p->storages_cap ? p->storages_cap * 2 : 16;
        if (cap > UINT32_MAX - 1 || cap > SIZE_MAX / sizeof(node *)) return nomem(p);
        node **s = realloc(p->storages, cap * sizeof(node *));
        if (!s) return nomem(p);
        p->storages = s;
        p->storages_cap = cap;
    }
    p->storages[p->nstorages++] = NODE(v);
    if (p->nstorages * 2 > p->storage_index_cap) {
        size_t cap = p->storage_index_cap ? p->storage_index_cap * 2 : 32;
        uint32_t *tab = calloc(cap, sizeof(uint32_t));
        if (!tab) return nomem(p);
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
static tm_status persistent_load(parser *p, tm_pk_value *pid, tm_pk_value **out) {
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
            return perr(p, TM_ERROR_UNSUPPORTED, "unsupported persistent id ('%.64s', ...)",
                        pid->u.seq.items[0]->u.str.data);
        return perr(p, TM_ERROR_UNSUPPORTED, "unsupported persistent id (a %s)",
                    tm_pk_kind_name(pid->kind));
    }
    tm_pk_value **it = pid->u.seq.items;
    size_t n = pid->u.seq.n;
    if (n != 5 && n != 6)
        return perr(p, TM_ERROR_FORMAT, "unsupported persistent id: storage tuple of %zu items",
                    n);
    if (it[1]->kind != TM_PK_GLOBAL || (NODE(it[1])->special != SP_STORAGE_TYPE &&
                                        NODE(it[1])->special != SP_UNTYPED_STORAGE)) {
        if (it[1]->kind == TM_PK_GLOBAL)
            return perr(p, TM_ERROR_UNSUPPORTED, "storage type %.100s.%.100s is not supported",
                        it[1]->u.global.module, it[1]->u.global.name);
        return perr(p, TM_ERROR_FORMAT, "persistent id: storage type is a %s",
                    tm_pk_kind_name(it[1]->kind));
    }
    const char *key;
    if (it[2]->kind == TM_PK_STRING) {
        key = it[2]->u.str.data;
    } else if (it[2]->kind == TM_PK_INT) {
        char buf[32];
        int len = snprintf(buf, sizeof buf, "%lld", (long long)it[2]->u.integer);
        char *k = NULL;
        TRY(arena_strdup(p, buf, (size_t)len, &k));
        key = k;
    } else {
        return perr(p, TM_ERROR_FORMAT, "persistent id: storage key is a %s",
                    tm_pk_kind_name(it[2]->kind));
    }
    if (strlen(key) != (it[2]->kind == TM_PK_STRING ? it[2]->u.str.len : strlen(key)))
        return perr(p, TM_ERROR_FORMAT, "persistent id: storage key contains NUL");
    if (it[3]->kind != TM_PK_STRING)
        return perr(p, TM_ERROR_FORMAT, "persistent id: location is a %s",
                    tm_pk_kind_name(it[3]->kind));
    if (it[4]->kind != TM_PK_INT || it[4]->u.integer < 0)
        return perr(p, TM_ERROR_FORMAT, "persistent id: storage size is not a non-negative int");
    if (n == 6 && it[5]->kind != TM_PK_NONE)
        return perr(p, TM_ERROR_UNSUPPORTED, "storage views (legacy view_metadata)");
    int has_dtype = NODE(it[1])->special == SP_STORAGE_TYPE;
    return intern_storage(p, key, has_dtype, has_dtype ? (tm_dtype)NODE(it[1])->dtype : TM_UINT8,
                          it[3]->u.str.data, it[4]->u.integer, out);
}

static int is_seq(const tm_pk_value *v) {
    return v->kind == TM_PK_TUPLE || v->kind == TM_PK_LIST;
}

static int as_flag(const tm_pk_value *v, int *out) {
    if (v->kind == TM_PK_BOOL) { *out = v->u.boolean != 0; return 1; }
    if (v->kind == TM_PK_INT) { *out = v->u.integer != 0; return 1; }
    return 0;
}

/* storage, storage_offset, size, stride as given to torch._utils._rebuild_tensor*. */
static tm_status build_tensor(parser *p, const char *fn, tm_pk_value *const *a, int has_dtype,
                              tm_dtype dtype, tm_pk_value **out) {
    const tm_pk_value *st = a[0], *off = a[1], *size = a[2], *stride = a[3];
    if (st->kind != TM_PK_STORAGE)
        return perr(p, TM_ERROR_FORMAT, "%s: storage argument is a %s", fn, tm_pk_kind_name(st->kind));
    if (off->kind != TM_PK_INT || off->u.integer < 0)
        return perr(p, TM_ERROR_FORMAT, "%s: storage offset is not a non-negative int", fn);
    if (!is_seq(size) || !is_seq(stride))
        return perr(p, TM_ERROR_FORMAT, "%s: size and stride must be tuples", fn);
    if (size->u.seq.n != stride->u.seq.n)
        return perr(p, TM_ERROR_FORMAT, "%s: size has %zu dims but stride %zu", fn,
                    size->u.seq.n, stride->u.seq.n);
    size_t ndim = size->u.seq.n;
    if (ndim > TM_MAX_NDIM)
        return perr(p, TM_ERROR_UNSUPPORTED, "%s: %zu dimensions (at most %d)", fn, ndim,
                    TM_MAX_NDIM);
    if (has_dtype) {
        if (st->u.storage.has_dtype && st->u.storage.dtype != dtype)
            return perr(p, TM_ERROR_FORMAT, "%s: dtype %s differs from its storage's %s", fn,
                        tm_dtype_name(dtype), tm_dtype_name(st->u.storage.dtype));
    } else {
        if (!st->u.storage.has_dtype)
            return perr(p, TM_ERROR_UNSUPPORTED, "%s: untyped storage without a dtype", fn);
        dtype = st->u.storage.dtype;
    }
    tm_pk_value *t = NULL;
    TRY(new_value(p, TM_PK_TENSOR, &t));
    int64_t *shape = palloc(p, (ndim ? ndim : 1) * sizeof(int64_t));
    int64_t *strides = palloc(p, (ndim ? ndim : 1) * sizeof(int64_t));
    if (!shape || !strides) return nomem(p);
    int empty = 0;
    for (size_t i = 0; i < ndim; i++) {
        const tm_pk_value *s = size->u.seq.items[i], *r = stride->u.seq.items[i];
        if (s->kind != TM_PK_INT || r->kind != TM_PK_INT)
            return perr(p, TM_ERROR_FORMAT, "%s: size and stride must hold ints", fn);
        if (s->u.integer < 0 || r->u.integer < 0)
            return perr(p, TM_ERROR_FORMAT, "%s: negative size or stride", fn);
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
                return perr(p, TM_ERROR_FORMAT, "%s: tensor views elements outside its storage",
                            fn);
        }
        int64_t avail = st->u.storage.numel;
        if (!st->u.storage.has_dtype) avail /= (int64_t)tm_dtype_size(dtype);
        if (last >= avail)
            return perr(p, TM_ERROR_FORMAT,
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

static tm_status tensor_call(parser *p, const tm_pk_value *fn, const tm_pk_value *args,
                             tm_pk_value **out);

static tm_status as_parameter(parser *p, const tm_pk_value *data, const tm_pk_value *rg,
                              tm_pk_value **out) {
    if (data->kind != TM_PK_TENSOR)
        return perr(p, TM_ERROR_FORMAT, "_rebuild_parameter: data is a %s", tm_pk_kind_name(data->kind));
    int flag = data->u.tensor.requires_grad;
    if (rg && !as_flag(rg, &flag))
        return perr(p, TM_ERROR_FORMAT, "_rebuild_parameter: requires_grad is a %s",
                    tm_pk_kind_name(rg->kind));
    tm_pk_value *t = NULL;
    TRY(new_value(p, TM_PK_TENSOR, &t));
    t->u.tensor = data->u.tensor; /* a copy: the data tensor may be shared through the memo */
    t->u.tensor.requires_grad = flag;
    t->u.tensor.is_parameter = 1;
    *out = t;
    return TM_OK;
}

/* Calls one of the torch._utils tensor rebuild functions (not _rebuild_from_type_v2 with a
 * nested _rebuild_from_type_v2, so input cannot drive recursion). */
static tm_status tensor_call(parser *p, const tm_pk_value *fn, const tm_pk_value *args,
                             tm_pk_value **out) {
    const char *name = fn->u.global.name;
    tm_pk_value *const *a = args->u.seq.items;
    size_t n = args->u.seq.n;
    switch ((special)NODE(fn)->special) {
    case SP_REBUILD_V1:
        if (n != 4) break;
        return build_tensor(p, name, a, 0, TM_FLOAT32, out);
    case SP_REBUILD_V2: {
        if (n != 6 && n != 7) break;
        int rg;
        if (!as_flag(a[4], &rg))
            return perr(p, TM_ERROR_FORMAT, "%s: requires_grad is a %s", name,
                        tm_pk_kind_name(a[4]->kind));
        TRY(build_tensor(p, name, a, 0, TM_FLOAT32, out));
        (*out)->u.tensor.requires_grad = rg;
        return TM_OK;
    }
    case SP_REBUILD_V3: {
        if (n != 7 && n != 8) break;
        int rg;
        if (!as_flag(a[4], &rg))
            return perr(p, TM_ERROR_FORMAT, "%s: requires_grad is a %s", name,
                        tm_pk_kind_name(a[4]->kind));
        const tm_pk_value *dt = a[6];
        if (dt->kind != TM_PK_GLOBAL || NODE(dt)->special != SP_DTYPE)
            return perr(p, TM_ERROR_FORMAT, "%s: dtype argument is a %s", name,
                        tm_pk_kind_name(dt->kind));
        if (NODE(dt)->dtype < 0)
            return perr(p, TM_ERROR_UNSUPPORTED, "dtype %.100s is not supported",
                        dt->u.global.name);
        TRY(build_tensor(p, name, a, 1, (tm_dtype)NODE(dt)->dtype, out));
        (*out)->u.tensor.requires_grad = rg;
        return TM_OK;
    }
    case SP_REBUILD_PARAM:
        if (n != 3) break;
        return as_parameter(p, a[0], a[1], out);
    case SP_REBUILD_PARAM_STATE:
        if (n != 4) break;
        return as_parameter(p, a[0], a[1], out);
    default:
        return perr(p, TM_ERROR_INTERNAL, "not a tensor function");
    }
    return perr(p, TM_ERROR_FORMAT, "%s called with %zu arguments", name, n);
}

/* ---- Calling globals ---------------------------------------------------------------------- */

static tm_status new_object(parser *p, const tm_pk_value *cls, tm_pk_value *args,
                            tm_pk_value **out) {
    tm_pk_value *o = NULL;
    TRY(new_value(p, TM_PK_OBJECT, &o));
    o->u.object.module = cls->u.global.module;
    o->u.object.name = cls->u.global.name;
    o->u.object.args = args ? args : p->empty_tuple_v;
    *out = o;
    return TM_OK;
}

/* dict(), dict(pairs), OrderedDict([[k, v], ...]), dict(other_dict) */
static tm_status dict_from_args(parser *p, const char *fn, const tm_pk_value *args,
                                tm_pk_value **out) {
    tm_pk_value *d = NULL;
    TRY(new_value(p, TM_PK_DICT, &d));
    if (args->u.seq.n > 1)
        return perr(p, TM_ERROR_FORMAT, "%s called with %zu arguments", fn, args->u.seq.n);
    if (args->u.seq.n == 1) {
        const tm_pk_value *src = args->u.seq.items[0];
        if (src->kind == TM_PK_DICT) {
            for (size_t i = 0; i < src->u.dict.n; i++)
                TRY(dict_set(p, d, src->u.dict.keys[i], src->u.dict.values[i]));
        } else if (is_seq(src)) {
            for (size_t i = 0; i < src->u.seq.n; i++) {
                const tm_pk_value *pair = src->u.seq.items[i];
                if (!is_seq(pair) || pair->u.seq.n != 2)
                    return perr(p, TM_ERROR_FORMAT, "%s: item %zu is not a key/value pair", fn, i);
                TRY(dict_set(p, d, pair->u.seq.items[0], pair->u.seq.items[1]));
            }
        } else {
            return perr(p, TM_ERROR_FORMAT, "%s of a %s", fn, tm_pk_kind_name(src->kind));
        }
    }
    *out = d;
    return TM_OK;
}

/* set(), set(iterable), list(...), tuple(...) */
static tm_status seq_from_args(parser *p, const char *fn, tm_pk_kind kind,
                               const tm_pk_value *args, tm_pk_value **out) {
    if (args->u.seq.n == 0) return new_seq(p, kind, NULL, 0, out);
    if (args->u.seq.n > 1)
        return perr(p, TM_ERROR_FORMAT, "%s called with %zu arguments", fn, args->u.seq.n);
    const tm_pk_value *src = args->u.seq.items[0];
    if (src->kind == TM_PK_DICT)
        return new_seq(p, kind, src->u.dict.keys, src->u.dict.n, out);
    if (!is_seq(src) && src->kind != TM_PK_SET)
        return perr(p, TM_ERROR_FORMAT, "%s of a %s", fn, tm_pk_kind_name(src->kind));
    if (kind == TM_PK_TUPLE && src->kind == TM_PK_TUPLE) {
        *out = (tm_pk_value *)src; /* tuple(t) is t */
        return TM_OK;
    }
    return new_seq(p, kind, src->u.seq.items, src->u.seq.n, out);
}

static tm_status bytes_from_args(parser *p, const char *fn, const tm_pk_value *args,
                                 tm_pk_value **out) {
    size_t n = args->u.seq.n;
    if (n == 0) return new_str(p, TM_PK_BYTES, "", 0, out);
    const tm_pk_value *a = args->u.seq.items[0];
    if (n == 1 && a->kind == TM_PK_BYTES) {
        *out = (tm_pk_value *)a;
        return TM_OK;
    }
    if (n == 2 && a->kind == TM_PK_STRING) return encode_text(p, a, args->u.seq.items[1], out);
    return perr(p, TM_ERROR_FORMAT, "%s called with unsupported arguments", fn);
}

static int is_class_special(int sp) {
    return sp == SP_NONE || sp == SP_ODICT || sp == SP_DICT || sp == SP_LIST ||
           sp == SP_TUPLE || sp == SP_SET || sp == SP_FROZENSET || sp == SP_BYTES ||
           sp == SP_BYTEARRAY || sp == SP_STORAGE_TYPE || sp == SP_UNTYPED_STORAGE ||
           sp == SP_TORCH_SIZE || sp == SP_PARAMETER_CLASS || sp == SP_DTYPE;
}

/* cls.__new__(cls, *args): NEWOBJ, NEWOBJ_EX, copyreg._reconstructor / __newobj__. */
static tm_status instantiate(parser *p, const tm_pk_value *cls, tm_pk_value *args,
                             tm_pk_value **out) {
    if (cls->kind != TM_PK_GLOBAL)
        return perr(p, TM_ERROR_FORMAT, "cannot instantiate a %s", tm_pk_kind_name(cls->kind));
    int sp = NODE(cls)->special;
    switch (sp) {
    case SP_ODICT:
    case SP_DICT: return new_value(p, TM_PK_DICT, out);
    case SP_LIST: return new_seq(p, TM_PK_LIST, NULL, 0, out);
    case SP_SET:
    case SP_FROZENSET: return new_seq(p, TM_PK_SET, NULL, 0, out);
    case SP_TUPLE:
        return seq_from_args(p, cls->u.global.name, TM_PK_TUPLE, args, out);
    case SP_BYTES:
    case SP_BYTEARRAY:
        return bytes_from_args(p, cls->u.global.name, args, out);
    default:
        if (!is_class_special(sp))
            return perr(p, TM_ERROR_FORMAT, "cannot instantiate function %.100s.%.100s",
                        cls->u.global.module, cls->u.global.name);
        return new_object(p, cls, args, out);
    }
}

/* func(*args): REDUCE, INST, OBJ. */
static tm_status call(parser *p, const tm_pk_value *fn, tm_pk_value *args, tm_pk_value **out) {
    if (fn->kind != TM_PK_GLOBAL)
        return perr(p, TM_ERROR_FORMAT, "calling a %s (not a global)", tm_pk_kind_name(fn->kind));
    if (args->kind != TM_PK_TUPLE)
        return perr(p, TM_ERROR_FORMAT, "arguments are a %s, not a tuple", tm_pk_kind_name(args->kind));
    const char *name = fn->u.global.name;
    tm_pk_value *const *a = args->u.seq.items;
    size_t n = args->u.seq.n;
    switch ((special)NODE(fn)->special) {
    case SP_ODICT:
    case SP_DICT: return dict_from_args(p, name, args, out);
    case SP_LIST: return seq_from_args(p, name, TM_PK_LIST, args, out);
    case SP_TUPLE: return seq_from_args(p, name, TM_PK_TUPLE, args, out);
    case SP_SET:
    case SP_FROZENSET: return seq_from_args(p, name, TM_PK_SET, args, out);
    case SP_BYTES:
    case SP_BYTEARRAY: return bytes_from_args(p, name, args, out);
    case SP_ENCODE:
        if (n < 1 || n > 3) break;
        return encode_text(p, a[0], n >= 2 ? a[1] : NULL, out);
    case SP_RECONSTRUCTOR:
        /* _reconstructor(cls, base, state): state is for base.__init__; only cls matters. */
        if (n != 3) break;
        return instantiate(p, a[0], p->empty_tuple_v, out);
    case SP_NEWOBJ_FN: {
        if (n < 1) break;
        tm_pk_value *rest = NULL;
        TRY(new_seq(p, TM_PK_TUPLE, a + 1, n - 1, &rest));
        return instantiate(p, a[0], rest, out);
    }
    case SP_NEWOBJ_EX_FN:
        if (n != 3 || a[1]->kind != TM_PK_TUPLE) break;
        return instantiate(p, a[0], a[1], out);
    case SP_FIRST_ARG:
        if (n < 1) break;
        *out = a[0];
        return TM_OK;
    case SP_TORCH_SIZE:
        if (n != 1) break;
        return seq_from_args(p, name, TM_PK_TUPLE, args, out);
    case SP_REBUILD_V1:
    case SP_REBUILD_V2:
    case SP_REBUILD_V3:
    case SP_REBUILD_PARAM:
    case SP_REBUILD_PARAM_STATE: return tensor_call(p, fn, args, out);
    case SP_FROM_TYPE_V2: {
        /* (func, new_type, args, state): a tensor subclass or a tensor with Python attributes;
         * the attributes are dropped, a Parameter new_type is kept as is_parameter. */
        if (n != 4) break;
        const tm_pk_value *f = a[0], *ty = a[1], *fa = a[2];
        if (f->kind != TM_PK_GLOBAL || fa->kind != TM_PK_TUPLE) break;
        int fsp = NODE(f)->special;
        if (fsp != SP_REBUILD_V1 && fsp != SP_REBUILD_V2 && fsp != SP_REBUILD_V3 &&
            fsp != SP_REBUILD_PARAM && fsp != SP_REBUILD_PARAM_STATE)
            return new_object(p, fn, args, out);
        TRY(tensor_call(p, f, fa, out));
        if (ty->kind == TM_PK_GLOBAL && NODE(ty)->special == SP_PARAMETER_CLASS &&
            !(*out)->u.tensor.is_parameter)
            return as_parameter(p, *out, NULL, out);
        return TM_OK;
    }
    default: return new_object(p, fn, args, out);
    }
    return perr(p, TM_ERROR_FORMAT, "%.100s.%.100s called with unsupported arguments (%zu)",
                fn->u.global.module, name, n);
}

/* ---- Container mutation opcodes -------------------------------------------------------- */

static tm_status append_items(parser *p, tm_pk_value *target, tm_pk_value *const *items,
                              size_t n) {
    if (target->kind == TM_PK_LIST) return seq_extend(p, target, items, n);
    if (target->kind == TM_PK_OBJECT) {
        /* list subclasses: items collected beside the object */
        if (!target->u.object.items) TRY(new_seq(p, TM_PK_LIST, NULL, 0, &target->u.object.items));
        if (target->u.object.items->kind != TM_PK_LIST)
            return perr(p, TM_ERROR_FORMAT, "appending to an object that has dict items");
        return seq_extend(p, target->u.object.items, items, n);
    }
    return perr(p, TM_ERROR_FORMAT, "appending to a %s", tm_pk_kind_name(target->kind));
}

static tm_status set_items(parser *p, tm_pk_value *target, tm_pk_value *const *items, size_t n) {
    if (n % 2) return perr(p, TM_ERROR_FORMAT, "odd number of items (%zu) for a dict", n);
    tm_pk_value *d = target;
    if (target->kind == TM_PK_OBJECT) {
        /* dict subclasses (e.g. Lightning's AttributeDict) */
        if (!target->u.object.items) TRY(new_value(p, TM_PK_DICT, &target->u.object.items));
        d = target->u.object.items;
        if (d->kind != TM_PK_DICT)
            return perr(p, TM_ERROR_FORMAT, "setting items of an object that has list items");
    } else if (target->kind != TM_PK_DICT) {
        return perr(p, TM_ERROR_FORMAT, "setting items of a %s", tm_pk_kind_name(target->kind));
    }
    for (size_t i = 0; i < n; i += 2) TRY(dict_set(p, d, items[i], items[i + 1]));
    return TM_OK;
}

static tm_status build(parser *p, tm_pk_value *inst, tm_pk_value *state) {
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
        return perr(p, TM_ERROR_FORMAT, "BUILD on a %s", tm_pk_kind_name(inst->kind));
    }
}

/* ---- Final check: acyclic and bounded depth ----------------------------------------------- */

static int is_container(const tm_pk_value *v) {
    return v->kind == TM_PK_TUPLE || v->kind == TM_PK_LIST || v->kind == TM_PK_SET ||
           v->kind == TM_PK_DICT;
}

static size_t n_children(const tm_pk_value *v) {
    return v->kind == TM_PK_DICT ? 2 * v->u.dict.n : v->u.seq.n;
}

static tm_pk_value *child(const tm_pk_value *v, size_t i) {
    if (v->kind == TM_PK_DICT)
        return i < v->u.dict.n ? v->u.dict.keys[i] : v->u.dict.values[i - v->u.dict.n];
    return v->u.seq.items[i];
}

typedef struct dfs_frame {
    tm_pk_value *v;
    size_t next;
    uint32_t maxh;
} dfs_frame;

/* Guarantees callers can walk tuples/lists/sets/dicts recursively: no cycles and at most
 * max_depth levels. OBJECT placeholders are cut points: their args/state/items are checked as
 * separate roots, so a cycle through an object (OmegaConf configs keep _parent links) is
 * accepted; walkers that descend into objects must bound themselves. Iterative, linear. */
static tm_status check_graph(parser *p, tm_pk_value *root) {
    tm_status st = TM_OK;
    dfs_frame *stk = NULL;
    size_t cap = 0;
    tm_pk_value **objs = NULL;
    size_t nobjs = 0, objs_cap = 0, next_obj = 0, next_obj_child = 0;
    tm_pk_value *start = root;
    for (;;) {
        if (start && start->kind == TM_PK_OBJECT) {
            if (NODE(start)->color == 0) {
                NODE(start)->color = 2;
                if (nobjs == objs_cap) {
                    size_t c = objs_cap ? objs_cap * 2 : 16;
                    tm_pk_value **o = realloc(objs, c * sizeof *o);
                    if (!o) { st = nomem(p); goto done; }
                    objs = o;
                    objs_cap = c;
                }
                objs[nobjs++] = start;
            }
        } else if (start && is_container(start) && NODE(start)->color == 0) {
            size_t sp = 0;
            NODE(start)->color = 1;
            if (!cap) {
                cap = 64;
                stk = malloc(cap * sizeof *stk);
                if (!stk) { st = nomem(p); goto done; }
            }
            stk[sp++] = (dfs_frame){start, 0, 0};
            while (sp) {
                dfs_frame *f = &stk[sp - 1];
                if (f->next < n_children(f->v)) {
                    tm_pk_value *c = child(f->v, f->next++);
                    if (c->kind == TM_PK_OBJECT) {
                        if (NODE(c)->color == 0) {
                            NODE(c)->color = 2;
                            if (nobjs == objs_cap) {
                                size_t nc = objs_cap ? objs_cap * 2 : 16;
                                tm_pk_value **o = realloc(objs, nc * sizeof *o);
                                if (!o) { st = nomem(p); goto done; }
                                objs = o;
                                objs_cap = nc;
                            }
                            objs[nobjs++] = c;
                        }
                        continue;
                    }
                    if (!is_container(c)) continue;
                    node *cn = NODE(c);
                    if (cn->color == 1) {
                        st = perr(p, TM_ERROR_UNSUPPORTED,
                                  "a %s contains itself (self-referencing data)",
                                  tm_pk_kind_name(c->kind));
                        goto done;
                    }
                    if (cn->color == 2) {
                        if (cn->height > f->maxh) f->maxh = cn->height;
                        continue;
                    }
                    if (sp >= p->lim.max_depth) {
                        st = perr(p, TM_ERROR_LIMIT, "nesting deeper than %zu (limit)",
                                  p->lim.max_depth);
                        goto done;
                    }
                    if (sp == cap) {
                        size_t nc = cap * 2;
                        dfs_frame *s = realloc(stk, nc * sizeof *s);
                        if (!s) { st = nomem(p); goto done; }
                        stk = s;
                        cap = nc;
                    }
                    cn->color = 1;
                    stk[sp++] = (dfs_frame){c, 0, 0};
                } else {
                    uint32_t h = f->maxh + 1;
                    NODE(f->v)->height = h;
                    NODE(f->v)->color = 2;
                    sp--;
                    if ((size_t)h > p->lim.max_depth) {
                        st = perr(p, TM_ERROR_LIMIT, "nesting deeper than %zu (limit)",
                                  p->lim.max_depth);
                        goto done;
                    }
                    if (sp && h > stk[sp - 1].maxh) stk[sp - 1].maxh = h;
                }
            }
        }
        /* next root: the children of queued objects */
        start = NULL;
        while (!start && next_obj < nobjs) {
            tm_pk_value *o = objs[next_obj];
            tm_pk_value *cands[3] = {o->u.object.args, o->u.object.state, o->u.object.items};
            if (next_obj_child < 3) {
                start = cands[next_obj_child++];
            } else {
                next_obj++;
                next_obj_child = 0;
            }
        }
        if (!start && next_obj >= nobjs) break;
    }
done:
    free(stk);
    free(objs);
    return st;
}

/* ---- The machine ------------------------------------------------------------------------ */

static tm_status run(parser *p, tm_pk_value **result) {
    for (;;) {
        p->in_op = 0;
        if (p->pos >= p->size)
            return perr(p, TM_ERROR_FORMAT, "truncated pickle (no STOP opcode at offset %zu)",
                        p->pos);
        p->op_pos = p->pos;
        p->op = rd_u8(p);
        p->in_op = 1;
        tm_pk_value *v = NULL, *w = NULL, *x = NULL;
        const char *s = NULL, *s2 = NULL;
        size_t len = 0, len2 = 0, base = 0, n = 0;
        uint64_t u = 0;
        switch (p->op) {
        case 0x80: /* PROTO */
            TRY(need(p, 1));
            u = rd_u8(p);
            if (u > 5) return perr(p, TM_ERROR_UNSUPPORTED, "pickle protocol %u", (unsigned)u);
            break;
        case 0x95: /* FRAME: framing only groups opcodes; contents are read as usual */
            TRY(need(p, 8));
            u = rd_le(p, 8);
            if (u > (uint64_t)left(p))
                return perr(p, TM_ERROR_FORMAT, "truncated pickle (frame of %llu bytes)",
                            (unsigned long long)u);
            break;
        case '.': /* STOP */
            TRY(pop(p, &v));
            *result = v;
            return TM_OK;
        case '(': TRY(push_mark(p)); break;
        case '0': /* POP: Python pops a MARK when the current stack is empty */
            if (stack_avail(p)) p->sp--;
            else if (p->nmarks) p->nmarks--;
            else return perr(p, TM_ERROR_FORMAT, "stack underflow");
            break;
        case '1': TRY(pop_mark(p, &base, &n)); break;
        case '2': TRY(top(p, &v)); TRY(push(p, v)); break;
        case 'N': TRY(push(p, p->none_v)); break;
        case 0x88: TRY(push(p, p->true_v)); break;
        case 0x89: TRY(push(p, p->false_v)); break;

        case 'I':
            TRY(read_line(p, &s, &len));
            /* Protocols 0–1 spell bools as INT 01 / 00 */
            if (len == 2 && s[0] == '0' && s[1] == '1') v = p->true_v;
            else if (len == 2 && s[0] == '0' && s[1] == '0') v = p->false_v;
            else TRY(int_from_text(p, s, len, &v));
            TRY(push(p, v));
            break;
        case 'J': {
            TRY(need(p, 4));
            uint32_t b = (uint32_t)rd_le(p, 4);
            int32_t sx;
            memcpy(&sx, &b, sizeof sx);
            TRY(new_int(p, sx, &v));
            TRY(push(p, v));
            break;
        }
        case 'K': TRY(need(p, 1)); TRY(new_int(p, rd_u8(p), &v)); TRY(push(p, v)); break;
        case 'M': TRY(need(p, 2)); TRY(new_int(p, (int64_t)rd_le(p, 2), &v)); TRY(push(p, v)); break;
        case 'L':
            TRY(read_line(p, &s, &len));
            if (len && s[len - 1] == 'L') len--;
            TRY(int_from_text(p, s, len, &v));
            TRY(push(p, v));
            break;
        case 0x8a: /* LONG1 */
            TRY(need(p, 1));
            u = rd_u8(p);
            TRY(need_len(p, u));
            TRY(int_from_le(p, p->data + p->pos, (size_t)u, &v));
            p->pos += (size_t)u;
            TRY(push(p, v));
            break;
        case 0x8b: { /* LONG4 */
            TRY(need(p, 4));
            uint32_t b = (uint32_t)rd_le(p, 4);
            if (b & 0x80000000u) return perr(p, TM_ERROR_FORMAT, "negative byte count");
            TRY(need_len(p, b));
            TRY(int_from_le(p, p->data + p->pos, b, &v));
            p->pos += b;
            TRY(push(p, v));
            break;
        }
        case 'F':
            TRY(read_line(p, &s, &len));
            TRY(float_from_text(p, s, len, &v));
            TRY(push(p, v));
            break;
        case 'G': {
            TRY(need(p, 8));
            uint64_t b = 0;
            for (int i = 0; i < 8; i++) b = (b << 8) | rd_u8(p);
            double d;
            memcpy(&d, &b, sizeof d);
            TRY(new_value(p, TM_PK_FLOAT, &v));
            v->u.real = d;
            TRY(push(p, v));
            break;
        }

        case 'S':
            TRY(read_line(p, &s, &len));
            TRY(decode_string_repr(p, s, len, &v));
            TRY(push(p, v));
            break;
        case 'V':
            TRY(read_line(p, &s, &len));
            TRY(decode_raw_unicode_escape(p, s, len, &v));
            TRY(push(p, v));
            break;
        case 'T': /* BINSTRING: signed 4-byte length */
        case 'X': /* BINUNICODE */
        case 'B': /* BINBYTES */
        case 'U': /* SHORT_BINSTRING */
        case 'C': /* SHORT_BINBYTES */
        case 0x8c: /* SHORT_BINUNICODE */
        case 0x8d: /* BINUNICODE8 */
        case 0x8e: /* BINBYTES8 */
        case 0x96: /* BYTEARRAY8 */ {
            int width = (p->op == 'U' || p->op == 'C' || p->op == 0x8c) ? 1
                        : (p->op == 0x8d || p->op == 0x8e || p->op == 0x96) ? 8 : 4;
            TRY(need(p, (size_t)width));
            u = rd_le(p, width);
            if (p->op == 'T' && (u & 0x80000000u))
                return perr(p, TM_ERROR_FORMAT, "negative string length");
            TRY(need_len(p, u));
            /* Python 2 str (STRING opcodes) is read as text, as torch.load does with
             * encoding='utf-8'; checkpoint keys written by Python 2 stay looked-up-able. */
            tm_pk_kind k = (p->op == 'B' || p->op == 'C' || p->op == 0x8e || p->op == 0x96)
                               ? TM_PK_BYTES : TM_PK_STRING;
            TRY(new_str(p, k, p->data + p->pos, (size_t)u, &v));
            p->pos += (size_t)u;
            TRY(push(p, v));
            break;
        }

        case ')': TRY(push(p, p->empty_tuple_v)); break;
        case 't':
            TRY(pop_mark(p, &base, &n));
            TRY(new_seq(p, TM_PK_TUPLE, p->stack + base, n, &v));
            TRY(push(p, v));
            break;
        case 0x85:
        case 0x86:
        case 0x87:
            n = (size_t)(p->op - 0x84);
            if (stack_avail(p) < n) return perr(p, TM_ERROR_FORMAT, "stack underflow");
            p->sp -= n;
            TRY(new_seq(p, TM_PK_TUPLE, p->stack + p->sp, n, &v));
            TRY(push(p, v));
            break;
        case ']': TRY(new_seq(p, TM_PK_LIST, NULL, 0, &v)); TRY(push(p, v)); break;
        case 'l':
            TRY(pop_mark(p, &base, &n));
            TRY(new_seq(p, TM_PK_LIST, p->stack + base, n, &v));
            TRY(push(p, v));
            break;
        case 'a':
            TRY(pop(p, &w));
            TRY(top(p, &v));
            TRY(append_items(p, v, &w, 1));
            break;
        case 'e':
            TRY(pop_mark(p, &base, &n));
            TRY(top(p, &v));
            TRY(append_items(p, v, p->stack + base, n));
            break;
        case '}': TRY(new_value(p, TM_PK_DICT, &v)); TRY(push(p, v)); break;
        case 'd':
            TRY(pop_mark(p, &base, &n));
            TRY(new_value(p, TM_PK_DICT, &v));
            TRY(set_items(p, v, p->stack + base, n));
            TRY(push(p, v));
            break;
        case 's': {
            tm_pk_value *kv[2] = {NULL, NULL};
            TRY(pop(p, &kv[1]));
            TRY(pop(p, &kv[0]));
            TRY(top(p, &v));
            TRY(set_items(p, v, kv, 2));
            break;
        }
        case 'u':
            TRY(pop_mark(p, &base, &n));
            TRY(top(p, &v));
            TRY(set_items(p, v, p->stack + base, n));
            break;
        case 0x8f: TRY(new_seq(p, TM_PK_SET, NULL, 0, &v)); TRY(push(p, v)); break;
        case 0x90:
            TRY(pop_mark(p, &base, &n));
            TRY(top(p, &v));
            if (v->kind != TM_PK_SET)
                return perr(p, TM_ERROR_FORMAT, "adding items to a %s", tm_pk_kind_name(v->kind));
            TRY(seq_extend(p, v, p->stack + base, n));
            break;
        case 0x91:
            TRY(pop_mark(p, &base, &n));
            TRY(new_seq(p, TM_PK_SET, p->stack + base, n, &v));
            TRY(push(p, v));
            break;

        case 'c':
            TRY(read_line(p, &s, &len));
            TRY(read_line(p, &s2, &len2));
            TRY(make_global(p, s, len, s2, len2, &v));
            TRY(push(p, v));
            break;
        case 0x93: /* STACK_GLOBAL */
            TRY(pop(p, &w));
            TRY(pop(p, &v));
            if (v->kind != TM_PK_STRING || w->kind != TM_PK_STRING)
                return perr(p, TM_ERROR_FORMAT, "module and name must be str");
            TRY(make_global(p, v->u.str.data, v->u.str.len, w->u.str.data, w->u.str.len, &x));
            TRY(push(p, x));
            break;
        case 'R':
            TRY(pop(p, &w));
            TRY(pop(p, &v));
            TRY(call(p, v, w, &x));
            TRY(push(p, x));
            break;
        case 0x81: /* NEWOBJ */
            TRY(pop(p, &w));
            TRY(pop(p, &v));
            if (w->kind != TM_PK_TUPLE)
                return perr(p, TM_ERROR_FORMAT, "arguments are a %s, not a tuple",
                            tm_pk_kind_name(w->kind));
            TRY(instantiate(p, v, w, &x));
            TRY(push(p, x));
            break;
        case 0x92: { /* NEWOBJ_EX: keyword arguments are dropped with the call */
            tm_pk_value *kw = NULL;
            TRY(pop(p, &kw));
            TRY(pop(p, &w));
            TRY(pop(p, &v));
            if (w->kind != TM_PK_TUPLE || kw->kind != TM_PK_DICT)
                return perr(p, TM_ERROR_FORMAT, "NEWOBJ_EX needs a tuple and a dict");
            TRY(instantiate(p, v, w, &x));
            TRY(push(p, x));
            break;
        }
        case 'i': /* INST */
            TRY(read_line(p, &s, &len));
            TRY(read_line(p, &s2, &len2));
            TRY(make_global(p, s, len, s2, len2, &v));
            TRY(pop_mark(p, &base, &n));
            TRY(new_seq(p, TM_PK_TUPLE, p->stack + base, n, &w));
            TRY(call(p, v, w, &x));
            TRY(push(p, x));
            break;
        case 'o': /* OBJ */
            TRY(pop_mark(p, &base, &n));
            if (!n) return perr(p, TM_ERROR_FORMAT, "stack underflow");
            v = p->stack[base];
            TRY(new_seq(p, TM_PK_TUPLE, p->stack + base + 1, n - 1, &w));
            TRY(call(p, v, w, &x));
            TRY(push(p, x));
            break;
        case 'b':
            TRY(pop(p, &w));
            TRY(top(p, &v));
            TRY(build(p, v, w));
            break;

        case 'P':
            TRY(read_line(p, &s, &len));
            return perr(p, TM_ERROR_UNSUPPORTED, "unsupported persistent id (a text id)");
        case 'Q':
            TRY(pop(p, &v));
            TRY(persistent_load(p, v, &x));
            TRY(push(p, x));
            break;

        case 'p':
            TRY(read_line(p, &s, &len));
            TRY(parse_index(p, s, len, &u));
            TRY(top(p, &v));
            TRY(memo_put(p, u, v));
            break;
        case 'q': TRY(need(p, 1)); u = rd_u8(p); TRY(top(p, &v)); TRY(memo_put(p, u, v)); break;
        case 'r': TRY(need(p, 4)); u = rd_le(p, 4); TRY(top(p, &v)); TRY(memo_put(p, u, v)); break;
        case 0x94: TRY(top(p, &v)); TRY(memo_put(p, p->memo_n, v)); break;
        case 'g':
            TRY(read_line(p, &s, &len));
            TRY(parse_index(p, s, len, &u));
            TRY(memo_get(p, u, &v));
            TRY(push(p, v));
            break;
        case 'h': TRY(need(p, 1)); TRY(memo_get(p, rd_u8(p), &v)); TRY(push(p, v)); break;
        case 'j': TRY(need(p, 4)); TRY(memo_get(p, rd_le(p, 4), &v)); TRY(push(p, v)); break;

        case 0x82:
        case 0x83:
        case 0x84:
            return perr(p, TM_ERROR_UNSUPPORTED, "extension registry codes are not supported");
        case 0x97:
        case 0x98:
            return perr(p, TM_ERROR_UNSUPPORTED, "out-of-band buffers are not supported");
        default:
            return perr(p, TM_ERROR_FORMAT, "unknown opcode");
        }
    }
}

void tm_pickle_limits_default(tm_pickle_limits *limits) {
    if (!limits) return;
    limits->max_depth = 1000;
    limits->max_memo = 1000000;
    limits->max_string = (size_t)256 * 1024 * 1024;
    limits->max_items = 50000000;
    limits->max_stack = 1000000;
}

static tm_status make_singletons(parser *p) {
    TRY(new_value(p, TM_PK_NONE, &p->none_v));
    TRY(new_value(p, TM_PK_BOOL, &p->true_v));
    p->true_v->u.boolean = 1;
    TRY(new_value(p, TM_PK_BOOL, &p->false_v));
    TRY(new_value(p, TM_PK_TUPLE, &p->empty_tuple_v));
    return TM_OK;
}

tm_status tm_pickle_load(const uint8_t *data, size_t size, const char *label,
                         const tm_pickle_limits *limits, tm_pickle **out, size_t *consumed,
                         tm_error *err) {
    if (out) *out = NULL;
    if (consumed) *consumed = 0;
    if (!out || (!data && size))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s%spickle: invalid argument",
                            label ? label : "", label && *label ? ": " : "");
    parser p;
    memset(&p, 0, sizeof p);
    p.data = data;
    p.size = size;
    p.label = label;
    p.err = err;
    if (limits) p.lim = *limits;
    else tm_pickle_limits_default(&p.lim);
    p.pk = calloc(1, sizeof(tm_pickle));
    /* The stack exists from the start: opcodes address p->stack + base even when empty. */
    p.stack_cap = 64;
    p.stack = malloc(p.stack_cap * sizeof(*p.stack));
    if (!p.pk || !p.stack) {
        free(p.pk);
        free(p.stack);
        return nomem(&p);
    }

    tm_pk_value *root = NULL;
    tm_status st = make_singletons(&p);
    if (st == TM_OK) st = run(&p, &root);
    if (st == TM_OK) {
        p.in_op = 0;
        st = check_graph(&p, root);
    }
    free(p.stack);
    free(p.marks);
    free(p.memo);
    free(p.memo_dense);
    free(p.storage_index);
    if (st != TM_OK) {
        free(p.storages);
        tm_pickle_free(p.pk);
        return st;
    }
    p.pk->root = root;
    p.pk->storages = p.storages;
    p.pk->nstorages = p.nstorages;
    *out = p.pk;
    if (consumed) *consumed = p.pos;
    return TM_OK;
}

const tm_pk_value *tm_pickle_root(const tm_pickle *pk) { return pk ? pk->root : NULL; }

size_t tm_pickle_n_storages(const tm_pickle *pk) { return pk ? pk->nstorages : 0; }

const tm_pk_value *tm_pickle_storage(const tm_pickle *pk, size_t i) {
    return pk && i < pk->nstorages ? &pk->storages[i]->v : NULL;
}

void tm_pickle_free(tm_pickle *pk) {
    if (!pk) return;
    free(pk->storages);
    arena_free(&pk->arena);
    free(pk);
}
