/* Safe unpickler, the opcode machine: an iterative pickle stack machine that builds an inert
 * value tree, and the public entry points of pickle.h.
 *
 * Nothing here imports or calls anything. The machine only moves values between the input,
 * the stack, the marks and the memo, each bounded by tm_pickle_limits; what a value is and
 * what a global means is decided by the other pickle_*.c files (see pickle_internal.h).
 * Every value lives in one arena owned by tm_pickle, so freeing never walks the tree, and no
 * code path recurses on the structure of the input. */
#define _POSIX_C_SOURCE 200809L

#include "formats/pickle_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- Errors ---------------------------------------------------------------------------------- */

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

tm_status pk_err(parser *p, tm_status st, const char *fmt, ...) {
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

tm_status pk_nomem(parser *p) { return pk_err(p, TM_ERROR_NOMEM, "out of memory"); }

/* ---- Growing arrays (stack, marks, storage list, graph-check work lists) --------------------- */

void *pk_grow(void *array, size_t *cap, size_t elem_size, size_t first) {
    size_t c = *cap ? *cap * 2 : first;
    if (c > SIZE_MAX / elem_size) return NULL;
    void *a = realloc(array, c * elem_size);
    if (a) *cap = c;
    return a;
}

/* ---- Stack, marks, memo ------------------------------------------------------------------- */

static size_t stack_avail(const parser *p) {
    return p->sp - (p->nmarks ? p->marks[p->nmarks - 1] : 0);
}

static tm_status push(parser *p, tm_pk_value *v) {
    if (p->sp >= p->lim.max_stack)
        return pk_err(p, TM_ERROR_LIMIT, "stack deeper than %zu (limit)", p->lim.max_stack);
    if (p->sp == p->stack_cap) {
        tm_pk_value **s = pk_grow(p->stack, &p->stack_cap, sizeof *s, 64);
        if (!s) return pk_nomem(p);
        p->stack = s;
    }
    p->stack[p->sp++] = v;
    return TM_OK;
}

static tm_status pop(parser *p, tm_pk_value **out) {
    if (!stack_avail(p)) return pk_err(p, TM_ERROR_FORMAT, "stack underflow");
    *out = p->stack[--p->sp];
    return TM_OK;
}

static tm_status top(parser *p, tm_pk_value **out) {
    if (!stack_avail(p)) return pk_err(p, TM_ERROR_FORMAT, "stack underflow");
    *out = p->stack[p->sp - 1];
    return TM_OK;
}

static tm_status push_mark(parser *p) {
    if (p->nmarks >= p->lim.max_depth)
        return pk_err(p, TM_ERROR_LIMIT, "nesting deeper than %zu (limit)", p->lim.max_depth);
    if (p->nmarks == p->marks_cap) {
        size_t *m = pk_grow(p->marks, &p->marks_cap, sizeof *m, 32);
        if (!m) return pk_nomem(p);
        p->marks = m;
    }
    p->marks[p->nmarks++] = p->sp;
    return TM_OK;
}

/* The items stay readable in p->stack[*base ..] until the next push. */
static tm_status pop_mark(parser *p, size_t *base, size_t *n) {
    if (!p->nmarks) return pk_err(p, TM_ERROR_FORMAT, "no MARK");
    *base = p->marks[--p->nmarks];
    *n = p->sp - *base;
    p->sp = *base;
    return TM_OK;
}

static tm_pk_value **memo_hash_find(parser *p, uint64_t key) {
    if (!p->memo_hash_n) return NULL;
    size_t mask = p->memo_cap - 1;
    for (size_t j = (size_t)tm_hash_mix64(key) & mask; p->memo[j].val; j = (j + 1) & mask)
        if (p->memo[j].key == key) return &p->memo[j].val;
    return NULL;
}

static tm_status memo_new_key(parser *p) {
    if (p->memo_n >= p->lim.max_memo)
        return pk_err(p, TM_ERROR_LIMIT, "more than %zu memo entries (limit)", p->lim.max_memo);
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
        if (cap > SIZE_MAX / sizeof(tm_pk_value *)) return pk_nomem(p);
        tm_pk_value **d = realloc(p->memo_dense, cap * sizeof(tm_pk_value *));
        if (!d) return pk_nomem(p);
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
        if (cap > SIZE_MAX / sizeof(memo_slot)) return pk_nomem(p);
        memo_slot *m = calloc(cap, sizeof(memo_slot));
        if (!m) return pk_nomem(p);
        for (size_t i = 0; i < p->memo_cap; i++) {
            if (!p->memo[i].val) continue;
            size_t j = (size_t)tm_hash_mix64(p->memo[i].key) & (cap - 1);
            while (m[j].val) j = (j + 1) & (cap - 1);
            m[j] = p->memo[i];
        }
        free(p->memo);
        p->memo = m;
        p->memo_cap = cap;
    }
    size_t mask = p->memo_cap - 1;
    size_t j = (size_t)tm_hash_mix64(key) & mask;
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
    return pk_err(p, TM_ERROR_FORMAT, "memo index %llu not defined", (unsigned long long)key);
}

/* ---- Reading the input ----------------------------------------------------------------------- */

static size_t left(const parser *p) { return p->size - p->pos; }

static tm_status need(parser *p, size_t n) {
    if (left(p) < n)
        return pk_err(p, TM_ERROR_FORMAT, "truncated pickle (needs %zu bytes, %zu left)", n,
                      left(p));
    return TM_OK;
}

/* A declared length: checked against the input before the string limit, so a lying length is
 * reported as truncation. */
static tm_status need_len(parser *p, uint64_t n) {
    if (n > (uint64_t)left(p))
        return pk_err(p, TM_ERROR_FORMAT, "truncated pickle (length %llu but %zu bytes left)",
                      (unsigned long long)n, left(p));
    if (n > (uint64_t)p->lim.max_string)
        return pk_err(p, TM_ERROR_LIMIT, "length %llu exceeds the %zu-byte string limit",
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
            return pk_err(p, TM_ERROR_LIMIT, "text argument longer than %zu bytes (limit)",
                          p->lim.max_string);
        return pk_err(p, TM_ERROR_FORMAT, "truncated pickle (unterminated text argument)");
    }
    *s = (const char *)start;
    *len = (size_t)(nl - start);
    p->pos += *len + 1;
    return TM_OK;
}

/* ---- The machine ------------------------------------------------------------------------ */

static tm_status run(parser *p, tm_pk_value **result) {
    for (;;) {
        p->in_op = 0;
        if (p->pos >= p->size)
            return pk_err(p, TM_ERROR_FORMAT, "truncated pickle (no STOP opcode at offset %zu)",
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
            if (u > 5) return pk_err(p, TM_ERROR_UNSUPPORTED, "pickle protocol %u", (unsigned)u);
            break;
        case 0x95: /* FRAME: framing only groups opcodes; contents are read as usual */
            TRY(need(p, 8));
            u = rd_le(p, 8);
            if (u > (uint64_t)left(p))
                return pk_err(p, TM_ERROR_FORMAT, "truncated pickle (frame of %llu bytes)",
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
            else return pk_err(p, TM_ERROR_FORMAT, "stack underflow");
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
            else TRY(pk_int_from_text(p, s, len, &v));
            TRY(push(p, v));
            break;
        case 'J': {
            TRY(need(p, 4));
            uint32_t b = (uint32_t)rd_le(p, 4);
            int32_t sx;
            memcpy(&sx, &b, sizeof sx);
            TRY(pk_new_int(p, sx, &v));
            TRY(push(p, v));
            break;
        }
        case 'K': TRY(need(p, 1)); TRY(pk_new_int(p, rd_u8(p), &v)); TRY(push(p, v)); break;
        case 'M':
            TRY(need(p, 2));
            TRY(pk_new_int(p, (int64_t)rd_le(p, 2), &v));
            TRY(push(p, v));
            break;
        case 'L':
            TRY(read_line(p, &s, &len));
            if (len && s[len - 1] == 'L') len--;
            TRY(pk_int_from_text(p, s, len, &v));
            TRY(push(p, v));
            break;
        case 0x8a: /* LONG1 */
            TRY(need(p, 1));
            u = rd_u8(p);
            TRY(need_len(p, u));
            TRY(pk_int_from_le(p, p->data + p->pos, (size_t)u, &v));
            p->pos += (size_t)u;
            TRY(push(p, v));
            break;
        case 0x8b: { /* LONG4 */
            TRY(need(p, 4));
            uint32_t b = (uint32_t)rd_le(p, 4);
            if (b & 0x80000000u) return pk_err(p, TM_ERROR_FORMAT, "negative byte count");
            TRY(need_len(p, b));
            TRY(pk_int_from_le(p, p->data + p->pos, b, &v));
            p->pos += b;
            TRY(push(p, v));
            break;
        }
        case 'F':
            TRY(read_line(p, &s, &len));
            TRY(pk_float_from_text(p, s, len, &v));
            TRY(push(p, v));
            break;
        case 'G': {
            TRY(need(p, 8));
            uint64_t b = 0;
            for (int i = 0; i < 8; i++) b = (b << 8) | rd_u8(p);
            double d;
            memcpy(&d, &b, sizeof d);
            TRY(pk_new_value(p, TM_PK_FLOAT, &v));
            v->u.real = d;
            TRY(push(p, v));
            break;
        }

        case 'S':
            TRY(read_line(p, &s, &len));
            TRY(pk_decode_string_repr(p, s, len, &v));
            TRY(push(p, v));
            break;
        case 'V':
            TRY(read_line(p, &s, &len));
            TRY(pk_decode_raw_unicode_escape(p, s, len, &v));
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
                return pk_err(p, TM_ERROR_FORMAT, "negative string length");
            TRY(need_len(p, u));
            /* Python 2 str (STRING opcodes) is read as text, as torch.load does with
             * encoding='utf-8'; checkpoint keys written by Python 2 stay looked-up-able. */
            tm_pk_kind k = (p->op == 'B' || p->op == 'C' || p->op == 0x8e || p->op == 0x96)
                               ? TM_PK_BYTES : TM_PK_STRING;
            TRY(pk_new_str(p, k, p->data + p->pos, (size_t)u, &v));
            p->pos += (size_t)u;
            TRY(push(p, v));
            break;
        }

        case ')': TRY(push(p, p->empty_tuple_v)); break;
        case 't':
            TRY(pop_mark(p, &base, &n));
            TRY(pk_new_seq(p, TM_PK_TUPLE, p->stack + base, n, &v));
            TRY(push(p, v));
            break;
        case 0x85:
        case 0x86:
        case 0x87:
            n = (size_t)(p->op - 0x84);
            if (stack_avail(p) < n) return pk_err(p, TM_ERROR_FORMAT, "stack underflow");
            p->sp -= n;
            TRY(pk_new_seq(p, TM_PK_TUPLE, p->stack + p->sp, n, &v));
            TRY(push(p, v));
            break;
        case ']': TRY(pk_new_seq(p, TM_PK_LIST, NULL, 0, &v)); TRY(push(p, v)); break;
        case 'l':
            TRY(pop_mark(p, &base, &n));
            TRY(pk_new_seq(p, TM_PK_LIST, p->stack + base, n, &v));
            TRY(push(p, v));
            break;
        case 'a':
            TRY(pop(p, &w));
            TRY(top(p, &v));
            TRY(pk_append_items(p, v, &w, 1));
            break;
        case 'e':
            TRY(pop_mark(p, &base, &n));
            TRY(top(p, &v));
            TRY(pk_append_items(p, v, p->stack + base, n));
            break;
        case '}': TRY(pk_new_value(p, TM_PK_DICT, &v)); TRY(push(p, v)); break;
        case 'd':
            TRY(pop_mark(p, &base, &n));
            TRY(pk_new_value(p, TM_PK_DICT, &v));
            TRY(pk_set_items(p, v, p->stack + base, n));
            TRY(push(p, v));
            break;
        case 's': {
            tm_pk_value *kv[2] = {NULL, NULL};
            TRY(pop(p, &kv[1]));
            TRY(pop(p, &kv[0]));
            TRY(top(p, &v));
            TRY(pk_set_items(p, v, kv, 2));
            break;
        }
        case 'u':
            TRY(pop_mark(p, &base, &n));
            TRY(top(p, &v));
            TRY(pk_set_items(p, v, p->stack + base, n));
            break;
        case 0x8f: TRY(pk_new_seq(p, TM_PK_SET, NULL, 0, &v)); TRY(push(p, v)); break;
        case 0x90:
            TRY(pop_mark(p, &base, &n));
            TRY(top(p, &v));
            if (v->kind != TM_PK_SET)
                return pk_err(p, TM_ERROR_FORMAT, "adding items to a %s", tm_pk_kind_name(v->kind));
            TRY(pk_seq_extend(p, v, p->stack + base, n));
            break;
        case 0x91:
            TRY(pop_mark(p, &base, &n));
            TRY(pk_new_seq(p, TM_PK_SET, p->stack + base, n, &v));
            TRY(push(p, v));
            break;

        case 'c':
            TRY(read_line(p, &s, &len));
            TRY(read_line(p, &s2, &len2));
            TRY(pk_make_global(p, s, len, s2, len2, &v));
            TRY(push(p, v));
            break;
        case 0x93: /* STACK_GLOBAL */
            TRY(pop(p, &w));
            TRY(pop(p, &v));
            if (v->kind != TM_PK_STRING || w->kind != TM_PK_STRING)
                return pk_err(p, TM_ERROR_FORMAT, "module and name must be str");
            TRY(pk_make_global(p, v->u.str.data, v->u.str.len, w->u.str.data, w->u.str.len, &x));
            TRY(push(p, x));
            break;
        case 'R':
            TRY(pop(p, &w));
            TRY(pop(p, &v));
            TRY(pk_call(p, v, w, &x));
            TRY(push(p, x));
            break;
        case 0x81: /* NEWOBJ */
            TRY(pop(p, &w));
            TRY(pop(p, &v));
            if (w->kind != TM_PK_TUPLE)
                return pk_err(p, TM_ERROR_FORMAT, "arguments are a %s, not a tuple",
                              tm_pk_kind_name(w->kind));
            TRY(pk_instantiate(p, v, w, &x));
            TRY(push(p, x));
            break;
        case 0x92: { /* NEWOBJ_EX: keyword arguments are dropped with the call */
            tm_pk_value *kw = NULL;
            TRY(pop(p, &kw));
            TRY(pop(p, &w));
            TRY(pop(p, &v));
            if (w->kind != TM_PK_TUPLE || kw->kind != TM_PK_DICT)
                return pk_err(p, TM_ERROR_FORMAT, "NEWOBJ_EX needs a tuple and a dict");
            TRY(pk_instantiate(p, v, w, &x));
            TRY(push(p, x));
            break;
        }
        case 'i': /* INST */
            TRY(read_line(p, &s, &len));
            TRY(read_line(p, &s2, &len2));
            TRY(pk_make_global(p, s, len, s2, len2, &v));
            TRY(pop_mark(p, &base, &n));
            TRY(pk_new_seq(p, TM_PK_TUPLE, p->stack + base, n, &w));
            TRY(pk_call(p, v, w, &x));
            TRY(push(p, x));
            break;
        case 'o': /* OBJ */
            TRY(pop_mark(p, &base, &n));
            if (!n) return pk_err(p, TM_ERROR_FORMAT, "stack underflow");
            v = p->stack[base];
            TRY(pk_new_seq(p, TM_PK_TUPLE, p->stack + base + 1, n - 1, &w));
            TRY(pk_call(p, v, w, &x));
            TRY(push(p, x));
            break;
        case 'b':
            TRY(pop(p, &w));
            TRY(top(p, &v));
            TRY(pk_build(p, v, w));
            break;

        case 'P':
            TRY(read_line(p, &s, &len));
            return pk_err(p, TM_ERROR_UNSUPPORTED, "unsupported persistent id (a text id)");
        case 'Q':
            TRY(pop(p, &v));
            TRY(pk_persistent_load(p, v, &x));
            TRY(push(p, x));
            break;

        case 'p':
            TRY(read_line(p, &s, &len));
            TRY(pk_parse_index(p, s, len, &u));
            TRY(top(p, &v));
            TRY(memo_put(p, u, v));
            break;
        case 'q': TRY(need(p, 1)); u = rd_u8(p); TRY(top(p, &v)); TRY(memo_put(p, u, v)); break;
        case 'r': TRY(need(p, 4)); u = rd_le(p, 4); TRY(top(p, &v)); TRY(memo_put(p, u, v)); break;
        case 0x94: TRY(top(p, &v)); TRY(memo_put(p, p->memo_n, v)); break;
        case 'g':
            TRY(read_line(p, &s, &len));
            TRY(pk_parse_index(p, s, len, &u));
            TRY(memo_get(p, u, &v));
            TRY(push(p, v));
            break;
        case 'h': TRY(need(p, 1)); TRY(memo_get(p, rd_u8(p), &v)); TRY(push(p, v)); break;
        case 'j': TRY(need(p, 4)); TRY(memo_get(p, rd_le(p, 4), &v)); TRY(push(p, v)); break;

        case 0x82:
        case 0x83:
        case 0x84:
            return pk_err(p, TM_ERROR_UNSUPPORTED, "extension registry codes are not supported");
        case 0x97:
        case 0x98:
            return pk_err(p, TM_ERROR_UNSUPPORTED, "out-of-band buffers are not supported");
        default:
            return pk_err(p, TM_ERROR_FORMAT, "unknown opcode");
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
    TRY(pk_new_value(p, TM_PK_NONE, &p->none_v));
    TRY(pk_new_value(p, TM_PK_BOOL, &p->true_v));
    p->true_v->u.boolean = 1;
    TRY(pk_new_value(p, TM_PK_BOOL, &p->false_v));
    TRY(pk_new_value(p, TM_PK_TUPLE, &p->empty_tuple_v));
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
        return pk_nomem(&p);
    }

    tm_pk_value *root = NULL;
    tm_status st = make_singletons(&p);
    if (st == TM_OK) st = run(&p, &root);
    if (st == TM_OK) {
        p.in_op = 0;
        st = pk_check_graph(&p, root);
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
    pk_arena_free(&pk->arena);
    free(pk);
}
