#define _GNU_SOURCE
#include "core/fs.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

tm_status tm_fs_write_file(const char *path, const void *data, size_t len, tm_error *err) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) return tm_error_set(err, TM_ERROR_IO, "%s: cannot create: %s", path, strerror(errno));
    const uint8_t *p = data;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int e = errno;
            close(fd);
            return tm_error_set(err, TM_ERROR_IO, "%s: cannot write: %s", path, strerror(e));
        }
        p += w;
        len -= (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0) return tm_error_set(err, TM_ERROR_IO, "%s: cannot write: %s", path, strerror(errno));
    return TM_OK;
}

static tm_status too_large(const char *path, const char *what, size_t limit, tm_error *err) {
    return tm_error_set(err, TM_ERROR_LIMIT, "%s: %s may hold at most %zu bytes", path, what ? what : "the file", limit);
}

tm_status tm_fs_read_file(const char *path, size_t limit, const char *what, char **out, size_t *len, tm_error *err) {
    const char *sep = what ? " " : "", *name = what ? what : "";
    FILE *f = fopen(path, "rb");
    if (!f)
        return tm_error_set(err, errno == ENOENT ? TM_ERROR_NOT_FOUND : TM_ERROR_IO, "%s: cannot open%s%s: %s", path, sep,
                            name, strerror(errno));
    /* Grown by doubling rather than sized by fstat: pipes and /proc files report size 0. */
    size_t cap = 4096, used = 0;
    char *buf = malloc(cap + 1);
    tm_status st = TM_OK;
    while (buf) {
        if (used == cap) {
            if (cap > limit) {
                st = too_large(path, what, limit, err);
                break;
            }
            char *b = realloc(buf, 2 * cap + 1);
            if (!b) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = b;
            cap *= 2;
        }
        size_t got = fread(buf + used, 1, cap - used, f);
        used += got;
        if (got == 0) {
            if (ferror(f)) st = tm_error_set(err, TM_ERROR_IO, "%s: cannot read%s%s: %s", path, sep, name, strerror(errno));
            break;
        }
    }
    fclose(f);
    if (!buf) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    if (!st && used > limit) st = too_large(path, what, limit, err);
    if (st) {
        free(buf);
        return st;
    }
    buf[used] = '\0';
    *out = buf;
    *len = used;
    return TM_OK;
}

void tm_fs_remove_flat_folder(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char *p = NULL;
        if (asprintf(&p, "%s/%s", dir, e->d_name) >= 0) unlink(p);
        free(p);
    }
    closedir(d);
    rmdir(dir);
}

int tm_fs_is_folder_output(const char *output) {
    struct stat sb;
    size_t n = strlen(output);
    return (n && output[n - 1] == '/') || (stat(output, &sb) == 0 && S_ISDIR(sb.st_mode));
}
