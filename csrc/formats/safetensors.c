/* safetensors reader and writer. The reader follows the reference implementation's
 * validation (safetensors/src/tensor.rs: read_metadata and Metadata::validate) and is stricter
 * where cJSON is looser than serde_json: the header must be valid UTF-8, strings may not hold
 * raw control characters or an escaped NUL (cJSON would silently cut the string there),
 * duplicate keys are refused (cJSON keeps both), and only whitespace may follow the JSON
 * object. JSON numbers arrive as doubles, so integers must be exact: below 2^53. */
#define _POSIX_C_SOURCE 200809L /* strdup */
#include "formats/safetensors.h"

#include "core/name_map.h"

#include "core/output_stream.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned long long ull;

/* JSON numbers are doubles in cJSON: every integer below this converts exactly. */
#define EXACT_INT_LIMIT 9007199254740992.0 /* 2^53 */
#define MAX_EXACT_INT ((uint64_t)1 << 53)

#define METADATA_KEY "__metadata__"

/* ---- Dtype names ---------------------------------------------------------------------- */

static const char *const st_dtype_names[TM_DTYPE_COUNT] = {
    [TM_FLOAT64] = "F64", [TM_FLOAT32] = "F32", [TM_FLOAT16] = "F16",
    [TM_BFLOAT16] = "BF16", [TM_COMPLEX64] = "C64", [TM_COMPLEX128] = NULL,
    [TM_INT64] = "I64",   [TM_INT32] = "I32",   [TM_INT16] = "I16",
    [TM_INT8] = "I8",     [TM_UINT8] = "U8",    [TM_BOOL] = "BOOL",
    [TM_QINT8] = NULL,    [TM_QUINT8] = NULL,   [TM_QINT32] = NULL, /* no scale/zero point */
};
/* A new tm_dtype must be given its safetensors name (or NULL) above. */
_Static_assert(TM_DTYPE_COUNT == 15, "update st_dtype_names for the new dtype");

/* Valid safetensors dtypes that torchmerge has no tm_dtype for. */
static const char *const st_unsupported_dtypes[] = {
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "U16", "U32", "U64",
};

const char *tm_safetensors_dtype_string(tm_dtype d) {
    return (unsigned)d < TM_DTYPE_COUNT ? st_dtype_names[d] : NULL;
}

/* Copies s for a one-line message: control characters become \xNN, long strings are cut (at a
 * UTF-8 character boundary) and end with "...". */
#define SHOW_MAX 160
static const char *show(const char *s, char buf[SHOW_MAX]) {
    size_t o = 0;
    if (!s) s = "(null)";
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (o + 8 >= SHOW_MAX) {
            while (o > 0 && ((unsigned char)buf[o - 1] & 0xC0) == 0x80) o--;
            if (o > 0 && ((unsigned char)buf[o - 1] & 0xC0) == 0xC0) o--;
            memcpy(buf + o, "...", 4);
            return buf;
        }
        if (c < 0x20 || c == 0x7F) {
            snprintf(buf + o, SHOW_MAX - o, "\\x%02X", c);
            o += 4;
        } else {
            buf[o++] = (char)c;
        }
    }
    buf[o] = '\0';
    return buf;
}

tm_status tm_safetensors_dtype_from_string(const char *s, tm_dtype *out, tm_error *err) {
    char shown[SHOW_MAX];
    if (!s || !out)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "safetensors dtype: NULL argument");
    for (int i = 0; i < TM_DTYPE_COUNT; i++)
        if (st_dtype_names[i] && strcmp(s, st_dtype_names[i]) == 0) {
            *out = (tm_dtype)i;
            return TM_OK;
        }
    for (size_t i = 0; i < sizeof st_unsupported_dtypes / sizeof st_unsupported_dtypes[0]; i++)
        if (strcmp(s, st_unsupported_dtypes[i]) == 0)
            return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                                "dtype %s is not supported by this LibTorch", s);
    return tm_error_set(err, TM_ERROR_UNSUPPORTED, "unknown dtype '%s'", show(s, shown));
}

/* ---- Small helpers ---------------------------------------------------------------------- */

static uint64_t rd64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void wr64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Length of the valid UTF-8 prefix of s[0..n) (n when all valid): no overlong forms, no
 * surrogates, nothing above U+10FFFF. */
static size_t utf8_valid_prefix(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t len;
        uint32_t cp, min;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1Fu; min = 0x80; }
        else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0Fu; min = 0x800; }
        else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07u; min = 0x10000; }
        else return i;
        if (n - i < len) return i;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return i;
            cp = (cp << 6) | (s[i + k] & 0x3Fu);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
        i += len;
    }
    return n;
}

static int utf8_valid(const char *s) {
    size_t n = strlen(s);
    return utf8_valid_prefix((const uint8_t *)s, n) == n;
}

/* Index of key in m, or -1. Maps here are reserved for every key before the first insert, so an
 * insert cannot run out of memory: it returns 0 (added) or 1 (a duplicate). */
static int64_t index_find(const tm_name_map *m, const char *key) {
    size_t i;
    return tm_name_map_find(m, key, &i) ? (int64_t)i : -1;
}

static const char *json_kind(const cJSON *item) {
    if (cJSON_IsObject(item)) return "an object";
    if (cJSON_IsArray(item)) return "an array";
    if (cJSON_IsString(item)) return "a string";
    if (cJSON_IsNumber(item)) return "a number";
    if (cJSON_IsBool(item)) return "a boolean";
    if (cJSON_IsNull(item)) return "null";
    return "an invalid value";
}

typedef enum num_check {
    NUM_OK,
    NUM_NOT_NUMBER,
    NUM_NEGATIVE,
    NUM_FRACTIONAL,
    NUM_TOO_LARGE
} num_check;

/* A JSON number that is a non-negative integer small enough to be exact in a double. */
static num_check get_uint(const cJSON *item, uint64_t *out) {
    if (!cJSON_IsNumber(item)) return NUM_NOT_NUMBER;
    double d = item->valuedouble;
    if (isnan(d)) return NUM_FRACTIONAL;
    if (signbit(d)) return NUM_NEGATIVE;
    if (!(d < EXACT_INT_LIMIT)) return NUM_TOO_LARGE;
    uint64_t v = (uint64_t)d;
    if ((double)v != d) return NUM_FRACTIONAL;
    *out = v;
    return NUM_OK;
}

/* "is -1, not a non-negative integer" etc., for "<what> <this>". */
static void describe_bad_number(const cJSON *item, num_check why, char *buf, size_t size) {
    switch (why) {
    case NUM_NOT_NUMBER:
        snprintf(buf, size, "is %s, not an integer", json_kind(item));
        break;
    case NUM_NEGATIVE:
        snprintf(buf, size, "is %.17g; it must not be negative", item->valuedouble);
        break;
    case NUM_FRACTIONAL:
        snprintf(buf, size, "is %.17g, not an integer", item->valuedouble);
        break;
    case NUM_TOO_LARGE:
        snprintf(buf, size, "is %.17g, too large (integers must be below 2^53)",
                 item->valuedouble);
        break;
    default:
        snprintf(buf, size, "is invalid");
    }
}

/* "[2, 3]" */
static const char *format_shape(const int64_t *shape, int32_t ndim, char *buf, size_t size) {
    size_t o = 0;
    buf[0] = '\0';
    o += (size_t)snprintf(buf, size, "[");
    for (int32_t i = 0; i < ndim && o < size; i++)
        o += (size_t)snprintf(buf + o, size - o, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (o < size) snprintf(buf + o, size - o, "]");
    return buf;
}

/* ---- Reader ----------------------------------------------------------------------------- */

struct tm_safetensors {
    const uint8_t *data;
    uint64_t data_offset, data_size;
    tm_st_tensor *tensors;
    size_t count;
    char **meta_keys, **meta_values;
    size_t n_meta;
    tm_name_map names;
    tm_name_map meta_index;
};

int tm_safetensors_looks_like(const uint8_t *data, size_t size) {
    if (!data || size < 9) return 0;
    uint64_t n = rd64(data);
    return n <= (uint64_t)(size - 8) && n > 0 && data[8] == '{';
}

void tm_safetensors_free(tm_safetensors *st) {
    if (!st) return;
    for (size_t i = 0; i < st->count; i++) free((char *)st->tensors[i].name);
    free(st->tensors);
    for (size_t i = 0; i < st->n_meta; i++) {
        free(st->meta_keys[i]);
        free(st->meta_values[i]);
    }
    free(st->meta_keys);
    free(st->meta_values);
    tm_name_map_free(&st->names);
    tm_name_map_free(&st->meta_index);
    free(st);
}

size_t tm_safetensors_count(const tm_safetensors *st) { return st ? st->count : 0; }

const tm_st_tensor *tm_safetensors_tensor(const tm_safetensors *st, size_t i) {
    return st && i < st->count ? &st->tensors[i] : NULL;
}

int64_t tm_safetensors_find(const tm_safetensors *st, const char *name) {
    return st ? index_find(&st->names, name) : -1;
}

const uint8_t *tm_safetensors_tensor_data(const tm_safetensors *st, size_t i) {
    if (!st || i >= st->count) return NULL;
    return st->data + st->data_offset + st->tensors[i].begin;
}

uint64_t tm_safetensors_data_offset(const tm_safetensors *st) { return st ? st->data_offset : 0; }
uint64_t tm_safetensors_data_size(const tm_safetensors *st) { return st ? st->data_size : 0; }
size_t tm_safetensors_metadata_count(const tm_safetensors *st) { return st ? st->n_meta : 0; }

const char *tm_safetensors_metadata_key(const tm_safetensors *st, size_t i) {
    return st && i < st->n_meta ? st->meta_keys[i] : NULL;
}

const char *tm_safetensors_metadata_value(const tm_safetensors *st, size_t i) {
    return st && i < st->n_meta ? st->meta_values[i] : NULL;
}

const char *tm_safetensors_metadata_find(const tm_safetensors *st, const char *key) {
    if (!st) return NULL;
    int64_t i = index_find(&st->meta_index, key);
    return i < 0 ? NULL : st->meta_values[i];
}

/* Checks what cJSON does not: no raw control characters inside strings (nor any outside
 * except JSON whitespace; cJSON skips every byte <= 0x20 as whitespace) and no \u0000 escape
 * (cJSON would end the C string there, so "a\u0000b" would read as "a"). Expects UTF-8. */
static tm_status scan_header_bytes(const uint8_t *h, size_t n, const char *label, tm_error *err) {
    int in_string = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = h[i];
        if (in_string) {
            if (c == '"') {
                in_string = 0;
            } else if (c == '\\') {
                if (i + 5 < n && h[i + 1] == 'u' && memcmp(h + i + 2, "0000", 4) == 0)
                    return tm_error_set(err, TM_ERROR_FORMAT,
                                        "%s: header has a string with an escaped NUL "
                                        "character (\\u0000) at byte %zu",
                                        label, i);
                i++; /* the escaped character cannot end the string */
            } else if (c < 0x20) {
                return tm_error_set(err, TM_ERROR_FORMAT,
                                    "%s: header has a raw control character (0x%02X) inside a "
                                    "string at byte %zu",
                                    label, c, i);
            }
        } else if (c == '"') {
            in_string = 1;
        } else if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') {
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: header has an invalid byte 0x%02X at byte %zu", label, c,
                                i);
        }
    }
    return TM_OK;
}

static tm_status read_metadata(tm_safetensors *st, const cJSON *meta, const char *label,
                               tm_error *err) {
    char shown[SHOW_MAX];
    if (!cJSON_IsObject(meta))
        return tm_error_set(err, TM_ERROR_FORMAT, "%s: " METADATA_KEY " is %s, not an object",
                            label, json_kind(meta));
    size_t n = 0;
    for (const cJSON *e = meta->child; e; e = e->next) n++;
    st->meta_keys = calloc(n ? n : 1, sizeof *st->meta_keys);
    st->meta_values = calloc(n ? n : 1, sizeof *st->meta_values);
    if (!st->meta_keys || !st->meta_values || tm_name_map_reserve(&st->meta_index, n))
        return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory reading " METADATA_KEY,
                            label);
    for (const cJSON *e = meta->child; e; e = e->next) {
        if (!cJSON_IsString(e) || !e->valuestring)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: " METADATA_KEY " entry '%s' is %s, not a string", label,
                                show(e->string, shown), json_kind(e));
        char *k = strdup(e->string), *v = strdup(e->valuestring);
        if (!k || !v) {
            free(k);
            free(v);
            return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory reading " METADATA_KEY,
                                label);
        }
        st->meta_keys[st->n_meta] = k;
        st->meta_values[st->n_meta] = v;
        st->n_meta++;
        if (tm_name_map_insert(&st->meta_index, k, st->n_meta - 1, NULL) != 0)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: " METADATA_KEY " has the key '%s' twice", label,
                                show(k, shown));
    }
    return TM_OK;
}

/* Fills t (whose name is already set) from the tensor's JSON object. */
static tm_status read_tensor(tm_st_tensor *t, const cJSON *obj, uint64_t data_size,
                             const char *label, tm_error *err) {
    char name[SHOW_MAX], why[128], shape_str[TM_MAX_NDIM * 22 + 8];
    show(t->name, name);
    if (!cJSON_IsObject(obj))
        return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor '%s': entry is %s, not an object",
                            label, name, json_kind(obj));
    const cJSON *dtype = NULL, *shape = NULL, *offsets = NULL;
    for (const cJSON *f = obj->child; f; f = f->next) {
        const cJSON **slot = strcmp(f->string, "dtype") == 0          ? &dtype
                             : strcmp(f->string, "shape") == 0        ? &shape
                             : strcmp(f->string, "data_offsets") == 0 ? &offsets
                                                                      : NULL;
        if (!slot) continue; /* unknown fields are ignored, as by the reference */
        if (*slot)
            return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor '%s': \"%s\" appears twice",
                                label, name, f->string);
        *slot = f;
    }
    if (!dtype || !shape || !offsets)
        return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor '%s': missing \"%s\"", label, name,
                            !dtype ? "dtype" : !shape ? "shape" : "data_offsets");

    if (!cJSON_IsString(dtype) || !dtype->valuestring)
        return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor '%s': \"dtype\" is %s, not a string",
                            label, name, json_kind(dtype));
    tm_status s = tm_safetensors_dtype_from_string(dtype->valuestring, &t->dtype, err);
    if (s) {
        char prefix[TM_ERROR_MSG_MAX];
        snprintf(prefix, sizeof prefix, "%s: tensor '%s'", label, name);
        tm_error_prefix(err, prefix);
        return s;
    }

    if (!cJSON_IsArray(shape))
        return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor '%s': \"shape\" is %s, not an array",
                            label, name, json_kind(shape));
    int32_t ndim = 0;
    for (const cJSON *d = shape->child; d; d = d->next) {
        if (ndim == TM_MAX_NDIM)
            return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                                "%s: tensor '%s': shape has more than %d dimensions", label, name,
                                TM_MAX_NDIM);
        uint64_t v = 0;
        num_check c = get_uint(d, &v);
        if (c != NUM_OK) {
            describe_bad_number(d, c, why, sizeof why);
            return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor '%s': shape[%d] %s", label,
                                name, (int)ndim, why);
        }
        t->shape[ndim++] = (int64_t)v;
    }
    t->ndim = ndim;
    format_shape(t->shape, ndim, shape_str, sizeof shape_str);

    /* The product of the non-zero dimensions must fit in int64 even when another dimension is
     * 0, so that code computing strides from the shape cannot overflow. */
    uint64_t prod = 1;
    int has_zero = 0;
    for (int32_t i = 0; i < ndim; i++) {
        uint64_t d = (uint64_t)t->shape[i];
        if (d == 0) {
            has_zero = 1;
        } else if (prod > (uint64_t)INT64_MAX / d) {
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: tensor '%s': shape %s has too many elements (overflow)",
                                label, name, shape_str);
        } else {
            prod *= d;
        }
    }
    t->numel = has_zero ? 0 : prod;
    uint64_t itemsize = tm_dtype_size(t->dtype);
    if (t->numel > (uint64_t)INT64_MAX / itemsize)
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: tensor '%s': shape %s of %s has too many bytes (overflow)",
                            label, name, shape_str, dtype->valuestring);
    uint64_t nbytes = t->numel * itemsize;

    if (!cJSON_IsArray(offsets))
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: tensor '%s': \"data_offsets\" is %s, not an array", label, name,
                            json_kind(offsets));
    uint64_t be[2] = {0, 0};
    int k = 0;
    for (const cJSON *o = offsets->child; o; o = o->next) {
        if (k == 2) {
            k = 3; /* too many */
            break;
        }
        num_check c = get_uint(o, &be[k]);
        if (c != NUM_OK) {
            describe_bad_number(o, c, why, sizeof why);
            return tm_error_set(err, TM_ERROR_FORMAT, "%s: tensor '%s': data_offsets[%d] %s",
                                label, name, k, why);
        }
        k++;
    }
    if (k != 2)
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: tensor '%s': \"data_offsets\" must be [begin, end], it has %s "
                            "elements",
                            label, name, k < 2 ? (k ? "1" : "0") : "more than 2");
    t->begin = be[0];
    t->end = be[1];
    if (t->begin > t->end)
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: tensor '%s': data_offsets [%llu, %llu] end before they begin",
                            label, name, (ull)t->begin, (ull)t->end);
    if (t->end - t->begin != nbytes)
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes but "
                            "shape %s of %s needs %llu",
                            label, name, (ull)t->begin, (ull)t->end, (ull)(t->end - t->begin),
                            shape_str, dtype->valuestring, (ull)nbytes);
    if (t->end > data_size)
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the "
                            "data section (%llu bytes)",
                            label, name, (ull)t->begin, (ull)t->end, (ull)data_size);
    return TM_OK;
}

typedef struct span {
    uint64_t begin, end;
    size_t idx;
} span;

static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* The byte ranges sorted by begin must tile [0, data_size) exactly. */
static tm_status check_tiling(const tm_safetensors *st, const char *label, tm_error *err) {
    char a[SHOW_MAX], b[SHOW_MAX];
    span *spans = malloc((st->count ? st->count : 1) * sizeof *spans);
    if (!spans) return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
    for (size_t i = 0; i < st->count; i++)
        spans[i] = (span){st->tensors[i].begin, st->tensors[i].end, i};
    qsort(spans, st->count, sizeof *spans, span_cmp);
    uint64_t pos = 0;
    const tm_st_tensor *prev = NULL;
    tm_status s = TM_OK;
    for (size_t k = 0; k < st->count && !s; k++) {
        const tm_st_tensor *t = &st->tensors[spans[k].idx];
        if (t->begin > pos && !prev)
            s = tm_error_set(err, TM_ERROR_FORMAT,
                             "%s: tensor '%s': data starts at byte %llu; bytes [0, %llu) of the "
                             "data section belong to no tensor",
                             label, show(t->name, a), (ull)t->begin, (ull)t->begin);
        else if (t->begin > pos)
            s = tm_error_set(err, TM_ERROR_FORMAT,
                             "%s: gap in the data section: bytes [%llu, %llu) between tensor "
                             "'%s' and tensor '%s' belong to no tensor",
                             label, (ull)pos, (ull)t->begin, show(prev->name, a),
                             show(t->name, b));
        else if (t->begin < pos)
            s = tm_error_set(err, TM_ERROR_FORMAT,
                             "%s: tensor '%s': data_offsets [%llu, %llu] overlap tensor '%s' "
                             "[%llu, %llu]",
                             label, show(t->name, a), (ull)t->begin, (ull)t->end,
                             show(prev->name, b), (ull)prev->begin, (ull)prev->end);
        pos = t->end;
        prev = t;
    }
    free(spans);
    if (!s && pos != st->data_size)
        s = tm_error_set(err, TM_ERROR_FORMAT,
                         "%s: the tensors end at byte %llu of the data section but it holds "
                         "%llu bytes (%llu trailing bytes belong to no tensor)",
                         label, (ull)pos, (ull)st->data_size, (ull)(st->data_size - pos));
    return s;
}

static tm_status read_header(tm_safetensors *st, const cJSON *root, const char *label,
                             tm_error *err) {
    char shown[SHOW_MAX];
    size_t n = 0;
    for (const cJSON *e = root->child; e; e = e->next) n++;
    st->tensors = calloc(n ? n : 1, sizeof *st->tensors);
    if (!st->tensors || tm_name_map_reserve(&st->names, n))
        return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory reading the header", label);
    int seen_metadata = 0;
    tm_status s;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (strcmp(e->string, METADATA_KEY) == 0) {
            if (seen_metadata)
                return tm_error_set(err, TM_ERROR_FORMAT,
                                    "%s: header has \"" METADATA_KEY "\" twice", label);
            seen_metadata = 1;
            if ((s = read_metadata(st, e, label, err))) return s;
            continue;
        }
        tm_st_tensor *t = &st->tensors[st->count];
        if (!(t->name = strdup(e->string)))
            return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory reading the header",
                                label);
        st->count++;
        if (tm_name_map_insert(&st->names, t->name, st->count - 1, NULL) != 0)
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: tensor '%s' appears twice in the header", label,
                                show(t->name, shown));
        if ((s = read_tensor(t, e, st->data_size, label, err))) return s;
    }
    return check_tiling(st, label, err);
}

tm_status tm_safetensors_open(const uint8_t *data, size_t size, const char *label,
                              tm_safetensors **out, tm_error *err) {
    if (!label) label = "safetensors";
    if (!out)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: safetensors: NULL output",
                            label);
    *out = NULL;
    if (!data && size)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: safetensors: NULL data",
                            label);
    if (size < 8)
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: file is %zu bytes, too short for a safetensors header length "
                            "(8 bytes)",
                            label, size);
    uint64_t n = rd64(data);
    if (n > (uint64_t)(size - 8))
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: safetensors header length %llu runs past the end of the file "
                            "(%zu bytes)",
                            label, (ull)n, size);
    if (n > TM_SAFETENSORS_MAX_HEADER)
        return tm_error_set(err, TM_ERROR_LIMIT,
                            "%s: safetensors header is %llu bytes, over the limit of %u", label,
                            (ull)n, TM_SAFETENSORS_MAX_HEADER);
    if (n == 0)
        return tm_error_set(err, TM_ERROR_FORMAT, "%s: safetensors header is empty", label);
    const uint8_t *hdr = data + 8;
    size_t hlen = (size_t)n;
    size_t valid = utf8_valid_prefix(hdr, hlen);
    if (valid != hlen)
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: safetensors header is not valid UTF-8 (at byte %zu)", label,
                            valid);
    tm_status s = scan_header_bytes(hdr, hlen, label, err);
    if (s) return s;

    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)hdr, hlen, &end, 0);
    if (!root) {
        size_t at = end && end >= (const char *)hdr && end <= (const char *)hdr + hlen
                        ? (size_t)(end - (const char *)hdr)
                        : 0;
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: safetensors header is not valid JSON (error near byte %zu)",
                            label, at);
    }
    for (const char *p = end; p < (const char *)hdr + hlen; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            return tm_error_set(err, TM_ERROR_FORMAT,
                                "%s: safetensors header has unexpected data after the JSON "
                                "object (byte %zu)",
                                label, (size_t)(p - (const char *)hdr));
        }
    if (!cJSON_IsObject(root)) {
        s = tm_error_set(err, TM_ERROR_FORMAT, "%s: safetensors header is %s, not a JSON object",
                         label, json_kind(root));
        cJSON_Delete(root);
        return s;
    }
    if (hdr[0] != '{') {
        cJSON_Delete(root);
        return tm_error_set(err, TM_ERROR_FORMAT,
                            "%s: safetensors header must start with '{', not whitespace", label);
    }

    tm_safetensors *st = calloc(1, sizeof *st);
    if (!st) {
        cJSON_Delete(root);
        return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
    }
    st->data = data;
    st->data_offset = 8 + n;
    st->data_size = (uint64_t)size - st->data_offset;
    s = read_header(st, root, label, err);
    cJSON_Delete(root);
    if (s) {
        tm_safetensors_free(st);
        return s;
    }
    *out = st;
    return TM_OK;
}

/* ---- Writer ----------------------------------------------------------------------------- */

struct tm_st_writer {
    tm_output_stream out;
    char *label;
    uint64_t total, written;
    int failed, finished;
};

/* A growable byte string for the header. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->cap - b->len < n) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap - b->len < n) {
            if (cap > SIZE_MAX / 2) { b->oom = 1; return; }
            cap *= 2;
        }
        char *p = realloc(b->p, cap);
        if (!p) { b->oom = 1; return; }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_u64(sbuf *b, uint64_t v) {
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%llu", (ull)v);
    sb_put(b, tmp, (size_t)n);
}

/* A JSON string literal; s is valid UTF-8, written as is except the characters JSON needs
 * escaped. */
static void sb_json_string(sbuf *b, const char *s) {
    sb_put(b, "\"", 1);
    const char *run = s;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        sb_put(b, run, (size_t)(s - run));
        char esc[8];
        switch (c) {
        case '"': sb_put(b, "\\\"", 2); break;
        case '\\': sb_put(b, "\\\\", 2); break;
        case '\n': sb_put(b, "\\n", 2); break;
        case '\r': sb_put(b, "\\r", 2); break;
        case '\t': sb_put(b, "\\t", 2); break;
        case '\b': sb_put(b, "\\b", 2); break;
        case '\f': sb_put(b, "\\f", 2); break;
        default:
            snprintf(esc, sizeof esc, "\\u%04x", c);
            sb_put(b, esc, 6);
        }
        run = s + 1;
    }
    sb_put(b, run, (size_t)(s - run));
    sb_put(b, "\"", 1);
}

static tm_status put(tm_st_writer *w, const void *data, size_t n, tm_error *err) {
    tm_status s = n ? tm_output_stream_put(&w->out, data, n, err) : TM_OK;
    if (s) w->failed = 1;
    return s;
}

void tm_st_writer_free(tm_st_writer *w) {
    if (!w) return;
    tm_output_stream_free(&w->out);
    free(w->label);
    free(w);
}

uint64_t tm_st_writer_data_size(const tm_st_writer *w) { return w ? w->total : 0; }
uint64_t tm_st_writer_data_written(const tm_st_writer *w) { return w ? w->written : 0; }

/* Checks tensor i and returns its byte size in *nbytes. */
static tm_status check_out_tensor(const tm_st_out_tensor *t, size_t i, const char *label,
                                  uint64_t *nbytes, tm_error *err) {
    char name[SHOW_MAX];
    if (!t->name)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: tensor %zu has no name", label,
                            i);
    show(t->name, name);
    if (!utf8_valid(t->name))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: tensor '%s': name is not valid UTF-8", label, name);
    if (strcmp(t->name, METADATA_KEY) == 0)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: tensor '%s': the name is reserved for metadata", label, name);
    if ((unsigned)t->dtype >= TM_DTYPE_COUNT)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: tensor '%s': invalid dtype %d",
                            label, name, (int)t->dtype);
    if (!tm_safetensors_dtype_string(t->dtype))
        return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                            "%s: tensor '%s': dtype %s cannot be stored in safetensors (it has "
                            "no %s type)",
                            label, name, tm_dtype_name(t->dtype),
                            tm_dtype_is_quantized(t->dtype) ? "quantized" : "complex128");
    if (t->ndim < 0 || t->ndim > TM_MAX_NDIM)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: tensor '%s': ndim %d is outside [0, %d]", label, name,
                            (int)t->ndim, TM_MAX_NDIM);
    if (t->ndim > 0 && !t->shape)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: tensor '%s': shape is NULL",
                            label, name);
    uint64_t prod = 1;
    int has_zero = 0;
    for (int32_t d = 0; d < t->ndim; d++) {
        int64_t v = t->shape[d];
        if (v < 0 || (uint64_t)v >= MAX_EXACT_INT)
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                "%s: tensor '%s': shape[%d] is %lld; it must be in [0, 2^53)",
                                label, name, (int)d, (long long)v);
        if (v == 0) has_zero = 1;
        else if (prod > (uint64_t)INT64_MAX / (uint64_t)v)
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                "%s: tensor '%s': shape has too many elements (overflow)", label,
                                name);
        else prod *= (uint64_t)v;
    }
    uint64_t numel = has_zero ? 0 : prod, itemsize = tm_dtype_size(t->dtype);
    if (numel > (uint64_t)INT64_MAX / itemsize)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: tensor '%s': shape has too many bytes (overflow)", label, name);
    *nbytes = numel * itemsize;
    return TM_OK;
}

tm_status tm_safetensors_header(const char *label, const tm_st_out_tensor *tensors, size_t n,
                                const char *const *meta_keys, const char *const *meta_values, size_t n_meta,
                                uint8_t **header, size_t *header_len, uint64_t *data_size, tm_error *err) {
    char shown[SHOW_MAX];
    if (!label) label = "safetensors";
    *header = NULL;
    *header_len = 0;
    *data_size = 0;
    if ((n && !tensors) || (n_meta && (!meta_keys || !meta_values)))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: safetensors: NULL array",
                            label);

    tm_status s = TM_OK;
    sbuf hb = {0};
    tm_name_map seen = TM_NAME_MAP_INIT;
    uint64_t *sizes = calloc(n ? n : 1, sizeof *sizes);
    if (!sizes || tm_name_map_reserve(&seen, n)) {
        s = tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
        goto done;
    }

    /* Validate everything before writing anything. */
    uint64_t total = 0;
    for (size_t i = 0; i < n && !s; i++) {
        if ((s = check_out_tensor(&tensors[i], i, label, &sizes[i], err))) break;
        if (tm_name_map_insert(&seen, tensors[i].name, i, NULL) != 0)
            s = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: tensor '%s' is given twice",
                             label, show(tensors[i].name, shown));
        else if (sizes[i] >= MAX_EXACT_INT - total)
            s = tm_error_set(err, TM_ERROR_LIMIT,
                             "%s: tensor '%s': data offsets would reach 2^53 bytes", label,
                             show(tensors[i].name, shown));
        else
            total += sizes[i];
    }
    if (s) goto done;
    tm_name_map_free(&seen);
    if (tm_name_map_reserve(&seen, n_meta)) {
        s = tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
        goto done;
    }
    for (size_t i = 0; i < n_meta && !s; i++) {
        const char *k = meta_keys[i], *v = meta_values[i];
        if (!k || !v)
            s = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: metadata entry %zu is NULL",
                             label, i);
        else if (!utf8_valid(k) || !utf8_valid(v))
            s = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                             "%s: metadata '%s': not valid UTF-8", label, show(k, shown));
        else if (tm_name_map_insert(&seen, k, i, NULL) != 0)
            s = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                             "%s: metadata key '%s' is given twice", label, show(k, shown));
    }
    if (s) goto done;

    /* The header: 8 bytes of length, then the JSON, then spaces up to a multiple of 8. */
    sb_put(&hb, "\0\0\0\0\0\0\0\0{", 9);
    int first = 1;
    if (n_meta) {
        sb_str(&hb, "\"" METADATA_KEY "\":{");
        for (size_t i = 0; i < n_meta; i++) {
            if (i) sb_put(&hb, ",", 1);
            sb_json_string(&hb, meta_keys[i]);
            sb_put(&hb, ":", 1);
            sb_json_string(&hb, meta_values[i]);
        }
        sb_put(&hb, "}", 1);
        first = 0;
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < n; i++) {
        const tm_st_out_tensor *t = &tensors[i];
        if (!first) sb_put(&hb, ",", 1);
        first = 0;
        sb_json_string(&hb, t->name);
        sb_str(&hb, ":{\"dtype\":\"");
        sb_str(&hb, tm_safetensors_dtype_string(t->dtype));
        sb_str(&hb, "\",\"shape\":[");
        for (int32_t d = 0; d < t->ndim; d++) {
            if (d) sb_put(&hb, ",", 1);
            sb_u64(&hb, (uint64_t)t->shape[d]);
        }
        sb_str(&hb, "],\"data_offsets\":[");
        sb_u64(&hb, offset);
        sb_put(&hb, ",", 1);
        offset += sizes[i];
        sb_u64(&hb, offset);
        sb_str(&hb, "]}");
    }
    sb_put(&hb, "}", 1);
    while (!hb.oom && hb.len % 8) sb_put(&hb, " ", 1);
    if (hb.oom) {
        s = tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory building the header", label);
        goto done;
    }
    uint64_t hlen = hb.len - 8;
    if (hlen > TM_SAFETENSORS_MAX_HEADER) {
        s = tm_error_set(err, TM_ERROR_LIMIT,
                         "%s: safetensors header would be %llu bytes, over the limit of %u that "
                         "readers accept",
                         label, (ull)hlen, TM_SAFETENSORS_MAX_HEADER);
        goto done;
    }
    wr64((uint8_t *)hb.p, hlen);

    *header = (uint8_t *)hb.p;
    *header_len = hb.len;
    *data_size = total;
    hb.p = NULL;
done:
    free(hb.p);
    free(sizes);
    tm_name_map_free(&seen);
    return s;
}

tm_status tm_st_writer_open(int fd, const char *label, const tm_st_out_tensor *tensors,
                            size_t n, const char *const *meta_keys,
                            const char *const *meta_values, size_t n_meta, tm_st_writer **out,
                            tm_error *err) {
    if (!label) label = "safetensors";
    if (!out)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: safetensors: NULL output",
                            label);
    *out = NULL;
    if (fd < 0)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: safetensors: invalid file descriptor", label);
    uint8_t *hp = NULL;
    size_t hlen = 0;
    uint64_t total = 0;
    tm_status s = tm_safetensors_header(label, tensors, n, meta_keys, meta_values, n_meta, &hp, &hlen, &total, err);
    if (s) return s;
    tm_st_writer *w = calloc(1, sizeof *w);
    if (!w || !(w->label = strdup(label))) {
        tm_st_writer_free(w);
        s = tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", label);
        goto out;
    }
    if ((s = tm_output_stream_init(&w->out, fd, w->label, err))) {
        tm_st_writer_free(w);
        goto out;
    }
    w->total = total;
    if ((s = put(w, hp, hlen, err))) {
        tm_st_writer_free(w);
        goto out;
    }
    *out = w;
out:
    free(hp);
    return s;
}

/* A writer that failed or finished takes no more calls. */
static tm_status check_usable(const tm_st_writer *w, tm_error *err) {
    if (!w) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "safetensors: NULL writer");
    if (w->failed)
        return tm_error_set(err, TM_ERROR_IO, "%s: safetensors: an earlier write failed",
                            w->label);
    if (w->finished)
        return tm_error_set(err, TM_ERROR_INTERNAL, "%s: safetensors: file already finished",
                            w->label);
    return TM_OK;
}

tm_status tm_st_writer_write(tm_st_writer *w, const void *data, size_t len, tm_error *err) {
    tm_status s = check_usable(w, err);
    if (s) return s;
    if (len && !data)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: safetensors: NULL data",
                            w->label);
    if (len > w->total - w->written) {
        w->failed = 1;
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: safetensors: %zu bytes written past the %llu bytes of tensor "
                            "data declared (%llu already written)",
                            w->label, len, (ull)w->total, (ull)w->written);
    }
    s = put(w, data, len, err);
    if (!s) w->written += len;
    return s;
}

tm_status tm_st_writer_finish(tm_st_writer *w, tm_error *err) {
    tm_status s = check_usable(w, err);
    if (s) return s;
    if (w->written != w->total) {
        w->failed = 1;
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: safetensors: only %llu of the %llu bytes of tensor data were "
                            "written",
                            w->label, (ull)w->written, (ull)w->total);
    }
    s = tm_output_stream_flush(&w->out, err);
    if (s) w->failed = 1;
    else w->finished = 1;
    return s;
}
