#define _GNU_SOURCE
#include "core/atomic_output.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Temporary paths a signal handler must remove. A small fixed table: a process writes one or
 * two outputs at a time, and a signal handler cannot take locks or allocate. */
#define MAX_LIVE 16
static char *volatile live[MAX_LIVE];

static void live_add(char *p) {
    for (int i = 0; i < MAX_LIVE; i++)
        if (!live[i]) { live[i] = p; return; }
}
static void live_remove(const char *p) {
    for (int i = 0; i < MAX_LIVE; i++)
        if (live[i] == p) live[i] = NULL;
}

void tm_temporary_track(char *path) { live_add(path); }
void tm_temporary_untrack(const char *path) { live_remove(path); }

void tm_remove_temporary_outputs(void) {
    for (int i = 0; i < MAX_LIVE; i++)
        if (live[i]) unlink(live[i]);
}

static char *dir_of(const char *path) {
    char *copy = strdup(path);
    if (!copy) return NULL;
    char *d = strdup(dirname(copy));
    free(copy);
    return d;
}

tm_status tm_atomic_output_open(const char *target, tm_atomic_output *out, tm_error *err) {
    out->fd = -1;
    out->target = out->temp = NULL;
    struct stat st;
    if (stat(target, &st) == 0 && S_ISDIR(st.st_mode))
        return tm_error_set(err, TM_ERROR_IO, "%s: output is a directory", target);
    char *copy = strdup(target), *dir = dir_of(target);
    if (!copy || !dir) {
        free(copy);
        free(dir);
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    const char *base = basename(copy);
    if (asprintf(&out->temp, "%s/.%s.tmp.XXXXXX", dir, base) < 0) out->temp = NULL;
    free(copy);
    free(dir);
    out->target = strdup(target);
    if (!out->temp || !out->target) {
        tm_atomic_output_abort(out);
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    /* Registered before it exists (mkostemp fills the name in place), so a signal arriving
     * right after the file is created still finds it. */
    live_add(out->temp);
    out->fd = mkostemp(out->temp, O_CLOEXEC);
    if (out->fd < 0) {
        int e = errno;
        live_remove(out->temp);
        free(out->temp);
        out->temp = NULL;
        tm_atomic_output_abort(out);
        return tm_error_set(err, TM_ERROR_IO, "%s: cannot create a temporary file beside it: %s",
                            target, strerror(e));
    }
    /* mkostemp makes it 0600; a model file is as readable as any file the user creates. */
    mode_t mask = umask(0);
    umask(mask);
    fchmod(out->fd, 0666 & ~mask);
    return TM_OK;
}

tm_status tm_atomic_output_commit(tm_atomic_output *out, tm_error *err) {
    if (out->fd >= 0) {
        if (fsync(out->fd) != 0) {
            int e = errno;
            tm_atomic_output_abort(out);
            return tm_error_set(err, TM_ERROR_IO, "%s: cannot write: %s", out->target, strerror(e));
        }
        if (close(out->fd) != 0) {
            int e = errno;
            out->fd = -1;
            tm_atomic_output_abort(out);
            return tm_error_set(err, TM_ERROR_IO, "%s: cannot write: %s", out->target, strerror(e));
        }
        out->fd = -1;
    }
    if (rename(out->temp, out->target) != 0) {
        int e = errno;
        tm_atomic_output_abort(out);
        return tm_error_set(err, TM_ERROR_IO, "%s: cannot rename the temporary file into place: %s",
                            out->target, strerror(e));
    }
    live_remove(out->temp);
    char *dir = dir_of(out->target);
    if (dir) {
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd); /* make the rename itself durable */
            close(dfd);
        }
        free(dir);
    }
    free(out->temp);
    free(out->target);
    out->temp = out->target = NULL;
    return TM_OK;
}

void tm_atomic_output_abort(tm_atomic_output *out) {
    if (!out) return;
    if (out->fd >= 0) close(out->fd);
    out->fd = -1;
    if (out->temp) {
        live_remove(out->temp);
        unlink(out->temp);
        free(out->temp);
    }
    free(out->target);
    out->temp = out->target = NULL;
}
