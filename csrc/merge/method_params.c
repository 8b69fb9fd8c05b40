/* Method parameters: text or numbers as the caller gave them → checked numbers, by the method's
 * declaration. One parser and one set of messages for the C API, the command line and recipes
 * (which hand their YAML scalars over as text). C11. */
#define _GNU_SOURCE
#include "merge/method.h"

#include "core/c_number.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const char *kind_word(const tm_param_decl *d) {
    switch (d->kind) {
    case TM_PARAM_INTEGER: return "a whole number";
    case TM_PARAM_BOOL: return "true or false";
    case TM_PARAM_CHOICE: return "one of";
    default: return d->per_input ? "a number, or one per input separated by commas" : "a number";
    }
}

/* The index of word in "a|b|c", or -1. */
static int choice_index(const char *choices, const char *word) {
    size_t wl = strlen(word);
    int i = 0;
    for (const char *p = choices; p && *p; i++) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == wl && strncasecmp(p, word, wl) == 0) return i;
        p = bar ? bar + 1 : NULL;
    }
    return -1;
}

tm_status tm_param_check_number(const tm_param_decl *d, double v, tm_error *err) {
    if (!isfinite(v)) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: %g is not a finite number", d->name, v);
    if (d->kind == TM_PARAM_INTEGER && v != floor(v))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: expected a whole number, got %g", d->name, v);
    if (d->kind == TM_PARAM_BOOL && v != 0 && v != 1)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: expected true or false, got %g", d->name, v);
    if (d->kind != TM_PARAM_NUMBER && d->kind != TM_PARAM_INTEGER) return TM_OK;
    int low = d->min_exclusive ? v <= d->min : v < d->min, high = d->max_exclusive ? v >= d->max : v > d->max;
    if (low || high)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: %g is outside %c%g, %g%c", d->name, v,
                            d->min_exclusive ? '(' : '[', d->min, d->max, d->max_exclusive ? ')' : ']');
    return TM_OK;
}

static tm_status bad_text(const tm_param_decl *d, const char *text, tm_error *err) {
    if (d->kind == TM_PARAM_CHOICE)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: expected one of %s, got '%s'", d->name, d->choices,
                            text);
    return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: expected %s, got '%s'", d->name, kind_word(d), text);
}

tm_status tm_param_parse_text(const tm_param_decl *d, const char *text, double *out, size_t cap, size_t *count,
                              tm_error *err) {
    *count = 0;
    if (!text) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: no value", d->name);
    if (d->kind == TM_PARAM_BOOL) {
        static const char *const yes[] = {"true", "1", "yes", "on"}, *const no[] = {"false", "0", "no", "off"};
        for (size_t i = 0; i < 4; i++) {
            if (strcasecmp(text, yes[i]) == 0) return out[0] = 1, *count = 1, TM_OK;
            if (strcasecmp(text, no[i]) == 0) return out[0] = 0, *count = 1, TM_OK;
        }
        return bad_text(d, text, err);
    }
    if (d->kind == TM_PARAM_CHOICE) {
        int i = choice_index(d->choices, text);
        if (i < 0) return bad_text(d, text, err);
        out[0] = i;
        *count = 1;
        return TM_OK;
    }
    const char *p = text;
    while (*p) {
        while (*p == ' ') p++;
        char *end;
        errno = 0;
        double v = tm_strtod_c(p, &end);
        if (end == p || errno == ERANGE) return bad_text(d, text, err);
        while (*end == ' ') end++;
        if (*end && *end != ',') return bad_text(d, text, err);
        if (*count == cap || (*count == 1 && !d->per_input))
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: expected %s, got '%s'", d->name,
                                d->per_input ? "at most one number per input" : "one number", text);
        tm_status st = tm_param_check_number(d, v, err);
        if (st) return st;
        out[(*count)++] = v;
        p = *end ? end + 1 : end;
        if (*end == ',' && !*p) return bad_text(d, text, err);
    }
    if (!*count) return bad_text(d, text, err);
    return TM_OK;
}

int tm_name_in(const char *const *names, const char *name) {
    for (; *names; names++)
        if (strcmp(*names, name) == 0) return 1;
    return 0;
}

int tm_method_param_index(const tm_method *m, const char *name, int with_aliases) {
    for (size_t j = 0; j < m->n_params; j++)
        if (!strcmp(m->params[j].name, name) || (with_aliases && tm_name_in(m->params[j].aliases, name))) return (int)j;
    return -1;
}

/* Fills parameter j from what the caller gave (text or numbers), broadcasting one value over
 * the inputs of a per-input parameter. */
static tm_status fill(const tm_param_decl *d, const tm_param *given, double *dst, size_t count, int spread,
                      tm_error *err) {
    const double *src = given->numbers;
    size_t n = given->n_numbers;
    double *parsed = NULL;
    tm_status st = TM_OK;
    if (given->text) {
        parsed = malloc((count + 1) * sizeof *parsed);
        if (!parsed) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        st = tm_param_parse_text(d, given->text, parsed, count + 1, &n, err);
        src = parsed;
    } else {
        if (!src || !n) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: no value", d->name);
        for (size_t i = 0; i < n && !st; i++) st = tm_param_check_number(d, src[i], err);
    }
    if (!st && n != count && (n != 1 || !spread))
        st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "expected %zu %s (one per input), got %zu", count, d->name, n);
    for (size_t i = 0; i < count && !st; i++) dst[i] = src[n == 1 ? 0 : i];
    free(parsed);
    return st;
}

tm_status tm_param_values_resolve(const tm_method *m, const tm_param *params, size_t n_params, size_t n_inputs,
                                  tm_param_values *out, tm_error *err) {
    memset(out, 0, sizeof *out);
    if (m->n_params > TM_METHOD_MAX_PARAMS) /* a table entry over the bound, caught by any test */
        return tm_error_set(err, TM_ERROR_INTERNAL, "%s declares %zu parameters, more than %d", m->name, m->n_params,
                            TM_METHOD_MAX_PARAMS);
    out->n_inputs = n_inputs;
    out->n_params = m->n_params;
    for (size_t j = 0; j < m->n_params; j++) {
        out->at[j] = out->n_values;
        out->count[j] = m->params[j].per_input ? n_inputs : 1;
        out->n_values += out->count[j];
    }
    if (n_params && !params) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "params is NULL");
    out->values = calloc(out->n_values + 1, sizeof *out->values);
    if (!out->values) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t k = 0; k < n_params; k++) {
        const char *name = params[k].name ? params[k].name : "";
        int j = tm_method_param_index(m, name, 0);
        if (j < 0) {
            if (m->n_params == 0)
                return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s takes no parameters (got '%s')", m->name, name);
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s has no parameter '%s'", m->name, name);
        }
        if (out->given[j])
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: given twice", m->params[j].name);
        tm_status st = fill(&m->params[j], &params[k], out->values + out->at[j], out->count[j],
                            !m->params[j].exactly_per_input, err);
        if (st) return st;
        out->given[j] = 1;
    }
    for (size_t j = 0; j < m->n_params; j++) {
        const tm_param_decl *d = &m->params[j];
        if (out->given[j]) continue;
        if (d->required || !d->default_value)
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s needs %s", m->name, d->name);
        tm_param dflt = {d->name, d->default_value, NULL, 0};
        tm_status st = fill(d, &dflt, out->values + out->at[j], out->count[j], 1, err); /* a default is for all */
        if (st) return st;
    }
    return m->check ? m->check(out, err) : TM_OK;
}

void tm_param_values_free(tm_param_values *p) {
    if (!p) return;
    free(p->values);
    memset(p, 0, sizeof *p);
}
