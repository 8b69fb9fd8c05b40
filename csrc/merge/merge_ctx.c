/* The few helpers every part of the merge uses on its context. C11. */
#define _GNU_SOURCE
#include "merge/merge_ctx.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

void tm_name_list_add(tm_name_list *l, const char *name) {
    size_t used = strlen(l->text);
    if (l->count < 10 && used < sizeof l->text)
        snprintf(l->text + used, sizeof l->text - used, "%s'%s'", l->count ? ", " : "", name);
    l->count++;
}

double tm_merge_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

tm_tensor_info tm_merge_tensor(tm_checkpoint *ck, int64_t idx) { return tm_checkpoint_info(ck, (size_t)idx); }

tm_tensor_info tm_merge_key_tensor(const merge_ctx *c, size_t k) {
    size_t i = 0;
    while (tm_plan_where(&c->plan, k, i) < 0) i++;
    return tm_merge_tensor(c->in[i], tm_plan_where(&c->plan, k, i));
}
