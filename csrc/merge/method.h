/* The merge-method table: what a method is to the engine, the command line and recipes.
 *
 * A method is one entry: its names, its parameters as data (tm_param_decl: the same
 * declaration gives the CLI flags, the recipe keys, the validation messages and --help), what it
 * needs (a base model, how many inputs), and three steps over one tensor at a time:
 *   prepare  per tensor, before any element: coefficients from the parameters (e.g. the
 *            normalised weights of the inputs that hold the tensor);
 *   reduce   optional, over every block of the tensor first: whole-tensor statistics (norms, dot
 *            products, magnitude thresholds) accumulated into the tensor's state;
 *   apply    per block of elements: the merged values, rounded once to the output dtype.
 * The streaming engine (merge_unit.c, pipeline.c) calls these and knows nothing else about the
 * method. How to add one: docs/adding_a_method.md. C11. */
#ifndef TM_MERGE_METHOD_H
#define TM_MERGE_METHOD_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "merge/kernel.h"
#include "torchmerge.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Doubles of scratch per element of a block that reduce and apply get: the inputs' values, the
 * base's and a float64 (complex128) accumulator. */
#define TM_METHOD_SCRATCH 3

/* Methods have few parameters; the bound keeps per-tensor parameter copies on the stack. */
#define TM_METHOD_MAX_PARAMS 16

/* One parameter, declared as data (see tm_method_param_info in torchmerge.h for each field). */
typedef struct tm_param_decl {
    const char *name;
    const char *aliases[4];    /* other recipe names (mergekit's, FusionBench's), NULL-terminated */
    tm_param_kind kind;
    int per_input;
    int exactly_per_input;     /* per-input, and a single value is not spread over the inputs */
    int required;
    const char *default_value; /* NULL when required */
    double min, max;
    int min_exclusive, max_exclusive;
    const char *choices;       /* "sum|count" for TM_PARAM_CHOICE */
    const char *help;
} tm_param_decl;

/* A method's parameters resolved for a merge of n_inputs inputs: every parameter has values,
 * numbers all of them (bools 0/1, a choice its index): per-input parameters n_inputs of them,
 * the others one. */
typedef struct tm_param_values {
    size_t n_inputs;
    size_t n_params;
    size_t at[TM_METHOD_MAX_PARAMS];  /* parameter j's values: values + at[j] */
    size_t count[TM_METHOD_MAX_PARAMS];
    int given[TM_METHOD_MAX_PARAMS];  /* 1: given by the caller, 0: the default */
    double *values;                   /* owned */
    size_t n_values;
} tm_param_values;

/* What a method sees of one output tensor (a "unit": a tensor, or a storage shared by views). */
typedef struct tm_method_tensor {
    const char *name;       /* the tensor's name (the first, for a shared storage) */
    size_t n_inputs;        /* inputs of the merge */
    size_t n;               /* of them, those that hold this tensor */
    const size_t *input;    /* input[j]: the merge input view j comes from (ascending) */
    const tm_view *in;      /* n views over the inputs' bytes */
    const tm_view *base;    /* the base model's view (methods with needs_base), else NULL; it is
                               in[n], so inputs and base can go to a kernel as one array */
    tm_dtype out_dtype;
    uint64_t numel;
    const double *params;   /* this tensor's parameter values (after per-tensor rules): */
    const size_t *param_at; /* parameter j at params + param_at[j], indexed by input when per-input */
} tm_method_tensor;

typedef struct tm_method {
    const char *name;
    const char *aliases[4]; /* other names (mergekit's), NULL-terminated */
    const char *fusionbench_class; /* FusionBench's algorithm class (recipes' _target_), or NULL */
    const char *summary;
    const tm_param_decl *params;
    size_t n_params;
    int needs_base;
    size_t min_inputs, max_inputs; /* max 0: no limit */
    /* Doubles of per-tensor state: state_fixed + state_per_input × n (inputs holding it). */
    size_t state_fixed, state_per_input;
    /* Optional: merge-wide checks of the resolved values, before any file is opened. */
    tm_status (*check)(const tm_param_values *p, tm_error *err);
    /* Per tensor, before its elements. Errors name the tensor. */
    tm_status (*prepare)(const tm_method_tensor *t, double *state, tm_error *err);
    /* Optional: called on every block of the tensor, in order, before the first apply. */
    void (*reduce)(const tm_method_tensor *t, double *state, uint64_t begin, size_t count, double *scratch);
    /* Elements [begin, begin + count) of the merged tensor into out (out_dtype). scratch holds
     * TM_METHOD_SCRATCH × count doubles (reduce gets the same). */
    void (*apply)(const tm_method_tensor *t, const double *state, uint64_t begin, size_t count, void *out,
                  double *scratch);
} tm_method;

/* The table (method_table.c). */
size_t tm_methods_count(void);
const tm_method *tm_methods_at(size_t i);
/* By name or alias; NULL when unknown. */
const tm_method *tm_methods_find(const char *name);
/* "simple_average, weighted_average (linear), ..." for messages. Static buffer built once. */
const char *tm_methods_list(void);

/* 1 when name is one of the NULL-terminated names. */
int tm_name_in(const char *const *names, const char *name);
/* Parameter j of m called name (or one of its aliases when with_aliases), or -1. */
int tm_method_param_index(const tm_method *m, const char *name, int with_aliases);

/* Resolves params (as the caller gave them) for a merge of n_inputs: parses text, checks kinds,
 * counts and ranges, fills defaults, requires required ones, then runs m->check. Errors name the
 * parameter: "--weights"-free wording ("weights: expected 3 values (one per input), got 2") so
 * every surface can use them. Free with tm_param_values_free. */
tm_status tm_param_values_resolve(const tm_method *m, const tm_param *params, size_t n_params, size_t n_inputs,
                                  tm_param_values *out, tm_error *err);
void tm_param_values_free(tm_param_values *p);

/* Parses one value as text for parameter d into out[0..*count): "0.2,0.8" gives 2 numbers;
 * a bool gives 0/1, a choice its index. cap is the room in out. */
tm_status tm_param_parse_text(const tm_param_decl *d, const char *text, double *out, size_t cap, size_t *count,
                              tm_error *err);

/* Checks one number against d's kind and range; the message names the parameter. */
tm_status tm_param_check_number(const tm_param_decl *d, double v, tm_error *err);

/* The value of parameter j for input i of t (per-input parameters), or its single value. */
static inline double tm_tensor_param(const tm_method_tensor *t, size_t j, size_t input) {
    return t->params[t->param_at[j] + input];
}
static inline double tm_tensor_param1(const tm_method_tensor *t, size_t j) { return t->params[t->param_at[j]]; }

#ifdef __cplusplus
}
#endif
#endif
