/* Shared helpers of the fuzz targets. Each target is one C file defining
 * LLVMFuzzerTestOneInput (libFuzzer). The same file is also compiled into a plain replay
 * driver (replay_main.c) for the normal test run, with -DTM_FUZZ_ENTRY=tm_fuzz_one so that no
 * libFuzzer is needed there. */
#ifndef TM_FUZZ_COMMON_H
#define TM_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "formats/pickle.h"

#ifndef TM_FUZZ_ENTRY
#define TM_FUZZ_ENTRY LLVMFuzzerTestOneInput
#endif

int TM_FUZZ_ENTRY(const uint8_t *data, size_t size);

#define TM_FUZZ_FAIL(...)                                                                      \
    do {                                                                                       \
        fprintf(stderr, "fuzz: " __VA_ARGS__);                                                 \
        fputc('\n', stderr);                                                                   \
        abort();                                                                               \
    } while (0)

/* Reads [p, p+n) at its first and last byte and every 4093rd one, so AddressSanitizer sees a
 * range that is out of bounds; the volatile sink keeps the loads. */
static volatile uint8_t tm_fuzz_sink;
static inline void tm_fuzz_touch(const void *p, uint64_t n) {
    const volatile uint8_t *b = (const volatile uint8_t *)p;
    uint8_t x = 0;
    if (!n) return;
    x ^= b[0];
    x ^= b[n - 1];
    for (uint64_t i = 0; i < n; i += 4093) x ^= b[i];
    tm_fuzz_sink ^= x;
}

/* What every failure must look like, whatever the input: a valid error status, recorded in
 * err, with a message that is one non-empty line (the CLI prints "torchmerge: error: MSG"). */
static inline void tm_fuzz_check_error(tm_status st, const tm_error *err) {
    if (st == TM_OK) return;
    if ((int)st <= 0 || (int)st >= (int)TM_STATUS_COUNT) TM_FUZZ_FAIL("invalid status %d", (int)st);
    if (err->status != st)
        TM_FUZZ_FAIL("returned %s but the error record says %s: %s", tm_status_name(st),
                     tm_status_name(err->status), err->msg);
    size_t n = strnlen(err->msg, sizeof err->msg);
    if (n == sizeof err->msg) TM_FUZZ_FAIL("error message not NUL-terminated");
    if (n == 0) TM_FUZZ_FAIL("empty error message for %s", tm_status_name(st));
    for (size_t i = 0; i < n; i++)
        if (err->msg[i] == '\n' || err->msg[i] == '\r')
            TM_FUZZ_FAIL("error message is not one line: %s", err->msg);
}

/* Walks an unpickled value tree and checks its invariants. The unpickler guarantees that
 * tuples/lists/sets/dicts form an acyclic graph at most max_depth deep; objects are cut points
 * (they may form cycles), so they are followed to a bounded depth only. A visit budget keeps
 * shared sub-trees (a DAG) from taking exponential time. */
typedef struct tm_fuzz_walk {
    size_t budget;
    size_t max_depth;
} tm_fuzz_walk;

static inline void tm_fuzz_walk_value(tm_fuzz_walk *w, const tm_pk_value *v, size_t cdepth,
                                      size_t odepth) {
    if (!v) TM_FUZZ_FAIL("NULL value in the tree");
    if (!w->budget) return;
    w->budget--;
    if (cdepth > w->max_depth + 1) TM_FUZZ_FAIL("containers nested %zu deep", cdepth);
    switch (v->kind) {
    case TM_PK_STRING:
    case TM_PK_BYTES:
    case TM_PK_BIGINT:
        if (!v->u.str.data || v->u.str.data[v->u.str.len] != 0)
            TM_FUZZ_FAIL("string value not NUL-terminated at its length");
        tm_fuzz_touch(v->u.str.data, v->u.str.len + 1);
        break;
    case TM_PK_TUPLE:
    case TM_PK_LIST:
    case TM_PK_SET:
        for (size_t i = 0; i < v->u.seq.n; i++)
            tm_fuzz_walk_value(w, v->u.seq.items[i], cdepth + 1, odepth);
        break;
    case TM_PK_DICT:
        for (size_t i = 0; i < v->u.dict.n; i++) {
            tm_fuzz_walk_value(w, v->u.dict.keys[i], cdepth + 1, odepth);
            tm_fuzz_walk_value(w, v->u.dict.values[i], cdepth + 1, odepth);
        }
        break;
    case TM_PK_GLOBAL:
        tm_fuzz_touch(v->u.global.module, strlen(v->u.global.module) + 1);
        tm_fuzz_touch(v->u.global.name, strlen(v->u.global.name) + 1);
        break;
    case TM_PK_OBJECT:
        tm_fuzz_touch(v->u.object.module, strlen(v->u.object.module) + 1);
        tm_fuzz_touch(v->u.object.name, strlen(v->u.object.name) + 1);
        if (odepth < 32) {
            if (v->u.object.args) tm_fuzz_walk_value(w, v->u.object.args, 0, odepth + 1);
            if (v->u.object.state) tm_fuzz_walk_value(w, v->u.object.state, 0, odepth + 1);
            if (v->u.object.items) tm_fuzz_walk_value(w, v->u.object.items, 0, odepth + 1);
        }
        break;
    case TM_PK_STORAGE:
        tm_fuzz_touch(v->u.storage.key, strlen(v->u.storage.key) + 1);
        tm_fuzz_touch(v->u.storage.location, strlen(v->u.storage.location) + 1);
        if (v->u.storage.numel < 0) TM_FUZZ_FAIL("storage with a negative size");
        break;
    case TM_PK_TENSOR:
        if (v->u.tensor.ndim < 0 || v->u.tensor.ndim > TM_MAX_NDIM)
            TM_FUZZ_FAIL("tensor with %d dims", (int)v->u.tensor.ndim);
        if (!v->u.tensor.storage || v->u.tensor.storage->kind != TM_PK_STORAGE)
            TM_FUZZ_FAIL("tensor without a storage");
        if ((unsigned)v->u.tensor.dtype >= TM_DTYPE_COUNT) TM_FUZZ_FAIL("tensor dtype out of range");
        if (v->u.tensor.offset < 0) TM_FUZZ_FAIL("negative storage offset");
        for (int32_t d = 0; d < v->u.tensor.ndim; d++)
            if (v->u.tensor.shape[d] < 0 || v->u.tensor.stride[d] < 0)
                TM_FUZZ_FAIL("negative shape or stride");
        tm_fuzz_walk_value(w, v->u.tensor.storage, cdepth, odepth);
        break;
    default:
        break;
    }
}

#endif
