/* Fuzz target: the "open any file" entry point, tm_checkpoint_open_err (format detection, zip
 * torch.save, TorchScript, legacy torch.save, safetensors, the state-dict walk and the tensor
 * table with its bounds checks), then every tensor read back through its strides. The input
 * is written to a file in /dev/shm (memory) because the entry point takes a path. */
#define _GNU_SOURCE
#include "fuzz_common.h"

#include <fcntl.h>
#include <unistd.h>

#include "checkpoint/checkpoint_internal.h"

#define MAX_READ ((uint64_t)16 << 20)

static char path[256];

static void remove_file(void) {
    if (path[0]) unlink(path);
}

static const char *input_path(void) {
    if (!path[0]) {
        const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR");
        snprintf(path, sizeof path, "%s/torchmerge-fuzz-%ld.pt", dir ? dir : "/tmp", (long)getpid());
        atexit(remove_file);
    }
    return path;
}

int TM_FUZZ_ENTRY(const uint8_t *data, size_t size) {
    const char *p = input_path();
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) TM_FUZZ_FAIL("cannot create %s", p);
    for (size_t done = 0; done < size;) {
        ssize_t w = write(fd, data + done, size - done);
        if (w <= 0) TM_FUZZ_FAIL("cannot write %s", p);
        done += (size_t)w;
    }
    close(fd);

    tm_error err = {0};
    tm_checkpoint *ck = NULL;
    tm_status st = tm_checkpoint_open_err(p, NULL, &ck, &err);
    tm_fuzz_check_error(st, &err);
    if (st) {
        if (ck) TM_FUZZ_FAIL("failed open returned a checkpoint");
        if (strncmp(err.msg, p, strlen(p)) != 0 && st != TM_ERROR_NOMEM)
            TM_FUZZ_FAIL("error message does not name the file: %s", err.msg);
        return 0;
    }
    (void)tm_checkpoint_format(ck);
    (void)tm_checkpoint_is_module(ck);
    size_t n = tm_checkpoint_n_tensors(ck);
    for (size_t i = 0; i < n; i++) {
        tm_tensor_info t;
        tm_tensor_info_init(&t);
        if (tm_checkpoint_tensor(ck, i, &t) != TM_OK) TM_FUZZ_FAIL("tensor %zu", i);
        if (!t.name || tm_checkpoint_find(ck, t.name) != (int64_t)i) TM_FUZZ_FAIL("find(tensor %zu)", i);
        if ((unsigned)t.dtype >= TM_DTYPE_COUNT || t.ndim < 0 || t.ndim > TM_MAX_NDIM)
            TM_FUZZ_FAIL("tensor '%s': bad dtype or ndim", t.name);
        uint64_t numel = 1;
        for (int32_t d = 0; d < t.ndim; d++) {
            if (t.shape[d] < 0 || t.stride[d] < 0) TM_FUZZ_FAIL("tensor '%s': negative shape/stride", t.name);
            if (t.shape[d] && numel > UINT64_MAX / (uint64_t)t.shape[d])
                TM_FUZZ_FAIL("tensor '%s': numel overflows", t.name);
            numel *= (uint64_t)t.shape[d];
        }
        if (numel != t.numel) TM_FUZZ_FAIL("tensor '%s': numel", t.name);
        if (t.numel > INT64_MAX / tm_dtype_size(t.dtype) || t.nbytes != t.numel * tm_dtype_size(t.dtype))
            TM_FUZZ_FAIL("tensor '%s': nbytes overflows", t.name);
        tm_checkpoint_prefetch_tensor(ck, i);
        if (t.numel) tm_fuzz_touch(t.storage_data, t.storage_nbytes);
        if (t.nbytes <= MAX_READ) {
            void *buf = malloc(t.nbytes ? (size_t)t.nbytes : 1);
            if (!buf) TM_FUZZ_FAIL("out of memory");
            if (tm_checkpoint_read(ck, i, buf, (size_t)t.nbytes) != TM_OK)
                TM_FUZZ_FAIL("tensor '%s': read failed: %s", t.name, tm_errmsg());
            free(buf);
        }
        tm_checkpoint_release_tensor(ck, i);
    }
    tm_checkpoint_free(ck);
    return 0;
}
