/* Internal error record: every internal function that can fail takes a tm_error* and returns
 * the status it stored, so a message naming the file and tensor travels up to the public API
 * unchanged. C11. */
#ifndef TM_CORE_ERROR_H
#define TM_CORE_ERROR_H

#include "torchmerge.h"
#include "core/internal_export.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TM_ERROR_MSG_MAX 1024

typedef struct tm_error {
    tm_status status;
    char msg[TM_ERROR_MSG_MAX];
} tm_error;

/* Stores status and a printf-formatted message; returns status so callers can
 * `return tm_error_set(err, TM_ERROR_FORMAT, "%s: ...", label);`. err may be NULL. */
TM_INTERNAL tm_status tm_error_set(tm_error *err, tm_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Prepends "prefix: " to an existing message (used to add the file name at an outer layer). */
void tm_error_prefix(tm_error *err, const char *prefix);

/* Publishes err as this thread's last error (what tm_errmsg() returns) and returns its status. */
tm_status tm_error_publish(const tm_error *err);

#ifdef __cplusplus
}
#endif
#endif
