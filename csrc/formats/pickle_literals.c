/* Safe unpickler, literal arguments: the text and byte forms opcodes carry numbers and
 * strings in (decimal INT/LONG, LONG1/LONG4 two's complement, FLOAT text, protocol-0 quoted
 * STRING and raw-unicode-escape UNICODE, memo indices of PUT/GET), decoded as Python decodes
 * them. Lengths are bounded before any work that grows with them. */
#define _POSIX_C_SOURCE 200809L

#include "formats/pickle_internal.h"

#include <limits.h>
#include <locale.h>
#include <stdlib.h>
#include <string.h>

/* ---- Integers ---------------------------------------------------------------------------- */

/* Little-endian two's complement (LONG1/LONG4 payload) to INT or, if wider than int64, BIGINT
 * holding the minimal encoding. */
tm_status pk_int_from_le(parser *p, const uint8_t *b, size_t n, tm_pk_value **out) {
    while (n > 1 && ((b[n - 1] == 0x00 && !(b[n - 2] & 0x80)) ||
                     (b[n - 1] == 0xff && (b[n - 2] & 0x80))))
        n--;
    if (n <= 8) {
        uint64_t x = 0;
        for (size_t i = 0; i < n; i++) x |= (uint64_t)b[i] << (8 * i);
        if (n && n < 8 && (b[n - 1] & 0x80)) x |= ~(uint64_t)0 << (8 * n);
        int64_t sx;
        memcpy(&sx, &x, sizeof sx);
        return pk_new_int(p, sx, out);
    }
    return pk_new_str(p, TM_PK_BIGINT, b, n, out);
}

/* Python refuses to convert longer decimal strings (sys.int_info.default_max_str_digits); the
 * conversion below is quadratic, so the same bound keeps it cheap. */
#define MAX_DECIMAL_DIGITS 4300

static int is_space(char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
}

tm_status pk_int_from_text(parser *p, const char *s, size_t len, tm_pk_value **out) {
    while (len && is_space(*s)) { s++; len--; }
    while (len && is_space(s[len - 1])) len--;
    int neg = 0;
    if (len && (*s == '-' || *s == '+')) {
        neg = *s == '-';
        s++;
        len--;
    }
    if (!len) return pk_err(p, TM_ERROR_FORMAT, "invalid integer literal");
    if (len > MAX_DECIMAL_DIGITS)
        return pk_err(p, TM_ERROR_LIMIT, "integer literal longer than %d digits",
                      MAX_DECIMAL_DIGITS);
    for (size_t i = 0; i < len; i++)
        if (s[i] < '0' || s[i] > '9') return pk_err(p, TM_ERROR_FORMAT, "invalid integer literal");
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
        return pk_new_int(p, x, out);
    }
    size_t cap = len / 9 + 2;
    uint32_t *limbs = calloc(cap, sizeof(uint32_t));
    if (!limbs) return pk_nomem(p);
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
        return pk_nomem(p);
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
    tm_status st = pk_int_from_le(p, b, nb, out);
    free(limbs);
    free(b);
    return st;
}

tm_status pk_parse_index(parser *p, const char *s, size_t len, uint64_t *out) {
    uint64_t x = 0;
    if (!len) return pk_err(p, TM_ERROR_FORMAT, "invalid memo index");
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return pk_err(p, TM_ERROR_FORMAT, "invalid memo index");
        unsigned d = (unsigned)(s[i] - '0');
        if (x > (UINT64_MAX - d) / 10) return pk_err(p, TM_ERROR_FORMAT, "memo index too large");
        x = x * 10 + d;
    }
    *out = x;
    return TM_OK;
}

tm_status pk_float_from_text(parser *p, const char *s, size_t len, tm_pk_value **out) {
    char buf[512];
    while (len && is_space(*s)) { s++; len--; }
    while (len && is_space(s[len - 1])) len--;
    if (!len || len >= sizeof buf) return pk_err(p, TM_ERROR_FORMAT, "invalid float literal");
    memcpy(buf, s, len);
    buf[len] = 0;
    /* strtod follows LC_NUMERIC; pickles always use '.'. */
    const char *dp = localeconv()->decimal_point;
    if (dp && dp[0] && dp[0] != '.' && !dp[1])
        for (size_t i = 0; i < len; i++)
            if (buf[i] == '.') buf[i] = dp[0];
    char *end = NULL;
    double x = strtod(buf, &end);
    if (end != buf + len) return pk_err(p, TM_ERROR_FORMAT, "invalid float literal");
    TRY(pk_new_value(p, TM_PK_FLOAT, out));
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
tm_status pk_decode_string_repr(parser *p, const char *s, size_t len, tm_pk_value **out) {
    if (len < 2 || s[0] != s[len - 1] || (s[0] != '\'' && s[0] != '"'))
        return pk_err(p, TM_ERROR_FORMAT, "the STRING argument must be quoted");
    s++;
    len -= 2;
    char *o = pk_alloc(p, len + 1);
    if (!o) return pk_nomem(p);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c != '\\') { o[n++] = c; continue; }
        if (++i >= len) return pk_err(p, TM_ERROR_FORMAT, "trailing \\ in STRING");
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
            if (h1 < 0 || h2 < 0) return pk_err(p, TM_ERROR_FORMAT, "invalid \\x escape in STRING");
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
    TRY(pk_new_value(p, TM_PK_STRING, out));
    (*out)->u.str.data = o;
    (*out)->u.str.len = n;
    return TM_OK;
}

/* Protocol-0 UNICODE: raw-unicode-escape (bytes are Latin-1 code points; \uXXXX and
 * \UXXXXXXXX escapes count only after an odd run of backslashes), re-encoded as UTF-8. */
tm_status pk_decode_raw_unicode_escape(parser *p, const char *s, size_t len,
                                       tm_pk_value **out) {
    if (len > (SIZE_MAX - 1) / 2) return pk_nomem(p);
    char *o = pk_alloc(p, 2 * len + 1);
    if (!o) return pk_nomem(p);
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
            return pk_err(p, TM_ERROR_FORMAT, "truncated \\u escape in UNICODE");
        uint32_t cp = 0;
        for (int k = 0; k < digits; k++) {
            int h = hexval((unsigned char)s[i + (size_t)k]);
            if (h < 0) return pk_err(p, TM_ERROR_FORMAT, "invalid \\u escape in UNICODE");
            cp = cp * 16 + (uint32_t)h;
        }
        if (cp > 0x10ffff) return pk_err(p, TM_ERROR_FORMAT, "\\U escape out of range in UNICODE");
        i += (size_t)digits;
        n += put_utf8(o + n, cp);
    }
    o[n] = 0;
    TRY(pk_new_value(p, TM_PK_STRING, out));
    (*out)->u.str.data = o;
    (*out)->u.str.len = n;
    return TM_OK;
}
