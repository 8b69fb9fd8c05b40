/* The merge-method table: what a method is to the engine, the command line and recipes.
 *
 * A method is one entry: its names, its parameters as data (tm_param_decl: the same
 * declaration gives the CLI flags, the recipe keys, the validation messages and --help), what it
 * needs (a base model, how many inputs), and three steps over one tensor at a time:
 *   prepare  per tensor, before any element: coefficients from the parameters (e.g. the
 *            normalised weights of the inputs that hold the tensor);
 *   reduce   optional, over every block of the tensor first, in one or more passes (reduce_end
 *            asks for another): whole-tensor statistics (norms, dot products, histograms and
 *            candidates of an exact top-k) accumulated into the tensor's state and memory;
 *   apply    per block of elements: the merged values, rounded once to the output dtype.
 * A method may also ask for model-wide passes before any tensor is written (model_reduce /
 * model_end: e.g. FusionBench's TIES threshold over the whole flattened model); their result
 * reaches every tensor as t->model.
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
    const char *fusionbench_default; /* FusionBench's default where it differs (FusionBench-shaped recipes), or NULL */
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

/* Memory of any size a method may use for one tensor beyond its fixed scratch (e.g. the
 * candidates of a top-k selection): the merging thread's, kept across the tensor's passes and
 * reused by its next tensor. */
typedef struct tm_method_memory {
    void *data;
    size_t size;
} tm_method_memory;

/* At least bytes of m, its contents kept when it grows; NULL when out of memory. */
void *tm_method_memory_reserve(tm_method_memory *m, size_t bytes);

/* Values the model-wide passes collect (e.g. the candidates of a global top-k), one list per
 * input: merge-wide, appended to from any thread (tm_method_collect), handed to model_end. */
typedef struct tm_model_lists tm_model_lists;

/* The boolean keep-masks of a merge (--masks-out), or NULL when not asked for. */
typedef struct tm_mask_writer tm_mask_writer;

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
    tm_method_memory *memory; /* the thread's memory for this tensor (reduce and apply) */
    const double *model;    /* the model-wide state after the model passes (model_state doubles) */
    tm_model_lists *lists;  /* during model passes: where tm_method_collect appends */
    tm_mask_writer *masks;  /* the masks output, or NULL: see tm_method_mask */
    uint64_t unit_index;    /* the tensor's place in the plan (deterministic tie-breaks across tensors) */
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
    int has_masks;          /* 1: apply reports which task-vector elements it kept (tm_method_mask) */
    /* Doubles of per-tensor state: state_fixed + state_per_input × n (inputs holding it). */
    size_t state_fixed, state_per_input;
    /* Optional: merge-wide checks of the resolved values, before any file is opened. */
    tm_status (*check)(const tm_param_values *p, tm_error *err);
    /* Per tensor, before its elements. Errors name the tensor. */
    tm_status (*prepare)(const tm_method_tensor *t, double *state, tm_error *err);
    /* Optional: called on every block of the tensor, in order, before the first apply; pass
     * counts the passes over the tensor from 0. */
    void (*reduce)(const tm_method_tensor *t, double *state, unsigned pass, uint64_t begin, size_t count,
                   double *scratch);
    /* Optional: after each reduce pass; *again = 1 runs another pass over the tensor. Errors
     * (out of memory, ...) name the tensor. */
    tm_status (*reduce_end)(const tm_method_tensor *t, double *state, unsigned pass, int *again, tm_error *err);
    /* Optional model-wide passes before any tensor is written. Pass p calls model_reduce on
     * every block of every floating tensor (after its prepare; tensors in any order and thread),
     * adding into sum, a zeroed model_state doubles of the thread's (so only counts and sums:
     * the engine adds the threads' up; t->model is the model state so far), and appending values
     * with tm_method_collect; then
     * model_end(model, sum, lists) updates the model state (zeroed before pass 0) and sets
     * *again for another pass. Tensors are then merged with t->model = model. */
    size_t model_state;
    size_t model_state_per_input; /* more model state doubles, per input of the merge */
    /* Optional: 0 when these resolved parameters need no model-wide passes (e.g. TIES trimmed per
     * tensor): the passes are skipped and t->model is NULL. */
    int (*wants_model_passes)(const tm_param_values *p);
    void (*model_reduce)(const tm_method_tensor *t, const double *state, unsigned pass, uint64_t begin, size_t count,
                         double *sum, double *scratch);
    tm_status (*model_end)(const tm_param_values *p, double *model, const double *sum, const tm_model_lists *lists,
                           unsigned pass, int *again, tm_error *err);
    /* Elements [begin, begin + count) of the merged tensor into out (out_dtype). scratch holds
     * TM_METHOD_SCRATCH × count doubles (reduce gets the same). */
    void (*apply)(const tm_method_tensor *t, const double *state, uint64_t begin, size_t count, void *out,
                  double *scratch);
    /* Optional: the method across hosts (merge/method_xr.h); NULL: --distributed refuses it. */
    const struct tm_method_xr *cross_rank;
} tm_method;

/* Appends count values to list `list` (an input index) of the model passes; thread-safe.
 * Returns TM_ERROR_NOMEM when out of memory (model_end then fails the merge). */
tm_status tm_method_collect(const tm_method_tensor *t, size_t list, const double *values, size_t count);
/* List `list` of the model pass just run: *count values (NULL when none). */
const double *tm_model_list(const tm_model_lists *lists, size_t list, size_t *count);

/* Records which elements [begin, begin + count) of the j-th holder's task vector the method
 * kept (keep[e] 0 or 1) when the merge writes masks (t->masks non-NULL; else a no-op). */
void tm_method_mask(const tm_method_tensor *t, size_t j, uint64_t begin, size_t count, const uint8_t *keep);

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
