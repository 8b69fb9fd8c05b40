/* Loads the LibTorch half on first use and forwards the in-memory state dict API to it. */
#define _GNU_SOURCE
#include "core/torch_bridge.h"
#include "core/struct_size.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static pthread_once_t once = PTHREAD_ONCE_INIT;
static const tm_torch_bridge *bridge;
static char load_error[TM_ERROR_MSG_MAX];

static void load(void) {
    char path[PATH_MAX] = TM_TORCH_BRIDGE_LIBRARY;
    Dl_info self;
    /* Beside our own shared object first (build tree and install tree alike). */
    if (dladdr((void *)&tm_torch_bridge_get, &self) && self.dli_fname) {
        const char *slash = strrchr(self.dli_fname, '/');
        if (slash && (size_t)(slash - self.dli_fname) + sizeof TM_TORCH_BRIDGE_LIBRARY + 1 < sizeof path)
            snprintf(path, sizeof path, "%.*s/%s", (int)(slash - self.dli_fname), self.dli_fname,
                     TM_TORCH_BRIDGE_LIBRARY);
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h && access(path, F_OK) == 0) {
        /* It is there but does not load (LibTorch missing, a mismatched build): say why. */
        snprintf(load_error, sizeof load_error, "cannot load %s, the LibTorch part of torchmerge: %s", path,
                 dlerror());
        return;
    }
    if (!h) h = dlopen(TM_TORCH_BRIDGE_LIBRARY, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        /* The usual case: a build configured with -DTORCHMERGE_WITH_TORCH=OFF has no such file. */
        snprintf(load_error, sizeof load_error,
                 "this needs the LibTorch part of torchmerge, %s (rebuilding TorchScript modules, "
                 "greedy soup, in-memory state dicts), which was not built or installed: build torchmerge with "
                 "-DTORCHMERGE_WITH_TORCH=ON",
                 TM_TORCH_BRIDGE_LIBRARY);
        return;
    }
    const tm_torch_bridge *(*get)(void) = (const tm_torch_bridge *(*)(void))dlsym(h, TM_TORCH_BRIDGE_SYMBOL);
    const tm_torch_bridge *b = get ? get() : NULL;
    if (!b || b->abi != TM_TORCH_BRIDGE_ABI) {
        snprintf(load_error, sizeof load_error, "%s does not match this libtorchmerge", TM_TORCH_BRIDGE_LIBRARY);
        return;
    }
    bridge = b;
}

tm_status tm_torch_bridge_get(const tm_torch_bridge **out, tm_error *err) {
    pthread_once(&once, load);
    *out = bridge;
    if (!bridge) return tm_error_set(err, TM_ERROR_UNSUPPORTED, "%s", load_error);
    return TM_OK;
}

/* ---- Public in-memory state dict API, forwarded ---------------------------------------- */

#define BRIDGE_OR_FAIL(b, e)                                                                   \
    const tm_torch_bridge *b;                                                                  \
    tm_error e = {0};                                                                          \
    if (tm_torch_bridge_get(&b, &e)) return tm_error_publish(&e)

#define PUBLISH(call) do { tm_status st_ = (call); return st_ ? tm_error_publish(&e) : TM_OK; } while (0)

tm_status tm_state_dict_new(tm_state_dict **out) {
    BRIDGE_OR_FAIL(b, e);
    PUBLISH(b->state_dict_new(out, &e));
}

tm_status tm_state_dict_load(const char *path, const tm_open_options *opts, tm_state_dict **out) {
    if (out) *out = NULL;
    BRIDGE_OR_FAIL(b, e);
    tm_open_options o; /* the caller's fields over the defaults */
    tm_open_options_init(&o);
    if (opts && TM_STRUCT_CHECK(opts, &e)) return tm_error_publish(&e);
    if (opts) TM_STRUCT_COPY_IN(&o, opts);
    PUBLISH(b->state_dict_load(path, &o, out, &e));
}

tm_status tm_state_dict_clone(const tm_state_dict *sd, tm_state_dict **out) {
    if (out) *out = NULL;
    BRIDGE_OR_FAIL(b, e);
    PUBLISH(b->state_dict_clone(sd, out, &e));
}

void tm_state_dict_free(tm_state_dict *sd) {
    const tm_torch_bridge *b;
    tm_error e = {0};
    if (sd && tm_torch_bridge_get(&b, &e) == TM_OK) b->state_dict_free(sd);
}

size_t tm_state_dict_size(const tm_state_dict *sd) {
    const tm_torch_bridge *b;
    tm_error e = {0};
    return sd && tm_torch_bridge_get(&b, &e) == TM_OK ? b->state_dict_size(sd) : 0;
}

tm_status tm_state_dict_tensor(const tm_state_dict *sd, size_t i, tm_tensor_info *out) {
    BRIDGE_OR_FAIL(b, e);
    if (TM_STRUCT_CHECK(out, &e)) return tm_error_publish(&e);
    tm_tensor_info full; /* written only as far as the caller's struct_size */
    tm_tensor_info_init(&full);
    tm_status st = b->state_dict_tensor(sd, i, &full, &e);
    if (!st) TM_STRUCT_COPY_OUT(out, &full);
    return st ? tm_error_publish(&e) : TM_OK;
}

int64_t tm_state_dict_find(const tm_state_dict *sd, const char *name) {
    const tm_torch_bridge *b;
    tm_error e = {0};
    return sd && tm_torch_bridge_get(&b, &e) == TM_OK ? b->state_dict_find(sd, name) : -1;
}

tm_status tm_state_dict_set(tm_state_dict *sd, const char *name, tm_dtype dtype, int32_t ndim,
                            const int64_t *shape, const void *data) {
    BRIDGE_OR_FAIL(b, e);
    PUBLISH(b->state_dict_set(sd, name, dtype, ndim, shape, data, &e));
}

tm_status tm_state_dict_add(tm_state_dict *a, const tm_state_dict *sd_b, double alpha) {
    BRIDGE_OR_FAIL(b, e);
    PUBLISH(b->state_dict_add(a, sd_b, alpha, &e));
}

tm_status tm_state_dict_mul(tm_state_dict *sd, double scalar) {
    BRIDGE_OR_FAIL(b, e);
    PUBLISH(b->state_dict_mul(sd, scalar, &e));
}

tm_status tm_state_dict_save(const tm_state_dict *sd, const char *path, tm_format format,
                             const char *template_path) {
    BRIDGE_OR_FAIL(b, e);
    PUBLISH(b->state_dict_save(sd, path, format, template_path, &e));
}
