#define _GNU_SOURCE
#include "merge/output_metadata.h"

#include <cjson/cJSON.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void tm_output_metadata_free(tm_output_metadata *m) {
    for (size_t i = 0; i < m->n; i++) free(m->values[i]);
    free(m->keys);
    free(m->values);
    memset(m, 0, sizeof *m);
}

/* Appends key = value, taking value (NULL: out of memory, reported by the caller). */
static int add(tm_output_metadata *m, const char *key, char *value) {
    if (!value) return -1;
    if (m->n == m->cap) {
        size_t cap = m->cap ? 2 * m->cap : 8;
        const char **keys = realloc(m->keys, cap * sizeof *keys);
        if (keys) m->keys = keys;
        char **values = keys ? realloc(m->values, cap * sizeof *values) : NULL;
        if (!values) {
            free(value);
            return -1;
        }
        m->values = values;
        m->cap = cap;
    }
    m->keys[m->n] = key;
    m->values[m->n++] = value;
    return 0;
}

/* A JSON value as text (cJSON escapes strings correctly). */
static char *json_text(cJSON *v) {
    char *s = v ? cJSON_PrintUnformatted(v) : NULL;
    cJSON_Delete(v);
    return s;
}

/* A parameter's value as JSON: numbers, true/false, a choice's word; a list for per-input ones. */
static cJSON *param_json(const tm_param_decl *d, const double *v, size_t count) {
    cJSON *list = d->per_input ? cJSON_CreateArray() : NULL;
    for (size_t i = 0; i < count; i++) {
        cJSON *one;
        if (d->kind == TM_PARAM_BOOL) {
            one = cJSON_CreateBool(v[i] != 0);
        } else if (d->kind == TM_PARAM_CHOICE) {
            const char *p = d->choices;
            for (int k = 0; k < (int)v[i] && p; k++) p = strchr(p, '|') ? strchr(p, '|') + 1 : NULL;
            size_t len = p ? strcspn(p, "|") : 0;
            char word[64];
            snprintf(word, sizeof word, "%.*s", (int)len, p ? p : "");
            one = cJSON_CreateString(word);
        } else {
            one = cJSON_CreateNumber(v[i]);
        }
        if (!list) return one;
        cJSON_AddItemToArray(list, one);
    }
    return list;
}

tm_status tm_output_metadata_build(const merge_ctx *c, const char *const *paths, tm_output_metadata *m,
                                   tm_error *err) {
    const tm_merge_options *o = c->o;
    const tm_method *method = c->method;
    cJSON *params = cJSON_CreateObject(), *inputs = cJSON_CreateArray(), *aliases = cJSON_CreateObject();
    for (size_t j = 0; j < method->n_params; j++)
        cJSON_AddItemToObject(params, method->params[j].name,
                              param_json(&method->params[j], c->params.values + c->params.at[j], c->params.count[j]));
    for (size_t i = 0; i < c->n; i++) {
        char *copy = strdup(paths[i]);
        cJSON_AddItemToArray(inputs, cJSON_CreateString(copy ? basename(copy) : paths[i]));
        free(copy);
    }
    size_t n_alias = 0;
    for (size_t k = 0; k < c->plan.n_keys; k++)
        if (c->plan.alias_of[k] >= 0) {
            cJSON_AddStringToObject(aliases, c->plan.keys[k], c->plan.keys[c->plan.alias_of[k]]);
            n_alias++;
        }
    /* One statement each: the order of the entries is the order in the file (the operands of
     * a single `|` expression would be evaluated in an unspecified order). torchmerge_weights and
     * torchmerge_normalize repeat those parameters where the method has them, as 0.1 wrote them. */
    int bad = add(m, "format", strdup("pt"));
    bad |= add(m, "torchmerge_version", strdup(tm_version()));
    bad |= add(m, "torchmerge_method", strdup(c->label ? c->label : method->name));
    bad |= add(m, "torchmerge_params", json_text(params));
    for (size_t j = 0; j < method->n_params; j++) {
        const char *name = method->params[j].name;
        if (strcmp(name, "weights") == 0 || strcmp(name, "normalize") == 0) {
            bad |= add(m, strcmp(name, "weights") == 0 ? "torchmerge_weights" : "torchmerge_normalize",
                       json_text(param_json(&method->params[j], c->params.values + c->params.at[j], c->params.count[j])));
        }
    }
    bad |= add(m, "torchmerge_inputs", json_text(inputs));
    if (c->base) {
        char *copy = strdup(tm_checkpoint_path(c->base));
        cJSON *base = cJSON_CreateString(copy ? basename(copy) : tm_checkpoint_path(c->base));
        free(copy);
        bad |= add(m, "torchmerge_base", json_text(base));
    }
    if (n_alias) bad |= add(m, "torchmerge_aliases", json_text(aliases));
    else cJSON_Delete(aliases);
    if (o->recipe_text) bad |= add(m, "torchmerge_recipe", strdup(o->recipe_text));
    return bad ? tm_error_set(err, TM_ERROR_NOMEM, "out of memory") : TM_OK;
}
