/* tm_merge_files across hosts (tm_merge_options.distributed; docs/distributed.md). Each rank
 * merges its local inputs as part of the global list of inputs (rank 0's first, then rank 1's,
 * ...). Each float64 block sum travels down the ranks in order (rank r receives the running sum
 * from r − 1, adds its terms, sends it to r + 1: the single-host accumulation order, hence the
 * single-host bits), and the last rank sends the total to rank 0 (or broadcasts it with
 * --output-on all), which rounds it once. The averages are translated here into
 * weighted_average with the global coefficients; the other methods computable from sums run
 * their own cross-rank code (tm_method.cross_rank, method_xr.h) on the parameters of the global
 * input list, with the base on every rank. Before any tensor is read, the ranks agree through
 * the store: world size, method and parameters ("hello"), then the plan and the base ("plan").
 * The network half is LibTorch's c10d over Gloo, through the bridge (csrc/torch/distributed.cpp).
 * C11. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/hash.h"
#include "core/struct_size.h"
#include "core/torch_bridge.h"
#include "merge/cross_rank.h"
#include "merge/merge_ctx.h"
#include "merge/merge_files_internal.h"
#include "merge/method_xr.h"
#include "merge/pipeline.h"
#include "merge/sink.h"

/* A growable string. */
typedef struct text {
    char *s;
    size_t len, cap;
    int oom;
} text;

static void add(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add(text *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (k < 0 || t->oom) return;
    if (t->len + (size_t)k + 1 > t->cap) {
        size_t cap = (t->len + (size_t)k + 1) * 2;
        char *s = realloc(t->s, cap);
        if (!s) {
            t->oom = 1;
            return;
        }
        t->s = s;
        t->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(t->s + t->len, (size_t)k + 1, fmt, ap);
    va_end(ap);
    t->len += (size_t)k;
}

#define AHEAD 4 /* blocks rank 0 passes on ahead of the total it waits for */

typedef struct session {
    const tm_torch_bridge *b;
    tm_dist_session *s;
    tm_dist_config cfg;
    int output_on_all;
    size_t *counts;        /* local inputs per rank */
    int own_code;          /* the method runs through its own cross-rank code (every rank has the base) */
    uint64_t n_blocks, done_blocks; /* the blocks of the plan, and those passed on so far */
    double *share;         /* --output-on all without a base: a non-floating block's bytes (as doubles) */
} session;

static void free_all(char **all, int n) {
    for (int i = 0; all && i < n; i++) free(all[i]);
    free(all);
}

/* ---- Configuration: flags over the torchrun environment variables ----------------------- */

static tm_status env_int(const char *name, const char *flag, long lo, long hi, int *out, tm_error *err) {
    const char *v = getenv(name);
    if (!v || !*v)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: not set (%s, or the %s environment variable)", name,
                            flag, name);
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || x < lo || x > hi)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: '%s' is not a whole number in [%ld, %ld]", name, v, lo,
                            hi);
    *out = (int)x;
    return TM_OK;
}

static tm_status resolve_config(const tm_distributed_options *given, tm_dist_config *cfg, int *output_on_all,
                                tm_error *err) {
    tm_distributed_options d;
    tm_distributed_options_init(&d);
    if (TM_STRUCT_CHECK(given, err)) return err->status;
    TM_STRUCT_COPY_IN(&d, given);
    tm_status st = TM_OK;
    cfg->world_size = d.world_size;
    if (d.world_size <= 0) st = env_int("WORLD_SIZE", "--world-size", 1, 1 << 20, &cfg->world_size, err);
    cfg->rank = d.rank;
    if (!st && d.rank < 0) st = env_int("RANK", "--rank", 0, 1 << 20, &cfg->rank, err);
    if (!st && cfg->rank >= cfg->world_size)
        st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "RANK %d is not below WORLD_SIZE %d", cfg->rank,
                          cfg->world_size);
    cfg->master_addr = d.master_addr ? d.master_addr : getenv("MASTER_ADDR");
    if (!st && (!cfg->master_addr || !*cfg->master_addr))
        st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                          "MASTER_ADDR: not set (--master-addr, or the MASTER_ADDR environment variable)");
    cfg->master_port = d.master_port;
    if (!st && d.master_port <= 0) st = env_int("MASTER_PORT", "--master-port", 1, 65535, &cfg->master_port, err);
    if (!st && cfg->master_port > 65535)
        st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "MASTER_PORT: %d is not a port", cfg->master_port);
    cfg->timeout_seconds = d.timeout_seconds > 0 ? d.timeout_seconds : 300;
    cfg->ifname = d.ifname;
    *output_on_all = d.output_on_all != 0;
    return st;
}

void tm_distributed_options_init(tm_distributed_options *opts) {
    TM_STRUCT_INIT(opts);
    if (opts) opts->rank = -1;
}

/* ---- What the ranks agree on ----------------------------------------------------------- */

/* The averages: translated into weighted_average with global coefficients (no base). The other
 * methods that are computable from sums across ranks run their own cross-rank code
 * (tm_method.cross_rank, method_xr.h). */
static int is_average(const tm_method *m) {
    return strcmp(m->name, "simple_average") == 0 || strcmp(m->name, "weighted_average") == 0;
}

static int param_index(const tm_method *m, const char *name) {
    for (size_t j = 0; j < m->n_params; j++)
        if (strcmp(m->params[j].name, name) == 0) return (int)j;
    return -1;
}

/* Resolves the method's parameters for this rank's n inputs, without the method's merge-wide
 * check (which is about all inputs: it runs on the global list after the hello; this rank's
 * weights alone may sum to 0). A rank without inputs resolves its per-input parameters as one
 * input with their defaults (only the others are compared). */
static tm_status resolve_params(const tm_method *m, const tm_merge_options *o, size_t n, tm_param_values *pv,
                                tm_error *err) {
    tm_method unchecked = *m;
    unchecked.check = NULL;
    if (n) return tm_param_values_resolve(&unchecked, o->params, o->n_params, n, pv, err);
    tm_param *p = calloc(o->n_params + m->n_params + 1, sizeof *p);
    if (!p) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    size_t k = 0;
    for (size_t i = 0; i < o->n_params; i++) {
        int j = param_index(m, o->params[i].name);
        if (j < 0 || !m->params[j].per_input) p[k++] = o->params[i];
    }
    for (size_t j = 0; j < m->n_params; j++)
        if (m->params[j].per_input) {
            const char *dflt = m->params[j].default_value;
            p[k++] = (tm_param){m->params[j].name, dflt ? dflt : "1", NULL, 0};
        }
    tm_status st = tm_param_values_resolve(&unchecked, p, k, 1, pv, err);
    free(p);
    return st;
}

/* "hello": what must be equal on every rank (first line), then this rank's inputs' weights. */
static void hello_text(text *t, const session *se, const tm_merge_options *o, const tm_method *m,
                       const tm_param_values *pv, size_t n) {
    add(t, "world_size=%d method=%s keys=%d dtype=%s output_on=%s", se->cfg.world_size, m->name, (int)o->keys,
        o->has_dtype ? tm_dtype_name(o->dtype) : "as-input", se->output_on_all ? "all" : "0");
    for (size_t j = 0; j < m->n_params; j++) {
        if (m->params[j].per_input) continue;
        add(t, " %s=", m->params[j].name);
        for (size_t i = 0; i < pv->count[j]; i++) add(t, "%s%.17g", i ? "," : "", pv->values[pv->at[j] + i]);
    }
    /* then each per-input parameter's values for this rank's inputs, exactly (hexadecimal) */
    add(t, "\n%zu", n);
    for (size_t j = 0; j < m->n_params; j++) {
        if (!m->params[j].per_input) continue;
        add(t, " ");
        for (size_t i = 0; i < n; i++) add(t, "%s%a", i ? "," : "", pv->values[pv->at[j] + i]);
    }
}

/* The per-input parameters of the global input list from the hellos: g[p·total + i] = the p-th
 * per-input parameter's value for global input i (malloc'ed; total ≥ 1). */
static double *global_values(const session *se, const tm_method *m, char **hellos, size_t total) {
    size_t n_per = 0;
    for (size_t j = 0; j < m->n_params; j++) n_per += m->params[j].per_input != 0;
    double *g = malloc((n_per * total + 1) * sizeof *g);
    for (int r = 0, at = 0; g && r < se->cfg.world_size; at += (int)se->counts[r], r++) {
        const char *p = strchr(hellos[r], '\n');
        char *end;
        strtoull(p ? p + 1 : "", &end, 10);
        for (size_t q = 0; q < n_per; q++)
            for (size_t i = 0; i < se->counts[r]; i++) g[q * total + (size_t)at + i] = strtod(end + 1, &end);
    }
    return g;
}

/* The first word where a and b (one line each) differ, as "X vs Y", into out. */
static void first_difference(const char *a, const char *b, char *out, size_t cap) {
    size_t i = 0;
    while (a[i] && a[i] == b[i]) i++;
    while (i > 0 && a[i - 1] != ' ') i--; /* the start of the word (the prefix is the same in both) */
    a += i, b += i;
    size_t la = strcspn(a, " \n"), lb = strcspn(b, " \n");
    snprintf(out, cap, "%.*s vs %.*s", (int)(la > 200 ? 200 : la), a, (int)(lb > 200 ? 200 : lb), b);
}

/* The base model's fingerprint (0: none): each merged tensor's dtype, shape, and its first and
 * last 512 elements' bytes. Enough to catch another base on one rank without reading it all. */
static uint64_t base_fingerprint(const merge_ctx *c) {
    if (!c->base) return 0;
    uint64_t h = 0;
    uint8_t buf[512 * 16];
    for (size_t u = 0; u < c->plan.n_units; u++) {
        tm_tensor_info ti = tm_merge_tensor(c->base, c->plan.base_where[c->plan.units[u].keys[0]]);
        tm_view v = {(const uint8_t *)ti.storage_data, ti.dtype, ti.ndim, ti.shape, ti.stride, ti.storage_offset};
        size_t item = tm_dtype_size(ti.dtype), k = ti.numel < 512 ? (size_t)ti.numel : 512;
        h = tm_hash_bytes(&ti.dtype, sizeof ti.dtype, h);
        h = tm_hash_bytes(ti.shape, (size_t)ti.ndim * sizeof *ti.shape, h);
        tm_kernel_copy(&v, 0, k, ti.dtype, buf);
        h = tm_hash_bytes(buf, k * item, h);
        tm_kernel_copy(&v, (uint64_t)ti.numel - k, k, ti.dtype, buf);
        h = tm_hash_bytes(buf, k * item, h);
    }
    return h;
}

/* The plan as text, one line per unit: its tensor names, the first one's dtype and shape, the
 * output dtype, whether it is averaged, its element count; after a line for the output format. */
static void plan_text(text *t, const merge_ctx *c, tm_format format) {
    add(t, "format=%d base=%016llx\n", (int)format, (unsigned long long)base_fingerprint(c));
    for (size_t u = 0; u < c->plan.n_units; u++) {
        const tm_unit *un = &c->plan.units[u];
        tm_tensor_info ti = tm_merge_key_tensor(c, un->keys[0]);
        for (size_t k = 0; k < un->n_keys; k++) add(t, "%s%s", k ? "," : "", c->plan.keys[un->keys[k]]);
        add(t, "\t%s\t[", tm_dtype_name(ti.dtype));
        for (int32_t d = 0; d < ti.ndim; d++) add(t, "%s%lld", d ? ", " : "", (long long)ti.shape[d]);
        add(t, "]\t%s\t%d\t%lld\n", tm_dtype_name(un->out_dtype), un->floating, (long long)un->numel);
    }
}

/* One plan line's fields. */
typedef struct plan_line {
    const char *names, *dtype, *shape, *out_dtype;
    size_t lens[4];
    int floating;
    long long numel;
} plan_line;

static int parse_line(const char *line, plan_line *p) {
    const char **f[4] = {&p->names, &p->dtype, &p->shape, &p->out_dtype};
    for (int i = 0; i < 4; i++) {
        *f[i] = line;
        p->lens[i] = strcspn(line, "\t\n");
        line += p->lens[i];
        if (*line != '\t') return 0;
        line++;
    }
    return sscanf(line, "%d\t%lld", &p->floating, &p->numel) == 2;
}

/* Compares rank r's plan with the reference's; the first difference into msg (same words on
 * every rank). 1 when they are the same. */
static int same_plan(const char *ref, int ref_rank, const char *mine, int r, char *msg, size_t cap) {
    const char *a = ref, *b = mine;
    size_t la = strcspn(a, "\n"), lb = strcspn(b, "\n");
    if (la != lb || strncmp(a, b, la) != 0) {
        if (strcspn(a, " ") != strcspn(b, " ") || strncmp(a, b, strcspn(a, " ")) != 0)
            snprintf(msg, cap, "rank %d writes another output format than rank %d: give every rank the same -o kind",
                     r, ref_rank);
        else
            snprintf(msg, cap, "rank %d's base model differs from rank %d's (another file's tensors): every rank "
                     "needs the same --base", r, ref_rank);
        return 0;
    }
    a += la + (a[la] == '\n'), b += lb + (b[lb] == '\n');
    while (*a || *b) {
        la = strcspn(a, "\n"), lb = strcspn(b, "\n");
        if (la == lb && strncmp(a, b, la) == 0) {
            a += la + (a[la] == '\n'), b += lb + (b[lb] == '\n');
            continue;
        }
        plan_line pa = {0}, pb = {0};
        int oka = *a && parse_line(a, &pa), okb = *b && parse_line(b, &pb);
        if (!okb)
            snprintf(msg, cap, "rank %d's inputs lack tensor '%.*s' that rank %d's have (or have fewer tensors)", r,
                     (int)pa.lens[0], pa.names, ref_rank);
        else if (!oka)
            snprintf(msg, cap, "rank %d's inputs hold tensor '%.*s' that rank %d's do not", r, (int)pb.lens[0],
                     pb.names, ref_rank);
        else if (pa.lens[0] != pb.lens[0] || strncmp(pa.names, pb.names, pa.lens[0]) != 0)
            snprintf(msg, cap, "rank %d's tensor '%.*s' is '%.*s' on rank %d (names or order differ)", r,
                     (int)pb.lens[0], pb.names, (int)pa.lens[0], pa.names, ref_rank);
        else if (pa.lens[2] != pb.lens[2] || strncmp(pa.shape, pb.shape, pa.lens[2]) != 0)
            snprintf(msg, cap, "rank %d: tensor '%.*s': shape %.*s differs from rank %d's %.*s", r, (int)pb.lens[0],
                     pb.names, (int)pb.lens[2], pb.shape, ref_rank, (int)pa.lens[2], pa.shape);
        else
            snprintf(msg, cap, "rank %d: tensor '%.*s': dtype %.*s (output %.*s) differs from rank %d's %.*s (output %.*s)",
                     r, (int)pb.lens[0], pb.names, (int)pb.lens[1], pb.dtype, (int)pb.lens[3], pb.out_dtype, ref_rank,
                     (int)pa.lens[1], pa.dtype, (int)pa.lens[3], pa.out_dtype);
        return 0;
    }
    return 1;
}

/* The blocks that travel: one per TM_BLOCK_ELEMS elements of every averaged unit. */
static uint64_t count_blocks(const char *plan) {
    uint64_t n = 0;
    const char *line = strchr(plan, '\n');
    for (line = line ? line + 1 : ""; *line; line += strcspn(line, "\n") + (line[strcspn(line, "\n")] == '\n')) {
        plan_line p;
        if (parse_line(line, &p) && p.floating && p.numel > 0)
            n += ((uint64_t)p.numel + TM_BLOCK_ELEMS - 1) / TM_BLOCK_ELEMS;
    }
    return n;
}

/* Whether rank r's plan is compared: every rank has one with the base (a rank without inputs
 * plans from it), else the ranks with inputs. */
static int has_plan(const session *se, int r) { return se->own_code || se->counts[r]; }

/* The reference plan: the first rank (in rank order) with a plan. */
static int reference_rank(const session *se) {
    for (int r = 0; r < se->cfg.world_size; r++)
        if (has_plan(se, r)) return r;
    return -1;
}

/* Exchanges the plans and checks them; then connects the process group. c is NULL on a rank
 * without inputs; *ref_plan then receives the reference plan (malloc'ed). */
static tm_status agree_on_plan(session *se, const merge_ctx *c, tm_format format, char **ref_plan, tm_error *err) {
    if (format == TM_FORMAT_TORCHSCRIPT)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                            "rank %d: TorchScript output is not supported by a distributed merge: write .pt or "
                            ".safetensors (then rebuild the module on one host)", se->cfg.rank);
    text mine = {0};
    if (c) plan_text(&mine, c, format);
    else add(&mine, "%s", "");
    if (mine.oom) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    char **all = NULL;
    tm_status st = se->b->dist_exchange(se->s, "plan", mine.s, &all, err);
    free(mine.s);
    if (st) return st;
    int ref = reference_rank(se);
    char msg[TM_ERROR_MSG_MAX - 64];
    for (int r = 0; r < se->cfg.world_size && !st; r++)
        if (has_plan(se, r) && !same_plan(all[ref], ref, all[r], r, msg, sizeof msg))
            st = tm_error_set(err, TM_ERROR_MISMATCH, "distributed merge: %s; nothing written", msg);
    if (!st) se->n_blocks = count_blocks(all[ref]);
    if (!st && ref_plan) *ref_plan = strdup(all[ref]);
    free_all(all, se->cfg.world_size);
    if (!st) st = se->b->dist_start(se->s, err);
    if (!st && se->n_blocks == 0) st = se->b->dist_check_world(se->s, err);
    return st;
}

static tm_status xr_agree(void *user, const merge_ctx *c, tm_format format, tm_error *err) {
    return agree_on_plan(user, c, format, NULL, err);
}

static tm_status xr_before(void *user, double *prev, size_t count, int *has_prev, tm_error *err) {
    session *se = user;
    *has_prev = se->cfg.rank > 0;
    return *has_prev ? se->b->dist_recv(se->s, se->cfg.rank - 1, prev, count, err) : TM_OK;
}

/* The running sum to the next rank; the last rank's (the total) to rank 0 when only it writes. */
static tm_status xr_pass(void *user, const double *sums, size_t count, tm_error *err) {
    session *se = user;
    int rank = se->cfg.rank, last = se->cfg.world_size - 1;
    if (rank < last) return se->b->dist_send(se->s, rank + 1, sums, count, err);
    if (!se->output_on_all && last > 0) return se->b->dist_send(se->s, 0, sums, count, err);
    return TM_OK;
}

static tm_status xr_total(void *user, double *sums, size_t count, tm_error *err) {
    session *se = user;
    int rank = se->cfg.rank, last = se->cfg.world_size - 1;
    tm_status st = TM_OK;
    if (se->output_on_all) st = se->b->dist_broadcast(se->s, last, sums, count, err);
    else if (last > 0 && rank == 0) st = se->b->dist_recv(se->s, last, sums, count, err);
    /* The last block: no rank beyond the world size may have joined (before rank 0 commits). */
    if (!st && ++se->done_blocks == se->n_blocks) st = se->b->dist_check_world(se->s, err);
    return st;
}

/* A method's own chained sum (method_xr.h): handed on, its total to every rank or to the writers. */
static tm_status xr_deliver(void *user, double *buf, size_t count, int to, int *has_total, tm_error *err) {
    session *se = user;
    int rank = se->cfg.rank, last = se->cfg.world_size - 1;
    tm_status st = TM_OK;
    if (to == TM_XR_OUTPUT) {
        *has_total = rank == 0 || se->output_on_all;
        st = xr_pass(se, buf, count, err);
        return st ? st : xr_total(se, buf, count, err);
    }
    *has_total = 1;
    if (rank < last) st = se->b->dist_send(se->s, rank + 1, buf, count, err);
    if (!st && last > 0) st = se->b->dist_broadcast(se->s, last, buf, count, err);
    return st;
}

/* --output-on all without a base: a non-floating block comes from rank 0's first input, as on
 * one host (the bytes travel as doubles: a broadcast moves bits, whatever they are). */
static tm_status xr_share(void *user, void *bytes, size_t len, tm_error *err) {
    session *se = user;
    size_t doubles = (len + sizeof(double) - 1) / sizeof(double);
    if (!se->share && !(se->share = malloc(TM_BLOCK_BYTES + sizeof(double))))
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    memcpy(se->share, bytes, len);
    tm_status st = se->b->dist_broadcast(se->s, 0, se->share, doubles, err);
    if (!st) memcpy(bytes, se->share, len);
    return st;
}

/* A rank without inputs: passes every block of the reference plan on, in its order. */
static tm_status pass_on(session *se, tm_error *err) {
    char *plan = NULL;
    tm_status st = agree_on_plan(se, NULL, TM_FORMAT_AUTO, &plan, err);
    double *sums = st ? NULL : malloc(2 * TM_BLOCK_ELEMS * sizeof *sums);
    if (!st && !sums) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    const char *line = plan ? strchr(plan, '\n') : NULL;
    for (line = line ? line + 1 : ""; !st && *line; line += strcspn(line, "\n") + (line[strcspn(line, "\n")] == '\n')) {
        plan_line p;
        if (!parse_line(line, &p) || !p.floating) continue;
        int complex = strncmp(p.out_dtype, "complex", 7) == 0;
        for (long long begin = 0; begin < p.numel && !st; begin += (long long)TM_BLOCK_ELEMS) {
            size_t count = p.numel - begin < (long long)TM_BLOCK_ELEMS ? (size_t)(p.numel - begin) : TM_BLOCK_ELEMS;
            size_t doubles = complex ? 2 * count : count;
            int has_prev;
            st = xr_before(se, sums, doubles, &has_prev, err);
            if (!st) st = xr_pass(se, sums, doubles, err);
            if (!st) st = xr_total(se, sums, doubles, err);
        }
    }
    free(sums);
    free(plan);
    return st;
}

/* ---- The merge ----------------------------------------------------------------------------- */

/* The averages' coefficients for this rank's inputs: the single-host method's over the global
 * input list (ranks in order), with the same float64 operations in the same order as
 * tm_method_weights, so the sum is the single-host sum. w: every input's weight (global order). */
static tm_status translate(const tm_method *m, const tm_param_values *pv, double *w, size_t total, size_t offset,
                           size_t n, double *coef, tm_error *err) {
    int pn = param_index(m, "normalize");
    int normalize = pn >= 0 ? pv->values[pv->at[pn]] != 0 : 1;
    double sum = 0;
    for (size_t i = 0; i < total; i++) sum += w[i];
    if (normalize && (sum == 0 || sum != sum || sum - sum != 0))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "the weights of all ranks sum to %g and cannot be normalised (normalize: false)", sum);
    for (size_t i = 0; i < n; i++) coef[i] = normalize ? w[offset + i] / sum : w[offset + i];
    return TM_OK;
}

/* The methods a distributed merge runs, for messages. */
static const char *supported_list(void) {
    static char list[512];
    if (list[0]) return list;
    size_t used = 0;
    for (size_t i = 0; i < tm_methods_count() && used < sizeof list; i++) {
        const tm_method *m = tm_methods_at(i);
        if (is_average(m) || m->cross_rank)
            used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", used ? ", " : "", m->name);
    }
    return list;
}

/* What the parameters ask that cannot be computed across hosts (after they resolve). */
static tm_status check_params(const tm_method *m, const tm_param_values *pv, tm_error *err) {
    if (m->wants_model_passes && m->wants_model_passes(pv))
        return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                            "%s cannot be merged across hosts with these parameters: they need model-wide passes over "
                            "every input's whole model (trim_scope: global); use trim_scope: tensor", m->name);
    return m->cross_rank && m->cross_rank->check ? m->cross_rank->check(pv, err) : TM_OK;
}

/* What no rank can merge across hosts: refused by each rank on its own, before the rendezvous
 * (n: this rank's inputs, for its parameters). */
static tm_status check_supported(const tm_merge_options *o, size_t n, tm_error *err) {
    const char *name = o->method ? o->method : "simple_average";
    const tm_method *m = tm_methods_find(name);
    if (!m) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "unknown method '%s'", name);
    if (!is_average(m) && !m->cross_rank)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                            "%s cannot be merged across hosts: it needs the inputs themselves, not sums over them "
                            "(across hosts: %s)", m->name, supported_list());
    if (o->keys == TM_KEYS_UNION)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED,
                            "a distributed merge needs the same tensors on every input (--keys strict or intersection)");
    if (o->tensor_param)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED, "a distributed merge takes no per-tensor parameter rules");
    if (o->dequantize)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED, "a distributed merge does not dequantize (--dequantize)");
    if (o->masks_out || o->template_path)
        return tm_error_set(err, TM_ERROR_UNSUPPORTED, "a distributed merge writes no %s",
                            o->masks_out ? "masks (--masks-out)" : "TorchScript module (--template)");
    tm_param_values pv = {0};
    tm_status st = resolve_params(m, o, n, &pv, err);
    if (!st) st = check_params(m, &pv, err);
    tm_param_values_free(&pv);
    return st;
}

/* The global inputs' parameters: the merge's own, the per-input ones from every rank (g). */
static tm_status global_params(const tm_method *m, const tm_merge_options *o, const double *g, size_t total,
                               tm_param_values *gpv, tm_error *err) {
    tm_param list[o->n_params + m->n_params + 1];
    size_t k = 0, q = 0;
    for (size_t i = 0; i < o->n_params; i++) {
        int j = param_index(m, o->params[i].name);
        if (j < 0 || !m->params[j].per_input) list[k++] = o->params[i];
    }
    for (size_t j = 0; j < m->n_params; j++)
        if (m->params[j].per_input) list[k++] = (tm_param){m->params[j].name, NULL, g + total * q++, total};
    return tm_param_values_resolve(m, list, k, total, gpv, err);
}

/* Everything after the rendezvous; any failure is told to the other ranks by the caller. */
static tm_status run(session *se, const char *const *inputs, size_t n, const char *output, const tm_merge_options *o,
                     const char *label, tm_error *err) {
    const tm_method *m = tm_methods_find(o->method ? o->method : "simple_average");
    se->own_code = !is_average(m);
    tm_param_values pv = {0}, gpv = {0};
    tm_status st = TM_OK;
    if (se->own_code && !o->base)
        st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                          "rank %d: %s across hosts needs the base model on every rank (--base BASE)", se->cfg.rank,
                          m->name);
    if (!st) st = resolve_params(m, o, n, &pv, err);
    text hello = {0};
    if (!st) hello_text(&hello, se, o, m, &pv, n);
    if (!st && hello.oom) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    char **all = NULL;
    if (!st) st = se->b->dist_exchange(se->s, "hello", hello.s, &all, err);
    free(hello.s);
    /* Every rank checks every rank against rank 0 in the same order: the same message everywhere. */
    for (int r = 1; r < se->cfg.world_size && !st; r++) {
        size_t l0 = strcspn(all[0], "\n"), lr = strcspn(all[r], "\n");
        if (l0 != lr || strncmp(all[0], all[r], l0) != 0) {
            char what[600];
            first_difference(all[0], all[r], what, sizeof what);
            st = tm_error_set(err, TM_ERROR_MISMATCH,
                              "distributed merge: rank %d was started with other settings than rank 0 (%s): every "
                              "rank must run the same method, parameters and output options; nothing written",
                              r, what);
        }
    }
    size_t total = 0, offset = 0;
    for (int r = 0; r < se->cfg.world_size && !st; r++) {
        se->counts[r] = strtoull(strchr(all[r], '\n') + 1, NULL, 10);
        if (r == se->cfg.rank) offset = total;
        total += se->counts[r];
    }
    const size_t least = m->min_inputs ? m->min_inputs : 1;
    if (!st && total < least)
        st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s needs at least %zu input%s over all ranks, got %zu",
                          m->name, least, least == 1 ? "" : "s", total);
    if (!st && !se->counts[0] && !se->own_code)
        st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                          "rank 0 has no local inputs but writes the output: give rank 0 at least one input");
    for (int r = 0; r < se->cfg.world_size && !st && se->output_on_all && !se->own_code; r++)
        if (!se->counts[r])
            st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                              "rank %d has no local inputs: --output-on all needs an input on every rank", r);
    double *g = st ? NULL : global_values(se, m, all, total);
    if (!st && !g) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    free_all(all, se->cfg.world_size);
    /* Rank 0 runs AHEAD blocks ahead of the totals it waits for, so the ranks work at once (the
     * averages; the methods' own exchanges keep one block in flight). */
    tm_cross_rank xr = {.before = xr_before, .pass = xr_pass, .total = xr_total, .agree = xr_agree,
                        .first = se->cfg.rank == 0, .ahead = se->cfg.world_size > 1 && !se->own_code ? AHEAD : 1,
                        .discard_output = !(se->cfg.rank == 0 || se->output_on_all), .deliver = xr_deliver,
                        .offset = offset, .no_inputs = n == 0, .user = se};
    tm_merge_options lo = *o;
    lo.distributed = NULL;
    if (!st && se->own_code) { /* the method's own code, on the global parameters (checked as on one host) */
        st = global_params(m, o, g, total, &gpv, err);
        xr.params = &gpv;
        if (!st) /* a rank without inputs plans from the base */
            st = tm_merge_files_xr(n ? inputs : &o->base, n ? n : 1, output, &lo, label ? label : m->name, &xr, err);
    } else if (!st && n == 0) {
        st = pass_on(se, err);
    } else if (!st) { /* the averages: weighted_average with the global coefficients */
        int pw = param_index(m, "weights"), q = 0; /* weights: the q-th per-input parameter */
        for (int j = 0; j < pw; j++) q += m->params[j].per_input != 0;
        double *ones = pw < 0 ? malloc((total + 1) * sizeof *ones) : NULL, *coef = malloc((n + 1) * sizeof *coef);
        for (size_t i = 0; ones && i < total; i++) ones[i] = 1.0;
        if (!coef || (pw < 0 && !ones)) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        if (!st) st = translate(m, &pv, pw < 0 ? ones : g + (size_t)q * total, total, offset, n, coef, err);
        tm_param p[2] = {{"weights", NULL, coef, n}, {"normalize", "false", NULL, 0}};
        lo.method = "weighted_average";
        lo.params = p;
        lo.n_params = 2;
        lo.base = NULL;
        xr.share = se->output_on_all ? xr_share : NULL;
        if (!st) st = tm_merge_files_xr(inputs, n, output, &lo, label ? label : m->name, &xr, err);
        free(ones);
        free(coef);
    }
    free(g);
    tm_param_values_free(&gpv);
    tm_param_values_free(&pv);
    return st;
}

/* A write to a socket whose peer has gone raises SIGPIPE, which ends a process that has not set
 * it aside, without a word: a rank would vanish when another one stops. SIGPIPE is blocked in
 * this thread for the session, so in the threads the session starts too (Gloo's, the stores',
 * the merging thread): such a write fails with EPIPE instead and the exchange says which rank
 * stopped. The SIGPIPEs left pending in this thread are discarded before its mask is restored. */
static void sigpipe_block(sigset_t *before) {
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, before);
}
static void sigpipe_restore(const sigset_t *before) {
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    const struct timespec now = {0, 0};
    if (!sigismember(before, SIGPIPE))
        while (sigtimedwait(&pipe, NULL, &now) == SIGPIPE) {
        }
    pthread_sigmask(SIG_SETMASK, before, NULL);
}

static tm_status merge_distributed(const char *const *inputs, size_t n, const char *output, const tm_merge_options *o,
                                   const char *label, tm_error *err) {
    session se = {0};
    tm_status st = resolve_config(o->distributed, &se.cfg, &se.output_on_all, err);
    if (!st) st = check_supported(o, n, err);
    if (!st) st = tm_torch_bridge_get(&se.b, err);
    if (!st && !se.b->dist_open)
        st = tm_error_set(err, TM_ERROR_UNSUPPORTED,
                          "this torchmerge was built without Gloo (libgloo-dev): no distributed merge");
    if (!st && n && !inputs) st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "inputs is NULL");
    if (!st && (!output || !*output)) st = tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "no output path");
    if (!st) st = se.b->dist_open(&se.cfg, &se.s, err);
    if (st) return st;
    se.counts = calloc((size_t)se.cfg.world_size, sizeof *se.counts);
    if (!se.counts) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    if (!st) st = run(&se, inputs, n, output, o, label, err);
    /* Every rank learns that every other one finished (the writer's commit included). */
    char **all = NULL;
    if (!st) st = se.b->dist_exchange(se.s, "done", "ok", &all, err);
    free_all(all, se.cfg.world_size);
    if (st) {
        char msg[TM_ERROR_MSG_MAX + 32];
        snprintf(msg, sizeof msg, "rank %d failed: %s", se.cfg.rank, err->msg);
        se.b->dist_abort(se.s, msg);
    }
    se.b->dist_close(se.s);
    free(se.counts);
    free(se.share);
    return st;
}

tm_status tm_merge_distributed(const char *const *inputs, size_t n, const char *output, const tm_merge_options *o,
                               const char *label, tm_error *err) {
    sigset_t before;
    sigpipe_block(&before);
    tm_status st = merge_distributed(inputs, n, output, o, label, err);
    sigpipe_restore(&before);
    return st;
}

static tm_status discard_write(void *self, const void *data, size_t len, uint32_t crc, tm_error *err) {
    (void)self, (void)data, (void)len, (void)crc, (void)err;
    return TM_OK;
}

tm_status tm_cross_rank_discard(merge_ctx *c, tm_error *err) {
    tm_sink sink = {.self = NULL, .want_crc = 0, .write = discard_write};
    size_t done = 0;
    return tm_pipeline_run(c, NULL, 0, c->plan.n_units, &sink, &done, err);
}
