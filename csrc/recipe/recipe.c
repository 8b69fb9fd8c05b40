/* Recipes, part 2: the tree (recipe_yaml.c) → a validated tm_recipe → tm_merge_files.
 *
 * Accepted shapes (see docs/recipes.md):
 *   - FusionBench method configs: top-level name / weights / normalize, or the same under
 *     `method:` (also `_target_: fusion_bench.method.SimpleAverageAlgorithm`);
 *   - FusionBench model pools: `models:` (or `modelpool: {models: ...}`) as a mapping
 *     name → path; names like _pretrained_ (leading and trailing underscore) are not merged;
 *   - mergekit configs: merge_method: linear, models: [{model: path, parameters: {weight: W}}],
 *     top-level parameters: {weight, normalize}; a weight may be per tensor:
 *     [{filter: "lm_head", value: 0.0}, {value: 1.0}].
 * Every error names the recipe, line and column of the offending node. C11. */
#define _GNU_SOURCE
#include <errno.h>
#include <fnmatch.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "core/atomic_output.h"
#include "core/c_number.h"
#include "core/struct_size.h"
#include "recipe/recipe.h"

typedef struct ictx {
    tm_recipe *r;
    tm_error *err;
    void (*warn)(void *, const char *);
    void *warn_user;
    int fusionbench; /* the method is named FusionBench's way (name:, method:, _target_), not merge_method: */
    int in_slices; /* parsing mergekit slices' sources: layer_range is theirs */
} ictx;

static char *dup_s(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d) memcpy(d, s, n + 1);
    return d;
}

/* ---- messages --------------------------------------------------------------------------------- */

static void locate(char *buf, size_t cap, const tm_recipe *r, const tm_rnode *at) {
    if (!at) snprintf(buf, cap, "%s", r->doc.origins[0]->label);
    else if (at->origin->is_override || !at->line) snprintf(buf, cap, "%s", at->origin->label);
    else snprintf(buf, cap, "%s:%zu:%zu", at->origin->label, at->line, at->column);
}

static tm_status ierr(ictx *c, tm_status st, const tm_rnode *at, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static tm_status ierr(ictx *c, tm_status st, const tm_rnode *at, const char *fmt, ...) {
    char loc[600], msg[800];
    locate(loc, sizeof loc, c->r, at);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return tm_error_set(c->err, st, "%s: %s", loc, msg);
}

static tm_status oom(ictx *c) { return tm_error_set(c->err, TM_ERROR_NOMEM, "out of memory"); }

static void iwarn(ictx *c, const tm_rnode *at, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void iwarn(ictx *c, const tm_rnode *at, const char *fmt, ...) {
    if (!c->warn) return;
    char loc[600], msg[800], line[1500];
    locate(loc, sizeof loc, c->r, at);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(line, sizeof line, "%s: %s", loc, msg);
    c->warn(c->warn_user, line);
}

/* Where a node is, for "given twice" messages: "line 3" or "override 'x=1'". */
static void short_where(char *buf, size_t cap, const tm_rnode *n) {
    if (n->origin->is_override) {
        const char *o = strstr(n->origin->label, "override '");
        snprintf(buf, cap, "%s", o ? o : n->origin->label);
    } else {
        snprintf(buf, cap, "line %zu", n->line);
    }
}

/* ---- scalars ---------------------------------------------------------------------------------- */

static int is_null(const tm_rnode *n) {
    return !n || (n->kind == TM_RNODE_SCALAR && n->plain &&
                  (!*n->text || !strcmp(n->text, "~") || !strcmp(n->text, "null") || !strcmp(n->text, "Null") ||
                   !strcmp(n->text, "NULL")));
}

static const char *kind_name(const tm_rnode *n) {
    return n->kind == TM_RNODE_SEQ ? "a list" : n->kind == TM_RNODE_MAP ? "a mapping" : "a single value";
}

static int is_missing_marker(const tm_rnode *n) {
    return n && n->kind == TM_RNODE_SCALAR && n->plain && strcmp(n->text, "???") == 0;
}

static tm_status want_scalar(ictx *c, const tm_rnode *n, const char *what) {
    if (n->kind != TM_RNODE_SCALAR) return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s: expected a single value, got %s", what, kind_name(n));
    if (is_missing_marker(n))
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s is mandatory ('?\?\?'): give it in the recipe or as %s=VALUE", what, what);
    return TM_OK;
}

static tm_status get_string(ictx *c, const tm_rnode *n, const char *what, const char **out) {
    tm_status st = want_scalar(c, n, what);
    if (st) return st;
    if (!*n->text) return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s is empty", what);
    *out = n->text;
    return TM_OK;
}

static int parse_double(const char *s, double *out) {
    if (!*s || *s == ' ') return 0;
    char *end;
    errno = 0;
    double v = tm_strtod_c(s, &end);
    if (end == s || *end || errno == ERANGE || !isfinite(v)) return 0;
    *out = v;
    return 1;
}

static tm_status get_number(ictx *c, const tm_rnode *n, const char *what, double *out) {
    tm_status st = want_scalar(c, n, what);
    if (st) return st;
    if (!n->plain)
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s: expected a number, got the string '%s'", what, n->text);
    if (!parse_double(n->text, out))
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s: expected a finite number, got '%s'", what, n->text);
    return TM_OK;
}

/* ---- keys ------------------------------------------------------------------------------------- */

/* Hydra/FusionBench bookkeeping keys (_target_, _recursive_, _pretrained_ ...). */
static int is_underscored(const char *k) {
    size_t n = strlen(k);
    return n >= 2 && k[0] == '_' && k[n - 1] == '_';
}

static size_t edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 40 || lb > 40) return 99;
    size_t d[41][41];
    for (size_t i = 0; i <= la; i++) d[i][0] = i;
    for (size_t j = 0; j <= lb; j++) d[0][j] = j;
    for (size_t i = 1; i <= la; i++)
        for (size_t j = 1; j <= lb; j++) {
            size_t best = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);
            if (d[i - 1][j] + 1 < best) best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    return d[la][lb];
}

/* Every key of map must be in allowed (NULL-terminated), ignored (warned about) or _underscored_. */
static tm_status check_keys(ictx *c, const tm_rnode *map, const char *where, const char *const *allowed,
                            const char *const *ignored, const char *ignored_why) {
    for (size_t i = 0; i < map->n; i++) {
        const tm_rnode *k = map->keys[i];
        int ok = is_underscored(k->text);
        for (const char *const *a = allowed; !ok && *a; a++) ok = !strcmp(k->text, *a);
        if (ok) continue;
        int skip = 0;
        for (const char *const *a = ignored; !skip && a && *a; a++) skip = !strcmp(k->text, *a);
        if (skip) {
            iwarn(c, k, "ignored '%s' (%s)", k->text, ignored_why);
            continue;
        }
        const char *best = NULL;
        size_t best_d = 3;
        for (const char *const *a = allowed; *a; a++) {
            size_t d = edit_distance(k->text, *a);
            if (d < best_d) best_d = d, best = *a;
        }
        if (best)
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, k, "unknown key '%s' in %s (did you mean '%s'?)", k->text, where,
                        best);
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, k, "unknown key '%s' in %s", k->text, where);
    }
    return TM_OK;
}

static tm_status want_map(ictx *c, const tm_rnode *n, const char *what) {
    if (n->kind != TM_RNODE_MAP)
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s: expected a mapping (name: value), got %s", what, kind_name(n));
    return TM_OK;
}

/* Chooses among the places a setting may be given: absent ones (NULL or null) are skipped; two
 * given in the recipe itself are an error; when one comes from an override it wins. */
static tm_status choose_at(ictx *c, const char *what, const tm_rnode *const *cand, const char *const *places,
                           size_t n, const tm_rnode **out, size_t *index) {
    *out = NULL;
    size_t chosen = 0;
    for (size_t i = 0; i < n; i++) {
        const tm_rnode *v = cand[i];
        if (is_null(v)) continue;
        if (!*out) {
            *out = v;
            chosen = i;
            continue;
        }
        int a = (*out)->origin->is_override, b = v->origin->is_override;
        if (a && !b) continue;
        if (b && !a) {
            *out = v;
            chosen = i;
            continue;
        }
        char w1[600], w2[600];
        short_where(w1, sizeof w1, *out);
        short_where(w2, sizeof w2, v);
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, v, "%s is given twice: %s (%s) and %s (%s); keep one", what,
                    places[chosen], w1, places[i], w2);
    }
    if (index) *index = chosen;
    return TM_OK;
}

static tm_status choose(ictx *c, const char *what, const tm_rnode *const *cand, const char *const *places, size_t n,
                        const tm_rnode **out) {
    return choose_at(c, what, cand, places, n, out, NULL);
}

/* ---- paths ------------------------------------------------------------------------------------ */

static char *resolve(const tm_rnode *n) {
    const char *dir = n->origin->base_dir;
    if (n->text[0] == '/' || !*dir) return dup_s(n->text);
    size_t a = strlen(dir), b = strlen(n->text);
    char *p = malloc(a + b + 1);
    if (p) {
        memcpy(p, dir, a);
        memcpy(p + a, n->text, b + 1);
    }
    return p;
}

static tm_status check_exists(ictx *c, const tm_rnode *at, const char *what, const char *written, const char *path) {
    struct stat sb;
    if (stat(path, &sb) == 0) return TM_OK;
    int e = errno;
    char looked[600] = "";
    if (strcmp(written, path) != 0) snprintf(looked, sizeof looked, " (looked for '%s')", path);
    if (e == ENOENT || e == ENOTDIR)
        return ierr(c, TM_ERROR_NOT_FOUND, at, "%s '%s' not found%s", what, written, looked);
    return ierr(c, TM_ERROR_IO, at, "%s '%s': %s%s", what, written, strerror(e), looked);
}

/* ---- weights and rules ------------------------------------------------------------------------ */

static void setting_free(tm_recipe_setting *s) {
    for (size_t i = 0; i < s->n_rules; i++) {
        free(s->rules[i].filter);
        free(s->rules[i].gradient);
    }
    free(s->rules);
    memset(s, 0, sizeof *s);
}

/* mergekit's layer gradient: a list of numbers, anchors spread evenly over the layers. */
static tm_status parse_gradient(ictx *c, const tm_rnode *v, const char *what, tm_recipe_rule *rule) {
    if (!v->n) return ierr(c, TM_ERROR_INVALID_ARGUMENT, v, "%s: the gradient (list of numbers) is empty", what);
    if (!(rule->gradient = calloc(v->n, sizeof *rule->gradient))) return oom(c);
    rule->n_gradient = v->n;
    for (size_t i = 0; i < v->n; i++) {
        if (v->items[i]->kind != TM_RNODE_SCALAR)
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, v->items[i],
                        "%s: expected a number, a layer gradient (a list of numbers) or {filter, value} rules", what);
        tm_status st = get_number(c, v->items[i], what, &rule->gradient[i]);
        if (st) return st;
    }
    rule->value = rule->gradient[0];
    c->r->has_gradient = 1;
    return TM_OK;
}

double tm_recipe_gradient_at(const double *anchors, size_t n, double t) {
    /* mergekit's evaluate_setting: t·(n − 1) splits into an anchor index and a fraction */
    double scaled = t * (double)(n - 1);
    size_t i0 = (size_t)scaled, i1 = i0 + 1 < n ? i0 + 1 : n - 1;
    if (i0 >= n) i0 = i1 = n - 1;
    double frac = scaled - (double)i0;
    return (1 - frac) * anchors[i0] + frac * anchors[i1];
}

long tm_recipe_layer_of(const char *name) {
    for (const char *p = name; *p;) {
        const char *end = strchr(p, '.');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        size_t digits = strspn(p, "0123456789");
        if (len && digits == len && len < 10) return strtol(p, NULL, 10);
        if (!end) break;
        p = end + 1;
    }
    return -1;
}

/* Where name sits for a gradient, as mergekit sets t: layer i of n → i / (n − 1) (1 when there is
 * one layer); tensors outside the layers (embeddings, head, final norm) → 0. */
static double layer_t(const tm_recipe *r, const char *name) {
    long i = tm_recipe_layer_of(name);
    if (i < 0 || r->n_layers <= 0) return 0;
    return r->n_layers > 1 ? (double)i / (double)(r->n_layers - 1) : 1;
}

static tm_status parse_rule(ictx *c, const tm_rnode *m, const char *what, tm_recipe_rule *rule) {
    static const char *const keys[] = {"filter", "value", NULL};
    tm_status st = check_keys(c, m, what, keys, NULL, NULL);
    if (st) return st;
    const tm_rnode *f = tm_rnode_get(m, "filter"), *v = tm_rnode_get(m, "value");
    rule->at = m;
    if (!f || is_null(f)) {
        rule->filter = NULL;
    } else {
        const char *s = NULL;
        if ((st = get_string(c, f, "filter", &s))) return st;
        if (!(rule->filter = dup_s(s))) return oom(c);
        rule->at = f;
    }
    if (!v || is_null(v)) return ierr(c, TM_ERROR_INVALID_ARGUMENT, m, "%s: a rule needs a value", what);
    if (v->kind == TM_RNODE_SEQ) return parse_gradient(c, v, what, rule);
    return get_number(c, v, "value", &rule->value);
}

/* weight: a number; a list of {filter, value} rules (first match wins); or one such rule. */
static tm_status parse_setting(ictx *c, const tm_rnode *n, const char *what, tm_recipe_setting *s) {
    memset(s, 0, sizeof *s);
    if (is_null(n)) return TM_OK;
    s->present = 1;
    s->at = n;
    if (n->kind == TM_RNODE_SCALAR) return get_number(c, n, what, &s->value);
    size_t count = n->kind == TM_RNODE_SEQ ? n->n : 1;
    if (n->kind == TM_RNODE_SEQ) {
        if (!n->n) return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s: the list of rules is empty", what);
        if (n->items[0]->kind == TM_RNODE_SCALAR) { /* a layer gradient: one catch-all rule */
            s->is_rules = 1;
            if (!(s->rules = calloc(1, sizeof *s->rules))) return oom(c);
            s->n_rules = 1;
            s->rules[0].at = n;
            return parse_gradient(c, n, what, &s->rules[0]);
        }
        for (size_t i = 0; i < n->n; i++)
            if (n->items[i]->kind != TM_RNODE_MAP)
                return ierr(c, TM_ERROR_INVALID_ARGUMENT, n->items[i],
                            "%s: expected a number, a layer gradient (a list of numbers) or a list of "
                            "{filter: NAME, value: W} rules",
                            what);
    }
    s->is_rules = 1;
    s->rules = calloc(count, sizeof *s->rules);
    if (!s->rules) return oom(c);
    for (size_t i = 0; i < count; i++) {
        tm_status st = parse_rule(c, n->kind == TM_RNODE_SEQ ? n->items[i] : n, what, &s->rules[i]);
        s->n_rules++;
        if (st) return st;
    }
    return TM_OK;
}

static int is_catch_all(const tm_recipe_rule *rule) { return !rule->filter || !strcmp(rule->filter, "*"); }

/* 1 and the value the setting gives when no filter matches (its catch-all; out may be NULL), or
 * 0 when it has none. */
static int setting_default(const tm_recipe_setting *s, double *out) {
    double v;
    if (!out) out = &v;
    if (!s->present) return 0;
    if (!s->is_rules) return *out = s->value, 1;
    for (size_t i = 0; i < s->n_rules; i++)
        if (is_catch_all(&s->rules[i])) return *out = s->rules[i].value, 1;
    return 0;
}

int tm_recipe_pattern_matches(const char *pattern, const char *name) {
    if (!pattern || !strcmp(pattern, "*")) return 1;
    if (strpbrk(pattern, "*?[")) return fnmatch(pattern, name, 0) == 0;
    return strstr(name, pattern) != NULL;
}

/* The value the setting gives for name (counting the rule's use when count); a gradient is read
 * at t, the tensor's place among the layers. */
static int setting_lookup(tm_recipe_setting *s, const char *name, double t, int count, double *out) {
    if (!s->present) return 0;
    if (!s->is_rules) return *out = s->value, 1;
    for (size_t i = 0; i < s->n_rules; i++) {
        tm_recipe_rule *rule = &s->rules[i];
        if (is_catch_all(rule) || tm_recipe_pattern_matches(rule->filter, name)) {
            if (count) rule->matched++;
            *out = rule->n_gradient ? tm_recipe_gradient_at(rule->gradient, rule->n_gradient, t) : rule->value;
            return 1;
        }
    }
    return 0;
}

/* ---- patterns --------------------------------------------------------------------------------- */

static tm_status parse_patterns(ictx *c, const tm_rnode *n, const char *what, tm_recipe_pattern **out, size_t *count) {
    *out = NULL;
    *count = 0;
    if (is_null(n)) return TM_OK;
    size_t k = n->kind == TM_RNODE_SEQ ? n->n : 1;
    if (n->kind == TM_RNODE_MAP)
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s: expected a name pattern or a list of them, got a mapping", what);
    *out = calloc(k ? k : 1, sizeof **out);
    if (!*out) return oom(c);
    for (size_t i = 0; i < k; i++) {
        const tm_rnode *p = n->kind == TM_RNODE_SEQ ? n->items[i] : n;
        const char *s = NULL;
        tm_status st = get_string(c, p, what, &s);
        if (st) return st;
        if (!((*out)[i].pattern = dup_s(s))) return oom(c);
        (*out)[i].at = p;
        (*count)++;
    }
    return TM_OK;
}

static int excluded_by_patterns(const tm_recipe *r, const char *name) {
    int keep = r->n_include == 0;
    for (size_t i = 0; i < r->n_include && !keep; i++) keep = tm_recipe_pattern_matches(r->include[i].pattern, name);
    for (size_t i = 0; i < r->n_exclude && keep; i++) keep = !tm_recipe_pattern_matches(r->exclude[i].pattern, name);
    return !keep;
}

/* The keys a recipe may use before its method is known: fixed (NULL-terminated, or NULL), then
 * every method's parameter names and aliases (only per-input ones when per_input), each once.
 * malloc'd and NULL-terminated, sized from the table; NULL when out of memory. */
#define MAX_NAMES_PER_PARAM (1 + sizeof((tm_param_decl *)0)->aliases / sizeof(char *))
static const char **known_keys(const char *const *fixed, int per_input) {
    size_t cap = 1;
    for (const char *const *f = fixed; f && *f; f++) cap++;
    for (size_t i = 0; i < tm_methods_count(); i++) cap += tm_methods_at(i)->n_params * MAX_NAMES_PER_PARAM;
    const char **out = malloc(cap * sizeof *out);
    if (!out) return NULL;
    size_t n = 0;
    for (const char *const *f = fixed; f && *f; f++) out[n++] = *f;
    for (size_t i = 0; i < tm_methods_count(); i++) {
        const tm_method *m = tm_methods_at(i);
        for (size_t j = 0; j < m->n_params; j++) {
            const tm_param_decl *d = &m->params[j];
            if (per_input && !d->per_input) continue;
            for (size_t k = 0; k < MAX_NAMES_PER_PARAM; k++) {
                const char *name = k ? d->aliases[k - 1] : d->name;
                if (!name) break;
                out[n] = NULL;
                if (!tm_name_in(out, name)) out[n++] = name;
            }
        }
    }
    out[n] = NULL;
    return out;
}

/* ---- models ----------------------------------------------------------------------------------- */

/* One model: "path", or {model: path, parameters: {...}} (path: is accepted for model:). */
static tm_status parse_model(ictx *c, const tm_rnode *n, const char *where, const char *name, tm_recipe_model *m) {
    memset(m, 0, sizeof *m);
    if (name && !(m->name = dup_s(name))) return oom(c);
    const tm_rnode *path = n;
    tm_status st;
    if (n->kind == TM_RNODE_MAP) {
        static const char *const keys[] = {"model", "path", "parameters", "name", NULL};
        static const char *const source_keys[] = {"model", "parameters", "layer_range", NULL};
        if ((st = check_keys(c, n, where, c->in_slices ? source_keys : keys, NULL, NULL))) return st;
        const tm_rnode *cand[2] = {tm_rnode_get(n, "model"), tm_rnode_get(n, "path")};
        static const char *const places[2] = {"as model", "as path"};
        if ((st = choose(c, "the model's path", cand, places, 2, &path))) return st;
        if (!path) return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s: no model: give model: PATH", where);
        const tm_rnode *nm = tm_rnode_get(n, "name");
        if (nm && !is_null(nm) && !m->name) {
            const char *s = NULL;
            if ((st = get_string(c, nm, "name", &s))) return st;
            if (!(m->name = dup_s(s))) return oom(c);
        }
        const tm_rnode *params = tm_rnode_get(n, "parameters");
        if (!is_null(params)) {
            char what[300];
            snprintf(what, sizeof what, "%s.parameters", where);
            const char **keys = known_keys(NULL, 1);
            if (!keys) return oom(c);
            if (!(st = want_map(c, params, what))) st = check_keys(c, params, what, keys, NULL, NULL);
            free(keys);
            if (st) return st;
            m->params_at = params; /* read once the method is known */
        }
    } else if (n->kind == TM_RNODE_SEQ) {
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s: expected a path or {model: PATH, parameters: ...}, got a list",
                    where);
    }
    if (is_null(path)) return ierr(c, TM_ERROR_INVALID_ARGUMENT, path, "%s: the model path is empty", where);
    const char *written = NULL;
    if ((st = get_string(c, path, "the model path", &written))) return st;
    m->at = path;
    if (!(m->written = dup_s(written)) || !(m->path = resolve(path))) return oom(c);
    return TM_OK;
}

static tm_status push_model(ictx *c, tm_recipe_model *m) {
    tm_recipe *r = c->r;
    tm_recipe_model *a = realloc(r->models, (r->n_models + 1) * sizeof *a);
    if (!a) return oom(c);
    r->models = a;
    a[r->n_models++] = *m;
    return TM_OK;
}

static void model_free(tm_recipe_model *m) {
    free(m->name);
    free(m->written);
    free(m->path);
    for (size_t j = 0; j < TM_METHOD_MAX_PARAMS; j++) setting_free(&m->params[j]);
}

static tm_status parse_models(ictx *c, const tm_rnode *models) {
    tm_status st = TM_OK;
    if (models->kind == TM_RNODE_SCALAR)
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, models,
                    "models: expected a list of paths or a mapping name: path, got a single value");
    for (size_t i = 0; i < models->n && !st; i++) {
        char where[300];
        tm_recipe_model m;
        if (models->kind == TM_RNODE_SEQ) {
            snprintf(where, sizeof where, "models[%zu]", i);
            st = parse_model(c, models->items[i], where, NULL, &m);
        } else {
            const char *name = models->keys[i]->text;
            if (is_underscored(name)) continue; /* FusionBench's _pretrained_ is not one of the models merged */
            snprintf(where, sizeof where, "models.%s", name);
            st = parse_model(c, models->items[i], where, name, &m);
        }
        if (!st) st = push_model(c, &m);
        if (st) model_free(&m);
    }
    if (!st && !c->r->n_models)
        st = ierr(c, TM_ERROR_INVALID_ARGUMENT, models, "no models to merge%s",
                  models->kind == TM_RNODE_MAP && models->n ? " (names like _pretrained_ are not merged)" : "");
    return st;
}

/* ---- the method -------------------------------------------------------------------------------- */

static tm_status method_from_name(ictx *c, const tm_rnode *n, const tm_method **out) {
    const char *s = NULL;
    tm_status st = get_string(c, n, "method", &s);
    if (st) return st;
    if ((*out = tm_methods_find(s))) return TM_OK;
    return ierr(c, TM_ERROR_UNSUPPORTED, n, "unknown method '%s' (torchmerge runs %s)", s, tm_methods_list());
}

/* FusionBench's newer configs name the algorithm's class: fusion_bench.method.XAlgorithm. */
static tm_status method_from_target(ictx *c, const tm_rnode *n, const tm_method **out) {
    const char *s = NULL;
    tm_status st = get_string(c, n, "_target_", &s);
    if (st) return st;
    const char *cls = strrchr(s, '.');
    cls = cls ? cls + 1 : s;
    char known[512] = "";
    for (size_t i = 0, used = 0; i < tm_methods_count(); i++) {
        const tm_method *m = tm_methods_at(i);
        if (!m->fusionbench_class) continue;
        if (!strcmp(cls, m->fusionbench_class)) return *out = m, TM_OK;
        if (used < sizeof known)
            used += (size_t)snprintf(known + used, sizeof known - used, "%s%s", used ? ", " : "", m->fusionbench_class);
    }
    return ierr(c, TM_ERROR_UNSUPPORTED, n, "unknown method '_target_: %s' (torchmerge runs %s)", s, known);
}

/* ---- the method's parameters ------------------------------------------------------------------ */

/* A parameter key found in the recipe (any method's), with its value node. */
typedef struct given_param {
    const char *key;
    const tm_rnode *value;
} given_param;

/* Every key naming some method's parameter: at the top, under method:, in parameters:, in a
 * model's parameters:, into *out (malloc'd; NULL when out of memory). Returns how many. */
static size_t find_given(const tm_recipe *r, const tm_rnode *root, const tm_rnode *method_map, const tm_rnode *params,
                         given_param **out) {
    const char **known = known_keys(NULL, 0);
    size_t cap = 1, n = 0;
    for (size_t w = 0; w < 3 + r->n_models; w++) {
        const tm_rnode *map = w == 0 ? root : w == 1 ? method_map : w == 2 ? params : r->models[w - 3].params_at;
        cap += map ? map->n : 0;
    }
    *out = known ? malloc(cap * sizeof **out) : NULL;
    for (size_t w = 0; *out && w < 3 + r->n_models; w++) {
        const tm_rnode *map = w == 0 ? root : w == 1 ? method_map : w == 2 ? params : r->models[w - 3].params_at;
        for (size_t i = 0; map && i < map->n; i++)
            if (tm_name_in(known, map->keys[i]->text) && !is_null(map->items[i]))
                (*out)[n++] = (given_param){map->keys[i]->text, map->items[i]};
    }
    free(known);
    return n;
}

/* Rules and values are checked against the parameter's range where they are written. */
static tm_status check_setting(ictx *c, const tm_param_decl *d, const tm_recipe_setting *s) {
    tm_error e = {0};
    if (s->present && !s->is_rules && tm_param_check_number(d, s->value, &e))
        return ierr(c, e.status, s->at, "%s", e.msg);
    for (size_t i = 0; s->is_rules && i < s->n_rules; i++) {
        const tm_recipe_rule *rule = &s->rules[i];
        for (size_t k = 0; k < (rule->n_gradient ? rule->n_gradient : 1); k++)
            if (tm_param_check_number(d, rule->n_gradient ? rule->gradient[k] : rule->value, &e))
                return ierr(c, e.status, rule->at, "%s", e.msg);
    }
    return TM_OK;
}

/* The node giving parameter d in map by its name or an alias, and that key. */
static const tm_rnode *get_param(const tm_rnode *map, const tm_param_decl *d, const char **key) {
    for (size_t k = 0; map && k < 4; k++) {
        const char *name = k ? d->aliases[k - 1] : d->name;
        if (!name) break;
        const tm_rnode *v = tm_rnode_get(map, name);
        if (!is_null(v)) return *key = name, v;
    }
    return NULL;
}

/* ---- FusionBench's ways of writing parameters ------------------------------------------------- */

/* FusionBench writes some parameters its own way. By parameter name, so that every method with
 * such a parameter (dare_linear, dare_ties; ties) takes them:
 *   a key giving a parameter through a function: DARE's sparsity_ratio = 1 − density; TIES'
 *   threshold, the kept share in percent (density = threshold / 100 when above 1, else as is:
 *   FusionBench's topk_values_mask);
 *   a boolean for a choice: DARE's rescale, true = ÷ density in FusionBench (÷ (1 − sparsity_ratio))
 *   but mergekit's L1-norm rescale in a mergekit config, false = none. */
static double complement(double v) { return 1 - v; }
static double percent(double v) { return v > 1 ? v / 100 : v; }
static const struct {
    const char *key, *param;
    double (*to)(double);
    double lo, hi;          /* the key's range: [lo, hi) for the complement, (lo, hi] for percent */
    const char *meaning;    /* "1 - density" */
} complements[] = {{"sparsity_ratio", "density", complement, 0, 1, "= 1 - density"},
                   {"threshold", "density", percent, 0, 100, "= density, in percent when above 1"}};
static const struct {
    const char *param, *fusionbench_true, *mergekit_true, *if_false;
} bool_choices[] = {{"rescale", "inverse", "l1", "none"}};

/* The text a choice parameter gets for the scalar n: a boolean mapped by bool_choices, else n's. */
static const char *choice_text(const ictx *c, const tm_param_decl *d, const tm_rnode *n) {
    for (size_t k = 0; d->kind == TM_PARAM_CHOICE && n->plain && k < sizeof bool_choices / sizeof *bool_choices; k++) {
        if (strcmp(d->name, bool_choices[k].param) != 0) continue;
        if (!strcasecmp(n->text, "true")) return c->fusionbench ? bool_choices[k].fusionbench_true : bool_choices[k].mergekit_true;
        if (!strcasecmp(n->text, "false")) return bool_choices[k].if_false;
    }
    return n->text;
}

/* Parameter j given as its complement (sparsity_ratio for density) at the top or under method:,
 * into the merge's parameters; found: j's node when also given under its own name (an error). */
static tm_status parse_complement(ictx *c, size_t j, const tm_rnode *root, const tm_rnode *method_map,
                                  const tm_rnode *found) {
    tm_recipe *r = c->r;
    const tm_param_decl *d = &r->method->params[j];
    for (size_t k = 0; k < sizeof complements / sizeof *complements; k++) {
        if (strcmp(d->name, complements[k].param) != 0) continue;
        const char *key = complements[k].key;
        char p0[80], p1[80];
        snprintf(p0, sizeof p0, "as %s", key);
        snprintf(p1, sizeof p1, "as method.%s", key);
        const tm_rnode *cand[2] = {tm_rnode_get(root, key), method_map ? tm_rnode_get(method_map, key) : NULL}, *n;
        const char *const places[2] = {p0, p1};
        tm_status st = choose(c, key, cand, places, 2, &n);
        if (st) return st;
        if (!n) continue;
        if (found)
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "give %s or %s (%s), not both", d->name, key,
                        complements[k].meaning);
        double v;
        if ((st = get_number(c, n, key, &v))) return st;
        const double x = complements[k].to(v);
        if (!(x > 0 && x <= 1) || !(v >= complements[k].lo && v <= complements[k].hi))
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s: %g gives %s %g, outside (0, 1] (%s %s)", key, v, d->name,
                        x, key, complements[k].meaning);
        if (!(r->numbers[j] = calloc(1, sizeof *r->numbers[j]))) return oom(c);
        r->numbers[j][0] = x;
        r->params[r->n_params++] = (tm_param){d->name, NULL, r->numbers[j], 1};
        return TM_OK;
    }
    return TM_OK;
}

/* FusionBench's settings that are not parameters of ours: refused unless they mean what
 * torchmerge does (only_on_linear_weights: false, an empty ignore_keys), or warned about
 * (where FusionBench saves its model: torchmerge writes output:). */
static tm_status check_fusionbench_settings(ictx *c, const tm_rnode *root, const tm_rnode *method_map) {
    const tm_method *m = c->r->method;
    for (int w = 0; w < 2; w++) {
        const tm_rnode *map = w ? method_map : root;
        for (size_t i = 0; map && i < map->n; i++) {
            const char *key = map->keys[i]->text;
            const tm_rnode *v = map->items[i];
            for (size_t k = 0; k < sizeof complements / sizeof *complements; k++)
                if (!strcmp(key, complements[k].key) && !is_null(v) && tm_method_param_index(m, complements[k].param, 0) < 0)
                    return ierr(c, TM_ERROR_INVALID_ARGUMENT, v, "%s takes no %s (%s %s)", m->name, key, key,
                                complements[k].meaning);
            if (!strcmp(key, "only_on_linear_weights") && !is_null(v)) {
                if (tm_method_param_index(m, "density", 0) < 0)
                    return ierr(c, TM_ERROR_INVALID_ARGUMENT, v, "%s takes no only_on_linear_weights", m->name);
                tm_status st = want_scalar(c, v, key);
                if (st) return st;
                if (!strcasecmp(v->text, "false")) continue;
                if (!strcasecmp(v->text, "true"))
                    return ierr(c, TM_ERROR_UNSUPPORTED, v,
                                "only_on_linear_weights: true is not supported (torchmerge drops elements of every "
                                "floating tensor, FusionBench's false); set it to false");
                return ierr(c, TM_ERROR_INVALID_ARGUMENT, v, "only_on_linear_weights: expected true or false, got '%s'",
                            v->text);
            }
            if (!strcmp(key, "ignore_keys") && !is_null(v) && !(v->kind == TM_RNODE_SEQ && v->n == 0))
                return ierr(c, TM_ERROR_UNSUPPORTED, v,
                            "ignore_keys: not supported (FusionBench gives those tensors the plain average of the "
                            "models); give an empty list");
            if (!strcmp(key, "remove_keys") && !is_null(v) && !(v->kind == TM_RNODE_SEQ && v->n == 0))
                return ierr(c, TM_ERROR_UNSUPPORTED, v,
                            "remove_keys: not supported (FusionBench leaves those tensors out of the flattened task "
                            "vectors, for tied weights); give an empty list");
            if ((!strcmp(key, "model_save_path") || !strcmp(key, "model_save_kwargs")) && !is_null(v))
                iwarn(c, map->keys[i], "ignored '%s' (FusionBench's saving setting: torchmerge writes output:)", key);
        }
    }
    return TM_OK;
}

/* Parameter j given merge-wide (top level, method:, or mergekit's parameters:). */
static tm_status parse_global_param(ictx *c, size_t j, const tm_rnode *root, const tm_rnode *method_map,
                                    const tm_rnode *params, const tm_rnode **list) {
    tm_recipe *r = c->r;
    const tm_param_decl *d = &r->method->params[j];
    const tm_rnode *cand[3];
    const char *keys[3] = {d->name, d->name, d->name}, *places[3];
    char where[3][120];
    const tm_rnode *maps[3] = {root, method_map, params};
    static const char *const prefix[3] = {"", "method.", "parameters."};
    for (int w = 0; w < 3; w++) {
        cand[w] = get_param(maps[w], d, &keys[w]);
        snprintf(where[w], sizeof where[w], "as %s%s", prefix[w], keys[w]);
        places[w] = where[w];
    }
    const tm_rnode *n;
    size_t at = 0;
    tm_status st = choose_at(c, d->name, cand, places, 3, &n, &at);
    *list = NULL;
    if (!st) st = parse_complement(c, j, root, method_map, n);
    if (st || !n) return st;
    if (is_missing_marker(n))
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s is mandatory ('?\?\?'): give it in the recipe or as method.%s=%s",
                    d->name, d->name, d->per_input ? "[V1,V2,...]" : "VALUE");
    if (at == 2 && d->kind == TM_PARAM_NUMBER) { /* mergekit: a value, or per-tensor rules */
        char what[120];
        snprintf(what, sizeof what, "parameters.%s", keys[2]);
        if ((st = parse_setting(c, n, what, &r->defaults[j]))) return st;
        r->defaults[j].key = keys[2];
        return check_setting(c, d, &r->defaults[j]);
    }
    if (n->kind == TM_RNODE_SEQ) {
        if (!d->per_input) return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s: expected a single value, got a list", d->name);
        if (n->n != r->n_models)
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "expected %zu %s (one per model), got %zu", r->n_models, d->name,
                        n->n);
        if (!(r->numbers[j] = calloc(n->n + 1, sizeof *r->numbers[j]))) return oom(c);
        for (size_t i = 0; i < n->n; i++) {
            char what[140];
            tm_error e = {0};
            snprintf(what, sizeof what, "%s[%zu]", d->name, i);
            if ((st = get_number(c, n->items[i], what, &r->numbers[j][i]))) return st;
            if (tm_param_check_number(d, r->numbers[j][i], &e)) return ierr(c, e.status, n->items[i], "%s", e.msg);
        }
        r->params[r->n_params++] = (tm_param){d->name, NULL, r->numbers[j], n->n};
        *list = n;
        return TM_OK;
    }
    if ((st = want_scalar(c, n, d->name))) return st;
    if (d->kind == TM_PARAM_NUMBER || d->kind == TM_PARAM_INTEGER) {
        if (!(r->numbers[j] = calloc(1, sizeof *r->numbers[j]))) return oom(c);
        tm_error e = {0};
        if ((st = get_number(c, n, d->name, r->numbers[j]))) return st;
        if (tm_param_check_number(d, r->numbers[j][0], &e)) return ierr(c, e.status, n, "%s", e.msg);
        r->params[r->n_params++] = (tm_param){d->name, NULL, r->numbers[j], 1};
        return TM_OK;
    }
    double v;
    size_t count;
    tm_error e = {0};
    const char *text = choice_text(c, d, n);
    if (tm_param_parse_text(d, text, &v, 1, &count, &e)) return ierr(c, e.status, n, "%s", e.msg);
    r->params[r->n_params++] = (tm_param){d->name, text, NULL, 0};
    return TM_OK;
}

/* A per-input parameter given per model (mergekit's models[].parameters), with the top-level
 * parameters: as every model's default: one number per model for the merge, the rules kept for
 * tm_recipe_tensor_param. */
static tm_status parse_model_param(ictx *c, size_t j, const tm_rnode *list) {
    tm_recipe *r = c->r;
    const tm_param_decl *d = &r->method->params[j];
    const tm_rnode *first = NULL;
    tm_status st;
    for (size_t i = 0; i < r->n_models; i++) {
        tm_recipe_model *m = &r->models[i];
        const char *key = d->name;
        const tm_rnode *n = get_param(m->params_at, d, &key);
        if (!n) continue;
        char what[300];
        snprintf(what, sizeof what, "models[%zu].parameters.%s", i, key);
        if ((st = parse_setting(c, n, what, &m->params[j]))) return st;
        m->params[j].key = key;
        if ((st = check_setting(c, d, &m->params[j]))) return st;
        if (!first) first = n;
    }
    if (!first && !r->defaults[j].present) return TM_OK;
    if (list && first) {
        char w1[600], w2[600];
        short_where(w1, sizeof w1, list);
        short_where(w2, sizeof w2, first);
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, first, "%s are given both as a list (%s) and per model (%s); keep one",
                    d->name, w1, w2);
    }
    if (!(r->numbers[j] = calloc(r->n_models + 1, sizeof *r->numbers[j]))) return oom(c);
    for (size_t i = 0; i < r->n_models; i++) {
        tm_recipe_model *m = &r->models[i];
        const tm_recipe_setting *own = &m->params[j], *dflt = &r->defaults[j];
        if (!own->present && !dflt->present)
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, m->at,
                        "model '%s' has no %s: give it parameters: {%s: V} (or a default in the top-level parameters)",
                        m->written, d->aliases[0] ? d->aliases[0] : d->name, d->aliases[0] ? d->aliases[0] : d->name);
        if (own->is_rules || (!own->present && dflt->is_rules)) r->per_tensor = 1;
        /* without a catch-all, every tensor has a rule (check_rules_cover): any in-range value */
        double v = d->default_value ? tm_strtod_c(d->default_value, NULL) : 1.0;
        if (!setting_default(own, &v)) setting_default(dflt, &v);
        r->numbers[j][i] = v;
    }
    r->params[r->n_params++] = (tm_param){d->name, NULL, r->numbers[j], r->n_models};
    return TM_OK;
}

/* Which method, when the recipe names none (a FusionBench model pool file): the first of the table
 * that takes every parameter given (simple_average with none; weighted_average with weights). */
static tm_status infer_method(ictx *c, const given_param *given, size_t n_given) {
    for (size_t i = 0; i < tm_methods_count(); i++) {
        const tm_method *m = tm_methods_at(i);
        size_t k = 0;
        while (k < n_given && tm_method_param_index(m, given[k].key, 1) >= 0) k++;
        if (k == n_given) return c->r->method = m, TM_OK;
    }
    return ierr(c, TM_ERROR_INVALID_ARGUMENT, given[0].value, "no method takes all these parameters: name the method");
}

static tm_status check_method_params(ictx *c, const tm_rnode *root, const tm_rnode *method_map,
                                     const tm_rnode *params, const tm_rnode *name, const given_param *given,
                                     size_t n_given) {
    tm_recipe *r = c->r;
    tm_status st;
    if (!r->method && (st = infer_method(c, given, n_given))) return st;
    for (size_t k = 0; k < n_given; k++)
        if (tm_method_param_index(r->method, given[k].key, 1) < 0) {
            char others[400] = "";
            for (size_t i = 0, used = 0; i < tm_methods_count(); i++)
                if (tm_method_param_index(tm_methods_at(i), given[k].key, 1) >= 0 && used < sizeof others)
                    used += (size_t)snprintf(others + used, sizeof others - used, "%s%s", used ? ", " : "",
                                             tm_methods_at(i)->name);
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, given[k].value, "%s takes no %s (methods that do: %s)",
                        r->method->name, given[k].key, others);
        }
    for (size_t j = 0; j < r->method->n_params; j++) {
        const tm_rnode *list = NULL;
        if ((st = parse_global_param(c, j, root, method_map, params, &list))) return st;
        if (r->method->params[j].per_input && (st = parse_model_param(c, j, list))) return st;
        else if (!r->method->params[j].per_input && r->defaults[j].present) {
            const tm_param_decl *d = &r->method->params[j];
            if (r->defaults[j].is_rules) r->per_tensor = 1;
            if (!(r->numbers[j] = calloc(1, sizeof *r->numbers[j]))) return oom(c);
            r->numbers[j][0] = d->default_value ? tm_strtod_c(d->default_value, NULL) : r->defaults[j].rules[0].value;
            setting_default(&r->defaults[j], r->numbers[j]);
            r->params[r->n_params++] = (tm_param){d->name, NULL, r->numbers[j], 1};
        }
    }
    /* A FusionBench-shaped recipe gets FusionBench's default where it differs from mergekit's. */
    for (size_t j = 0; c->fusionbench && j < r->method->n_params; j++) {
        const tm_param_decl *d = &r->method->params[j];
        int given = 0;
        for (size_t k = 0; k < r->n_params && !given; k++) given = !strcmp(r->params[k].name, d->name);
        if (!given && d->fusionbench_default) r->params[r->n_params++] = (tm_param){d->name, d->fusionbench_default, NULL, 0};
    }
    /* The method's own checks (required parameters, weights that sum to 0, ...), located at the
     * parameter the message names, else at the method's name. */
    tm_param_values pv;
    tm_error e = {0};
    st = tm_param_values_resolve(r->method, r->params, r->n_params, r->n_models, &pv, &e);
    tm_param_values_free(&pv);
    if (!st) return TM_OK;
    const tm_rnode *at = name;
    for (size_t k = 0; k < n_given && at == name; k++)
        if (strstr(e.msg, given[k].key)) at = given[k].value;
    return ierr(c, e.status, at, "%s", e.msg);
}

static tm_status parse_method_params(ictx *c, const tm_rnode *root, const tm_rnode *method_map, const tm_rnode *params,
                                     const tm_rnode *name) {
    given_param *given;
    size_t n_given = find_given(c->r, root, method_map, params, &given);
    if (!given) return oom(c);
    tm_status st = check_method_params(c, root, method_map, params, name, given, n_given);
    free(given);
    return st;
}

/* ---- sizes and dtypes -------------------------------------------------------------------------- */

static tm_status parse_size(ictx *c, const tm_rnode *n, uint64_t *out) {
    tm_status st = want_scalar(c, n, "max_shard_size");
    if (st) return st;
    if (tm_byte_size_parse(n->text, out) != TM_OK)
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "max_shard_size: %s", tm_errmsg());
    return TM_OK;
}

static tm_status parse_dtypes(ictx *c, const tm_rnode *root) {
    tm_recipe *r = c->r;
    const tm_rnode *d = tm_rnode_get(root, "dtype"), *od = tm_rnode_get(root, "out_dtype");
    tm_status st;
    if (!is_null(d)) {
        const char *s = NULL;
        tm_dtype t;
        if ((st = get_string(c, d, "dtype", &s))) return st;
        if (tm_dtype_from_name(s, &t) != TM_OK || (t != TM_FLOAT32 && t != TM_FLOAT64)) {
            if (tm_dtype_from_name(s, &t) == TM_OK && tm_dtype_is_floating(t) && t != TM_COMPLEX64 && t != TM_COMPLEX128)
                return ierr(c, TM_ERROR_UNSUPPORTED, d,
                            "dtype: torchmerge always computes in float64, so the compute dtype may be float32 or "
                            "float64, not '%s'; to write %s tensors, set out_dtype: %s",
                            s, tm_dtype_name(t), tm_dtype_name(t));
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, d, "dtype: expected float32 or float64, got '%s'", s);
        }
    }
    if (!is_null(od)) {
        const char *s = NULL;
        if ((st = get_string(c, od, "out_dtype", &s))) return st;
        if (tm_dtype_from_name(s, &r->out_dtype) != TM_OK || !tm_dtype_is_floating(r->out_dtype) ||
            r->out_dtype == TM_COMPLEX64 || r->out_dtype == TM_COMPLEX128)
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, od,
                        "out_dtype: expected float32, float16, bfloat16 or float64, got '%s'", s);
        r->has_dtype = 1;
    }
    return TM_OK;
}

/* ---- the base model ---------------------------------------------------------------------------- */

/* The base model: mergekit's base_model (a path, or {model: PATH}) or the model pool's
 * _pretrained_ entry (FusionBench), for the methods that need one. The others ignore it, with a
 * warning for base_model (mergekit configs write it for linear too). */
static tm_status parse_base(ictx *c, const tm_rnode *root, const tm_rnode *models, const tm_rnode *name) {
    tm_recipe *r = c->r;
    const tm_rnode *pretrained = models->kind == TM_RNODE_MAP ? tm_rnode_get(models, "_pretrained_") : NULL;
    const tm_rnode *cand[2] = {tm_rnode_get(root, "base_model"), pretrained}, *n;
    static const char *const places[2] = {"as base_model", "as models._pretrained_"};
    tm_status st = choose(c, "the base model", cand, places, 2, &n);
    if (st) return st;
    if (!r->method->needs_base) {
        for (size_t i = 0; n && n == cand[0] && i < root->n; i++) /* pointed at by its key, as other ignored keys */
            if (root->items[i] == n) iwarn(c, root->keys[i], "ignored 'base_model' (%s uses no base model)", r->method->name);
        return TM_OK;
    }
    if (!n)
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, name,
                    "%s needs a base model: give base_model: PATH (or _pretrained_ in the model pool)", r->method->name);
    tm_recipe_model m;
    st = parse_model(c, n, n == cand[0] ? "base_model" : "models._pretrained_", NULL, &m);
    if (!st) st = check_exists(c, m.at, "base model", m.written, m.path);
    if (!st) {
        r->base = m.path;
        m.path = NULL;
    }
    model_free(&m);
    return st;
}

/* mergekit lists the base model among the models too (slerp's two models; often ties'): for a
 * method on a base it is the base, not an input (its task vector would be 0), so it leaves the
 * models, as mergekit leaves it out of the task vectors. */
static tm_status drop_base_from_models(ictx *c, const tm_rnode *root) {
    tm_recipe *r = c->r;
    const tm_rnode *n = tm_rnode_get(root, "base_model");
    if (!r->method || !r->method->needs_base || is_null(n)) return TM_OK;
    tm_recipe_model base;
    tm_status st = parse_model(c, n, "base_model", NULL, &base);
    size_t kept = 0;
    for (size_t i = 0; !st && i < r->n_models; i++) {
        int same = !strcmp(r->models[i].path, base.path) || tm_same_file(r->models[i].path, base.path);
        if (same && r->n_models > 1) model_free(&r->models[i]);
        else r->models[kept++] = r->models[i];
    }
    if (!st) r->n_models = kept;
    model_free(&base);
    return st;
}

/* ---- the whole recipe ------------------------------------------------------------------------- */

/* The recipe's keys, the method and its parameters, the models and every other setting. */
/* A layer_range: [lo, hi] of integers. */
static tm_status parse_layer_range(ictx *c, const tm_rnode *n, const char *where, long *lo, long *hi) {
    double v[2];
    if (!n || n->kind != TM_RNODE_SEQ || n->n != 2)
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "%s.layer_range: expected [FIRST, END]", where);
    for (int k = 0; k < 2; k++) {
        tm_status st = get_number(c, n->items[k], "layer_range", &v[k]);
        if (st) return st;
        if (v[k] != floor(v[k]) || v[k] < 0 || v[k] > 1e9)
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, n->items[k], "%s.layer_range: expected whole layer numbers", where);
    }
    *lo = (long)v[0];
    *hi = (long)v[1];
    return TM_OK;
}

/* mergekit's slices: accepted when they say what models: says (one slice, every source over the
 * same layer_range, checked against the models' layers by check_slices). Its sources are the
 * models; its parameters: are the top-level parameters (*params), of which there may be one. */
static tm_status parse_slices(ictx *c, const tm_rnode *slices, const tm_rnode **params) {
    tm_recipe *r = c->r;
    if (slices->kind != TM_RNODE_SEQ || slices->n != 1)
        return ierr(c, TM_ERROR_UNSUPPORTED, slices,
                    "slices: torchmerge merges whole models: give one slice whose sources take every layer "
                    "(or models: instead)");
    const tm_rnode *slice = slices->items[0];
    static const char *const keys[] = {"sources", "parameters", NULL};
    tm_status st = want_map(c, slice, "slices[0]");
    if (!st) st = check_keys(c, slice, "slices[0]", keys, NULL, NULL);
    if (st) return st;
    const tm_rnode *sources = tm_rnode_get(slice, "sources"), *sp = tm_rnode_get(slice, "parameters");
    if (!sources || sources->kind != TM_RNODE_SEQ || !sources->n)
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, slice, "slices[0]: expected sources: [{model: PATH, layer_range: [0, N]}, ...]");
    for (size_t i = 0; i < sources->n; i++) {
        char where[64];
        snprintf(where, sizeof where, "slices[0].sources[%zu]", i);
        if ((st = want_map(c, sources->items[i], where))) return st;
        const tm_rnode *lr = tm_rnode_get(sources->items[i], "layer_range");
        long lo = 0, hi = 0;
        if ((st = parse_layer_range(c, lr, where, &lo, &hi))) return st;
        if (!i) {
            r->slice_range = lr;
            r->slice_lo = lo;
            r->slice_hi = hi;
        } else if (lo != r->slice_lo || hi != r->slice_hi) {
            return ierr(c, TM_ERROR_UNSUPPORTED, lr,
                        "%s.layer_range [%ld, %ld] differs from the first source's [%ld, %ld]; torchmerge merges "
                        "the same layers of every model",
                        where, lo, hi, r->slice_lo, r->slice_hi);
        }
    }
    if (!is_null(sp)) {
        if (*params)
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, sp, "parameters are given both at the top and in slices[0]; keep one");
        *params = sp;
    }
    c->in_slices = 1;
    st = parse_models(c, sources);
    c->in_slices = 0;
    return st;
}

/* mergekit's tokenizer settings: a union vocabulary resizes the embeddings and the head, which
 * changes the weights, so it cannot be honoured: an error. Any other source (base, a model) keeps
 * the weights as they are; torchmerge writes weights only, so the warning says so. */
static tm_status check_tokenizer(ictx *c, const tm_rnode *root) {
    const tm_rnode *ts = tm_rnode_get(root, "tokenizer_source"), *tk = tm_rnode_get(root, "tokenizer");
    const tm_rnode *src = !is_null(ts) ? ts : !is_null(tk) && tk->kind == TM_RNODE_MAP ? tm_rnode_get(tk, "source") : NULL;
    if (src && src->kind == TM_RNODE_SCALAR && !strcmp(src->text, "union"))
        return ierr(c, TM_ERROR_UNSUPPORTED, src,
                    "tokenizer source 'union' builds a merged vocabulary and resizes the embeddings; torchmerge merges "
                    "the weights as they are (drop the setting, or merge with tokenizer_source: base)");
    if (src && src->kind != TM_RNODE_SCALAR)
        return ierr(c, TM_ERROR_UNSUPPORTED, src,
                    "tokenizer source with per-token settings changes the embeddings; torchmerge merges the weights "
                    "as they are");
    return TM_OK;
}

/* distributed: {rank, world_size, master_addr, master_port, timeout, output_on} makes the recipe
 * one rank of a merge across hosts (docs/distributed.md), as --distributed does; each key may be
 * left to the torchrun environment variables (an empty mapping reads them all). */
static tm_status parse_distributed(ictx *c, const tm_rnode *n) {
    static const char *const keys[] = {"rank", "world_size", "master_addr", "master_port", "timeout", "output_on", NULL};
    tm_recipe *r = c->r;
    tm_distributed_options_init(&r->distributed);
    r->has_distributed = 1;
    if (is_null(n)) return TM_OK;
    tm_status st = want_map(c, n, "distributed");
    if (!st) st = check_keys(c, n, "distributed", keys, NULL, NULL);
    const char *const ints[3] = {"rank", "world_size", "master_port"};
    int *dst[3] = {&r->distributed.rank, &r->distributed.world_size, &r->distributed.master_port};
    for (int i = 0; i < 3 && !st; i++) {
        const tm_rnode *v = tm_rnode_get(n, ints[i]);
        double x = 0;
        if (!v || is_null(v)) continue;
        if (!(st = get_number(c, v, ints[i], &x)) && (x != (int)x || x < (i == 1 ? 1 : 0) || x > (i == 2 ? 65535 : 1 << 20)))
            st = ierr(c, TM_ERROR_INVALID_ARGUMENT, v, "distributed.%s: expected a whole number in range", ints[i]);
        *dst[i] = (int)x;
    }
    const tm_rnode *v;
    const char *s = NULL;
    if (!st && (v = tm_rnode_get(n, "timeout")) && !is_null(v) &&
        !(st = get_number(c, v, "timeout", &r->distributed.timeout_seconds)) && !(r->distributed.timeout_seconds > 0))
        st = ierr(c, TM_ERROR_INVALID_ARGUMENT, v, "distributed.timeout: expected seconds > 0");
    if (!st && (v = tm_rnode_get(n, "master_addr")) && !is_null(v) && !(st = get_string(c, v, "master_addr", &s)))
        r->distributed.master_addr = r->master_addr = dup_s(s);
    if (!st && (v = tm_rnode_get(n, "output_on")) && !is_null(v) && !(st = get_string(c, v, "output_on", &s))) {
        if (strcmp(s, "all") && strcmp(s, "0"))
            st = ierr(c, TM_ERROR_INVALID_ARGUMENT, v, "distributed.output_on: expected 0 or all, got '%s'", s);
        r->distributed.output_on_all = !strcmp(s, "all");
    }
    return st;
}

static tm_status interpret_keys(ictx *c, const tm_rnode *root, const char *const *top_keys,
                                const char *const *method_keys, const char *const *param_keys,
                                const char *const *mergekit_ignored) {
    tm_recipe *r = c->r;
    tm_status st;
    if ((st = check_tokenizer(c, root))) return st;
    if ((st = check_keys(c, root, "the recipe", top_keys, mergekit_ignored,
                         "torchmerge writes the merged weights only; copy tokenizer files yourself")))
        return st;

    /* method: its name and parameters at the top (a FusionBench method file), under method:,
     * or mergekit's merge_method + parameters */
    const tm_rnode *method = tm_rnode_get(root, "method"), *method_map = NULL, *method_name = NULL;
    if (method && method->kind == TM_RNODE_MAP) {
        if ((st = check_keys(c, method, "method", method_keys, NULL, NULL))) return st; /* _target_ passes as _x_ */
        method_map = method;
    } else if (method && method->kind == TM_RNODE_SEQ) {
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, method, "method: expected a name or a mapping, got a list");
    } else {
        method_name = method;
    }
    const tm_rnode *params = tm_rnode_get(root, "parameters");
    if (!is_null(params)) {
        if ((st = want_map(c, params, "parameters")) || (st = check_keys(c, params, "parameters", param_keys, NULL, NULL)))
            return st;
    } else {
        params = NULL;
    }

    /* The method's name; FusionBench's newer configs name a class instead (_target_). A top-level
     * _target_ counts only when it names an algorithm (a model pool file has one too). */
    const tm_rnode *name;
    size_t name_at = 0;
    {
        const tm_rnode *root_target = tm_rnode_get(root, "_target_");
        if (root_target && (root_target->kind != TM_RNODE_SCALAR ||
                            ((strlen(root_target->text) < 9 ||
                              strcmp(root_target->text + strlen(root_target->text) - 9, "Algorithm") != 0) &&
                             strncmp(root_target->text, "fusion_bench.method.", 20) != 0)))
            root_target = NULL;
        const tm_rnode *cand[5] = {tm_rnode_get(root, "name"),
                                   method_map ? tm_rnode_get(method_map, "name") : method_name,
                                   tm_rnode_get(root, "merge_method"), NULL, NULL};
        if (is_null(cand[0])) cand[3] = root_target;
        if (method_map && is_null(cand[1])) cand[4] = tm_rnode_get(method_map, "_target_");
        static const char *const places[5] = {"as name", "as method", "as merge_method", "as _target_",
                                              "as method._target_"};
        if ((st = choose_at(c, "the method", cand, places, 5, &name, &name_at))) return st;
    }
    if (name && (st = name_at >= 3 ? method_from_target(c, name, &r->method) : method_from_name(c, name, &r->method)))
        return st;
    c->fusionbench = !(name && name_at == 2);

    /* models */
    const tm_rnode *models;
    {
        const tm_rnode *pool = tm_rnode_get(root, "modelpool"), *pool_models = NULL;
        if (!is_null(pool)) {
            if ((st = want_map(c, pool, "modelpool"))) return st;
            for (size_t i = 0; i < pool->n; i++)
                if (strcmp(pool->keys[i]->text, "models") != 0 && !is_underscored(pool->keys[i]->text))
                    iwarn(c, pool->keys[i], "ignored modelpool setting '%s' (torchmerge reads only models:)",
                          pool->keys[i]->text);
            pool_models = tm_rnode_get(pool, "models");
        }
        const tm_rnode *cand[3] = {tm_rnode_get(root, "models"), pool_models, tm_rnode_get(root, "slices")};
        static const char *const places[3] = {"as models", "as modelpool.models", "as slices"};
        if ((st = choose(c, "models", cand, places, 3, &models))) return st;
        if (!models) return ierr(c, TM_ERROR_INVALID_ARGUMENT, NULL, "no models: give models: [PATH, PATH, ...]");
        if (models == cand[2]) {
            if ((st = parse_slices(c, models, &params))) return st;
            if (params && (st = check_keys(c, params, "slices[0].parameters", param_keys, NULL, NULL))) return st;
            models = tm_rnode_get(models->items[0], "sources");
        } else if ((st = parse_models(c, models))) {
            return st;
        }
        if ((st = drop_base_from_models(c, root))) return st;
    }
    if ((st = parse_method_params(c, root, method_map, params, name))) return st;
    if ((st = check_fusionbench_settings(c, root, method_map))) return st;
    if ((st = parse_base(c, root, models, name))) return st;

    /* everything else */
    const tm_rnode *n;
    if (!is_null(n = tm_rnode_get(root, "output"))) {
        const char *s = NULL;
        if ((st = get_string(c, n, "output", &s))) return st;
        /* the output is where the command runs, like -o: not relative to the recipe */
        if (!(r->output = dup_s(s))) return oom(c);
        r->output_at = n;
    }
    if (!is_null(n = tm_rnode_get(root, "masks_out"))) {
        const char *s = NULL;
        if ((st = get_string(c, n, "masks_out", &s))) return st;
        if (!(r->masks_out = dup_s(s))) return oom(c); /* where the command runs, as output */
    }
    if (!is_null(n = tm_rnode_get(root, "dequantize"))) { /* --dequantize: merge quantized tensors' real values */
        if ((st = want_scalar(c, n, "dequantize"))) return st;
        if (!n->plain || (strcmp(n->text, "true") && strcmp(n->text, "false")))
            return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "dequantize: expected true or false, got '%s'", n->text);
        r->dequantize = strcmp(n->text, "true") == 0;
    }
    if (!is_null(n = tm_rnode_get(root, "format"))) {
        const char *s = NULL;
        if ((st = get_string(c, n, "format", &s))) return st;
        if (!strcmp(s, "pt")) r->format = TM_FORMAT_PT;
        else if (!strcmp(s, "torchscript")) r->format = TM_FORMAT_TORCHSCRIPT;
        else if (!strcmp(s, "safetensors")) r->format = TM_FORMAT_SAFETENSORS;
        else if (!strcmp(s, "auto")) r->format = TM_FORMAT_AUTO;
        else return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "format: expected pt, torchscript or safetensors, got '%s'", s);
    }
    if (!is_null(n = tm_rnode_get(root, "keys"))) {
        const char *s = NULL;
        if ((st = get_string(c, n, "keys", &s))) return st;
        if (!strcmp(s, "strict")) r->keys = TM_KEYS_STRICT;
        else if (!strcmp(s, "intersection")) r->keys = TM_KEYS_INTERSECTION;
        else if (!strcmp(s, "union")) r->keys = TM_KEYS_UNION;
        else return ierr(c, TM_ERROR_INVALID_ARGUMENT, n, "keys: expected strict, intersection or union, got '%s'", s);
    }
    if (!is_null(n = tm_rnode_get(root, "key"))) {
        const char *s = NULL;
        if ((st = get_string(c, n, "key", &s))) return st;
        if (!(r->key = dup_s(s))) return oom(c);
    }
    if (!is_null(n = tm_rnode_get(root, "template"))) {
        const char *s = NULL;
        if ((st = get_string(c, n, "template", &s))) return st;
        if (!(r->template_path = resolve(n))) return oom(c);
        if ((st = check_exists(c, n, "template", s, r->template_path))) return st;
    }
    if (!is_null(n = tm_rnode_get(root, "max_shard_size")) && (st = parse_size(c, n, &r->max_shard_size))) return st;
    if ((st = parse_dtypes(c, root))) return st;
    if ((n = tm_rnode_get(root, "distributed")) && (st = parse_distributed(c, n))) return st;
    if ((st = parse_patterns(c, tm_rnode_get(root, "include"), "include", &r->include, &r->n_include))) return st;
    if ((st = parse_patterns(c, tm_rnode_get(root, "exclude"), "exclude", &r->exclude, &r->n_exclude))) return st;

    for (size_t i = 0; i < r->n_models; i++)
        if ((st = check_exists(c, r->models[i].at, "model file", r->models[i].written, r->models[i].path))) return st;
    if (!r->output)
        return ierr(c, TM_ERROR_INVALID_ARGUMENT, NULL, "no output: give output: PATH in the recipe, or output=PATH");
    return TM_OK;
}

/* The recipe as a whole, with the keys allowed at each place. */
/* FusionBench method settings at the top or under method: (check_fusionbench_settings). */
#define FUSIONBENCH_KEYS "sparsity_ratio", "threshold", "remove_keys", "only_on_linear_weights", "ignore_keys", "model_save_path", "model_save_kwargs"
static tm_status interpret(ictx *c) {
    const tm_rnode *root = c->r->doc.root;
    tm_status st;
    static const char *const fixed_keys[] = {"name", "method", "merge_method", "models", "modelpool", "parameters",
                                             "output", "format", "dtype", "out_dtype", "keys", "key", "template",
                                             "max_shard_size", "include", "exclude", "base_model", "masks_out", "slices",
                                             "dequantize", "distributed", FUSIONBENCH_KEYS, NULL};
    static const char *const mergekit_ignored[] = {"tokenizer_source", "tokenizer", "chat_template", NULL};
    /* Parameter names of every method are known keys here; one the chosen method lacks is
     * refused once the method is known ("simple_average takes no weights"). */
    static const char *const name_key[] = {"name", FUSIONBENCH_KEYS, NULL};
    const char **top_keys = known_keys(fixed_keys, 0), **method_keys = known_keys(name_key, 0),
               **param_keys = known_keys(NULL, 0);
    st = top_keys && method_keys && param_keys ? TM_OK : oom(c);
    if (!st) st = interpret_keys(c, root, top_keys, method_keys, param_keys, mergekit_ignored);
    free(top_keys);
    free(method_keys);
    free(param_keys);
    return st;
}

/* The models' layer count for gradients (and slices): 1 + the largest layer index of a tensor
 * name in the first model, as mergekit counts the architecture's layers. */
static tm_status count_layers(ictx *c) {
    tm_recipe *r = c->r;
    if (r->n_layers || !r->n_models) return TM_OK;
    tm_open_options oo;
    tm_open_options_init(&oo);
    oo.key = r->key;
    tm_checkpoint *ck;
    if (tm_checkpoint_open(r->models[0].path, &oo, &ck) != TM_OK)
        return tm_error_set(c->err, TM_ERROR_FORMAT, "%s", tm_errmsg());
    long top = -1;
    for (size_t t = 0; t < tm_checkpoint_n_tensors(ck); t++) {
        tm_tensor_info info;
        tm_tensor_info_init(&info);
        if (tm_checkpoint_tensor(ck, t, &info) != TM_OK) continue;
        long i = tm_recipe_layer_of(info.name);
        if (i > top) top = i;
    }
    tm_checkpoint_free(ck);
    r->n_layers = top + 1;
    return TM_OK;
}

/* mergekit's slices, where they say what models: says: one output slice whose sources all take
 * every layer, [0, n_layers). Slices that cut, stack or reorder layers build a different model
 * from the inputs' layers, which torchmerge does not do: a clear error. */
static tm_status check_slices(ictx *c) {
    tm_recipe *r = c->r;
    if (!r->slice_range) return TM_OK;
    tm_status st = count_layers(c);
    if (st) return st;
    if (r->slice_lo != 0 || r->slice_hi != r->n_layers)
        return ierr(c, TM_ERROR_UNSUPPORTED, r->slice_range,
                    "slices: layer_range [%ld, %ld] is not every layer of the models ([0, %ld]); torchmerge merges "
                    "whole models, so a slice must take all layers (cutting or stacking layers is not supported)",
                    r->slice_lo, r->slice_hi, r->n_layers);
    return TM_OK;
}

/* Per-tensor rules without a catch-all must cover every averaged tensor of their model: checked
 * here, before anything is written, by listing the inputs' tensors. */
static tm_status check_rules_cover(ictx *c) {
    tm_recipe *r = c->r;
    if (!r->per_tensor) return TM_OK;
    for (size_t i = 0; i < r->n_models; i++) {
        tm_recipe_model *m = &r->models[i];
        size_t uncovered[TM_METHOD_MAX_PARAMS], n_unc = 0;
        for (size_t j = 0; j < r->method->n_params; j++) {
            tm_recipe_setting *own = r->method->params[j].per_input ? &m->params[j] : NULL;
            if ((own && setting_default(own, NULL)) || setting_default(&r->defaults[j], NULL)) continue;
            if ((own && own->is_rules) || r->defaults[j].is_rules) uncovered[n_unc++] = j;
        }
        if (!n_unc) continue;
        tm_open_options oo;
        tm_open_options_init(&oo);
        oo.key = r->key;
        tm_checkpoint *ck;
        if (tm_checkpoint_open(m->path, &oo, &ck) != TM_OK)
            return tm_error_set(c->err, TM_ERROR_FORMAT, "%s", tm_errmsg());
        tm_status st = TM_OK;
        for (size_t t = 0; t < tm_checkpoint_n_tensors(ck) && !st; t++) {
            tm_tensor_info info;
            tm_tensor_info_init(&info);
            if (tm_checkpoint_tensor(ck, t, &info) != TM_OK || !tm_dtype_is_floating(info.dtype)) continue;
            if (excluded_by_patterns(r, info.name)) continue;
            for (size_t u = 0; u < n_unc && !st; u++) {
                size_t j = uncovered[u];
                tm_recipe_setting *own = r->method->params[j].per_input ? &m->params[j] : NULL, *s = own;
                double w;
                if ((own && setting_lookup(own, info.name, 0, 0, &w)) ||
                    setting_lookup(&r->defaults[j], info.name, 0, 0, &w))
                    continue;
                if (!s || !s->present) s = &r->defaults[j];
                st = ierr(c, TM_ERROR_INVALID_ARGUMENT, s->at,
                          "model '%s': no %s rule matches tensor '%s' (add a rule without filter as the default)",
                          m->written, s->key, info.name);
            }
        }
        tm_checkpoint_free(ck);
        if (st) return st;
    }
    return TM_OK;
}

static void sanitize_line(char *s) {
    for (; *s; s++)
        if ((unsigned char)*s < 0x20) *s = ' ';
}

static tm_status make_text(ictx *c, const char *const *overrides, size_t n_overrides) {
    tm_recipe *r = c->r;
    size_t cap = 256 + strlen(r->doc.origins[0]->label);
    for (size_t i = 0; i < n_overrides; i++) cap += strlen(overrides[i]) + 16;
    char *header = malloc(cap), *label = dup_s(r->doc.origins[0]->label);
    if (!header || !label) {
        free(header);
        free(label);
        return oom(c);
    }
    sanitize_line(label);
    size_t used = (size_t)snprintf(header, cap, "# torchmerge %s: the effective recipe of %s\n", tm_version(), label);
    free(label);
    for (size_t i = 0; i < n_overrides; i++) {
        char *o = dup_s(overrides[i]);
        if (!o) {
            free(header);
            return oom(c);
        }
        sanitize_line(o);
        used += (size_t)snprintf(header + used, cap - used, "# override: %s\n", o);
        free(o);
    }
    tm_status st = tm_rdoc_emit(&r->doc, header, &r->text, c->err);
    free(header);
    return st;
}

tm_status tm_recipe_load(tm_recipe *r, const char *recipe, int is_path, const char *const *overrides,
                         size_t n_overrides, void (*warn)(void *, const char *), void *warn_user, tm_error *err) {
    memset(r, 0, sizeof *r);
    ictx c = {r, err, warn, warn_user, 0, 0};
    tm_status st = tm_rdoc_parse(&r->doc, recipe, is_path, err);
    if (!st && n_overrides && !overrides) st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "overrides is NULL");
    for (size_t i = 0; i < n_overrides && !st; i++) st = tm_rdoc_override(&r->doc, overrides[i], err);
    if (!st) st = interpret(&c);
    if (!st && r->has_gradient) st = count_layers(&c);
    if (!st) st = check_slices(&c);
    if (!st) st = check_rules_cover(&c);
    if (!st) st = make_text(&c, overrides, n_overrides);
    return st;
}

void tm_recipe_free(tm_recipe *r) {
    if (!r) return;
    for (size_t i = 0; i < r->n_models; i++) model_free(&r->models[i]);
    free(r->models);
    for (size_t j = 0; j < TM_METHOD_MAX_PARAMS; j++) {
        free(r->numbers[j]);
        setting_free(&r->defaults[j]);
    }
    free(r->output);
    free(r->key);
    free(r->template_path);
    free(r->base);
    free(r->masks_out);
    free(r->master_addr);
    for (size_t i = 0; i < r->n_include; i++) free(r->include[i].pattern);
    for (size_t i = 0; i < r->n_exclude; i++) free(r->exclude[i].pattern);
    free(r->include);
    free(r->exclude);
    free(r->text);
    tm_rdoc_free(&r->doc);
    memset(r, 0, sizeof *r);
}

/* ---- running ---------------------------------------------------------------------------------- */

void tm_recipe_merge_options(tm_recipe *r, const tm_merge_options *base, tm_merge_options *o) {
    tm_merge_options_init(o);
    if (base) {
        o->progress = base->progress;
        o->progress_user = base->progress_user;
        o->warning = base->warning;
        o->warning_user = base->warning_user;
        o->profile = base->profile;
    }
    o->method = r->method->name;
    o->params = r->params;
    o->n_params = r->n_params;
    o->format = r->format;
    o->template_path = r->template_path;
    o->base = r->base;
    o->masks_out = r->masks_out;
    o->dequantize = r->dequantize;
    o->has_dtype = r->has_dtype;
    if (r->has_dtype) o->dtype = r->out_dtype;
    o->keys = r->keys;
    o->key = r->key;
    o->max_shard_size = r->max_shard_size;
    o->recipe_text = r->text;
    o->include_tensor = r->n_include || r->n_exclude ? tm_recipe_include_tensor : NULL;
    o->tensor_param = r->per_tensor ? tm_recipe_tensor_param : NULL;
    o->rules_user = r;
    o->distributed = r->has_distributed ? &r->distributed : NULL;
}

int tm_recipe_include_tensor(void *user, const char *name) {
    tm_recipe *r = user;
    int keep = r->n_include == 0;
    for (size_t i = 0; i < r->n_include; i++)
        if (tm_recipe_pattern_matches(r->include[i].pattern, name)) {
            r->include[i].matched++;
            keep = 1;
        }
    if (!keep) return 0;
    for (size_t i = 0; i < r->n_exclude; i++)
        if (tm_recipe_pattern_matches(r->exclude[i].pattern, name)) {
            r->exclude[i].matched++;
            keep = 0;
        }
    return keep;
}

void tm_recipe_tensor_param(void *user, const char *name, const char *param, size_t n, double *values) {
    tm_recipe *r = user;
    int j = tm_method_param_index(r->method, param, 0);
    if (j < 0) return;
    int per_input = r->method->params[j].per_input;
    double t = layer_t(r, name);
    for (size_t i = 0; i < n && (!per_input || i < r->n_models); i++) {
        double w;
        if ((per_input && setting_lookup(&r->models[i].params[j], name, t, 1, &w)) ||
            setting_lookup(&r->defaults[j], name, t, 1, &w))
            values[i] = w;
    }
}

/* After a successful merge: patterns and rules that matched no tensor are probably typos. */
static void warn_unmatched(ictx *c) {
    tm_recipe *r = c->r;
    for (size_t i = 0; i < r->n_include; i++)
        if (!r->include[i].matched)
            iwarn(c, r->include[i].at, "include pattern '%s' matched no tensor", r->include[i].pattern);
    for (size_t i = 0; i < r->n_exclude; i++)
        if (!r->exclude[i].matched)
            iwarn(c, r->exclude[i].at, "exclude pattern '%s' matched no tensor", r->exclude[i].pattern);
    for (size_t i = 0; i <= r->n_models; i++)
        for (size_t j = 0; j < r->method->n_params; j++) {
            tm_recipe_setting *s = i < r->n_models ? &r->models[i].params[j] : &r->defaults[j];
            for (size_t k = 0; s->is_rules && k < s->n_rules; k++)
                if (!is_catch_all(&s->rules[k]) && !s->rules[k].matched)
                    iwarn(c, s->rules[k].at, "%s rule '%s' matched no tensor", s->key, s->rules[k].filter);
        }
}

tm_status tm_merge_recipe(const char *recipe, int is_path, const char *const *overrides, size_t n_overrides,
                          const tm_merge_options *base) {
    tm_recipe r;
    tm_error err = {0};
    tm_merge_options full; /* the caller's fields over the defaults */
    tm_merge_options_init(&full);
    if (base && TM_STRUCT_CHECK(base, &err)) return tm_error_publish(&err);
    if (base) {
        TM_STRUCT_COPY_IN(&full, base);
        base = &full;
    }
    tm_status st = tm_recipe_load(&r, recipe, is_path, overrides, n_overrides, base ? base->warning : NULL,
                                  base ? base->warning_user : NULL, &err);
    if (st) {
        tm_recipe_free(&r);
        return tm_error_publish(&err);
    }
    const char **paths = malloc(r.n_models * sizeof *paths);
    if (!paths) {
        tm_recipe_free(&r);
        tm_error_set(&err, TM_ERROR_NOMEM, "out of memory");
        return tm_error_publish(&err);
    }
    for (size_t i = 0; i < r.n_models; i++) paths[i] = r.models[i].path;
    tm_merge_options o;
    tm_recipe_merge_options(&r, base, &o);
    st = tm_merge_files(paths, r.n_models, r.output, &o); /* publishes its own error */
    if (!st) {
        ictx c = {&r, &err, o.warning, o.warning_user, 0, 0};
        warn_unmatched(&c);
    }
    free(paths);
    tm_recipe_free(&r);
    return st;
}
