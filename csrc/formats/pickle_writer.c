/* Emits the data.pkl of torch.save({name: tensor, ...}) byte for byte as Python does at
 * protocol 2 (same opcodes, same memoization), except that every batch of items uses MARK +
 * SETITEMS, so there is a single code path for LibTorch's reader to accept. */
#include "formats/pickle_writer.h"

#include "core/name_map.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct writer {
    tm_byte_buffer *out;
    uint32_t next_memo;
    int failed;
    /* memo indices of objects Python's pickler would memoize once and fetch afterwards */
    int64_t memo_storage_str, memo_cpu_str, memo_rebuild, memo_odict;
    int64_t memo_storage_type[TM_DTYPE_COUNT];
    tm_name_map key_memo; /* storage key -> memo index of its key string (tensors sharing a storage) */
} writer;

static void put(writer *w, const void *data, size_t n) {
    if (w->failed || !n) return;
    tm_byte_buffer *b = w->out;
    if (n > SIZE_MAX - b->size) {
        w->failed = 1;
        return;
    }
    if (b->size + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->size + n) {
            if (cap > SIZE_MAX / 2) { cap = b->size + n; break; }
            cap *= 2;
        }
        uint8_t *d = realloc(b->data, cap);
        if (!d) {
            w->failed = 1;
            return;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->size, data, n);
    b->size += n;
}

static void put1(writer *w, uint8_t c) { put(w, &c, 1); }

static void put_le(writer *w, uint64_t x, int n) {
    uint8_t b[8];
    for (int i = 0; i < n; i++) b[i] = (uint8_t)(x >> (8 * i));
    put(w, b, (size_t)n);
}

/* BINPUT below 256, LONG_BINPUT above, like pickle.Pickler.put */
static uint32_t memoize(writer *w) {
    uint32_t idx = w->next_memo++;
    if (idx < 256) {
        put1(w, 'q');
        put1(w, (uint8_t)idx);
    } else {
        put1(w, 'r');
        put_le(w, idx, 4);
    }
    return idx;
}

static void get(writer *w, uint32_t idx) {
    if (idx < 256) {
        put1(w, 'h');
        put1(w, (uint8_t)idx);
    } else {
        put1(w, 'j');
        put_le(w, idx, 4);
    }
}

/* Python's save_long at protocol 2 */
static void put_int(writer *w, int64_t x) {
    if (x >= 0 && x <= 0xff) {
        put1(w, 'K');
        put1(w, (uint8_t)x);
    } else if (x >= 0 && x <= 0xffff) {
        put1(w, 'M');
        put_le(w, (uint64_t)x, 2);
    } else if (x >= INT32_MIN && x <= INT32_MAX) {
        put1(w, 'J');
        put_le(w, (uint64_t)x, 4);
    } else {
        /* LONG1 with the minimal two's complement encoding (pickle.encode_long) */
        uint8_t b[8];
        uint64_t u = (uint64_t)x;
        for (int i = 0; i < 8; i++) b[i] = (uint8_t)(u >> (8 * i));
        int n = 8;
        while (n > 1 && ((b[n - 1] == 0x00 && !(b[n - 2] & 0x80)) ||
                         (b[n - 1] == 0xff && (b[n - 2] & 0x80))))
            n--;
        put1(w, 0x8a);
        put1(w, (uint8_t)n);
        put(w, b, (size_t)n);
    }
}

static void put_unicode(writer *w, const char *s, size_t n) {
    put1(w, 'X');
    put_le(w, n, 4);
    put(w, s, n);
}

static void put_global(writer *w, const char *module, const char *name) {
    put1(w, 'c');
    put(w, module, strlen(module));
    put1(w, '\n');
    put(w, name, strlen(name));
    put1(w, '\n');
}

/* A memoized-once object: first use writes it and BINPUTs, later uses BINGET. */
#define ONCE(w, slot, emit)                                                                    \
    do {                                                                                       \
        if ((slot) >= 0) {                                                                     \
            get((w), (uint32_t)(slot));                                                        \
        } else {                                                                               \
            emit;                                                                              \
            (slot) = memoize(w);                                                               \
        }                                                                                      \
    } while (0)

static void put_dims(writer *w, int32_t ndim, const int64_t *v) {
    if (ndim == 0) {
        put1(w, ')'); /* EMPTY_TUPLE is never memoized */
        return;
    }
    if (ndim > 3) put1(w, '(');
    for (int32_t i = 0; i < ndim; i++) put_int(w, v[i]);
    put1(w, ndim > 3 ? 't' : (uint8_t)(0x84 + ndim));
    memoize(w);
}

static const char *storage_type_name(tm_dtype d) {
    switch (d) {
    case TM_FLOAT64: return "DoubleStorage";
    case TM_FLOAT32: return "FloatStorage";
    case TM_FLOAT16: return "HalfStorage";
    case TM_BFLOAT16: return "BFloat16Storage";
    case TM_COMPLEX64: return "ComplexFloatStorage";
    case TM_COMPLEX128: return "ComplexDoubleStorage";
    case TM_INT64: return "LongStorage";
    case TM_INT32: return "IntStorage";
    case TM_INT16: return "ShortStorage";
    case TM_INT8: return "CharStorage";
    case TM_UINT8: return "ByteStorage";
    case TM_BOOL: return "BoolStorage";
    default: return NULL;
    }
}

static int utf8_valid(const char *str) {
    const unsigned char *s = (const unsigned char *)str;
    while (*s) {
        unsigned c = *s, n;
        uint32_t cp;
        if (c < 0x80) { s++; continue; }
        if ((c & 0xe0) == 0xc0) { n = 1; cp = c & 0x1f; }
        else if ((c & 0xf0) == 0xe0) { n = 2; cp = c & 0x0f; }
        else if ((c & 0xf8) == 0xf0) { n = 3; cp = c & 0x07; }
        else return 0;
        for (unsigned i = 1; i <= n; i++) {
            if ((s[i] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (s[i] & 0x3f);
        }
        if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        s += n + 1;
    }
    return 1;
}

static tm_status check_tensor(const tm_pk_out_tensor *t, size_t i, tm_error *err) {
    if (!t->name) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "pickle writer: tensor %zu has no name", i);
    if (strlen(t->name) > UINT32_MAX || !utf8_valid(t->name))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "pickle writer: tensor %zu: name is not valid UTF-8", i);
    if (!storage_type_name(t->dtype))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "pickle writer: tensor '%s': bad dtype",
                            t->name);
    if (t->ndim < 0 || t->ndim > TM_MAX_NDIM || (t->ndim && (!t->shape || !t->stride)))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "pickle writer: tensor '%s': bad shape", t->name);
    for (int32_t d = 0; d < t->ndim; d++)
        if (t->shape[d] < 0 || t->stride[d] < 0)
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                "pickle writer: tensor '%s': negative size or stride", t->name);
    if (!t->storage_key || !*t->storage_key || strchr(t->storage_key, '/') ||
        !utf8_valid(t->storage_key) || strlen(t->storage_key) > UINT32_MAX)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "pickle writer: tensor '%s': bad storage key", t->name);
    if (t->storage_offset < 0 || t->storage_numel < 0)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "pickle writer: tensor '%s': bad storage offset or size", t->name);
    /* torch.load would reject (or worse, read past) a view beyond its storage */
    int64_t last = t->storage_offset, span;
    int empty = 0;
    for (int32_t d = 0; d < t->ndim; d++) {
        if (t->shape[d] == 0) empty = 1;
        else if (__builtin_mul_overflow(t->shape[d] - 1, t->stride[d], &span) ||
                 __builtin_add_overflow(last, span, &last))
            last = INT64_MAX;
    }
    if (!empty && last >= t->storage_numel)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "pickle writer: tensor '%s': view exceeds its storage of %lld elements",
                            t->name, (long long)t->storage_numel);
    return TM_OK;
}

/* Python batches SETITEMS by this many items (pickle._Pickler._BATCHSIZE) */
#define BATCH 1000

tm_status tm_pickle_write_state_dict(const tm_pk_out_tensor *tensors, size_t n,
                                     tm_byte_buffer *out, tm_error *err) {
    if (!out || (n && !tensors))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "pickle writer: invalid argument");
    /* each tensor takes at most 10 memo slots; keep LONG_BINPUT's uint32 index in range */
    if (n > 100000000)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "pickle writer: too many tensors");
    for (size_t i = 0; i < n; i++) {
        tm_status st = check_tensor(&tensors[i], i, err);
        if (st != TM_OK) return st;
    }
    writer w;
    memset(&w, 0, sizeof w);
    w.out = out;
    w.memo_storage_str = w.memo_cpu_str = w.memo_rebuild = w.memo_odict = -1;
    for (int d = 0; d < TM_DTYPE_COUNT; d++) w.memo_storage_type[d] = -1;
    size_t start = out->size;
    /* Reserved for every key up front, so no insert below can run out of memory. */
    if (tm_name_map_reserve(&w.key_memo, n)) return tm_error_set(err, TM_ERROR_NOMEM, "pickle writer: out of memory");

    put1(&w, 0x80);
    put1(&w, 2);
    put1(&w, '}');
    memoize(&w);
    for (size_t b = 0; b < n; b += BATCH) {
        size_t end = n - b > BATCH ? b + BATCH : n;
        put1(&w, '(');
        for (size_t i = b; i < end; i++) {
            const tm_pk_out_tensor *t = &tensors[i];
            put_unicode(&w, t->name, strlen(t->name));
            memoize(&w);
            ONCE(&w, w.memo_rebuild, put_global(&w, "torch._utils", "_rebuild_tensor_v2"));
            put1(&w, '(');
            /* persistent id ('storage', torch.XStorage, key, 'cpu', numel) */
            put1(&w, '(');
            ONCE(&w, w.memo_storage_str, put_unicode(&w, "storage", 7));
            ONCE(&w, w.memo_storage_type[t->dtype],
                 put_global(&w, "torch", storage_type_name(t->dtype)));
            size_t km = 0;
            if (tm_name_map_find(&w.key_memo, t->storage_key, &km)) {
                get(&w, (uint32_t)km);
            } else {
                put_unicode(&w, t->storage_key, strlen(t->storage_key));
                tm_name_map_insert(&w.key_memo, t->storage_key, memoize(&w), NULL);
            }
            ONCE(&w, w.memo_cpu_str, put_unicode(&w, "cpu", 3));
            put_int(&w, t->storage_numel);
            put1(&w, 't');
            memoize(&w);
            put1(&w, 'Q');
            put_int(&w, t->storage_offset);
            put_dims(&w, t->ndim, t->shape);
            put_dims(&w, t->ndim, t->stride);
            put1(&w, 0x89); /* requires_grad=False */
            ONCE(&w, w.memo_odict, put_global(&w, "collections", "OrderedDict"));
            put1(&w, ')');
            put1(&w, 'R');
            memoize(&w); /* backward_hooks */
            put1(&w, 't');
            memoize(&w);
            put1(&w, 'R');
            memoize(&w);
        }
        put1(&w, 'u');
    }
    put1(&w, '.');

    tm_name_map_free(&w.key_memo);
    if (w.failed) {
        out->size = start;
        return tm_error_set(err, TM_ERROR_NOMEM, "pickle writer: out of memory");
    }
    return TM_OK;
}
