#define _GNU_SOURCE /* O_DIRECT */
#include "core/output_stream.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* 2 MiB: large enough that the disk sees big requests, small enough to stay in the L2/L3
 * caches between the copy into it and the DMA out of it. A multiple of every logical block
 * size (512 B to 4 KiB), so every full buffer lands at an aligned offset. */
#define STREAM_BUFFER_SIZE ((size_t)2 << 20)
#define DIRECT_ALIGN ((size_t)4096)
/* Linux transfers at most about 2 GiB per write(); asking for more only returns short. */
#define MAX_WRITE_CALL ((size_t)1 << 30)

static int direct_io_wanted(int fd) {
    const char *env = getenv("TORCHMERGE_DIRECT_IO");
    if (env && strcmp(env, "0") == 0) return 0;
    struct stat st;
    /* Only regular files: on a pipe O_DIRECT means "packet mode", not unbuffered. */
    return fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size == 0 && lseek(fd, 0, SEEK_CUR) == 0;
}

static void set_direct(tm_output_stream *s, int on) {
    int fl = fcntl(s->fd, F_GETFL);
    if (fl < 0) {
        s->direct = 0;
        return;
    }
    int want = on ? (fl | O_DIRECT) : (fl & ~O_DIRECT);
    s->direct = (want == fl || fcntl(s->fd, F_SETFL, want) == 0) ? on : 0;
}

tm_status tm_output_stream_init(tm_output_stream *s, int fd, const char *label, tm_error *err) {
    memset(s, 0, sizeof *s);
    s->fd = fd;
    s->label = label ? label : "output";
    void *p = NULL;
    if (posix_memalign(&p, DIRECT_ALIGN, STREAM_BUFFER_SIZE) != 0)
        return tm_error_set(err, TM_ERROR_NOMEM, "%s: out of memory", s->label);
    s->buf = p;
    s->cap = STREAM_BUFFER_SIZE;
    if (direct_io_wanted(fd)) set_direct(s, 1);
    return TM_OK;
}

static tm_status write_all(tm_output_stream *s, const uint8_t *p, size_t n, tm_error *err) {
    while (n) {
        ssize_t w = write(s->fd, p, n < MAX_WRITE_CALL ? n : MAX_WRITE_CALL);
        if (w < 0 && errno == EINTR) continue;
        /* O_DIRECT refused (a file system without it, or a short write that left the rest
         * unaligned): the same bytes through the page cache. */
        if (w < 0 && errno == EINVAL && s->direct) {
            set_direct(s, 0);
            if (!s->direct) continue;
        }
        if (w <= 0) {
            s->failed = 1;
            return tm_error_set(err, TM_ERROR_IO, "%s: write failed: %s", s->label,
                                w < 0 ? strerror(errno) : "no progress");
        }
        p += w;
        n -= (size_t)w;
    }
    return TM_OK;
}

tm_status tm_output_stream_put(tm_output_stream *s, const void *data, size_t n, tm_error *err) {
    if (s->failed) return tm_error_set(err, TM_ERROR_IO, "%s: an earlier write failed", s->label);
    const uint8_t *p = data;
    /* Without O_DIRECT a large block can go straight from the caller's memory. */
    if (!s->direct && n >= s->cap) {
        tm_status st = tm_output_stream_flush(s, err);
        if (!st) st = write_all(s, p, n, err);
        if (!st) s->pos += n;
        return st;
    }
    while (n) {
        size_t k = s->cap - s->len < n ? s->cap - s->len : n;
        memcpy(s->buf + s->len, p, k);
        s->len += k;
        s->pos += k;
        p += k;
        n -= k;
        if (s->len == s->cap) {
            s->len = 0;
            tm_status st = write_all(s, s->buf, s->cap, err);
            if (st) return st;
        }
    }
    return TM_OK;
}

tm_status tm_output_stream_flush(tm_output_stream *s, tm_error *err) {
    if (s->failed) return tm_error_set(err, TM_ERROR_IO, "%s: an earlier write failed", s->label);
    size_t n = s->len, aligned = s->direct ? n / DIRECT_ALIGN * DIRECT_ALIGN : 0;
    s->len = 0;
    tm_status st = aligned ? write_all(s, s->buf, aligned, err) : TM_OK;
    if (s->direct) set_direct(s, 0); /* the tail is not a whole block */
    if (!st && n > aligned) st = write_all(s, s->buf + aligned, n - aligned, err);
    return st;
}

void tm_output_stream_free(tm_output_stream *s) {
    if (!s) return;
    free(s->buf);
    s->buf = NULL;
}
