/* Runs a fuzz target (compiled with -DTM_FUZZ_ENTRY=tm_fuzz_one) over files and folders of
 * inputs without libFuzzer: the regression inputs in tests/hostile/ are replayed this way in
 * the normal (and the sanitizer) test run. A crash, a sanitizer report or a failed check
 * aborts; otherwise it prints how many inputs ran and exits 0. */
#define _GNU_SOURCE
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/fs.h"

int tm_fuzz_one(const uint8_t *data, size_t size);

static int run_file(const char *path) {
    char *buf = NULL;
    size_t n = 0;
    tm_error err = {0};
    if (tm_fs_read_file(path, SIZE_MAX, NULL, &buf, &n, &err) != TM_OK) {
        fprintf(stderr, "replay: %s\n", err.msg);
        return -1;
    }
    /* An exact-size copy, so AddressSanitizer catches a read one byte past the input. */
    uint8_t *exact = malloc(n ? n : 1);
    if (!exact) {
        free(buf);
        return -1;
    }
    memcpy(exact, buf, n);
    free(buf);
    fprintf(stderr, "replay: %s (%zu bytes)\n", path, n);
    tm_fuzz_one(exact, n);
    free(exact);
    return 0;
}

static int cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int run_path(const char *path, size_t *count) {
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "replay: %s: not found\n", path);
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        if (run_file(path)) return -1;
        ++*count;
        return 0;
    }
    DIR *d = opendir(path);
    if (!d) return -1;
    char **names = NULL;
    size_t nn = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char **p = realloc(names, (nn + 1) * sizeof *names);
        if (!p) break;
        names = p;
        if (asprintf(&names[nn], "%s/%s", path, e->d_name) < 0) break;
        nn++;
    }
    closedir(d);
    qsort(names, nn, sizeof *names, cmp);
    int rc = 0;
    for (size_t i = 0; i < nn; i++) {
        if (!rc && run_path(names[i], count)) rc = -1;
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv) {
    size_t count = 0;
    for (int i = 1; i < argc; i++)
        if (run_path(argv[i], &count)) return 1;
    printf("replayed %zu inputs\n", count);
    return 0;
}
