/* Each merging thread owns a ring of slots and claims the next unit of the write order when it
 * is free (a thread taking every n-th unit would get every weight of a model whose weights and
 * biases alternate, and the others the biases); the calling thread drains the units in that
 * order from the ring of the thread that claimed each, so the output is the same bytes whatever
 * the number of threads. A thread's ring holds its units in increasing order, which is the
 * order the caller reads them in. The caller mostly waits on the disk (O_DIRECT), so there are
 * as many merging threads as CPUs (TORCHMERGE_THREADS caps it). C11. */
#define _GNU_SOURCE
#include "merge/pipeline.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include "core/crc32.h"
#include "merge/merge_unit.h"

/* Blocks per ring (8 MiB of float32 output): a thread finishes most tensors while the writer
 * waits on another. */
#define N_SLOTS 32
#define MAX_MERGE_THREADS 8

typedef struct slot {
    uint8_t *buf;
    size_t len;
    uint32_t crc;
    int end_of_unit;
} slot;

struct pipeline;

typedef struct ring {
    struct pipeline *p;
    slot slots[N_SLOTS];
    size_t produced, consumed;
    uint64_t unit_left; /* bytes of the unit being merged not yet put: its last block ends it */
    int finished;
    tm_status st;
    tm_error err;
    tm_merge_worker w;
    pthread_t th;
    int running;
} ring;

typedef struct pipeline {
    merge_ctx *c;
    size_t u0, u1;       /* the write order's range */
    const size_t *order; /* units to write, in this order (NULL: u0, u0 + 1, …) */
    size_t next;         /* the next order index to claim */
    uint8_t *owner;      /* owner[k − u0]: 1 + the ring that claimed order index k, 0 before */
    size_t n_finished;   /* merging threads that have stopped */
    int want_crc;
    ring rings[MAX_MERGE_THREADS];
    size_t n_rings;
    int cancel;
    pthread_mutex_t mu;
    pthread_cond_t changed;
} pipeline;

void tm_pipeline_touch_unit(const merge_ctx *c, const tm_unit *u, int release) {
    for (size_t i = 0; i <= c->n; i++) { /* the inputs, then the base model */
        tm_checkpoint *ck = i < c->n ? c->in[i] : c->base;
        int64_t idx = i < c->n ? tm_plan_where(&c->plan, u->keys[0], i) : ck ? c->plan.base_where[u->keys[0]] : -1;
        if (idx < 0) continue;
        if (u->whole_storage) {
            if (release) tm_checkpoint_release_storage(ck, (size_t)idx);
            else tm_checkpoint_prefetch_storage(ck, (size_t)idx);
        } else {
            if (release) tm_checkpoint_release_tensor(ck, (size_t)idx);
            else tm_checkpoint_prefetch_tensor(ck, (size_t)idx);
        }
    }
}

/* The next slot of r to fill, once the writer has freed it; NULL when cancelled. */
static void *reserve_slot(void *user) {
    ring *r = user;
    pipeline *p = r->p;
    pthread_mutex_lock(&p->mu);
    while (r->produced - r->consumed == N_SLOTS && !p->cancel) pthread_cond_wait(&p->changed, &p->mu);
    int cancel = p->cancel;
    pthread_mutex_unlock(&p->mu);
    return cancel ? NULL : r->slots[r->produced % N_SLOTS].buf;
}

/* Publishes the next slot: a block computed in place by tm_merge_unit, ending the unit when it
 * is its last (one hand-off per small tensor, not two), or an empty end-of-unit marker for a
 * unit without elements. */
static tm_status push_slot(ring *r, size_t len, int end_of_unit, tm_error *err) {
    if (!reserve_slot(r)) return tm_error_set(err, TM_ERROR_INTERRUPTED, "cancelled");
    pipeline *p = r->p;
    slot *s = &r->slots[r->produced % N_SLOTS];
    s->len = len;
    s->end_of_unit = end_of_unit;
    s->crc = p->want_crc && len ? tm_crc32(0, s->buf, len) : 0;
    pthread_mutex_lock(&p->mu);
    /* Only the writer, and only on an empty ring, waits for a slot to fill. */
    if (r->produced++ == r->consumed) pthread_cond_broadcast(&p->changed);
    pthread_mutex_unlock(&p->mu);
    return TM_OK;
}

static tm_status put_block(void *user, const void *block, size_t len, tm_error *err) {
    (void)block; /* always the slot reserve_slot gave out */
    ring *r = user;
    r->unit_left -= len;
    return push_slot(r, len, r->unit_left == 0, err);
}

#define UNIT_AT(order, k) ((order) ? (order)[k] : (k))

/* The next order index for ring r to merge, or u1 when none is left or the merge is cancelled. */
static size_t claim(pipeline *p, ring *r) {
    pthread_mutex_lock(&p->mu);
    size_t k = p->cancel ? p->u1 : p->next;
    if (k < p->u1) {
        p->next++;
        p->owner[k - p->u0] = (uint8_t)(1 + (size_t)(r - p->rings));
        pthread_cond_broadcast(&p->changed); /* the writer may be waiting for this claim */
    }
    pthread_mutex_unlock(&p->mu);
    return k;
}

static void *merging_thread(void *arg) {
    ring *r = arg;
    pipeline *p = r->p;
    merge_ctx *c = p->c;
    const tm_block_out out = {reserve_slot, put_block, r};
    tm_status st = TM_OK;
    for (size_t k; !st && (k = claim(p, r)) < p->u1;) {
        size_t u = UNIT_AT(p->order, k);
        if (k + 1 < p->u1) tm_pipeline_touch_unit(c, &c->plan.units[UNIT_AT(p->order, k + 1)], 0); /* read ahead */
        const tm_unit *un = &c->plan.units[u];
        r->unit_left = (uint64_t)un->numel * tm_dtype_size(un->out_dtype);
        if (r->unit_left == 0) st = push_slot(r, 0, 1, &r->err);
        else st = tm_merge_unit(c, &r->w, un, &out, &r->err);
        tm_pipeline_touch_unit(c, &c->plan.units[u], 1);
    }
    pthread_mutex_lock(&p->mu);
    r->st = st;
    r->finished = 1;
    p->n_finished++;
    pthread_cond_broadcast(&p->changed);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

size_t tm_pipeline_threads(size_t n_units) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    size_t n = cpus > 0 ? (size_t)cpus : 1;
    const char *env = getenv("TORCHMERGE_THREADS");
    if (env && atoi(env) > 0) n = (size_t)atoi(env);
    if (n > MAX_MERGE_THREADS) n = MAX_MERGE_THREADS;
    if (n > n_units) n = n_units;
    return n ? n : 1;
}

static void free_rings(pipeline *p) {
    free(p->owner);
    for (size_t r = 0; r < p->n_rings; r++) {
        for (size_t i = 0; i < N_SLOTS; i++) free(p->rings[r].slots[i].buf);
        tm_merge_worker_free(&p->rings[r].w);
    }
}

/* Starts the merging threads with the termination signals blocked, so the handlers run on this
 * thread, the one creating output files: a handler removing a temporary folder then never races
 * a shard being created in it. (Not SIGBUS: a truncated input raises it in the merging thread
 * that touched the page.) */
static tm_status start_threads(pipeline *p, tm_error *err) {
    sigset_t term, before;
    sigemptyset(&term);
    sigaddset(&term, SIGINT);
    sigaddset(&term, SIGTERM);
    sigaddset(&term, SIGHUP);
    sigaddset(&term, SIGQUIT);
    pthread_sigmask(SIG_BLOCK, &term, &before);
    tm_status st = TM_OK;
    for (size_t r = 0; r < p->n_rings && !st; r++) {
        if (pthread_create(&p->rings[r].th, NULL, merging_thread, &p->rings[r]) == 0) p->rings[r].running = 1;
        else st = tm_error_set(err, TM_ERROR_INTERNAL, "cannot start a merge thread");
    }
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    return st;
}

/* The ring that claimed order index k, once one has; NULL when every merging thread stopped
 * first (*err: the first one's error). */
static ring *owner_of(pipeline *p, size_t k, tm_status *st, tm_error *err) {
    pthread_mutex_lock(&p->mu);
    while (!p->owner[k - p->u0] && p->n_finished < p->n_rings) pthread_cond_wait(&p->changed, &p->mu);
    const size_t o = p->owner[k - p->u0];
    pthread_mutex_unlock(&p->mu);
    if (o) return &p->rings[o - 1];
    *st = TM_ERROR_INTERNAL;
    for (size_t r = 0; r < p->n_rings; r++)
        if (p->rings[r].st) {
            *st = p->rings[r].st;
            *err = p->rings[r].err;
            break;
        }
    return NULL;
}

/* Drains unit u from ring r into the sink. */
static tm_status write_unit(pipeline *p, ring *r, size_t u, const tm_sink *snk, tm_error *err) {
    tm_status st = snk->begin ? snk->begin(snk->self, u, err) : TM_OK;
    while (!st) {
        pthread_mutex_lock(&p->mu);
        while (r->produced == r->consumed && !r->finished) pthread_cond_wait(&p->changed, &p->mu);
        int have = r->produced > r->consumed;
        pthread_mutex_unlock(&p->mu);
        if (!have) { /* the merging thread stopped early: its error explains why */
            st = r->st ? r->st : TM_ERROR_INTERNAL;
            *err = r->err;
            break;
        }
        slot *sl = &r->slots[r->consumed % N_SLOTS];
        int end = sl->end_of_unit;
        if (sl->len) st = snk->write(snk->self, sl->buf, sl->len, sl->crc, err);
        pthread_mutex_lock(&p->mu);
        /* Only a merging thread, and only on a full ring, waits for a slot to free. */
        if (r->produced - r->consumed++ == N_SLOTS) pthread_cond_broadcast(&p->changed);
        pthread_mutex_unlock(&p->mu);
        if (end) break;
    }
    if (!st && snk->end) st = snk->end(snk->self, u, err);
    return st;
}

tm_status tm_pipeline_run(merge_ctx *c, const size_t *order, size_t u0, size_t u1, const tm_sink *snk, size_t *done,
                          tm_error *err) {
    pipeline p = {.c = c, .u0 = u0, .u1 = u1, .order = order, .next = u0, .want_crc = snk->want_crc,
                  .n_rings = c->xr ? 1 : tm_pipeline_threads(u1 - u0)}; /* xr: collectives in plan order */
    int ok = (p.owner = calloc(u1 > u0 ? u1 - u0 : 1, 1)) != NULL;
    for (size_t r = 0; r < p.n_rings; r++) {
        ring *rg = &p.rings[r];
        rg->p = &p;
        ok = tm_merge_worker_init(&rg->w, c) == TM_OK && ok;
        for (size_t i = 0; i < N_SLOTS; i++) ok = ok && (rg->slots[i].buf = malloc(TM_BLOCK_BYTES));
    }
    if (!ok) {
        free_rings(&p);
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    pthread_mutex_init(&p.mu, NULL);
    pthread_cond_init(&p.changed, NULL);
    tm_status st = start_threads(&p, err);
    for (size_t k = u0; k < u1 && !st; k++) {
        double t0 = tm_merge_now();
        ring *r = owner_of(&p, k, &st, err);
        if (r) st = write_unit(&p, r, UNIT_AT(order, k), snk, err);
        c->prof.save_seconds += tm_merge_now() - t0;
        c->prof.save_calls++;
        ++*done;
        if (!st && c->o->progress) c->o->progress(c->o->progress_user, *done, c->plan.n_units);
    }
    pthread_mutex_lock(&p.mu);
    p.cancel = 1;
    pthread_cond_broadcast(&p.changed);
    pthread_mutex_unlock(&p.mu);
    for (size_t r = 0; r < p.n_rings; r++) {
        if (!p.rings[r].running) continue;
        pthread_join(p.rings[r].th, NULL);
        if (!st && p.rings[r].st) {
            st = p.rings[r].st;
            *err = p.rings[r].err;
        }
        c->prof.merge_seconds += p.rings[r].w.merge_seconds;
        c->prof.merge_calls += p.rings[r].w.merge_calls;
    }
    free_rings(&p);
    pthread_mutex_destroy(&p.mu);
    pthread_cond_destroy(&p.changed);
    return st;
}
