/* Merge recipes: a YAML file (FusionBench method config, FusionBench model pool, mergekit config)
 * that says what to merge and how. Parsed with libyaml's event API into a small tree that
 * remembers where every node came from (file, line, column), changed by Hydra-style key=value
 * overrides, interpreted and validated into a tm_recipe, then run with tm_merge_files.
 * Nothing is written before the recipe has been fully validated. C11.
 *
 * Internal API (the public entry point is tm_merge_recipe in torchmerge.h). Files:
 *   recipe_yaml.c  YAML → tree (libyaml events), overrides, tree → YAML (libyaml emitter)
 *   recipe.c       tree → tm_recipe (validation, messages), rules callbacks, tm_merge_recipe */
#ifndef TM_RECIPE_RECIPE_H
#define TM_RECIPE_RECIPE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "merge/method.h"
#include "torchmerge.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- The YAML tree -------------------------------------------------------------------------- */

typedef enum tm_rnode_kind { TM_RNODE_SCALAR, TM_RNODE_SEQ, TM_RNODE_MAP } tm_rnode_kind;

/* Where a node came from: the recipe file (or text), or one override. */
typedef struct tm_rorigin {
    char *label;      /* "recipe.yaml", "<recipe>", or "override 'method.weights=[1,2]'" */
    int is_override;
    char *base_dir;   /* relative paths written here resolve against it ("" = current dir) */
} tm_rorigin;

typedef struct tm_rnode {
    tm_rnode_kind kind;
    char *text;              /* scalars: the value (NUL-terminated; NUL bytes are refused) */
    int plain;               /* scalars: written without quotes or tags, so null/true/1.5 are typed */
    int style;               /* scalars: libyaml's yaml_scalar_style_t, kept for re-emitting */
    int flow;                /* sequences and mappings: written in flow style ([..] / {..}) */
    size_t n;                /* items (sequences) or pairs (mappings) */
    struct tm_rnode **items; /* sequence items, or mapping values */
    struct tm_rnode **keys;  /* mapping keys (scalars) */
    const tm_rorigin *origin;
    size_t line, column;     /* 1-based position of the node's first character */
} tm_rnode;

/* The recipe file as read, and the tree after overrides. */
typedef struct tm_rdoc {
    tm_rnode *root;
    tm_rorigin **origins; /* owned: [0] the recipe, then one per override */
    size_t n_origins;
    size_t n_nodes;       /* for the node limit (aliases are copied) */
} tm_rdoc;

/* Parses the YAML recipe (a file when is_path, else the text itself). Messages name it by its
 * path, or "<recipe>" for text. The root must be a mapping. */
tm_status tm_rdoc_parse(tm_rdoc *doc, const char *recipe, int is_path, tm_error *err);
/* Applies one override: "a.b.0=value" (value parsed as YAML; "+a=v" and "++a=v" are accepted as
 * in Hydra; "~a.b" deletes). */
tm_status tm_rdoc_override(tm_rdoc *doc, const char *override, tm_error *err);
/* The tree as YAML text (malloc'ed, NUL-terminated), after header (comment lines, may be NULL). */
tm_status tm_rdoc_emit(const tm_rdoc *doc, const char *header, char **out, tm_error *err);
void tm_rdoc_free(tm_rdoc *doc);

/* Looks a key up in a mapping node; NULL when absent. */
const tm_rnode *tm_rnode_get(const tm_rnode *map, const char *key);

/* ---- The interpreted recipe ----------------------------------------------------------------- */

/* A per-tensor value: the first rule whose filter matches the tensor name wins. filter NULL or
 * "*" matches every name; a filter with * ? or [ is an fnmatch(3) glob over the whole name;
 * anything else matches as a substring (mergekit's rule). */
typedef struct tm_recipe_rule {
    char *filter;
    double value;       /* or, with n_gradient > 0, mergekit's layer gradient: */
    double *gradient;   /* anchors interpolated over the layers (tm_recipe_gradient_at) */
    size_t n_gradient;
    const tm_rnode *at;
    uint64_t matched; /* tensors it was used for (for the "matched nothing" warning) */
} tm_recipe_rule;

/* A numeric method parameter given in mergekit's form: a value, or per-tensor rules. */
typedef struct tm_recipe_setting {
    const char *key;    /* the key it was given as ("weight"), for messages */
    int present;
    int is_rules;       /* 0: value; 1: rules */
    double value;
    tm_recipe_rule *rules;
    size_t n_rules;
    const tm_rnode *at; /* the value node */
} tm_recipe_setting;

typedef struct tm_recipe_model {
    char *name;         /* pool name, or NULL */
    char *written;      /* the path as written in the recipe */
    char *path;         /* resolved */
    const tm_rnode *params_at;  /* its parameters: mapping, read once the method is known */
    tm_recipe_setting params[TM_METHOD_MAX_PARAMS]; /* per-input parameters, by method index */
    const tm_rnode *at; /* the path node */
} tm_recipe_model;

typedef struct tm_recipe_pattern {
    char *pattern;
    const tm_rnode *at;
    uint64_t matched;
} tm_recipe_pattern;

typedef struct tm_recipe {
    tm_rdoc doc;
    const tm_method *method;
    tm_recipe_model *models;
    size_t n_models;
    /* The method's parameters as the merge gets them (numbers or the text of a scalar), and
     * mergekit's top-level parameters: (values or per-tensor rules), by method index. */
    tm_param params[TM_METHOD_MAX_PARAMS];
    size_t n_params;
    double *numbers[TM_METHOD_MAX_PARAMS];
    tm_recipe_setting defaults[TM_METHOD_MAX_PARAMS];
    int per_tensor;             /* some parameter depends on the tensor name */
    int has_gradient;           /* some rule is a layer gradient: n_layers is needed */
    long n_layers;              /* layers of the models (1 + the largest layer index in a name) */
    const tm_rnode *slice_range; /* mergekit slices: the first source's layer_range, or NULL */
    long slice_lo, slice_hi;
    char *output;               /* resolved, or NULL */
    const tm_rnode *output_at;
    tm_format format;
    tm_key_policy keys;
    char *key;
    int has_dtype;
    tm_dtype out_dtype;
    char *template_path;        /* resolved */
    char *base;                 /* the base model, resolved, for methods that need one; or NULL */
    char *masks_out;            /* masks_out: the keep-masks file (as given: relative to where the command runs), or NULL */
    uint64_t max_shard_size;
    int dequantize;             /* dequantize: true (tm_merge_options.dequantize) */
    tm_recipe_pattern *include, *exclude;
    size_t n_include, n_exclude;
    char *text;                 /* the effective recipe, re-emitted as YAML */
    /* distributed: a merge across hosts (parse_distributed); has_distributed 0 when absent. */
    int has_distributed;
    tm_distributed_options distributed;
    char *master_addr;
} tm_recipe;

/* Parses, applies the overrides, interprets and validates (model files exist, weights match the
 * models, ...). warn (may be NULL) receives warnings such as ignored mergekit settings. */
tm_status tm_recipe_load(tm_recipe *r, const char *recipe, int is_path, const char *const *overrides,
                         size_t n_overrides, void (*warn)(void *, const char *), void *warn_user, tm_error *err);
void tm_recipe_free(tm_recipe *r);

/* Fills o from the recipe: base's callbacks and profile, the recipe's settings, and rules
 * callbacks that read r (which must outlive the merge). */
void tm_recipe_merge_options(tm_recipe *r, const tm_merge_options *base, tm_merge_options *o);

/* The callbacks (rules_user is the tm_recipe). The engine calls them from one thread at a time;
 * they count matches for the "matched no tensor" warnings, which tm_merge_recipe reads after the
 * merge. */
int tm_recipe_include_tensor(void *user, const char *name);
void tm_recipe_tensor_param(void *user, const char *name, const char *param, size_t n, double *values);
/* mergekit's layer gradient: anchors[0..n) spread evenly over t ∈ [0, 1], linearly
 * interpolated between neighbours. */
double tm_recipe_gradient_at(const double *anchors, size_t n, double t);
/* The layer index of a tensor name: its first dot-separated part made of digits only
 * ("model.layers.12.mlp.weight" → 12), or -1. */
long tm_recipe_layer_of(const char *name);
/* 1 when pattern matches name (substring, or glob when it has * ? [). */
int tm_recipe_pattern_matches(const char *pattern, const char *name);

#ifdef __cplusplus
}
#endif
#endif
