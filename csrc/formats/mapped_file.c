#define _GNU_SOURCE
#include "formats/mapped_file.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

tm_status tm_mapped_file_open(const char *path, tm_mapped_file *out, tm_error *err) {
    memset(out, 0, sizeof *out);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return tm_error_set(err, TM_ERROR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return tm_error_set(err, TM_ERROR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return tm_error_set(err, TM_ERROR_IO, "%s: is a directory", path);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return tm_error_set(err, TM_ERROR_IO, "%s: not a regular file", path);
    }
    if (st.st_size > 0) {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            return tm_error_set(err, TM_ERROR_IO, "%s: cannot map: %s", path, strerror(e));
        }
        out->data = (const uint8_t *)p;
        out->size = (size_t)st.st_size;
    }
    close(fd); /* the mapping keeps the file referenced */
    return TM_OK;
}

void tm_mapped_file_close(tm_mapped_file *f) {
    if (!f) return;
    if (f->data) munmap((void *)f->data, f->size);
    f->data = NULL;
    f->size = 0;
}

/* The whole pages covering [offset, offset+len), clipped to the file. */
static int page_range(const tm_mapped_file *f, uint64_t offset, uint64_t len, uint8_t **start, size_t *size) {
    if (!f->data || offset >= f->size || len == 0) return 0;
    if (len > f->size - offset) len = f->size - offset;
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t lo = offset / page * page, hi = offset + len;
    *start = (uint8_t *)f->data + lo;
    *size = (size_t)(hi - lo);
    return 1;
}

/* A range inside one page: the first touch faults it in anyway, and a syscall per tensor would
 * cost more than the merge of a small tensor (checkpoints of 10⁵ small tensors). */
static int within_one_page(uint64_t offset, uint64_t len) {
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    return len == 0 || offset / page == (offset + len - 1) / page;
}

void tm_mapped_file_prefetch(const tm_mapped_file *f, uint64_t offset, uint64_t len) {
    uint8_t *p;
    size_t n;
    if (f && !within_one_page(offset, len) && page_range(f, offset, len, &p, &n)) madvise(p, n, MADV_WILLNEED);
}

/* Pages here are never written (a private read-only mapping), so dropping one that a neighbour
 * still needs costs only a refault. Recent kernels map a whole large page-cache folio (up to
 * 2 MiB) on the first touch of any byte of it, so reading a small tensor maps the tail of the
 * big one before it again; tensors are read in file order, so the range dropped reaches back to
 * the 2 MiB boundary below it, taking such re-mapped pages with it. It stops at the last page the
 * range fills: the page holding its tail also holds what comes next (released, with this one,
 * by the next call that completes a page), so runs of small tensors cost one madvise per page,
 * not one each (each is a TLB shootdown on every CPU running a merging thread). */
#define FOLIO_SPAN ((uint64_t)2 << 20)

void tm_mapped_file_release(const tm_mapped_file *f, uint64_t offset, uint64_t len) {
    uint8_t *p;
    size_t n;
    if (!f || len == 0 || offset >= f->size) return;
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), end = offset + len;
    if (end < f->size) end = end / page * page; /* the whole file's end releases its last page */
    if (end <= offset / page * page) return;    /* no page completed */
    uint64_t lo = offset / FOLIO_SPAN * FOLIO_SPAN;
    if (page_range(f, lo, end - lo, &p, &n)) madvise(p, n, MADV_DONTNEED);
}

