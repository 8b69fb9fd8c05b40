/* Status names, thread-local last error, version. */
#include "core/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[TM_ERROR_MSG_MAX];

/* Messages quote names read from untrusted files (zip member names, dict keys, globals):
 * control characters become \xNN so that a message stays one line. A message that grows past
 * the buffer is cut, like any long message. */
static void escape_controls(char *msg) {
    const unsigned char *s = (const unsigned char *)msg;
    while (*s && *s >= 0x20 && *s != 0x7f) s++;
    if (!*s) return;
    char tmp[TM_ERROR_MSG_MAX];
    size_t o = 0;
    for (s = (const unsigned char *)msg; *s && o + 1 < sizeof tmp; s++) {
        if (*s < 0x20 || *s == 0x7f) {
            if (o + 5 > sizeof tmp) break;
            snprintf(tmp + o, 5, "\\x%02X", (unsigned)*s);
            o += 4;
        } else {
            tmp[o++] = (char)*s;
        }
    }
    tmp[o] = '\0';
    memcpy(msg, tmp, o + 1);
}

tm_status tm_error_set(tm_error *err, tm_status status, const char *fmt, ...) {
    if (!err) return status;
    err->status = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    escape_controls(err->msg);
    return status;
}

void tm_error_prefix(tm_error *err, const char *prefix) {
    if (!err || !prefix || !*prefix) return;
    size_t plen = strlen(prefix);
    if (strncmp(err->msg, prefix, plen) == 0) return; /* already named */
    char tmp[TM_ERROR_MSG_MAX];
    /* A message longer than the buffer is cut, which is acceptable for a one-line error. */
    if (snprintf(tmp, sizeof tmp, "%s: %s", prefix, err->msg) < 0) return;
    memcpy(err->msg, tmp, sizeof tmp);
    escape_controls(err->msg);
}

tm_status tm_error_publish(const tm_error *err) {
    if (!err) return TM_OK;
    snprintf(last_error, sizeof last_error, "%s", err->msg);
    return err->status;
}

const char *tm_errmsg(void) { return last_error; }

const char *tm_status_name(tm_status status) {
    switch (status) {
#define TM_STATUS_NAME_(name, text) case name: return #name;
        TM_STATUS_LIST(TM_STATUS_NAME_)
#undef TM_STATUS_NAME_
    default: return "TM_STATUS_UNKNOWN";
    }
}

const char *tm_strerror(tm_status status) {
    switch (status) {
#define TM_STATUS_TEXT_(name, text) case name: return text;
        TM_STATUS_LIST(TM_STATUS_TEXT_)
#undef TM_STATUS_TEXT_
    default: return "unknown status";
    }
}

const char *tm_version(void) { return TORCHMERGE_VERSION_STRING; }
