/* CHECK for the plain-C99 tests: counts, and reports a failed condition with tm_errmsg(); the
 * test ends with tm_check_summary(), which prints "N passed, N failed" (read by CI). */
#ifndef TM_TESTS_C_CHECK_H
#define TM_TESTS_C_CHECK_H

#include <stdio.h>

#include "torchmerge.h"

static int failures, checks;

#define CHECK(cond)                                                                             \
    do {                                                                                        \
        checks++;                                                                               \
        if (!(cond)) {                                                                          \
            failures++;                                                                         \
            fprintf(stderr, "%s:%d: CHECK(%s) failed; tm_errmsg: %s\n", __FILE__, __LINE__,     \
                    #cond, tm_errmsg());                                                        \
        }                                                                                       \
    } while (0)

static int tm_check_summary(void) {
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures ? 1 : 0;
}

#endif
