#define _GNU_SOURCE
#include "core/atomic_output.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Temporary paths a signal handler must remove. Small fixed tables: a process writes one or
 * two outputs at a time, and a signal handler cannot take locks or allocate. A folder (sharded
 * output) is one entry however many files it holds: the handler lists it itself, so a shard
 * needs no entry of its own and no table can run out of room. */
#define MAX_LIVE 16
static char *volatile live[MAX_LIVE];        /* files */
static char *volatile live_dirs[MAX_LIVE];   /* flat folders: emptied, then removed */

static void live_add(char *volatile *table, char *p) {
    for (int i = 0; i < MAX_LIVE; i++)
        if (!table[i]) { table[i] = p; return; }
}
static void live_remove(const char *p) {
    for (int i = 0; i < MAX_LIVE; i++) {
        if (live[i] == p) live[i] = NULL;
        if (live_dirs[i] == p) live_dirs[i] = NULL;
    }
}

void tm_temporary_track(char *path) { live_add(live, path); }
void tm_temporary_track_folder(char *path) { live_add(live_dirs, path); }
void tm_temporary_untrack(const char *path) { live_remove(path); }

int tm_same_file(const char *a, const char *b) {
    if (!a || !b) return 0;
    char *ra = realpath(a, NULL), *rb = realpath(b, NULL);
    int same = ra && rb && strcmp(ra, rb) == 0;
    free(ra);
    free(rb);
    return same;
}

/* Empties a flat folder and removes it with system calls only (opendir allocates). Another
 * thread may create a file in it meanwhile: rmdir then fails with ENOTEMPTY and the folder is
 * listed again; once it is gone, nothing more can be created in it. */
static void remove_folder_now(const char *dir) {
    for (int attempt = 0; attempt < 16; attempt++) {
        int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0) return;
        _Alignas(struct dirent64) char buf[4096];
        ssize_t n;
        while ((n = getdents64(fd, buf, sizeof buf)) > 0)
            for (ssize_t off = 0; off < n;) {
                const struct dirent64 *e = (const struct dirent64 *)(buf + off);
                off += e->d_reclen;
                if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) unlinkat(fd, e->d_name, 0);
            }
        close(fd);
        if (rmdir(dir) == 0 || errno != ENOTEMPTY) return;
    }
}

void tm_remove_temporary_outputs(void) {
    int saved = errno; /* a handler that returns must not change errno under the code it interrupted */
    for (int i = 0; i < MAX_LIVE; i++) {
        char *p = live[i];
        if (p) unlink(p);
    }
    /* Files first, then folders: rmdir needs them empty. */
    for (int i = 0; i < MAX_LIVE; i++) {
        char *p = live_dirs[i];
        if (p) remove_folder_now(p);
    }
    errno = saved;
}

static char *dir_of(const char *path) {
    char *copy = strdup(path);
    if (!copy) return NULL;
    char *d = strdup(dirname(copy));
    free(copy);
    return d;
}

char *tm_temporary_name(const char *target, const char *kind) {
    char *a = strdup(target), *b = strdup(target), *name = NULL;
    if (a && b) {
        for (size_t l = strlen(a); l > 1 && a[l - 1] == '/'; l--) a[l - 1] = b[l - 1] = '\0';
        if (asprintf(&name, "%s/.%s.%s.XXXXXX", dirname(a), basename(b), kind) < 0) name = NULL;
    }
    free(a);
    free(b);
    return name;
}

tm_status tm_atomic_output_open(const char *target, tm_atomic_output *out, tm_error *err) {
    out->fd = -1;
    out->target = out->temp = NULL;
    struct stat st;
    if (stat(target, &st) == 0 && S_ISDIR(st.st_mode))
        return tm_error_set(err, TM_ERROR_IO, "%s: output is a directory", target);
    out->temp = tm_temporary_name(target, "tmp");
    out->target = strdup(target);
    if (!out->temp || !out->target) {
        tm_atomic_output_abort(out);
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    /* Registered before it exists (mkostemp fills the name in place), so a signal arriving
     * right after the file is created still finds it. */
    live_add(live, out->temp);
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
