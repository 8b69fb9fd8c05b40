/* torchmerge — merge PyTorch checkpoints by averaging their weights.
 *
 * Pure C99 API. Everything here is usable from C, C++ and any FFI.
 *
 * Conventions
 * - Every call that can fail returns a tm_status; TM_OK is 0.
 * - When a call fails, tm_errmsg() returns a one-line message for the most recent failure on
 *   the calling thread, naming the file and, where one is involved, the tensor
 *   ("model.pt: tensor 'fc.weight': shape [3, 4] differs from a.pt's [4, 4]"). The message is
 *   thread-local (like errno) so calls that have no handle, such as tm_merge_files(), report
 *   errors the same way as calls that do. It stays valid until the next failing call on that
 *   thread.
 * - Handles are opaque. Every *_close / *_free accepts NULL.
 * - Ownership: a pointer returned by a getter is owned by the handle it came from and stays
 *   valid until that handle is closed/freed, unless the comment says otherwise. Pointers
 *   passed in are borrowed for the duration of the call only.
 * - Tensor bytes of an opened checkpoint are not copied: they point into the read-only memory
 *   mapping of the file (or into LibTorch's memory for TorchScript modules).
 * - Growing structs: every struct passed by pointer (options the caller fills, and records the
 *   library fills for the caller) starts with `size_t struct_size`, the caller's sizeof. Fill
 *   it with the struct's *_init function (or set it to sizeof yourself). The library reads and
 *   writes only the fields that fit in struct_size and uses defaults for the rest, so a program
 *   compiled against an older, shorter layout keeps working when fields are added at the end.
 *   struct_size 0 (a struct never initialised) is TM_ERROR_INVALID_ARGUMENT.
 * - Releasing: every handle and every record the library allocates is released by one function
 *   named *_free (tm_checkpoint_free, tm_state_dict_free, tm_greedy_report_free). Each accepts
 *   NULL and does nothing then.
 * - Method parameters (weights, normalize, and those of later methods) travel as name/value
 *   pairs (tm_param), described by the method table (tm_method_*): new methods and parameters
 *   need no new struct fields.
 * - Threads: every function may be called from any thread. Calls on different handles, and the
 *   read-only calls (getters, tm_checkpoint_read) on one handle, may run concurrently; calls that
 *   change a tm_state_dict (set/add/mul/free) need the caller to serialise them with every other
 *   use of that state dict. tm_merge_files, tm_merge_recipe and tm_greedy_soup may run
 *   concurrently with each other (distinct outputs); their callbacks are called from one thread
 *   at a time, not necessarily the caller's. tm_errmsg() is per thread.
 */
#ifndef TORCHMERGE_H
#define TORCHMERGE_H

#include <stddef.h>
#include <stdint.h>

#ifndef TM_API
#if defined(__GNUC__)
#define TM_API __attribute__((visibility("default")))
#else
#define TM_API
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define TORCHMERGE_VERSION_MAJOR 0
#define TORCHMERGE_VERSION_MINOR 2
#define TORCHMERGE_VERSION_PATCH 0
#define TORCHMERGE_VERSION_STRING "0.2.0"

/* ---- Status codes ------------------------------------------------------------------------ */

#define TM_STATUS_LIST(X)                                                                       \
    X(TM_OK, "ok")                                                                              \
    X(TM_ERROR_IO, "input/output error")                                                        \
    X(TM_ERROR_FORMAT, "malformed or unrecognised file")                                        \
    X(TM_ERROR_UNSUPPORTED, "unsupported feature")                                              \
    X(TM_ERROR_UNSAFE, "refused unsafe content")                                                \
    X(TM_ERROR_MISMATCH, "inputs do not match")                                                 \
    X(TM_ERROR_INVALID_ARGUMENT, "invalid argument")                                            \
    X(TM_ERROR_NOT_FOUND, "not found")                                                          \
    X(TM_ERROR_AMBIGUOUS, "ambiguous input")                                                    \
    X(TM_ERROR_NOMEM, "out of memory")                                                          \
    X(TM_ERROR_LIMIT, "resource limit exceeded")                                                \
    X(TM_ERROR_INTERRUPTED, "interrupted")                                                      \
    X(TM_ERROR_INTERNAL, "internal error")

typedef enum tm_status {
#define TM_STATUS_ENUM_(name, text) name,
    TM_STATUS_LIST(TM_STATUS_ENUM_)
#undef TM_STATUS_ENUM_
    TM_STATUS_COUNT
} tm_status;

/* "TM_ERROR_FORMAT" etc. Static string; never NULL. */
TM_API const char *tm_status_name(tm_status status);
/* A short English description of the status. Static string; never NULL. */
TM_API const char *tm_strerror(tm_status status);
/* The message of the most recent failure on this thread ("" if none). Thread-local storage
 * owned by the library; valid until the next failing call on this thread. */
TM_API const char *tm_errmsg(void);
/* "0.2.0". Static string. */
TM_API const char *tm_version(void);

/* ---- Data types -------------------------------------------------------------------------- */

#define TM_DTYPE_LIST(X)                                                                        \
    X(TM_FLOAT64, "float64", 8)                                                                 \
    X(TM_FLOAT32, "float32", 4)                                                                 \
    X(TM_FLOAT16, "float16", 2)                                                                 \
    X(TM_BFLOAT16, "bfloat16", 2)                                                               \
    X(TM_COMPLEX64, "complex64", 8)                                                             \
    X(TM_COMPLEX128, "complex128", 16)                                                          \
    X(TM_INT64, "int64", 8)                                                                     \
    X(TM_INT32, "int32", 4)                                                                     \
    X(TM_INT16, "int16", 2)                                                                     \
    X(TM_INT8, "int8", 1)                                                                       \
    X(TM_UINT8, "uint8", 1)                                                                     \
    X(TM_BOOL, "bool", 1)                                                                       \
    X(TM_QINT8, "qint8", 1)                                                                     \
    X(TM_QUINT8, "quint8", 1)                                                                   \
    X(TM_QINT32, "qint32", 4)

typedef enum tm_dtype {
#define TM_DTYPE_ENUM_(name, text, size) name,
    TM_DTYPE_LIST(TM_DTYPE_ENUM_)
#undef TM_DTYPE_ENUM_
    TM_DTYPE_COUNT
} tm_dtype;

/* "float32" etc. Static string; "?" for an out-of-range value. */
TM_API const char *tm_dtype_name(tm_dtype dtype);
/* Bytes per element; 0 for an out-of-range value. */
TM_API size_t tm_dtype_size(tm_dtype dtype);
/* Parses "float32" (also "fp32", "f32", "float", "half", "fp16", "bf16", "double", ...).
 * Returns TM_OK or TM_ERROR_INVALID_ARGUMENT. */
TM_API tm_status tm_dtype_from_name(const char *name, tm_dtype *out);
/* 1 for float16/bfloat16/float32/float64/complex: the dtypes that are averaged. */
TM_API int tm_dtype_is_floating(tm_dtype dtype);
/* 1 for the quantized dtypes (qint8, quint8, qint32; added in 0.2): integers q stored with the
 * tensor's scale and zero point (tm_tensor_info.qscheme), standing for scale·(q − zero_point). */
TM_API int tm_dtype_is_quantized(tm_dtype dtype);

/* ---- Tensors ----------------------------------------------------------------------------- */

#define TM_MAX_NDIM 16

/* How a quantized tensor maps its integers to real values (torch.qscheme). Added in 0.2. */
typedef enum tm_qscheme {
    TM_QSCHEME_NONE = 0,                        /* not quantized */
    TM_QSCHEME_PER_TENSOR_AFFINE,               /* scale·(q − zero_point) */
    TM_QSCHEME_PER_CHANNEL_AFFINE,              /* scales[c]·(q − zero_points[c]), c the index
                                                   along axis */
    TM_QSCHEME_PER_CHANNEL_AFFINE_FLOAT_QPARAMS /* the same with real-valued zero points */
} tm_qscheme;

/* "per_tensor_affine" etc. (torch's names); "none"; "?" for an out-of-range value. Static. */
TM_API const char *tm_qscheme_name(tm_qscheme qscheme);

/* A tensor as stored: a strided view into a storage. All pointers are owned by the handle
 * that produced the info (checkpoint or state dict) and live as long as it does. */
typedef struct tm_tensor_info {
    size_t struct_size;         /* the caller's sizeof(tm_tensor_info): tm_tensor_info_init */
    const char *name;           /* state-dict key, e.g. "encoder.layer.0.weight" */
    tm_dtype dtype;
    int32_t ndim;               /* 0 for a scalar */
    const int64_t *shape;       /* ndim entries */
    const int64_t *stride;      /* ndim entries, in elements */
    int64_t storage_offset;     /* in elements */
    const void *storage_data;   /* first byte of the storage (read-only) */
    uint64_t storage_nbytes;    /* bytes in the storage */
    int64_t storage_id;         /* equal for tensors sharing a storage within one handle */
    uint64_t numel;             /* product of shape */
    uint64_t nbytes;            /* numel * element size (contiguous size) */
    /* Quantized tensors (tm_dtype_is_quantized(dtype)), added in 0.2 after the other fields: the
     * integers stand for scale·(q − zero_point), per tensor or per channel along q_axis. A caller
     * whose struct_size ends before qscheme sees the dtype only. */
    tm_qscheme qscheme;         /* TM_QSCHEME_NONE for other tensors */
    double q_scale;             /* per tensor (0 otherwise) */
    int64_t q_zero_point;       /* per tensor (0 otherwise) */
    int32_t q_axis;             /* per channel: the channel dimension (0 otherwise) */
    const double *q_scales;     /* per channel: shape[q_axis] scales, else NULL; owned as name */
    const double *q_zero_points; /* per channel: shape[q_axis] zero points, else NULL */
} tm_tensor_info;

/* Zeroes *info and sets struct_size. */
TM_API void tm_tensor_info_init(tm_tensor_info *info);

/* ---- Checkpoints (read-only, lazily mapped) --------------------------------------------- */

/* An opened checkpoint file: torch.save (zip), TorchScript module (torch.jit.save).
 * Tensors are views into the mapped file until used. */
typedef struct tm_checkpoint tm_checkpoint;

typedef struct tm_open_options {
    size_t struct_size;        /* sizeof(tm_open_options), set by tm_open_options_init */
    /* For nested training checkpoints ({'epoch':…, 'state_dict':{…}}): the key of the state
     * dict to use; dots descend ("model.ema"). NULL: found automatically when unambiguous.
     * A file that is already a flat state dict ignores it. */
    const char *key;
} tm_open_options;

TM_API void tm_open_options_init(tm_open_options *opts);

/* Opens path. On success *out is a handle the caller frees with tm_checkpoint_free; on
 * failure *out is NULL and tm_errmsg() says why. opts may be NULL (defaults). */
TM_API tm_status tm_checkpoint_open(const char *path, const tm_open_options *opts,
                                    tm_checkpoint **out);
TM_API void tm_checkpoint_free(tm_checkpoint *ckpt);

/* "pt" (torch.save zip), "pt-legacy" (torch.save before 1.6), "torchscript". Static string. */
TM_API const char *tm_checkpoint_format(const tm_checkpoint *ckpt);
/* The path given to open; owned by ckpt. */
TM_API const char *tm_checkpoint_path(const tm_checkpoint *ckpt);
/* Key used for a nested checkpoint ("" when the file is a flat state dict); owned by ckpt. */
TM_API const char *tm_checkpoint_key(const tm_checkpoint *ckpt);
TM_API size_t tm_checkpoint_n_tensors(const tm_checkpoint *ckpt);
/* Tensor i (0 <= i < n) in file order. Fills *out (out->struct_size set by the caller, see
 * tm_tensor_info_init); pointers in it are owned by ckpt. */
TM_API tm_status tm_checkpoint_tensor(const tm_checkpoint *ckpt, size_t i, tm_tensor_info *out);
/* Index of the tensor named name, or -1. */
TM_API int64_t tm_checkpoint_find(const tm_checkpoint *ckpt, const char *name);
/* A value recorded with the checkpoint, or NULL: safetensors __metadata__[key] (torchmerge
 * records "torchmerge_method", "torchmerge_weights", "torchmerge_inputs", "torchmerge_recipe",
 * …); for a folder, "torchmerge_recipe" also comes from its torchmerge_recipe.yaml. Owned by
 * ckpt. */
TM_API const char *tm_checkpoint_metadata(const tm_checkpoint *ckpt, const char *key);
/* The keys a nested checkpoint holds several state dicts under ({'actor': sd, 'critic': sd}
 * gives "actor", "critic"), in file order: what tm_open_options.key accepts when
 * tm_checkpoint_open fails with TM_ERROR_AMBIGUOUS. Empty when the file is itself a state dict
 * (or a safetensors file). Added in 0.2. */
typedef struct tm_key_list {
    size_t struct_size;        /* sizeof(tm_key_list), set by tm_key_list_init */
    size_t n;
    char **keys;               /* n keys, allocated by the library: tm_key_list_free */
} tm_key_list;

TM_API void tm_key_list_init(tm_key_list *list);
/* Fills *out (struct_size set by the caller); on failure it is empty. */
TM_API tm_status tm_checkpoint_list_keys(const char *path, tm_key_list *out);
/* Frees the keys and empties *list (not list itself). NULL is fine. */
TM_API void tm_key_list_free(tm_key_list *list);

/* Copies tensor i as a contiguous row-major array into dst (dst_size >= info.nbytes); for a
 * quantized tensor, its stored integers (int8, uint8 or int32). */
TM_API tm_status tm_checkpoint_read(const tm_checkpoint *ckpt, size_t i, void *dst,
                                    size_t dst_size);

/* ---- In-memory state dicts (ATen tensors) ----------------------------------------------- */

/* An ordered name → tensor map held in memory (LibTorch tensors). */
typedef struct tm_state_dict tm_state_dict;

/* An empty state dict. Free with tm_state_dict_free. */
TM_API tm_status tm_state_dict_new(tm_state_dict **out);
/* Loads every tensor of path into memory (contiguous copies; quantized tensors as quantized
 * ATen tensors, as torch.load returns them). opts may be NULL. */
TM_API tm_status tm_state_dict_load(const char *path, const tm_open_options *opts,
                                    tm_state_dict **out);
/* Deep copy. */
TM_API tm_status tm_state_dict_clone(const tm_state_dict *sd, tm_state_dict **out);
TM_API void tm_state_dict_free(tm_state_dict *sd);

TM_API size_t tm_state_dict_size(const tm_state_dict *sd);
/* Tensor i in insertion order (out->struct_size set by the caller); pointers owned by sd, valid
 * until sd changes or is freed. A per-tensor quantized tensor is described with its integers,
 * scale and zero point; a per-channel one is TM_ERROR_UNSUPPORTED (not described yet). */
TM_API tm_status tm_state_dict_tensor(const tm_state_dict *sd, size_t i, tm_tensor_info *out);
TM_API int64_t tm_state_dict_find(const tm_state_dict *sd, const char *name);
/* Inserts or replaces name with a copy of the contiguous array data (numel * size bytes). */
TM_API tm_status tm_state_dict_set(tm_state_dict *sd, const char *name, tm_dtype dtype,
                                   int32_t ndim, const int64_t *shape, const void *data);

/* a[k] += alpha * b[k] for every key (FusionBench's state_dict_add, in place). Keys must match
 * exactly and shapes per key; floating tensors only are changed, others keep a's value. */
TM_API tm_status tm_state_dict_add(tm_state_dict *a, const tm_state_dict *b, double alpha);
/* sd[k] *= scalar for every floating tensor (FusionBench's state_dict_mul, in place). */
TM_API tm_status tm_state_dict_mul(tm_state_dict *sd, double scalar);

/* ---- Merging files ----------------------------------------------------------------------- */

typedef enum tm_format {
    TM_FORMAT_AUTO = 0,    /* from the output: *.safetensors or a folder → safetensors; else
                              TorchScript when the inputs are modules or a template is given;
                              else pt */
    TM_FORMAT_PT,          /* torch.save zip, a plain dict of tensors */
    TM_FORMAT_TORCHSCRIPT, /* torch.jit.save module: the first input module, or the template */
    TM_FORMAT_SAFETENSORS  /* safetensors file, or a sharded Hugging Face folder when the output
                              is a folder (an existing one, or a path ending in '/') */
} tm_format;

typedef enum tm_key_policy {
    TM_KEYS_STRICT = 0,    /* every input must have the same keys */
    TM_KEYS_INTERSECTION,  /* keys present in every input */
    TM_KEYS_UNION          /* every key; averaged over the inputs that have it */
} tm_key_policy;

/* Wall-clock seconds spent per phase, filled by tm_merge_files when requested. */
typedef struct tm_profile {
    size_t struct_size;        /* the caller's sizeof(tm_profile): tm_profile_init */
    double load_seconds, merge_seconds, save_seconds;
    uint64_t load_calls, merge_calls, save_calls;
} tm_profile;

TM_API void tm_profile_init(tm_profile *profile);

/* ---- Merge methods ------------------------------------------------------------------------
 *
 * Every merge method is an entry of one table: its name, its parameters (name, kind, default,
 * range) and what it needs. The command line's flags, the recipe keys, the validation messages
 * and `torchmerge METHOD --help` all come from it. Parameters are given as tm_param name/value
 * pairs. */

typedef enum tm_param_kind {
    TM_PARAM_NUMBER = 0, /* a real number ("0.5"); with per_input, one per input ("0.2,0.8") */
    TM_PARAM_INTEGER,    /* a whole number ("42") */
    TM_PARAM_BOOL,       /* "true"/"false" (also 1/0, yes/no, on/off) */
    TM_PARAM_CHOICE      /* one word of choices ("sum") */
} tm_param_kind;

/* One parameter as a method declares it. Static strings owned by the library. */
typedef struct tm_method_param_info {
    size_t struct_size;        /* the caller's sizeof: tm_method_param_info_init */
    const char *name;          /* "weights": the C API and recipe name; the flag is --weights */
    const char *const *aliases; /* other recipe names ("weight"), NULL-terminated; never NULL */
    tm_param_kind kind;
    int per_input;             /* 1: one value per input (a single value applies to every input,
                                  unless exactly_per_input) */
    int exactly_per_input;
    int required;              /* 1: no default */
    const char *default_value; /* as text ("true", "1"), "" when required */
    double min, max;           /* numbers: the accepted range (inclusive unless *_exclusive) */
    int min_exclusive, max_exclusive;
    const char *choices;       /* TM_PARAM_CHOICE: "sum|count"; else "" */
    const char *help;          /* one sentence */
} tm_method_param_info;

typedef struct tm_method_info {
    size_t struct_size;        /* the caller's sizeof: tm_method_info_init */
    const char *name;          /* "weighted_average" */
    const char *const *aliases; /* other names accepted (mergekit's "linear"), NULL-terminated;
                                   never NULL */
    const char *summary;       /* one line: the formula */
    int needs_base;            /* 1: a base model is required */
    size_t min_inputs, max_inputs; /* max_inputs 0: no limit */
    size_t n_params;
} tm_method_info;

TM_API void tm_method_info_init(tm_method_info *info);
TM_API void tm_method_param_info_init(tm_method_param_info *info);
/* The number of methods, and method i (0 <= i < count) in table order. */
TM_API size_t tm_method_count(void);
TM_API tm_status tm_method_get(size_t i, tm_method_info *out);
/* The index of the method called name (or one of its aliases), or -1. */
TM_API int64_t tm_method_find(const char *name);
/* Parameter j (0 <= j < n_params) of method i. */
TM_API tm_status tm_method_param(size_t i, size_t j, tm_method_param_info *out);

/* A method parameter's value: text as a user writes it ("0.5", "0.2,0.8", "true", "sum"), or,
 * when text is NULL, n_numbers numbers (one, or one per input). Borrowed for the call. */
typedef struct tm_param {
    const char *name;
    const char *text;
    const double *numbers;
    size_t n_numbers;
} tm_param;

/* "500MB", "2GB", "2GiB", "5e9", "1048576" → bytes. K/M/G/T (with or without B) are powers of
 * 1000, as Hugging Face counts shard sizes; KiB/MiB/GiB/TiB powers of 1024; case-insensitive.
 * The one size grammar of the command line (--max-shard-size) and recipes (max_shard_size).
 * TM_ERROR_INVALID_ARGUMENT for anything else, zero, or more than 2^64 - 1 bytes. */
TM_API tm_status tm_byte_size_parse(const char *text, uint64_t *out);

typedef struct tm_merge_options {
    size_t struct_size;        /* sizeof(tm_merge_options), set by tm_merge_options_init */
    const char *method;        /* a method of the table (or an alias); NULL: "simple_average".
                                  Recorded in the output's metadata. */
    const tm_param *params;    /* the method's parameters, n_params of them; unknown names, values
                                  out of range and missing required ones are errors naming the
                                  parameter. E.g. {"weights", NULL, w, 3}, {"normalize", "false"} */
    size_t n_params;
    tm_format format;
    const char *template_path; /* TorchScript module to fill with merged weights, or NULL */
    int has_dtype;             /* 1: floating tensors are written as dtype */
    tm_dtype dtype;
    tm_key_policy keys;
    const char *key;           /* nested state dict key, see tm_open_options */
    /* Called after each tensor is written; may be NULL. */
    void (*progress)(void *user, size_t done, size_t total);
    void *progress_user;
    /* Called with a one-line warning (e.g. non-floating tensors that differ); may be NULL. */
    void (*warning)(void *user, const char *message);
    void *warning_user;
    tm_profile *profile;       /* filled when non-NULL */
    uint64_t max_shard_size;   /* folder output: bytes per shard at most (0: 5 GiB) */
    const char *recipe_text;   /* YAML recipe recorded with the output (safetensors metadata,
                                  torchmerge_recipe.yaml beside a folder), or NULL */
    /* Optional per-tensor rules (recipes): include_tensor returns 0 to leave a tensor out of the
     * output; tensor_param may overwrite the numeric parameter param for the tensor name:
     * values[0..n) holds its value for the merge (n = the number of inputs for a per-input
     * parameter, else 1) and the callback changes it in place. Either may be NULL. */
    int (*include_tensor)(void *user, const char *name);
    void (*tensor_param)(void *user, const char *name, const char *param, size_t n, double *values);
    void *rules_user;
    /* The base model (the pre-trained checkpoint the inputs were fine-tuned from; task vectors
     * are input − base), for the methods that need one (tm_method_info.needs_base), or NULL.
     * Any format an input may have; it must hold every merged tensor with the same shape.
     * Non-floating tensors are then taken from it. Added in 0.2 after the other fields: a
     * caller whose struct_size ends before it gets NULL. */
    const char *base;
    /* Methods that drop elements of the task vectors (DARE, TIES, Breadcrumbs, DELLA): a
     * safetensors file to write their boolean keep-masks to, one "{input}.{tensor}" per input
     * (0-based) and merged floating tensor, or NULL. Written beside it and renamed, as the
     * output. Added in 0.2 after base. */
    const char *masks_out;
    /* Quantized tensors (tm_dtype_is_quantized) are refused with a message naming the tensor
     * unless dequantize is 1: then each input's real values scale·(q − zero_point) are merged in
     * float64 like a floating tensor's and written as float32 (or as dtype when has_dtype). Added
     * in 0.2 after masks_out. */
    int dequantize;
    /* A merge across hosts (torch.distributed's c10d with Gloo; docs/distributed.md), or NULL
     * for a merge on this host. Every rank calls tm_merge_files with its own local inputs (n may
     * be 0 then) and the same method, parameters and output options. Added in 0.2 after
     * dequantize. */
    const struct tm_distributed_options *distributed;
} tm_merge_options;

TM_API void tm_merge_options_init(tm_merge_options *opts);

/* Where this process sits in a distributed merge (tm_merge_options.distributed). Each rank
 * merges its local inputs into float64 block sums; the sums are all-reduced over Gloo in
 * float64 and rounded once to the output dtype, so the output is the single-host merge of all
 * the ranks' inputs in rank order. The methods computable from sums across ranks:
 * simple_average, weighted_average (weights normalised by their global sum), task_arithmetic,
 * ties (trim_scope tensor), dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della,
 * della_linear (each rank sparsifies its own inputs with their global input index) and
 * model_stock (pairwise cosine; its ratio to float64 rounding); the methods on task vectors need the base on
 * every rank. Before any tensor data moves, the ranks agree through the store on the world
 * size, the method and its parameters, and the plan (names, shapes, dtypes, the base); any
 * difference fails every rank with one line naming the rank and the first differing tensor.
 * SIGPIPE is blocked in the calling thread while the merge runs (Gloo writes to sockets whose
 * peer may have gone; the threads it starts inherit the block), and the caller's signal mask is
 * restored before tm_merge_files returns. Needs libtorchmerge_torch built with Gloo. */
typedef struct tm_distributed_options {
    size_t struct_size;      /* sizeof(tm_distributed_options), set by tm_distributed_options_init */
    int rank;                /* this process, 0 .. world_size - 1; -1 (default): $RANK */
    int world_size;          /* the number of processes; 0 (default): $WORLD_SIZE */
    const char *master_addr; /* rank 0's host (its TCPStore); NULL (default): $MASTER_ADDR */
    int master_port;         /* rank 0's TCPStore port; 0 (default): $MASTER_PORT */
    double timeout_seconds;  /* bounds the rendezvous and every collective; 0 (default): 300 */
    int output_on_all;       /* 0 (default): rank 0 writes the output; 1: every rank does */
    const char *ifname;      /* network interface for Gloo; NULL (default): $GLOO_SOCKET_IFNAME,
                                else the address this host's name resolves to */
} tm_distributed_options;

TM_API void tm_distributed_options_init(tm_distributed_options *opts);

/* Merges the n input files into output with opts->method, tensor by tensor, streaming (for the
 * averages θ = Σ wᵢθᵢ). Floating tensors are computed in float64 (complex128) and rounded once to
 * the output dtype;
 * non-floating tensors are taken from the first input that has them. output is written to a
 * temporary file beside it and renamed on success: a failure leaves no partial file and an
 * existing output untouched. opts may be NULL (simple_average, strict keys, format from output). */
TM_API tm_status tm_merge_files(const char *const *inputs, size_t n, const char *output,
                                const tm_merge_options *opts);

/* ---- Merging tensors in memory ---------------------------------------------------------- */

/* A tensor in the caller's memory, for tm_merge_tensors. */
typedef struct tm_tensor_data {
    size_t struct_size;     /* sizeof(tm_tensor_data), set by tm_tensor_data_init */
    tm_dtype dtype;
    int32_t ndim;           /* 0..TM_MAX_NDIM */
    const int64_t *shape;   /* ndim entries */
    const int64_t *stride;  /* ndim entries, in elements; NULL: contiguous (row-major) */
    const void *data;       /* the tensor's first element */
} tm_tensor_data;

TM_API void tm_tensor_data_init(tm_tensor_data *t);

/* Merges one tensor held in memory by n inputs (same shape, floating dtypes) with opts->method
 * and opts->params, exactly as tm_merge_files merges that tensor of files: float64, rounded once
 * to out_dtype (a floating dtype) into out (contiguous, numel × tm_dtype_size(out_dtype) bytes,
 * owned by the caller). base: the base model's tensor for methods that need one, else NULL.
 * name: the tensor's name, which keys the random masks (DARE, DELLA) and opts->tensor_param;
 * NULL is "". A method's model-wide passes (TIES with trim_scope global) run over this tensor
 * alone. opts: as tm_merge_options (method, params, tensor_param used; files, formats and
 * masks_out ignored); NULL is simple_average. Thread-safe. */
TM_API tm_status tm_merge_tensors(const tm_tensor_data *inputs, size_t n, const tm_tensor_data *base,
                                  const char *name, const tm_merge_options *opts, tm_dtype out_dtype,
                                  void *out);

/* Runs a merge recipe: a YAML file (is_path = 1) or YAML text (is_path = 0) naming the models,
 * the method (any of the table, by its name, an alias such as mergekit's linear, or FusionBench's
 * class) and its parameters, the output and the options of tm_merge_options, as FusionBench method configs and mergekit configs do (docs/recipes.md).
 * overrides (n_overrides strings, may be NULL when 0) are Hydra-style "key.path=value" pairs
 * ("method.weights=[0.2,0.8]", "models.0=a.pt", "output=soup.pt"; the value is YAML), applied to
 * the parsed recipe in order before it is read. Relative model and template paths written in the
 * recipe file resolve against the recipe's folder; the output and paths given in overrides
 * resolve against the current directory. The recipe is validated completely (errors name the
 * recipe, line and column: "r.yaml:3:5: unknown key 'wieghts' in method") before anything is
 * written, and the effective recipe is recorded with the output (tm_merge_options.recipe_text).
 * base may be NULL: only its progress and warning callbacks and profile are used; every other
 * setting comes from the recipe. */
TM_API tm_status tm_merge_recipe(const char *recipe, int is_path, const char *const *overrides,
                                 size_t n_overrides, const tm_merge_options *base);

/* Saves sd to path as torch.save zip (format PT or AUTO without template) or as a TorchScript
 * module (template_path required). Same temporary-file-then-rename guarantee. */
TM_API tm_status tm_state_dict_save(const tm_state_dict *sd, const char *path,
                                    tm_format format, const char *template_path);

/* ---- Greedy soup (Wortsman et al. 2022, "Model soups") --------------------------------------
 *
 * Candidates are scored by an evaluation module: a TorchScript module (torch.jit.save) with a
 * Tensor attribute `inputs` and forward(self, outputs: Tensor) -> Tensor returning a 0-dim
 * score, higher is better (e.g. the accuracy of outputs.argmax(1) against labels it stores).
 * Each candidate is written as a TorchScript module, loaded with LibTorch on the CPU and run as
 * model.forward(inputs) in eval mode with no grad; eval.forward(outputs) gives its score. */

/* One input as greedy soup tried it. */
typedef struct tm_greedy_ingredient {
    size_t input;      /* index into the inputs given */
    double score;      /* the input alone (in the template module) on the evaluation module */
    double soup_score; /* the uniform soup of the inputs kept before it plus this one, as tried;
                          the first (best) input: its own score */
    int kept;          /* 1: in the final soup */
} tm_greedy_ingredient;

typedef struct tm_greedy_report {
    size_t struct_size;         /* the caller's sizeof(tm_greedy_report): tm_greedy_report_init */
    size_t n;                   /* number of inputs */
    tm_greedy_ingredient *tried; /* n entries in the order tried: by score, best first, ties in
                                    input order. Allocated by tm_greedy_soup, owned by the
                                    caller, freed with tm_greedy_report_free */
    size_t n_kept;              /* inputs in the final soup (>= 1) */
    double final_score;         /* score of the kept inputs' soup (before any opts->dtype) */
} tm_greedy_report;

/* Greedy soup: scores every input alone, sorts them by score (best first, ties in input order),
 * starts the soup with the best and adds each next input when the uniform average of the kept
 * inputs plus it scores strictly higher than the soup so far, else drops it (as the authors'
 * code does; a NaN score ranks last and never improves). Then writes the uniform average of the
 * kept inputs, best first, to output as tm_merge_files does (same formats and guarantees).
 * Candidates are merged to temporary TorchScript modules beside output (".OUT.greedy.XXXXXX",
 * removed afterwards and by tm_remove_temporary_outputs) with opts, in the module
 * opts->template_path, or when that is NULL the first input that is a TorchScript module.
 * opts may be NULL; opts->method must be NULL or simple_average, with no params (the soups are
 * uniform); the output records "greedy_soup" as its method; its progress, warning
 * and profile, and has_dtype/dtype, apply to the final merge only (candidates keep the
 * template's dtypes, which the evaluation inputs match); keys, key and the per-tensor rules
 * apply to every candidate and the output.
 * eval_module: see above. report may be NULL (else its struct_size set, tm_greedy_report_init);
 * on success it is filled (free it with tm_greedy_report_free), on failure it is zeroed. Needs libtorchmerge_torch (LibTorch). */
TM_API tm_status tm_greedy_soup(const char *const *inputs, size_t n, const char *output,
                                const char *eval_module, const tm_merge_options *opts,
                                tm_greedy_report *report);
TM_API void tm_greedy_report_init(tm_greedy_report *report);
/* Frees report->tried and zeroes *report but its struct_size (not report itself). NULL is fine. */
TM_API void tm_greedy_report_free(tm_greedy_report *report);

/* Removes the temporary files (and a folder output's temporary folder with the shards in it) of
 * outputs being written in this process. Async-signal-safe:
 * call it from a SIGINT/SIGTERM handler (then re-raise the signal) so an interrupted merge
 * leaves nothing behind. */
TM_API void tm_remove_temporary_outputs(void);

#ifdef __cplusplus
}
#endif
#endif /* TORCHMERGE_H */
