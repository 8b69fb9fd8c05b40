/* A safe unpickler for PyTorch checkpoints. It executes nothing: it runs the pickle stack
 * machine (protocols 0–5) into an inert value tree. Only the globals torch checkpoints use have
 * a meaning (OrderedDict, torch._utils._rebuild_tensor{,_v2,_v3}, _rebuild_parameter,
 * _rebuild_qtensor, torch.*Storage, _codecs.encode); other globals become inert placeholders, so a checkpoint
 * that also pickles e.g. argparse.Namespace still yields its tensors; globals that can run
 * code (os.system, builtins.eval, subprocess.*, …) are refused outright. Resource bounds are
 * enforced (see tm_pickle_limits). C11. */
#ifndef TM_FORMATS_PICKLE_H
#define TM_FORMATS_PICKLE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tm_pk_kind {
    TM_PK_NONE,
    TM_PK_BOOL,
    TM_PK_INT,     /* fits int64 */
    TM_PK_BIGINT,  /* LONG1/LONG4 too wide for int64: raw little-endian two's complement bytes */
    TM_PK_FLOAT,
    TM_PK_STRING,  /* UTF-8 text (unicode) */
    TM_PK_BYTES,   /* bytes / bytearray / protocol-2 latin-1 str */
    TM_PK_TUPLE,
    TM_PK_LIST,
    TM_PK_DICT,    /* dict and OrderedDict; insertion order kept */
    TM_PK_SET,     /* set / frozenset (items in seq) */
    TM_PK_GLOBAL,  /* a class or function reference (module, name) */
    TM_PK_OBJECT,  /* result of calling/instantiating a placeholder global */
    TM_PK_STORAGE, /* a torch storage from a persistent id */
    TM_PK_TENSOR
} tm_pk_kind;

/* Python's word for a kind ("int", "dict", …), for error messages. */
const char *tm_pk_kind_name(tm_pk_kind k);

typedef struct tm_pk_value tm_pk_value;

struct tm_pk_value {
    tm_pk_kind kind;
    union {
        int boolean;
        int64_t integer;
        double real;
        struct { const char *data; size_t len; } str;          /* STRING, BYTES, BIGINT; data NUL-terminated */
        struct { tm_pk_value **items; size_t n, cap; } seq;    /* TUPLE, LIST, SET */
        struct { tm_pk_value **keys, **values; size_t n, cap; } dict;
        struct { const char *module, *name; } global;          /* GLOBAL */
        struct {
            const char *module, *name; /* the class/callable */
            tm_pk_value *args;         /* TUPLE given to REDUCE/NEWOBJ/INST/OBJ (may be empty) */
            tm_pk_value *state;        /* from BUILD, or NULL */
            tm_pk_value *items;        /* LIST of APPENDed items / DICT of SETITEMs, or NULL */
        } object;
        struct {
            int has_dtype;        /* 0 for torch.storage.UntypedStorage (dtype comes from the tensor) */
            tm_dtype dtype;       /* from torch.FloatStorage etc. */
            const char *key;      /* storage key ("0", "94392...") */
            const char *location; /* "cpu", "cuda:0", … */
            int64_t numel;        /* in elements of dtype (in bytes for UntypedStorage) */
        } storage;
        struct {
            tm_pk_value *storage; /* a TM_PK_STORAGE */
            tm_dtype dtype;
            int64_t offset;       /* in elements */
            int32_t ndim;
            int64_t *shape, *stride;
            int requires_grad;
            int is_parameter;     /* came through _rebuild_parameter */
            /* torch._utils._rebuild_qtensor: dtype is TM_QINT8/TM_QUINT8/TM_QINT32 and the
             * integers stand for scale·(q − zero_point), per tensor or per channel along
             * q_axis. Per channel, the scales and zero points are tensors (q_scales_t,
             * q_zero_points_t, TM_PK_TENSOR, shape[q_axis] elements each) or, in older files,
             * lists already read into q_scales / q_zero_points (shape[q_axis] doubles). */
            tm_qscheme qscheme;
            double q_scale;
            int64_t q_zero_point;
            int32_t q_axis;
            const tm_pk_value *q_scales_t, *q_zero_points_t;
            const double *q_scales, *q_zero_points;
        } tensor;
    } u;
};

typedef struct tm_pickle_limits {
    size_t max_depth;        /* container nesting depth (MARK / nested tuples, lists, dicts) */
    size_t max_memo;         /* distinct memo slots */
    size_t max_string;       /* bytes in one string/bytes value */
    size_t max_items;        /* total values created */
    size_t max_stack;        /* stack length */
} tm_pickle_limits;

/* Defaults documented in the README's security section. */
void tm_pickle_limits_default(tm_pickle_limits *limits);

typedef struct tm_pickle tm_pickle; /* owns every value of one unpickled stream (an arena) */

/* Unpickles one pickle starting at data[0] and ending at its STOP opcode. *consumed (may be
 * NULL) receives the bytes used, so legacy files holding several pickles in a row can be read
 * one after another. label prefixes error messages. limits may be NULL (defaults). */
tm_status tm_pickle_load(const uint8_t *data, size_t size, const char *label,
                         const tm_pickle_limits *limits, tm_pickle **out, size_t *consumed,
                         tm_error *err);
const tm_pk_value *tm_pickle_root(const tm_pickle *pk);
/* Every distinct TM_PK_STORAGE the persistent ids created, one per (key, dtype), in order of
 * first appearance (including storages not reachable from the root). Legacy torch.save files
 * need them: the element size of the first one seen for a key sizes its raw bytes. */
size_t tm_pickle_n_storages(const tm_pickle *pk);
const tm_pk_value *tm_pickle_storage(const tm_pickle *pk, size_t i); /* NULL when out of range */
void tm_pickle_free(tm_pickle *pk);

/* Dict lookup by string key; NULL when absent or d is not a dict. */
const tm_pk_value *tm_pk_dict_get(const tm_pk_value *d, const char *key);

#ifdef __cplusplus
}
#endif
#endif
