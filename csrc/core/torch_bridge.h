/* The seam between the C core (libtorchmerge) and the parts that need LibTorch
 * (libtorchmerge_torch: TorchScript output and ATen in-memory state dicts). The core loads the
 * LibTorch half with dlopen only when one of those is used, so merging files to .pt never pays
 * LibTorch's start-up time and ~160 MB of resident memory. The LibTorch half links
 * libtorchmerge.so and uses its internal functions (TM_INTERNAL), so both report through the
 * same tm_error and share one table of temporary files. A build without LibTorch
 * (-DTORCHMERGE_WITH_TORCH=OFF) has no LibTorch half: these calls then fail with one line
 * saying so. */
#ifndef TM_CORE_TORCH_BRIDGE_H
#define TM_CORE_TORCH_BRIDGE_H

#include "core/error.h"
#include "torchmerge.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TM_TORCH_BRIDGE_ABI 3u
#define TM_TORCH_BRIDGE_SYMBOL "tm_torch_bridge_v1"
#define TM_TORCH_BRIDGE_LIBRARY "libtorchmerge_torch.so"

typedef struct tm_module_writer tm_module_writer;
typedef struct tm_dist_session tm_dist_session;

/* A rank of a merge across hosts, resolved (flags over the environment): see
 * tm_distributed_options. */
typedef struct tm_dist_config {
    int rank, world_size;
    const char *master_addr;
    int master_port;
    double timeout_seconds;
    const char *ifname; /* NULL or "": the address this host reaches master_addr from */
} tm_dist_config;

typedef struct tm_torch_bridge {
    unsigned abi;
    /* TorchScript output: the template's parameters and buffers receive merged tensors. */
    tm_status (*module_writer_open)(const char *template_path, const char *output, int has_dtype,
                                    tm_dtype dtype, tm_module_writer **out, tm_error *err);
    int (*module_writer_has)(const tm_module_writer *w, const char *name);
    /* Copies a strided view of storage into the module's tensor name. */
    tm_status (*module_writer_set)(tm_module_writer *w, const char *name, tm_dtype dtype, int32_t ndim,
                                   const int64_t *shape, const int64_t *stride, int64_t offset,
                                   const void *storage, tm_error *err);
    tm_status (*module_writer_commit)(tm_module_writer *w, tm_error *err);
    void (*module_writer_free)(tm_module_writer *w);

    /* The in-memory state dict API (see torchmerge.h for meanings). */
    tm_status (*state_dict_new)(tm_state_dict **out, tm_error *err);
    tm_status (*state_dict_load)(const char *path, const tm_open_options *opts, tm_state_dict **out, tm_error *err);
    tm_status (*state_dict_clone)(const tm_state_dict *sd, tm_state_dict **out, tm_error *err);
    void (*state_dict_free)(tm_state_dict *sd);
    size_t (*state_dict_size)(const tm_state_dict *sd);
    tm_status (*state_dict_tensor)(const tm_state_dict *sd, size_t i, tm_tensor_info *out, tm_error *err);
    int64_t (*state_dict_find)(const tm_state_dict *sd, const char *name);
    tm_status (*state_dict_set)(tm_state_dict *sd, const char *name, tm_dtype dtype, int32_t ndim,
                                const int64_t *shape, const void *data, tm_error *err);
    tm_status (*state_dict_add)(tm_state_dict *a, const tm_state_dict *b, double alpha, tm_error *err);
    tm_status (*state_dict_mul)(tm_state_dict *sd, double scalar, tm_error *err);
    tm_status (*state_dict_save)(const tm_state_dict *sd, const char *path, tm_format format,
                                 const char *template_path, tm_error *err);

    /* ABI 2. Scores a TorchScript model with a TorchScript evaluation module (greedy soup):
     * the evaluation module's Tensor attribute `inputs` is passed to model.forward in eval mode
     * with no grad, and eval.forward(outputs) must return a one-element tensor, the score
     * (higher is better), stored in *score as a double. Both modules are loaded on the CPU. */
    tm_status (*score_module)(const char *model_path, const char *eval_path, double *score, tm_error *err);

    /* ABI 3. Merges across hosts over torch.distributed's c10d (csrc/torch/distributed.cpp);
     * all NULL when libtorchmerge_torch was built without Gloo. Every wait is bounded by the
     * config's timeout.
     * dist_open: the rendezvous through rank 0's TCPStore; every rank must give the same world
     * size. dist_exchange: publishes mine under topic and returns every rank's text, in rank
     * order (*all: world_size malloc'ed strings in a malloc'ed array, freed by the caller).
     * dist_start: connects the Gloo process group. dist_send / dist_recv: count doubles to / from
     * one rank (in order per pair); dist_send copies them and returns at once (a few sends in
     * flight; their failures come out of a later call). dist_broadcast: root's data to every rank.
     * dist_check_world: fails when more processes joined than the world size (a WORLD_SIZE that
     * differs between ranks, a RANK given twice) or a rank gave up. dist_abort: tells the other
     * ranks this one failed (they stop waiting). dist_close: frees the session. */
    tm_status (*dist_open)(const tm_dist_config *cfg, tm_dist_session **out, tm_error *err);
    tm_status (*dist_exchange)(tm_dist_session *s, const char *topic, const char *mine, char ***all, tm_error *err);
    tm_status (*dist_start)(tm_dist_session *s, tm_error *err);
    tm_status (*dist_send)(tm_dist_session *s, int to, const double *data, size_t count, tm_error *err);
    tm_status (*dist_recv)(tm_dist_session *s, int from, double *data, size_t count, tm_error *err);
    tm_status (*dist_broadcast)(tm_dist_session *s, int root, double *data, size_t count, tm_error *err);
    tm_status (*dist_check_world)(tm_dist_session *s, tm_error *err);
    void (*dist_abort)(tm_dist_session *s, const char *message);
    void (*dist_close)(tm_dist_session *s);
} tm_torch_bridge;

/* Loads libtorchmerge_torch (once, thread-safe) from the folder libtorchmerge lives in. */
tm_status tm_torch_bridge_get(const tm_torch_bridge **out, tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
