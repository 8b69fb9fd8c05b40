/* The model-wide passes some methods run before any tensor is written (tm_method.model_reduce /
 * model_end: e.g. FusionBench's TIES, whose magnitude threshold and tie-breaking sign are over
 * the whole flattened model). Each pass streams every floating unit through the method on the
 * merging threads (each claiming the next unit when free, as the pipeline's), each thread
 * adding into its own sums (then added up, in thread order: sums of counts are exact whatever
 * the order) and appending to the shared lists; model_end turns them into the model state
 * every tensor then sees. Pages are dropped after each unit, as in
 * the merge, so memory stays near one unit per input. C11. */
#define _GNU_SOURCE
#include "merge/model_passes.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "merge/merge_unit.h"
#include "merge/pipeline.h"

typedef struct model_list {
    double *v;
    size_t count, cap;
} model_list;

struct tm_model_lists {
    pthread_mutex_t mu;
    model_list *l;
    size_t n;
    int nomem;
};

tm_status tm_method_collect(const tm_method_tensor *t, size_t list, const double *values, size_t count) {
    tm_model_lists *ls = t->lists;
    if (!ls || list >= ls->n || !count) return TM_OK;
    pthread_mutex_lock(&ls->mu);
    model_list *l = &ls->l[list];
    if (l->count + count > l->cap) {
        size_t cap = l->cap ? l->cap : 4096;
        while (cap < l->count + count) cap *= 2;
        double *v = realloc(l->v, cap * sizeof *v);
        if (!v) {
            ls->nomem = 1;
            pthread_mutex_unlock(&ls->mu);
            return TM_ERROR_NOMEM;
        }
        l->v = v;
        l->cap = cap;
    }
    memcpy(l->v + l->count, values, count * sizeof *values);
    l->count += count;
    pthread_mutex_unlock(&ls->mu);
    return TM_OK;
}

const double *tm_model_list(const tm_model_lists *lists, size_t list, size_t *count) {
    *count = lists && list < lists->n ? lists->l[list].count : 0;
    return *count ? lists->l[list].v : NULL;
}

typedef struct pass_thread {
    merge_ctx *c;
    tm_model_lists *lists;
    unsigned pass;
    atomic_size_t *next; /* the next unit to claim, shared by the threads */
    double *sum;
    tm_merge_worker w;
    tm_status st;
    tm_error err;
} pass_thread;

tm_status tm_model_pass_tensor(const tm_method *m, tm_merge_worker *w, tm_method_tensor *t, unsigned pass,
                               tm_model_lists *lists, double *sum, tm_error *err) {
    t->lists = lists;
    tm_status st = m->prepare(t, w->state, err);
    for (uint64_t begin = 0; begin < t->numel && !st; begin += TM_BLOCK_ELEMS) {
        size_t count = t->numel - begin < TM_BLOCK_ELEMS ? (size_t)(t->numel - begin) : TM_BLOCK_ELEMS;
        double t0 = tm_merge_now();
        m->model_reduce(t, w->state, pass, begin, count, sum, w->acc);
        w->merge_seconds += tm_merge_now() - t0;
    }
    t->lists = NULL;
    return st;
}

static void *run_pass(void *arg) {
    pass_thread *p = arg;
    merge_ctx *c = p->c;
    for (size_t u; !p->st && (u = atomic_fetch_add(p->next, 1)) < c->plan.n_units;) {
        const tm_unit *un = &c->plan.units[u];
        if (!un->floating || !un->numel) continue;
        if (u + 1 < c->plan.n_units) tm_pipeline_touch_unit(c, &c->plan.units[u + 1], 0); /* read ahead */
        tm_method_tensor t;
        tm_merge_unit_tensor(c, &p->w, un, &t);
        p->st = tm_model_pass_tensor(c->method, &p->w, &t, p->pass, p->lists, p->sum, &p->err);
        tm_pipeline_touch_unit(c, un, 1);
    }
    return NULL;
}

static void free_lists(tm_model_lists *ls) {
    for (size_t i = 0; i < ls->n; i++) free(ls->l[i].v);
    free(ls->l);
    pthread_mutex_destroy(&ls->mu);
}

/* Doubles of the method's model state for this merge. */
static size_t model_size(const merge_ctx *c) { return c->method->model_state + c->method->model_state_per_input * c->n; }

/* One pass over the planned model on the merging threads; sums added into sum. */
static tm_status one_pass(void *user, unsigned pass, tm_model_lists *lists, double *sum, tm_error *err) {
    merge_ctx *c = user;
    const size_t n_threads = tm_pipeline_threads(c->plan.n_units), size = model_size(c);
    pass_thread th[8];
    pthread_t ids[8];
    int started[8] = {0};
    atomic_size_t next = 0;
    tm_status st = TM_OK;
    for (size_t r = 0; r < n_threads; r++) {
        th[r] = (pass_thread){.c = c, .lists = lists, .pass = pass, .next = &next};
        th[r].sum = calloc(size + 1, sizeof *th[r].sum);
        if (tm_merge_worker_init(&th[r].w, c) || !th[r].sum) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    for (size_t r = 0; r < n_threads && !st; r++) {
        if (pthread_create(&ids[r], NULL, run_pass, &th[r]) == 0) started[r] = 1;
        else st = tm_error_set(err, TM_ERROR_INTERNAL, "cannot start a merge thread");
    }
    for (size_t r = 0; r < n_threads; r++) {
        if (started[r]) pthread_join(ids[r], NULL);
        if (!st && th[r].st) {
            st = th[r].st;
            *err = th[r].err;
        }
        for (size_t i = 0; !st && i < size; i++) sum[i] += th[r].sum[i];
        c->prof.merge_seconds += th[r].w.merge_seconds;
        free(th[r].sum);
        tm_merge_worker_free(&th[r].w);
    }
    return st;
}

tm_status tm_model_passes_run(const merge_ctx *c, double **model, tm_model_pass_fn pass_fn, void *user,
                              tm_error *err) {
    const tm_method *m = c->method;
    *model = NULL;
    if (!m->model_reduce || (m->wants_model_passes && !m->wants_model_passes(&c->params))) return TM_OK;
    const size_t size = model_size(c);
    *model = calloc(size + 1, sizeof **model);
    double *sum = calloc(size + 1, sizeof *sum);
    tm_status st = *model && sum ? TM_OK : tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    int again = 1;
    for (unsigned pass = 0; again && !st; pass++) {
        tm_model_lists lists = {.n = c->n};
        pthread_mutex_init(&lists.mu, NULL);
        lists.l = calloc(c->n, sizeof *lists.l);
        if (!lists.l) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        memset(sum, 0, size * sizeof *sum);
        if (!st) st = pass_fn(user, pass, &lists, sum, err);
        if (!st && lists.nomem)
            st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory (the model-wide pass of %s)", m->name);
        again = 0;
        if (!st) st = m->model_end(&c->params, *model, sum, &lists, pass, &again, err);
        free_lists(&lists);
    }
    free(sum);
    return st;
}

tm_status tm_model_passes(merge_ctx *c, tm_error *err) { return tm_model_passes_run(c, &c->model, one_pass, c, err); }
