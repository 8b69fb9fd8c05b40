/* The distributed merge through the C API (tm_merge_options.distributed): a world of one rank
 * (this process, on 127.0.0.1) gives the same bytes as tm_merge_files without it (an average,
 * and ties through its own cross-rank code); the options' defaults and their errors; an options
 * struct from an older, shorter layout (only struct_size and rank) reads the rest from the
 * environment. Plain C99 + POSIX.
 * usage: test_distributed_api FIXTURE_DIR WORK_DIR */
#define _POSIX_C_SOURCE 200809L
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "torchmerge.h"

static int failures = 0;
#define CHECK(cond)                                                                                 \
    do {                                                                                            \
        if (!(cond)) {                                                                              \
            fprintf(stderr, "%s:%d: CHECK(%s) failed; tm_errmsg: %s\n", __FILE__, __LINE__, #cond,  \
                    tm_errmsg());                                                                   \
            failures++;                                                                             \
        }                                                                                           \
    } while (0)

static int free_port(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = 0;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0) close(fd);
    return port;
}

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    long size;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (buf = malloc((size_t)size + 1)) != NULL)
        *n = fread(buf, 1, (size_t)size, f);
    fclose(f);
    return buf;
}

static int same_file(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    char *x = slurp(a, &na), *y = slurp(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

int main(int argc, char **argv) {
    char a[4096], b[4096], single[4096], dist[4096], port[16];
    const char *inputs[2];
    tm_merge_options o;
    tm_distributed_options d;
    if (argc != 3) return 2;
    snprintf(a, sizeof a, "%s/sd_a.pt", argv[1]);
    snprintf(b, sizeof b, "%s/sd_b.pt", argv[1]);
    snprintf(single, sizeof single, "%s/single.pt", argv[2]);
    snprintf(dist, sizeof dist, "%s/dist.pt", argv[2]);
    inputs[0] = a;
    inputs[1] = b;

    tm_distributed_options_init(&d);
    CHECK(d.struct_size == sizeof d && d.rank == -1 && d.world_size == 0 && d.master_addr == NULL &&
          d.master_port == 0 && d.timeout_seconds == 0 && d.output_on_all == 0 && d.ifname == NULL);

    tm_merge_options_init(&o);
    CHECK(o.distributed == NULL);
    CHECK(tm_merge_files(inputs, 2, single, &o) == TM_OK);

    d.rank = 0;
    d.world_size = 1;
    d.master_addr = "127.0.0.1";
    d.master_port = free_port();
    d.timeout_seconds = 30;
    o.distributed = &d;
    if (tm_merge_files(inputs, 2, dist, &o) != TM_OK && strstr(tm_errmsg(), "without Gloo")) {
        printf("tm-test: skipped: %s\n", tm_errmsg());
        return 0;
    }
    CHECK(same_file(single, dist));

    /* The rank must be below the world size; a struct never initialised is refused. */
    d.rank = 1;
    CHECK(tm_merge_files(inputs, 2, dist, &o) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "RANK 1 is not below WORLD_SIZE 1") != NULL);
    {
        tm_distributed_options zero;
        memset(&zero, 0, sizeof zero);
        o.distributed = &zero;
        CHECK(tm_merge_files(inputs, 2, dist, &o) == TM_ERROR_INVALID_ARGUMENT);
    }

    /* An older layout that ends after rank: the rest from WORLD_SIZE, MASTER_ADDR, MASTER_PORT. */
    remove(dist);
    d.rank = 0;
    d.struct_size = offsetof(tm_distributed_options, world_size);
    d.world_size = 7; /* beyond struct_size: not read */
    snprintf(port, sizeof port, "%d", free_port());
    setenv("WORLD_SIZE", "1", 1);
    setenv("MASTER_ADDR", "127.0.0.1", 1);
    setenv("MASTER_PORT", port, 1);
    o.distributed = &d;
    CHECK(tm_merge_files(inputs, 2, dist, &o) == TM_OK);
    CHECK(same_file(single, dist));

    /* A method on task vectors runs through its own cross-rank code: the same bytes too. */
    {
        tm_param density = {"density", "0.5", NULL, 0};
        char single_ties[4096], dist_ties[4096];
        snprintf(single_ties, sizeof single_ties, "%s/single_ties.pt", argv[2]);
        snprintf(dist_ties, sizeof dist_ties, "%s/dist_ties.pt", argv[2]);
        o.method = "ties";
        o.params = &density;
        o.n_params = 1;
        o.base = a;
        o.distributed = NULL;
        CHECK(tm_merge_files(inputs, 2, single_ties, &o) == TM_OK);
        snprintf(port, sizeof port, "%d", free_port());
        setenv("MASTER_PORT", port, 1);
        o.distributed = &d;
        CHECK(tm_merge_files(inputs, 2, dist_ties, &o) == TM_OK);
        CHECK(same_file(single_ties, dist_ties));
        o.base = NULL;
    }

    /* A method that is not a sum is refused with one line. */
    o.method = "slerp";
    {
        tm_param t = {"t", "0.5", NULL, 0};
        o.params = &t;
        o.n_params = 1;
        CHECK(tm_merge_files(inputs, 2, dist, &o) == TM_ERROR_UNSUPPORTED);
        CHECK(strstr(tm_errmsg(), "slerp cannot be merged across hosts") != NULL);
    }
    if (failures) fprintf(stderr, "%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
