/* tm_merge_files: the streaming file merge. For each output storage, blocks of elements are
 * read from every input (views over the mapped files), accumulated in float64, rounded once and
 * written; the input pages are dropped once used. Memory stays near one block per input plus
 * LibTorch-free code; TorchScript output alone loads LibTorch (through the bridge). C11. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/atomic_output.h"
#include "core/crc32.h"
#include "core/torch_bridge.h"
#include "formats/archive_rewriter.h"
#include "formats/pt_writer.h"
#include "formats/safetensors.h"
#include "merge/kernel.h"
#include "merge/plan.h"

/* Elements per block: large enough for long sequential writes, small enough for the cache. */
#define BLOCK_ELEMS ((size_t)1 << 16)

typedef struct merge_ctx {
    const tm_merge_options *o;
    tm_checkpoint **in;
    size_t n;
    double *weights;      /* as given, one per input */
    tm_plan plan;
    tm_profile prof;
    /* names whose non-floating values differ between inputs, for one warning line */
    char differing[768];
    size_t n_differing;
    /* output sinks */
    tm_pt_writer *pt;
    tm_st_writer *st;
    const tm_torch_bridge *bridge;
    tm_module_writer *module;
    tm_archive_rewriter *rw;
    int64_t *unit_record; /* TorchScript output without LibTorch: the template record of each unit */
    char ignored[768];
    size_t n_ignored;
} merge_ctx;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static tm_tensor_info info_of(tm_checkpoint *ck, int64_t idx) {
    tm_tensor_info t;
    memset(&t, 0, sizeof t);
    tm_checkpoint_tensor(ck, (size_t)idx, &t);
    return t;
}

static void note_name(char *list, size_t cap, size_t *count, const char *name) {
    size_t used = strlen(list);
    if (*count < 10 && used < cap)
        snprintf(list + used, cap - used, "%s'%s'", *count ? ", " : "", name);
    (*count)++;
}

/* The weights as given (uniform 1/n when none); normalisation happens per tensor, over the
 * inputs that have it, so per-tensor rules and --keys union share one rule. */
static tm_status resolve_weights(merge_ctx *c, tm_error *err) {
    const tm_merge_options *o = c->o;
    c->weights = malloc(c->n * sizeof *c->weights);
    if (!c->weights) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t i = 0; i < c->n; i++) c->weights[i] = 1.0 / (double)c->n;
    if (!o->weights) return TM_OK;
    if (o->n_weights != c->n)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "expected %zu weights (one per input), got %zu",
                            c->n, o->n_weights);
    double sum = 0;
    for (size_t i = 0; i < c->n; i++) {
        if (!isfinite(o->weights[i]))
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "weight %zu is not a finite number", i + 1);
        c->weights[i] = o->weights[i];
        sum += o->weights[i];
    }
    if (o->normalize && (sum == 0 || !isfinite(sum)))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "the weights sum to 0 and cannot be normalised (use --no-normalize)");
    return TM_OK;
}

/* One input's view of unit u (the whole storage, or the tensor). */
static tm_view unit_view(const merge_ctx *c, const tm_unit *u, size_t i, int64_t *shape1, int64_t *stride1) {
    tm_tensor_info t = info_of(c->in[i], tm_plan_where(&c->plan, u->keys[0], i));
    tm_view v = {(const uint8_t *)t.storage_data, t.dtype, t.ndim, t.shape, t.stride, t.storage_offset};
    if (u->whole_storage) {
        shape1[0] = (int64_t)(t.storage_nbytes / tm_dtype_size(t.dtype));
        stride1[0] = 1;
        v.ndim = 1;
        v.shape = shape1;
        v.stride = stride1;
        v.offset = 0;
    }
    return v;
}

/* Computes unit u block by block; emit(ctx, bytes, len) receives the output in order. Each
 * block is computed into reserve(user) when given (the pipeline's next free slot, so the
 * result is not copied again), else into w->block. */
typedef tm_status (*emit_fn)(merge_ctx *c, const void *data, size_t len, void *user, tm_error *err);
typedef void *(*reserve_fn)(void *user);

/* What one merging thread owns: its scratch and its share of the profile. */
typedef struct worker {
    double *acc;          /* 2 * BLOCK_ELEMS doubles */
    double *rule_weights; /* one per input */
    uint8_t *block;       /* BLOCK_ELEMS * 16 bytes, when blocks are not computed into slots */
    double merge_seconds;
    size_t merge_calls;
} worker;

/* Serialises what merging threads share: the per-tensor weight callback (user code) and the
 * list of differing names. */
static pthread_mutex_t shared_mu = PTHREAD_MUTEX_INITIALIZER;

static tm_status merge_unit(merge_ctx *c, worker *w, const tm_unit *u, reserve_fn reserve, emit_fn emit, void *user,
                            tm_error *err) {
    tm_view views[64], *vp = views;
    int64_t shapes[64], strides[64], *sp = shapes, *tp = strides;
    double wv[64], *wp = wv;
    if (c->n > 64) {
        vp = malloc(c->n * sizeof *vp);
        sp = malloc(c->n * sizeof *sp);
        tp = malloc(c->n * sizeof *tp);
        wp = malloc(c->n * sizeof *wp);
        if (!vp || !sp || !tp || !wp) {
            free(vp); free(sp); free(tp); free(wp);
            return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        }
    }
    double *raw = w->rule_weights;
    memcpy(raw, c->weights, c->n * sizeof *raw);
    if (c->o->tensor_weights) {
        pthread_mutex_lock(&shared_mu);
        c->o->tensor_weights(c->o->rules_user, c->plan.keys[u->keys[0]], c->n, raw);
        pthread_mutex_unlock(&shared_mu);
    }
    size_t m = 0;
    double wsum = 0;
    for (size_t i = 0; i < c->n; i++) {
        if (tm_plan_where(&c->plan, u->keys[0], i) < 0) continue;
        vp[m] = unit_view(c, u, i, &sp[m], &tp[m]);
        wp[m] = raw[i];
        wsum += wp[m];
        m++;
    }
    if (c->o->normalize && u->floating) {
        if (wsum == 0 || !isfinite(wsum)) {
            if (vp != views) { free(vp); free(sp); free(tp); free(wp); }
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                "tensor '%s': its weights sum to 0 and cannot be normalised",
                                c->plan.keys[u->keys[0]]);
        }
        for (size_t j = 0; j < m; j++) wp[j] /= wsum;
    }

    tm_status st = TM_OK;
    size_t item = tm_dtype_size(u->out_dtype);
    int differs = 0;
    for (uint64_t begin = 0; begin < (uint64_t)u->numel && !st; begin += BLOCK_ELEMS) {
        size_t count = (uint64_t)u->numel - begin < BLOCK_ELEMS ? (size_t)((uint64_t)u->numel - begin) : BLOCK_ELEMS;
        uint8_t *dst = reserve ? reserve(user) : w->block;
        if (!dst) {
            st = tm_error_set(err, TM_ERROR_INTERRUPTED, "cancelled");
            break;
        }
        double t0 = now();
        if (u->floating) {
            tm_kernel_weighted_sum(vp, wp, m, begin, count, u->out_dtype, dst, w->acc);
        } else {
            tm_kernel_copy(&vp[0], begin, count, u->out_dtype, dst);
            for (size_t j = 1; j < m && !differs; j++) differs = !tm_kernel_equal(&vp[0], &vp[j], begin, count);
        }
        w->merge_seconds += now() - t0;
        w->merge_calls++;
        st = emit(c, dst, count * item, user, err);
    }
    if (differs) {
        pthread_mutex_lock(&shared_mu);
        for (size_t k = 0; k < u->n_keys; k++)
            note_name(c->differing, sizeof c->differing, &c->n_differing, c->plan.keys[u->keys[k]]);
        pthread_mutex_unlock(&shared_mu);
    }
    if (vp != views) { free(vp); free(sp); free(tp); free(wp); }
    return st;
}

static void touch_unit(const merge_ctx *c, const tm_unit *u, int release) {
    for (size_t i = 0; i < c->n; i++) {
        int64_t idx = tm_plan_where(&c->plan, u->keys[0], i);
        if (idx < 0) continue;
        if (u->whole_storage) {
            if (release) tm_checkpoint_release_storage(c->in[i], (size_t)idx);
            else tm_checkpoint_prefetch_storage(c->in[i], (size_t)idx);
        } else {
            if (release) tm_checkpoint_release_tensor(c->in[i], (size_t)idx);
            else tm_checkpoint_prefetch_tensor(c->in[i], (size_t)idx);
        }
    }
}

/* ---- Pipeline: merging threads compute (and checksum), the caller writes ------------------ */

/* Each merging thread owns a ring of slots and takes every n-th unit of the write order; the
 * caller drains the rings in that order, so the output is the same bytes whatever the number
 * of threads. The caller mostly waits on the disk (O_DIRECT), so there are as many merging
 * threads as CPUs (TORCHMERGE_THREADS caps it). */
#define N_SLOTS 16
#define MAX_MERGE_THREADS 8

typedef struct sink {
    tm_status (*begin)(merge_ctx *c, size_t unit, tm_error *err);
    tm_status (*write)(merge_ctx *c, const void *data, size_t len, uint32_t crc, tm_error *err);
    tm_status (*end)(merge_ctx *c, size_t unit, tm_error *err);
} sink;

typedef struct slot {
    uint8_t *buf;
    size_t len;
    uint32_t crc;
    int end_of_unit;
} slot;

struct pipeline;

typedef struct ring {
    struct pipeline *p;
    size_t first; /* the first order index this thread merges; then every n_rings-th */
    slot slots[N_SLOTS];
    size_t produced, consumed;
    int finished;
    tm_status st;
    tm_error err;
    worker w;
    pthread_t th;
    int running;
} ring;

typedef struct pipeline {
    merge_ctx *c;
    size_t u0, u1;
    const size_t *order; /* units to write, in this order (NULL: u0, u0 + 1, …) */
    int want_crc;
    ring rings[MAX_MERGE_THREADS];
    size_t n_rings;
    int cancel;
    pthread_mutex_t mu;
    pthread_cond_t changed;
} pipeline;

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

static tm_status push_slot(ring *r, const void *data, size_t len, int end_of_unit, tm_error *err) {
    if (!reserve_slot(r)) return tm_error_set(err, TM_ERROR_INTERRUPTED, "cancelled");
    pipeline *p = r->p;
    slot *s = &r->slots[r->produced % N_SLOTS];
    if (len && data != s->buf) memcpy(s->buf, data, len);
    s->len = len;
    s->end_of_unit = end_of_unit;
    s->crc = p->want_crc && len ? tm_crc32(0, s->buf, len) : 0;
    pthread_mutex_lock(&p->mu);
    /* Only the writer, and only on an empty ring, waits for a slot to fill. */
    if (r->produced++ == r->consumed) pthread_cond_broadcast(&p->changed);
    pthread_mutex_unlock(&p->mu);
    return TM_OK;
}

static tm_status emit_pipe(merge_ctx *c, const void *data, size_t len, void *user, tm_error *err) {
    (void)c;
    return push_slot(user, data, len, 0, err);
}

#define UNIT_AT(order, k) ((order) ? (order)[k] : (k))

static void *merging_thread(void *arg) {
    ring *r = arg;
    pipeline *p = r->p;
    merge_ctx *c = p->c;
    tm_status st = TM_OK;
    for (size_t k = r->first; k < p->u1 && !st; k += p->n_rings) {
        size_t u = UNIT_AT(p->order, k);
        if (k + p->n_rings < p->u1) touch_unit(c, &c->plan.units[UNIT_AT(p->order, k + p->n_rings)], 0);
        st = merge_unit(c, &r->w, &c->plan.units[u], reserve_slot, emit_pipe, r, &r->err);
        if (!st) st = push_slot(r, NULL, 0, 1, &r->err);
        touch_unit(c, &c->plan.units[u], 1);
    }
    pthread_mutex_lock(&p->mu);
    r->st = st;
    r->finished = 1;
    pthread_cond_broadcast(&p->changed);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static size_t merging_threads(size_t n_units) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    size_t n = cpus > 0 ? (size_t)cpus : 1;
    const char *env = getenv("TORCHMERGE_THREADS");
    if (env && atoi(env) > 0) n = (size_t)atoi(env);
    if (n > MAX_MERGE_THREADS) n = MAX_MERGE_THREADS;
    if (n > n_units) n = n_units;
    return n ? n : 1;
}

static void free_rings(pipeline *p) {
    for (size_t r = 0; r < p->n_rings; r++) {
        for (size_t i = 0; i < N_SLOTS; i++) free(p->rings[r].slots[i].buf);
        free(p->rings[r].w.acc);
        free(p->rings[r].w.rule_weights);
    }
}

/* Merges units [u0, u1) (or order[u0 .. u1)) on merging threads while this one writes them
 * through snk. */
static tm_status run_pipeline(merge_ctx *c, size_t u0, size_t u1, const size_t *order, int want_crc, const sink *snk,
                              size_t *done, tm_error *err) {
    pipeline p;
    memset(&p, 0, sizeof p);
    p.c = c;
    p.u0 = u0;
    p.u1 = u1;
    p.order = order;
    p.want_crc = want_crc;
    p.n_rings = merging_threads(u1 - u0);
    int ok = 1;
    for (size_t r = 0; r < p.n_rings; r++) {
        ring *rg = &p.rings[r];
        rg->p = &p;
        rg->first = u0 + r;
        rg->w.acc = malloc(2 * BLOCK_ELEMS * sizeof *rg->w.acc);
        rg->w.rule_weights = malloc((c->n + 1) * sizeof *rg->w.rule_weights);
        ok = ok && rg->w.acc && rg->w.rule_weights;
        for (size_t i = 0; i < N_SLOTS; i++) ok = ok && (rg->slots[i].buf = malloc(BLOCK_ELEMS * 16));
    }
    if (!ok) {
        free_rings(&p);
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    pthread_mutex_init(&p.mu, NULL);
    pthread_cond_init(&p.changed, NULL);
    /* The merging threads start with the termination signals blocked, so the handlers run on
     * this thread, the one creating output files: a handler removing a temporary folder then
     * never races a shard being created in it. (Not SIGBUS: a truncated input raises it in the
     * merging thread that touched the page.) */
    sigset_t term, before;
    sigemptyset(&term);
    sigaddset(&term, SIGINT);
    sigaddset(&term, SIGTERM);
    sigaddset(&term, SIGHUP);
    sigaddset(&term, SIGQUIT);
    pthread_sigmask(SIG_BLOCK, &term, &before);
    tm_status st = TM_OK;
    for (size_t r = 0; r < p.n_rings && !st; r++) {
        if (pthread_create(&p.rings[r].th, NULL, merging_thread, &p.rings[r]) == 0) p.rings[r].running = 1;
        else st = tm_error_set(err, TM_ERROR_INTERNAL, "cannot start a merge thread");
    }
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    for (size_t k = u0; k < u1 && !st; k++) {
        size_t u = UNIT_AT(order, k);
        ring *r = &p.rings[(k - u0) % p.n_rings];
        double t0 = now();
        st = snk->begin(c, u, err);
        while (!st) {
            pthread_mutex_lock(&p.mu);
            while (r->produced == r->consumed && !r->finished) pthread_cond_wait(&p.changed, &p.mu);
            int have = r->produced > r->consumed;
            pthread_mutex_unlock(&p.mu);
            if (!have) { /* the merging thread stopped early: its error explains why */
                st = r->st ? r->st : TM_ERROR_INTERNAL;
                *err = r->err;
                break;
            }
            slot *sl = &r->slots[r->consumed % N_SLOTS];
            int end = sl->end_of_unit;
            if (!end) st = snk->write(c, sl->buf, sl->len, sl->crc, err);
            pthread_mutex_lock(&p.mu);
            /* Only a merging thread, and only on a full ring, waits for a slot to free. */
            if (r->produced - r->consumed++ == N_SLOTS) pthread_cond_broadcast(&p.changed);
            pthread_mutex_unlock(&p.mu);
            if (end) break;
        }
        if (!st) st = snk->end(c, u, err);
        c->prof.save_seconds += now() - t0;
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

/* ---- pt output ---------------------------------------------------------------------------- */

static tm_status pt_begin(merge_ctx *c, size_t u, tm_error *err) {
    const tm_unit *un = &c->plan.units[u];
    return tm_pt_writer_begin_storage(c->pt, u, (uint64_t)un->numel * tm_dtype_size(un->out_dtype), err);
}
static tm_status pt_write(merge_ctx *c, const void *data, size_t len, uint32_t crc, tm_error *err) {
    return tm_pt_writer_write_crc(c->pt, data, len, crc, err);
}
static tm_status pt_end(merge_ctx *c, size_t u, tm_error *err) {
    (void)u;
    return tm_pt_writer_end_storage(c->pt, err);
}

static tm_status write_pt(merge_ctx *c, const char *output, tm_error *err) {
    const tm_plan *p = &c->plan;
    tm_pk_out_tensor *t = calloc(p->n_keys ? p->n_keys : 1, sizeof *t);
    int64_t *strides = calloc(p->n_keys * TM_MAX_NDIM + 1, sizeof *strides);
    char (*keys)[24] = calloc(p->n_units + 1, sizeof *keys);
    tm_status st = TM_OK;
    if (!t || !strides || !keys) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t u = 0; u < p->n_units && !st; u++) {
        snprintf(keys[u], sizeof keys[u], "%zu", u);
        for (size_t j = 0; j < p->units[u].n_keys; j++) {
            size_t k = p->units[u].keys[j];
            size_t i = 0;
            while (tm_plan_where(p, k, i) < 0) i++;
            tm_tensor_info r = info_of(c->in[i], tm_plan_where(p, k, i));
            t[k].name = p->keys[k];
            t[k].dtype = p->units[u].out_dtype;
            t[k].ndim = r.ndim;
            t[k].shape = r.shape;
            t[k].stride = strides + k * TM_MAX_NDIM;
            tm_plan_output_layout(p, c->in, k, strides + k * TM_MAX_NDIM, &t[k].storage_offset);
            t[k].storage_key = keys[u];
            t[k].storage_numel = p->units[u].numel;
        }
    }
    double t0 = now();
    if (!st) st = tm_pt_writer_open(output, t, p->n_keys, &c->pt, err);
    c->prof.save_seconds += now() - t0;
    c->prof.save_calls++;
    static const sink pt_sink = {pt_begin, pt_write, pt_end};
    size_t done = 0;
    if (!st) st = run_pipeline(c, 0, p->n_units, NULL, 1, &pt_sink, &done, err);
    t0 = now();
    if (!st) st = tm_pt_writer_commit(c->pt, err);
    c->prof.save_seconds += now() - t0;
    free(t);
    free(strides);
    free(keys);
    return st;
}

/* ---- TorchScript output ------------------------------------------------------------------- */

typedef struct gather { uint8_t *buf; size_t used; } gather;

static tm_status emit_gather(merge_ctx *c, const void *data, size_t len, void *user, tm_error *err) {
    (void)c;
    (void)err;
    gather *g = user;
    memcpy(g->buf + g->used, data, len);
    g->used += len;
    return TM_OK;
}

/* The streaming way, without LibTorch: when every merged tensor has exactly the template's dtype
 * and layout, and each merged storage is one whole storage record of the template, the template
 * archive is copied record by record and those records are replaced by the merged bytes as they
 * are computed. Anything else (a --dtype change, a tensor that is a view into a larger template
 * storage such as cuDNN's flat RNN weights, two units in one storage) leaves *applicable = 0 and
 * nothing written, for write_module() below. */
static tm_status ts_begin(merge_ctx *c, size_t u, tm_error *err) {
    return tm_archive_rewriter_begin(c->rw, (size_t)c->unit_record[u], err);
}
static tm_status ts_write(merge_ctx *c, const void *data, size_t len, uint32_t crc, tm_error *err) {
    return tm_archive_rewriter_write_crc(c->rw, data, len, crc, err);
}
static tm_status ts_end(merge_ctx *c, size_t u, tm_error *err) {
    (void)u;
    return tm_archive_rewriter_end(c->rw, err);
}

/* The template record unit u can replace: >= 0; -1 when the template has none of its tensors
 * (the unit is skipped, as LibTorch skips names the module lacks); -2 when it cannot stream. */
static int64_t unit_template_record(merge_ctx *c, const tm_checkpoint *tpl, const tm_unit *un) {
    const tm_plan *p = &c->plan;
    int64_t record = -1;
    int in_template = 0, not_in_template = 0;
    for (size_t j = 0; j < un->n_keys; j++) {
        size_t k = un->keys[j];
        int64_t ti = tm_checkpoint_find(tpl, p->keys[k]);
        if (ti < 0) {
            not_in_template = 1;
            continue;
        }
        in_template = 1;
        tm_tensor_info t = info_of((tm_checkpoint *)tpl, ti);
        size_t i = 0;
        while (tm_plan_where(p, k, i) < 0) i++;
        tm_tensor_info r = info_of(c->in[i], tm_plan_where(p, k, i));
        int64_t stride[TM_MAX_NDIM], offset;
        tm_plan_output_layout(p, c->in, k, stride, &offset);
        if (t.dtype != un->out_dtype || t.ndim != r.ndim || t.storage_offset != offset ||
            t.storage_nbytes != (uint64_t)un->numel * tm_dtype_size(un->out_dtype))
            return -2;
        for (int32_t d = 0; d < t.ndim; d++)
            if (t.shape[d] != r.shape[d] || (t.shape[d] > 1 && t.stride[d] != stride[d])) return -2;
        uint64_t at;
        if (!tm_checkpoint_storage_location(tpl, (size_t)ti, &at)) return -2;
        int64_t rec = tm_archive_rewriter_find_record(c->rw, at, t.storage_nbytes);
        if (rec < 0 || (record >= 0 && rec != record)) return -2;
        record = rec;
    }
    if (in_template && not_in_template) return -2;
    return in_template ? record : -1;
}

static int cmp_by_record(const void *a, const void *b, void *records) {
    int64_t ra = ((const int64_t *)records)[*(const size_t *)a], rb = ((const int64_t *)records)[*(const size_t *)b];
    return (ra > rb) - (ra < rb);
}

static tm_status write_module_streaming(merge_ctx *c, const char *module_path, const char *output, int *applicable,
                                        tm_error *err) {
    const tm_plan *p = &c->plan;
    *applicable = 0;
    if (c->o->has_dtype) return TM_OK;
    tm_checkpoint *tpl = NULL, *opened = NULL;
    for (size_t i = 0; i < c->n && !tpl; i++)
        if (tm_same_file(module_path, c->in[i] ? tm_checkpoint_path(c->in[i]) : NULL)) tpl = c->in[i];
    tm_error ignore;
    if (!tpl && tm_checkpoint_open_err(module_path, NULL, &opened, &ignore) == TM_OK) tpl = opened;
    if (!tpl || !tm_checkpoint_is_module(tpl) || tm_archive_rewriter_open(module_path, &c->rw, &ignore) != TM_OK) {
        tm_checkpoint_close(opened);
        return TM_OK;
    }
    c->unit_record = malloc((p->n_units + 1) * sizeof *c->unit_record);
    size_t *order = malloc((p->n_units + 1) * sizeof *order);
    int ok = c->unit_record && order;
    size_t n_order = 0;
    for (size_t u = 0; u < p->n_units && ok; u++) {
        int64_t rec = c->unit_record[u] = unit_template_record(c, tpl, &p->units[u]);
        if (rec == -2) ok = 0;
        else if (rec >= 0) order[n_order++] = u;
        else
            for (size_t j = 0; j < p->units[u].n_keys; j++)
                note_name(c->ignored, sizeof c->ignored, &c->n_ignored, p->keys[p->units[u].keys[j]]);
    }
    tm_checkpoint_close(opened);
    if (ok) qsort_r(order, n_order, sizeof *order, cmp_by_record, c->unit_record);
    for (size_t k = 1; k < n_order && ok; k++) ok = c->unit_record[order[k]] != c->unit_record[order[k - 1]];
    if (!ok) {
        c->ignored[0] = 0;
        c->n_ignored = 0;
        free(order);
        tm_archive_rewriter_free(c->rw);
        c->rw = NULL;
        return TM_OK;
    }
    *applicable = 1;
    unsigned char *replaced = calloc(tm_archive_rewriter_count(c->rw) + 1, 1);
    tm_status st = replaced ? TM_OK : tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t k = 0; k < n_order && !st; k++) replaced[c->unit_record[order[k]]] = 1;
    double t0 = now();
    if (!st) st = tm_archive_rewriter_start(c->rw, output, replaced, err);
    c->prof.save_seconds += now() - t0;
    static const sink ts_sink = {ts_begin, ts_write, ts_end};
    size_t done = 0;
    if (!st) st = run_pipeline(c, 0, n_order, order, 1, &ts_sink, &done, err);
    /* Units the module has no place for were skipped: the bar still ends full. */
    if (!st && done < p->n_units && c->o->progress) c->o->progress(c->o->progress_user, p->n_units, p->n_units);
    t0 = now();
    if (!st) st = tm_archive_rewriter_commit(c->rw, err);
    c->prof.save_seconds += now() - t0;
    free(replaced);
    free(order);
    return st;
}

static tm_status write_module(merge_ctx *c, const char *module_path, const char *output, tm_error *err) {
    const tm_plan *p = &c->plan;
    double t0 = now();
    tm_status st = tm_torch_bridge_get(&c->bridge, err);
    if (!st) st = c->bridge->module_writer_open(module_path, output, c->o->has_dtype, c->o->dtype, &c->module, err);
    c->prof.load_seconds += now() - t0;
    c->prof.load_calls++;
    worker w = {malloc(2 * BLOCK_ELEMS * sizeof(double)), malloc((c->n + 1) * sizeof(double)), malloc(BLOCK_ELEMS * 16),
                0, 0};
    if (!st && (!w.acc || !w.rule_weights || !w.block)) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t u = 0; u < p->n_units && !st; u++) {
        const tm_unit *un = &p->units[u];
        gather g = {malloc((size_t)un->numel * tm_dtype_size(un->out_dtype) + 1), 0};
        if (!g.buf) {
            st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
            break;
        }
        st = merge_unit(c, &w, un, NULL, emit_gather, &g, err);
        t0 = now();
        for (size_t j = 0; j < un->n_keys && !st; j++) {
            size_t k = un->keys[j];
            size_t i = 0;
            while (tm_plan_where(p, k, i) < 0) i++;
            tm_tensor_info r = info_of(c->in[i], tm_plan_where(p, k, i));
            if (!c->bridge->module_writer_has(c->module, p->keys[k])) {
                note_name(c->ignored, sizeof c->ignored, &c->n_ignored, p->keys[k]);
                continue;
            }
            int64_t stride[TM_MAX_NDIM], offset;
            tm_plan_output_layout(p, c->in, k, stride, &offset);
            st = c->bridge->module_writer_set(c->module, p->keys[k], un->out_dtype, r.ndim, r.shape, stride,
                                              offset, g.buf, err);
        }
        c->prof.save_seconds += now() - t0;
        c->prof.save_calls++;
        free(g.buf);
        touch_unit(c, un, 1);
        if (!st && c->o->progress) c->o->progress(c->o->progress_user, u + 1, p->n_units);
    }
    c->prof.merge_seconds += w.merge_seconds;
    c->prof.merge_calls += w.merge_calls;
    free(w.acc);
    free(w.rule_weights);
    free(w.block);
    t0 = now();
    if (!st) st = c->bridge->module_writer_commit(c->module, err);
    c->prof.save_seconds += now() - t0;
    return st;
}

/* ---- safetensors output ------------------------------------------------------------------- */

#define DEFAULT_MAX_SHARD ((uint64_t)5 << 30)

typedef struct metadata {
    const char *keys[8];
    char *values[8];
    size_t n;
} metadata;

static void metadata_free(metadata *m) {
    for (size_t i = 0; i < m->n; i++) free(m->values[i]);
    m->n = 0;
}

static int metadata_add(metadata *m, const char *key, char *value) {
    if (!value) return -1;
    m->keys[m->n] = key;
    m->values[m->n++] = value;
    return 0;
}

/* A JSON value as text (cJSON escapes strings correctly). */
static char *json_text(cJSON *v) {
    char *s = v ? cJSON_PrintUnformatted(v) : NULL;
    cJSON_Delete(v);
    return s;
}

/* What the output records about the merge: method, weights, inputs, tied aliases, recipe. */
static tm_status build_metadata(const merge_ctx *c, const char *const *paths, metadata *m, tm_error *err) {
    const tm_merge_options *o = c->o;
    const char *method = o->method ? o->method : o->weights ? "weighted_average" : "simple_average";
    cJSON *weights = cJSON_CreateArray(), *inputs = cJSON_CreateArray(), *aliases = cJSON_CreateObject();
    for (size_t i = 0; i < c->n; i++) {
        cJSON_AddItemToArray(weights, cJSON_CreateNumber(c->weights[i]));
        char *copy = strdup(paths[i]);
        cJSON_AddItemToArray(inputs, cJSON_CreateString(copy ? basename(copy) : paths[i]));
        free(copy);
    }
    size_t n_alias = 0;
    for (size_t k = 0; k < c->plan.n_keys; k++)
        if (c->plan.alias_of[k] >= 0) {
            cJSON_AddStringToObject(aliases, c->plan.keys[k], c->plan.keys[c->plan.alias_of[k]]);
            n_alias++;
        }
    int bad = metadata_add(m, "format", strdup("pt")) | metadata_add(m, "torchmerge_version", strdup(tm_version())) |
              metadata_add(m, "torchmerge_method", strdup(method)) |
              metadata_add(m, "torchmerge_weights", json_text(weights)) |
              metadata_add(m, "torchmerge_normalize", strdup(o->normalize ? "true" : "false")) |
              metadata_add(m, "torchmerge_inputs", json_text(inputs));
    if (n_alias) bad |= metadata_add(m, "torchmerge_aliases", json_text(aliases));
    else cJSON_Delete(aliases);
    if (o->recipe_text) bad |= metadata_add(m, "torchmerge_recipe", strdup(o->recipe_text));
    return bad ? tm_error_set(err, TM_ERROR_NOMEM, "out of memory") : TM_OK;
}

static tm_status st_begin(merge_ctx *c, size_t u, tm_error *err) {
    (void)c, (void)u, (void)err;
    return TM_OK;
}
static tm_status st_write(merge_ctx *c, const void *data, size_t len, uint32_t crc, tm_error *err) {
    (void)crc;
    return tm_st_writer_write(c->st, data, len, err);
}

/* Writes units [u0, u1) as one safetensors file on fd. */
static tm_status write_st_units(merge_ctx *c, int fd, const char *label, size_t u0, size_t u1, const metadata *m,
                                size_t *done, tm_error *err) {
    const tm_plan *p = &c->plan;
    tm_st_out_tensor *t = calloc(u1 - u0 + 1, sizeof *t);
    if (!t) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t u = u0; u < u1; u++) {
        size_t k = p->units[u].keys[0], i = 0;
        while (tm_plan_where(p, k, i) < 0) i++;
        tm_tensor_info r = info_of(c->in[i], tm_plan_where(p, k, i));
        t[u - u0] = (tm_st_out_tensor){p->keys[k], p->units[u].out_dtype, r.ndim, r.shape};
    }
    double t0 = now();
    tm_status st = tm_st_writer_open(fd, label, t, u1 - u0, (const char *const *)m->keys,
                                     (const char *const *)m->values, m->n, &c->st, err);
    c->prof.save_seconds += now() - t0;
    free(t);
    static const sink st_sink = {st_begin, st_write, st_begin};
    if (!st) st = run_pipeline(c, u0, u1, NULL, 0, &st_sink, done, err);
    if (!st) st = tm_st_writer_finish(c->st, err);
    tm_st_writer_free(c->st);
    c->st = NULL;
    return st;
}

static int is_weight_file(const char *name) {
    static const char *const ends[] = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json",
                                       ".msgpack", ".h5", ".onnx", ".gguf", ".pth.tar"};
    size_t n = strlen(name);
    for (size_t i = 0; i < sizeof ends / sizeof ends[0]; i++) {
        size_t e = strlen(ends[i]);
        if (n >= e && strcmp(name + n - e, ends[i]) == 0) return 1;
    }
    return 0;
}

static tm_status write_file(const char *path, const void *data, size_t len, tm_error *err) {
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

static tm_status read_whole(const char *path, char **out, size_t *len, tm_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return tm_error_set(err, TM_ERROR_IO, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    size_t r;
    while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(buf, 2 * cap + 1);
            if (!nb) { free(buf); buf = NULL; break; }
            buf = nb;
            cap *= 2;
        }
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf || bad) { free(buf); return tm_error_set(err, TM_ERROR_IO, "%s: cannot read", path); }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return TM_OK;
}

/* Copies the first input folder's non-weight files (config, tokenizer, generation config),
 * setting torch_dtype in config.json when --dtype changes it. */
static tm_status copy_side_files(const merge_ctx *c, const char *from, const char *to, tm_error *err) {
    DIR *d = opendir(from);
    if (!d) return TM_OK;
    tm_status st = TM_OK;
    struct dirent *e;
    while (!st && (e = readdir(d))) {
        if (e->d_name[0] == '.' || is_weight_file(e->d_name) || strcmp(e->d_name, "torchmerge_recipe.yaml") == 0)
            continue;
        char *src = NULL, *dst = NULL;
        if (asprintf(&src, "%s/%s", from, e->d_name) < 0 || asprintf(&dst, "%s/%s", to, e->d_name) < 0) {
            free(src);
            closedir(d);
            return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        }
        struct stat sb;
        if (stat(src, &sb) == 0 && S_ISREG(sb.st_mode)) {
            char *buf = NULL;
            size_t len = 0;
            st = read_whole(src, &buf, &len, err);
            if (!st && c->o->has_dtype && strcmp(e->d_name, "config.json") == 0) {
                cJSON *cfg = cJSON_ParseWithLength(buf, len);
                if (cfg && cJSON_IsObject(cfg)) {
                    cJSON_DeleteItemFromObjectCaseSensitive(cfg, "torch_dtype");
                    cJSON_AddStringToObject(cfg, "torch_dtype", tm_dtype_name(c->o->dtype));
                    char *text = cJSON_Print(cfg);
                    if (text) { free(buf); buf = text; len = strlen(text); }
                }
                cJSON_Delete(cfg);
            }
            if (!st) st = write_file(dst, buf, len, err);
            free(buf);
        }
        free(src);
        free(dst);
    }
    closedir(d);
    return st;
}

static void remove_flat_dir(const char *dir) {
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

static int is_folder_output(const char *output) {
    struct stat sb;
    size_t n = strlen(output);
    return (n && output[n - 1] == '/') || (stat(output, &sb) == 0 && S_ISDIR(sb.st_mode));
}

static tm_status write_safetensors(merge_ctx *c, const char *const *paths, const char *output, int folder,
                                   tm_error *err) {
    metadata m = {0};
    tm_status st = build_metadata(c, paths, &m, err);
    size_t done = 0;
    if (st) return st;
    if (!folder) {
        tm_atomic_output out;
        st = tm_atomic_output_open(output, &out, err);
        if (!st) {
            st = write_st_units(c, out.fd, output, 0, c->plan.n_units, &m, &done, err);
            if (!st) st = tm_atomic_output_commit(&out, err);
            else tm_atomic_output_abort(&out);
        }
        metadata_free(&m);
        return st;
    }
    /* A folder: shards in a temporary folder beside it, renamed into place as a whole. */
    char *target = strdup(output), *tmp = NULL;
    if (!target) { metadata_free(&m); return tm_error_set(err, TM_ERROR_NOMEM, "out of memory"); }
    while (strlen(target) > 1 && target[strlen(target) - 1] == '/') target[strlen(target) - 1] = '\0';
    char *copy1 = strdup(target), *copy2 = strdup(target);
    if (!copy1 || !copy2 || asprintf(&tmp, "%s/.%s.tmp.XXXXXX", dirname(copy1), basename(copy2)) < 0) tmp = NULL;
    free(copy1);
    free(copy2);
    /* Registered before it exists (mkdtemp fills the name in place), so a signal arriving right
     * after it is created still finds it; the handler removes the shards in it too. */
    if (tmp) tm_temporary_track_folder(tmp);
    if (!tmp || !mkdtemp(tmp)) {
        st = tm_error_set(err, TM_ERROR_IO, "%s: cannot create a temporary folder beside it: %s", target, strerror(errno));
        if (tmp) tm_temporary_untrack(tmp);
        free(tmp);
        free(target);
        metadata_free(&m);
        return st;
    }
    uint64_t max = c->o->max_shard_size ? c->o->max_shard_size : DEFAULT_MAX_SHARD;
    size_t *first = malloc((c->plan.n_units + 2) * sizeof *first), n_shards = 0;
    uint64_t cur = 0, total = 0;
    for (size_t u = 0; first && u < c->plan.n_units; u++) {
        uint64_t bytes = (uint64_t)c->plan.units[u].numel * tm_dtype_size(c->plan.units[u].out_dtype);
        if (n_shards == 0 || (cur > 0 && cur + bytes > max)) { first[n_shards++] = u; cur = 0; }
        cur += bytes;
        total += bytes;
    }
    if (!first) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    if (first) first[n_shards] = c->plan.n_units;
    cJSON *index = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(index, "metadata");
    cJSON_AddNumberToObject(meta, "total_size", (double)total);
    cJSON *wmap = cJSON_AddObjectToObject(index, "weight_map");
    for (size_t s = 0; s < n_shards && !st; s++) {
        char name[64], *path = NULL;
        if (n_shards == 1) snprintf(name, sizeof name, "model.safetensors");
        else snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, n_shards);
        if (asprintf(&path, "%s/%s", tmp, name) < 0) { st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory"); break; }
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0) st = tm_error_set(err, TM_ERROR_IO, "%s: cannot create: %s", path, strerror(errno));
        if (!st) {
            char label[4200];
            snprintf(label, sizeof label, "%s/%s", target, name);
            st = write_st_units(c, fd, label, first[s], first[s + 1], &m, &done, err);
            if (!st && fsync(fd) != 0) st = tm_error_set(err, TM_ERROR_IO, "%s: cannot write: %s", label, strerror(errno));
            close(fd);
        }
        for (size_t u = first[s]; u < first[s + 1]; u++)
            cJSON_AddStringToObject(wmap, c->plan.keys[c->plan.units[u].keys[0]], name);
        free(path);
    }
    if (!st && n_shards > 1) {
        char *text = cJSON_Print(index), *path = NULL;
        if (!text || asprintf(&path, "%s/model.safetensors.index.json", tmp) < 0) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        else st = write_file(path, text, strlen(text), err);
        free(text);
        free(path);
    }
    cJSON_Delete(index);
    const char *src_folder = tm_checkpoint_folder(c->in[0]);
    if (!st && src_folder) st = copy_side_files(c, src_folder, tmp, err);
    if (!st && c->o->recipe_text) {
        char *path = NULL;
        if (asprintf(&path, "%s/torchmerge_recipe.yaml", tmp) < 0) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        else st = write_file(path, c->o->recipe_text, strlen(c->o->recipe_text), err);
        free(path);
    }
    if (!st) {
        /* An existing folder is moved aside, the new one renamed into place, the old one removed.
         * No signal is taken between the two renames: its handler would find neither folder at
         * OUT. Once the new one is there, the old one is a temporary like any other. */
        char *old = NULL;
        struct stat sb;
        int exists = stat(target, &sb) == 0;
        if (exists && asprintf(&old, "%s.old", tmp) < 0) old = NULL;
        sigset_t all, before;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &before);
        if (exists && (!old || rename(target, old) != 0))
            st = tm_error_set(err, TM_ERROR_IO, "%s: cannot replace the existing folder: %s", target, strerror(errno));
        if (!st && rename(tmp, target) != 0) {
            st = tm_error_set(err, TM_ERROR_IO, "%s: cannot rename the temporary folder into place: %s", target, strerror(errno));
            if (old) rename(old, target);
        }
        if (!st) {
            tm_temporary_untrack(tmp);
            if (old) tm_temporary_track_folder(old);
        }
        pthread_sigmask(SIG_SETMASK, &before, NULL);
        if (!st && old) {
            remove_flat_dir(old);
            tm_temporary_untrack(old);
        }
        free(old);
    }
    if (st) {
        remove_flat_dir(tmp);
        tm_temporary_untrack(tmp);
    }
    free(first);
    free(tmp);
    free(target);
    metadata_free(&m);
    return st;
}

/* ---- Entry point -------------------------------------------------------------------------- */

static void warn(const merge_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#include <stdarg.h>
static void warn(const merge_ctx *c, const char *fmt, ...) {
    if (!c->o->warning) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    c->o->warning(c->o->warning_user, msg);
}

static tm_status run(merge_ctx *c, const char *const *paths, const char *output, tm_error *err) {
    if (c->n == 0) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "no input files");
    if (!paths) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "inputs is NULL");
    if (!output || !*output) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "no output path");
    tm_status st = resolve_weights(c, err);
    if (st) return st;
    for (size_t i = 0; i < c->n; i++) {
        if (!paths[i]) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "input %zu is NULL", i + 1);
        if (tm_same_file(paths[i], output))
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: the output would replace an input", output);
    }
    int folder = is_folder_output(output);
    if (folder) {
        /* Replacing a folder replaces every file in it: refuse when an input lives there. */
        char *dir = realpath(output, NULL);
        for (size_t i = 0; dir && i <= c->n; i++) {
            const char *in = i < c->n ? paths[i] : c->o->template_path;
            char *r = in ? realpath(in, NULL) : NULL;
            size_t dl = strlen(dir);
            int inside = r && (strcmp(r, dir) == 0 || (strncmp(r, dir, dl) == 0 && r[dl] == '/'));
            free(r);
            if (inside) {
                free(dir);
                return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                    "%s: the output folder holds the input %s; replacing it would destroy that input",
                                    output, in);
            }
        }
        free(dir);
    }
    if (tm_same_file(c->o->template_path, output))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: the output would replace the template", output);

    double t0 = now();
    c->in = calloc(c->n, sizeof *c->in);
    if (!c->in) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    tm_open_options oo;
    tm_open_options_init(&oo);
    oo.key = c->o->key;
    for (size_t i = 0; i < c->n && !st; i++) {
        st = tm_checkpoint_open_err(paths[i], &oo, &c->in[i], err);
        c->prof.load_calls++;
    }
    tm_format format = c->o->format;
    size_t olen = strlen(output);
    if (format == TM_FORMAT_AUTO && (folder || (olen > 12 && strcmp(output + olen - 12, ".safetensors") == 0)))
        format = TM_FORMAT_SAFETENSORS;
    if (format == TM_FORMAT_AUTO)
        format = c->o->template_path || (!st && tm_checkpoint_is_module(c->in[0])) ? TM_FORMAT_TORCHSCRIPT : TM_FORMAT_PT;
    if (!st) st = tm_plan_build(&c->plan, c->in, c->n, c->o, format == TM_FORMAT_SAFETENSORS, err);
    c->prof.load_seconds += now() - t0;
    if (st) return st;
    if (format != TM_FORMAT_SAFETENSORS && folder)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: is a folder; folder output is sharded safetensors", output);
    if (format == TM_FORMAT_TORCHSCRIPT) {
        const char *module = c->o->template_path;
        if (!module && tm_checkpoint_is_module(c->in[0])) module = paths[0];
        if (!module)
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                                "%s: TorchScript output needs module inputs or a --template MODULE", paths[0]);
        int streamed = 0;
        st = write_module_streaming(c, module, output, &streamed, err);
        if (!st && !streamed) st = write_module(c, module, output, err);
        if (!st && c->n_ignored)
            warn(c, "ignored %zu tensors that %s holds no parameter or buffer for: %s%s", c->n_ignored, module,
                 c->ignored, c->n_ignored > 10 ? ", …" : "");
    } else if (format == TM_FORMAT_SAFETENSORS) {
        st = write_safetensors(c, paths, output, folder, err);
        for (size_t k = 0; k < c->plan.n_keys && !st; k++)
            if (c->plan.alias_of[k] >= 0)
                warn(c, "'%s' shares its storage with '%s' (tied weights): safetensors stores it once, under '%s'; "
                        "the alias is recorded in __metadata__['torchmerge_aliases']",
                     c->plan.keys[k], c->plan.keys[c->plan.alias_of[k]], c->plan.keys[c->plan.alias_of[k]]);
    } else {
        st = write_pt(c, output, err);
    }
    if (!st && c->n_differing)
        warn(c, "non-floating tensors differ between inputs; taken from %s: %s%s", paths[0], c->differing,
             c->n_differing > 10 ? ", …" : "");
    return st;
}

void tm_merge_options_init(tm_merge_options *opts) {
    if (!opts) return;
    memset(opts, 0, sizeof *opts);
    opts->normalize = 1;
    opts->format = TM_FORMAT_AUTO;
    opts->keys = TM_KEYS_STRICT;
    opts->dtype = TM_FLOAT32;
}

tm_status tm_merge_files(const char *const *inputs, size_t n, const char *output,
                         const tm_merge_options *opts) {
    tm_merge_options defaults;
    tm_merge_options_init(&defaults);
    merge_ctx c;
    memset(&c, 0, sizeof c);
    c.o = opts ? opts : &defaults;
    c.n = n;
    tm_error err = {0};
    tm_status st = run(&c, inputs, output, &err);
    if (c.o->profile) *c.o->profile = c.prof;
    tm_pt_writer_free(c.pt);
    tm_st_writer_free(c.st);
    if (c.module) c.bridge->module_writer_free(c.module);
    tm_archive_rewriter_free(c.rw);
    free(c.unit_record);
    tm_plan_free(&c.plan);
    for (size_t i = 0; c.in && i < n; i++) tm_checkpoint_close(c.in[i]);
    free(c.in);
    free(c.weights);
    return st ? tm_error_publish(&err) : TM_OK;
}
