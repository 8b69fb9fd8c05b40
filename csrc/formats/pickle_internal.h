/* What the files of the safe unpickler share, and nothing outside them may use: the value
 * node and arena, the parser state, and the functions each file offers the others. The
 * unpickler is split by job, each file leaning only on this header:
 *
 *   pickle.c             the opcode machine: reads opcodes, runs the bounded stack/memo, loads
 *   pickle_values.c      the inert value tree: arena, constructors, dicts, container opcodes
 *   pickle_literals.c    decoding opcode arguments: decimal/LONG ints, floats, quoted text
 *   pickle_globals.c     the allowlist: which globals are refused, which mean something
 *   pickle_calls.c       what calling a recognised global builds (dict, set, bytes, copyreg…)
 *   pickle_tensors.c     storages from persistent ids and torch's tensor rebuild functions
 *   pickle_graph_check.c the final check that the tree is acyclic and not too deep
 *
 * Everything stays inside one tm_pickle arena and reports errors through pk_err, so a message
 * names the opcode and offset whichever file found the problem. C11. */
#ifndef TM_FORMATS_PICKLE_INTERNAL_H
#define TM_FORMATS_PICKLE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "formats/pickle.h"
#include "core/hash.h"

/* ---- Arena ---------------------------------------------------------------------------------- */

typedef struct arena_chunk arena_chunk;

typedef struct arena {
    arena_chunk *head; /* bump-allocated chunk; dedicated big chunks are linked behind it */
} arena;

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
    SP_PARAMETER_CLASS,/* torch.nn.parameter.Parameter (as _rebuild_from_type_v2's new_type) */
    SP_REBUILD_QTENSOR,/* torch._utils._rebuild_qtensor */
    SP_DILL_LOAD_TYPE  /* dill._dill._load_type(name): a placeholder once name is checked */
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

/* ---- Small predicates on values, used by several files -------------------------------------- */

static inline int str_is(const tm_pk_value *v, const char *s) {
    size_t n = strlen(s);
    return v && v->kind == TM_PK_STRING && v->u.str.len == n && memcmp(v->u.str.data, s, n) == 0;
}

static inline int is_seq(const tm_pk_value *v) {
    return v->kind == TM_PK_TUPLE || v->kind == TM_PK_LIST;
}

/* ---- pickle.c: errors carry the opcode and offset being run -------------------------------- */

tm_status pk_err(parser *p, tm_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
tm_status pk_nomem(parser *p);
/* Doubles a malloc'd array (to first when it is empty): the new array, or NULL (then *cap and
 * the old array are unchanged). */
void *pk_grow(void *array, size_t *cap, size_t elem_size, size_t first);

/* ---- pickle_values.c --------------------------------------------------------------------- */

void pk_arena_free(arena *a);
tm_status pk_count_items(parser *p, size_t n);
void *pk_alloc(parser *p, size_t size);
tm_status pk_new_value(parser *p, tm_pk_kind kind, tm_pk_value **out);
tm_status pk_strdup(parser *p, const void *s, size_t len, char **out);
tm_status pk_new_str(parser *p, tm_pk_kind kind, const void *s, size_t len, tm_pk_value **out);
tm_status pk_new_int(parser *p, int64_t x, tm_pk_value **out);
tm_status pk_new_seq(parser *p, tm_pk_kind kind, tm_pk_value *const *items, size_t n,
                     tm_pk_value **out);
tm_status pk_seq_extend(parser *p, tm_pk_value *s, tm_pk_value *const *items, size_t n);
tm_status pk_dict_set(parser *p, tm_pk_value *d, tm_pk_value *k, tm_pk_value *v);
/* APPEND(S), SETITEM(S), BUILD on the value at the top of the stack. */
tm_status pk_append_items(parser *p, tm_pk_value *target, tm_pk_value *const *items, size_t n);
tm_status pk_set_items(parser *p, tm_pk_value *target, tm_pk_value *const *items, size_t n);
tm_status pk_build(parser *p, tm_pk_value *inst, tm_pk_value *state);

/* ---- pickle_literals.c --------------------------------------------------------------------- */

tm_status pk_int_from_le(parser *p, const uint8_t *b, size_t n, tm_pk_value **out);
tm_status pk_int_from_text(parser *p, const char *s, size_t len, tm_pk_value **out);
tm_status pk_parse_index(parser *p, const char *s, size_t len, uint64_t *out);
tm_status pk_float_from_text(parser *p, const char *s, size_t len, tm_pk_value **out);
tm_status pk_decode_string_repr(parser *p, const char *s, size_t len, tm_pk_value **out);
tm_status pk_decode_raw_unicode_escape(parser *p, const char *s, size_t len, tm_pk_value **out);

/* ---- pickle_globals.c ---------------------------------------------------------------------- */

/* GLOBAL / STACK_GLOBAL / INST: validates, refuses, classifies. */
tm_status pk_make_global(parser *p, const char *m, size_t mlen, const char *n, size_t nlen,
                         tm_pk_value **out);

/* ---- pickle_calls.c ------------------------------------------------------------------------ */

/* cls.__new__(cls, *args): NEWOBJ, NEWOBJ_EX, copyreg._reconstructor / __newobj__. */
tm_status pk_instantiate(parser *p, const tm_pk_value *cls, tm_pk_value *args, tm_pk_value **out);
/* func(*args): REDUCE, INST, OBJ. */
tm_status pk_call(parser *p, const tm_pk_value *fn, tm_pk_value *args, tm_pk_value **out);

/* ---- pickle_tensors.c ---------------------------------------------------------------------- */

/* BINPERSID: a storage (interned per key and dtype) or a legacy module record. */
tm_status pk_persistent_load(parser *p, tm_pk_value *pid, tm_pk_value **out);
/* Calls one of the torch._utils tensor rebuild functions (fn's special is SP_REBUILD_*). */
tm_status pk_tensor_call(parser *p, const tm_pk_value *fn, const tm_pk_value *args,
                         tm_pk_value **out);
/* data as an nn.Parameter; rg (may be NULL: keep data's) is its requires_grad. */
tm_status pk_as_parameter(parser *p, const tm_pk_value *data, const tm_pk_value *rg,
                          tm_pk_value **out);

/* ---- pickle_graph_check.c ----------------------------------------------------------------- */

tm_status pk_check_graph(parser *p, tm_pk_value *root);

#endif
