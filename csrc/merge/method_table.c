/* The table of merge methods — add a method here, one line, after writing its file in methods/
 * (docs/adding_a_method.md) — and the public functions that describe it (tm_method_* in
 * torchmerge.h), from which the command line builds its flags and --help. C11. */
#define _GNU_SOURCE
#include "merge/method.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "core/struct_size.h"
#include "merge/methods/methods.h"

static const tm_method *const table[] = {
    &tm_method_simple_average,
    &tm_method_weighted_average,
    &tm_method_task_arithmetic,
    &tm_method_ties,
    &tm_method_dare_linear,
    &tm_method_dare_ties,
    &tm_method_breadcrumbs,
    &tm_method_breadcrumbs_ties,
    &tm_method_della,
    &tm_method_della_linear,
    &tm_method_slerp,
    &tm_method_model_stock,
};

size_t tm_methods_count(void) { return sizeof table / sizeof *table; }

const tm_method *tm_methods_at(size_t i) { return i < tm_methods_count() ? table[i] : NULL; }

const tm_method *tm_methods_find(const char *name) {
    for (size_t i = 0; name && i < tm_methods_count(); i++)
        if (strcmp(table[i]->name, name) == 0 || tm_name_in(table[i]->aliases, name)) return table[i];
    return NULL;
}

static char list_text[1024];
static pthread_once_t list_once = PTHREAD_ONCE_INIT;
static void make_list(void) {
    size_t used = 0;
    for (size_t i = 0; i < tm_methods_count() && used < sizeof list_text; i++)
        used += (size_t)snprintf(list_text + used, sizeof list_text - used, "%s%s%s%s%s", i ? ", " : "", table[i]->name,
                                 table[i]->aliases[0] ? " (" : "", table[i]->aliases[0] ? table[i]->aliases[0] : "",
                                 table[i]->aliases[0] ? ")" : "");
}

const char *tm_methods_list(void) {
    pthread_once(&list_once, make_list);
    return list_text;
}

/* ---- public description ------------------------------------------------------------------ */

void tm_method_info_init(tm_method_info *info) { TM_STRUCT_INIT(info); }
void tm_method_param_info_init(tm_method_param_info *info) { TM_STRUCT_INIT(info); }

size_t tm_method_count(void) { return tm_methods_count(); }

int64_t tm_method_find(const char *name) {
    const tm_method *m = tm_methods_find(name);
    for (size_t i = 0; m && i < tm_methods_count(); i++)
        if (table[i] == m) return (int64_t)i;
    return -1;
}

tm_status tm_method_get(size_t i, tm_method_info *out) {
    tm_error err = {0};
    if (TM_STRUCT_CHECK(out, &err)) return tm_error_publish(&err);
    if (i >= tm_methods_count()) {
        tm_error_set(&err, TM_ERROR_INVALID_ARGUMENT, "method %zu: there are %zu methods", i, tm_methods_count());
        return tm_error_publish(&err);
    }
    const tm_method *m = table[i];
    tm_method_info v = {.struct_size = out->struct_size,
                        .name = m->name,
                        .aliases = m->aliases,
                        .summary = m->summary,
                        .needs_base = m->needs_base,
                        .min_inputs = m->min_inputs,
                        .max_inputs = m->max_inputs,
                        .n_params = m->n_params};
    TM_STRUCT_COPY_OUT(out, &v);
    return TM_OK;
}

tm_status tm_method_param(size_t i, size_t j, tm_method_param_info *out) {
    tm_error err = {0};
    if (TM_STRUCT_CHECK(out, &err)) return tm_error_publish(&err);
    if (i >= tm_methods_count() || j >= table[i]->n_params) {
        tm_error_set(&err, TM_ERROR_INVALID_ARGUMENT, "method %zu has no parameter %zu", i, j);
        return tm_error_publish(&err);
    }
    const tm_param_decl *d = &table[i]->params[j];
    tm_method_param_info v = {.struct_size = out->struct_size,
                              .name = d->name,
                              .aliases = d->aliases,
                              .kind = d->kind,
                              .per_input = d->per_input,
                              .exactly_per_input = d->exactly_per_input,
                              .required = d->required,
                              .default_value = d->default_value ? d->default_value : "",
                              .min = d->min,
                              .max = d->max,
                              .min_exclusive = d->min_exclusive,
                              .max_exclusive = d->max_exclusive,
                              .choices = d->choices ? d->choices : "",
                              .help = d->help ? d->help : ""};
    TM_STRUCT_COPY_OUT(out, &v);
    return TM_OK;
}
