/* The growing-struct rule of the public API (torchmerge.h, "Growing structs"): every struct
 * passed by pointer starts with size_t struct_size, the caller's sizeof. Structs coming in are
 * copied over a full one holding the defaults, so fields an older caller lacks keep them;
 * structs going out are written only as far as the caller's struct_size. C11. */
#ifndef TM_CORE_STRUCT_SIZE_H
#define TM_CORE_STRUCT_SIZE_H

#include <stddef.h>
#include <string.h>

#include "core/error.h"

/* Zeroes *p and sets its struct_size; p may be NULL. */
#define TM_STRUCT_INIT(p)                                                                          \
    do {                                                                                           \
        if (p) {                                                                                   \
            memset((p), 0, sizeof *(p));                                                           \
            (p)->struct_size = sizeof *(p);                                                        \
        }                                                                                          \
    } while (0)

/* TM_OK, or TM_ERROR_INVALID_ARGUMENT when p is NULL or its struct_size was never set. */
#define TM_STRUCT_CHECK(p, err) tm_struct_check((p) ? (p)->struct_size : 0, (p) != NULL, #p, (err))
tm_status tm_struct_check(size_t struct_size, int present, const char *what, tm_error *err);

/* *full (already holding the defaults, with its own struct_size) ← the caller's fields. */
#define TM_STRUCT_COPY_IN(full, given)                                                             \
    tm_struct_copy_in((full), sizeof *(full), (given), (given)->struct_size)
void tm_struct_copy_in(void *full, size_t full_size, const void *given, size_t given_size);

/* The caller's *out ← *value, as far as out->struct_size reaches (out->struct_size is kept). */
#define TM_STRUCT_COPY_OUT(out, value)                                                             \
    tm_struct_copy_out((out), (out)->struct_size, (value), sizeof *(value))
void tm_struct_copy_out(void *out, size_t out_size, const void *value, size_t value_size);

#endif
