#include "core/struct_size.h"

tm_status tm_struct_check(size_t struct_size, int present, const char *what, tm_error *err) {
    if (!present) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s is NULL", what);
    if (struct_size < sizeof(size_t))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: struct_size is %zu; initialise the struct with its *_init function", what,
                            struct_size);
    return TM_OK;
}

void tm_struct_copy_in(void *full, size_t full_size, const void *given, size_t given_size) {
    size_t keep = ((const size_t *)full)[0];
    memcpy(full, given, given_size < full_size ? given_size : full_size);
    ((size_t *)full)[0] = keep;
}

void tm_struct_copy_out(void *out, size_t out_size, const void *value, size_t value_size) {
    memcpy((char *)out + sizeof(size_t), (const char *)value + sizeof(size_t),
           (out_size < value_size ? out_size : value_size) - sizeof(size_t));
}
