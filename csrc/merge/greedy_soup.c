/* tm_greedy_soup: Wortsman et al.'s greedy soup over files. Every candidate (each input alone,
 * then the kept inputs plus the next one) is merged with tm_merge_files into one temporary
 * TorchScript module beside the output and scored through the LibTorch bridge; the kept inputs
 * are finally merged into the output. C11. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/atomic_output.h"
#include "core/struct_size.h"
#include "core/torch_bridge.h"
#include "merge/merge_files_internal.h"
#include "merge/method.h"

typedef struct greedy_ctx {
    const char *const *inputs;
    size_t n;
    const char *eval;
    tm_merge_options cand; /* candidate merges: TorchScript into the template, no callbacks */
    const tm_torch_bridge *bridge;
    char *temp;            /* the candidate module's path (tracked for signal clean-up) */
    char *template_path;   /* malloc'd copy when found among the inputs */
} greedy_ctx;

/* ".<base>.greedy.XXXXXX" in output's folder (for a folder output: beside that folder). */
static tm_status make_temp(greedy_ctx *g, const char *output, tm_error *err) {
    g->temp = tm_temporary_name(output, "greedy");
    if (!g->temp) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    /* Registered before it exists (mkostemp fills the name in place), like every temporary. */
    tm_temporary_track(g->temp);
    int fd = mkostemp(g->temp, O_CLOEXEC);
    if (fd < 0) {
        tm_error_set(err, TM_ERROR_IO, "%s: cannot create a temporary file beside it for the greedy soup's candidates: %s",
                     output, strerror(errno));
        tm_temporary_untrack(g->temp);
        free(g->temp);
        g->temp = NULL;
        return err->status;
    }
    close(fd);
    return TM_OK;
}

static tm_status find_template(greedy_ctx *g, const tm_merge_options *o, tm_error *err) {
    if (o->template_path) {
        g->cand.template_path = o->template_path;
        return TM_OK;
    }
    tm_open_options oo;
    tm_open_options_init(&oo);
    oo.key = o->key;
    for (size_t i = 0; i < g->n; i++) {
        tm_checkpoint *ck = NULL;
        if (tm_checkpoint_open(g->inputs[i], &oo, &ck) != TM_OK)
            return tm_error_set(err, TM_ERROR_FORMAT, "%s", tm_errmsg());
        int module = strcmp(tm_checkpoint_format(ck), "torchscript") == 0;
        tm_checkpoint_free(ck);
        if (module) {
            g->template_path = strdup(g->inputs[i]);
            if (!g->template_path) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
            g->cand.template_path = g->template_path;
            return TM_OK;
        }
    }
    return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                        "greedy soup scores TorchScript modules: give a template module (--template) or at "
                        "least one TorchScript module among the inputs");
}

/* Messages about a candidate name its temporary file: name the inputs instead. */
static void relabel(tm_error *err, const char *temp, const char *label) {
    char out[TM_ERROR_MSG_MAX];
    size_t used = 0, tl = strlen(temp), ll = strlen(label);
    for (const char *p = err->msg; *p && used + 1 < sizeof out;) {
        if (strncmp(p, temp, tl) == 0 && used + ll + 1 < sizeof out) {
            memcpy(out + used, label, ll);
            used += ll;
            p += tl;
        } else {
            out[used++] = *p++;
        }
    }
    out[used] = '\0';
    memcpy(err->msg, out, used + 1);
}

/* Merges the m inputs idx[0..m) uniformly into the candidate module and scores it. */
static tm_status score_soup(greedy_ctx *g, const size_t *idx, size_t m, double *score, tm_error *err) {
    const char **pp = malloc(m * sizeof *pp);
    if (!pp) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    for (size_t j = 0; j < m; j++) pp[j] = g->inputs[idx[j]];
    tm_status st = tm_merge_files(pp, m, g->temp, &g->cand);
    if (st) tm_error_set(err, st, "%s", tm_errmsg());
    free(pp);
    if (!st) st = g->bridge->score_module(g->temp, g->eval, score, err);
    if (st) {
        char label[512];
        if (m == 1) snprintf(label, sizeof label, "%s (in %s)", g->inputs[idx[0]], g->cand.template_path);
        else snprintf(label, sizeof label, "the soup of %s and %zu more (in %s)", g->inputs[idx[0]], m - 1,
                      g->cand.template_path);
        relabel(err, g->temp, label);
    }
    return st;
}

/* Best first; NaN last; ties in input order. */
static int better(const tm_greedy_ingredient *a, const tm_greedy_ingredient *b) {
    if (isnan(a->score) != isnan(b->score)) return isnan(b->score);
    if (!isnan(a->score) && a->score != b->score) return a->score > b->score;
    return a->input < b->input;
}

static tm_status run(greedy_ctx *g, const char *output, const tm_merge_options *o, tm_greedy_report *rep,
                     tm_error *err) {
    if (!g->inputs || g->n == 0) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "no input files");
    if (!output || !*output) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "no output path");
    if (!g->eval || !*g->eval) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "no evaluation module");
    if (o->n_params || (o->method && tm_methods_find(o->method) != tm_methods_find("simple_average")))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "greedy soup averages uniformly: a method and its parameters are not accepted");
    for (size_t i = 0; i < g->n; i++) {
        if (!g->inputs[i]) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "input %zu is NULL", i + 1);
        if (tm_same_file(g->inputs[i], output))
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: the output would replace an input", output);
    }
    if (tm_same_file(g->eval, output))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: the output would replace the evaluation module", output);
    if (tm_same_file(o->template_path, output))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: the output would replace the template", output);
    if (access(g->eval, R_OK) != 0) return tm_error_set(err, TM_ERROR_IO, "%s: cannot read: %s", g->eval, strerror(errno));

    g->cand = *o;
    g->cand.format = TM_FORMAT_TORCHSCRIPT;
    g->cand.has_dtype = 0; /* scored in the template's dtype: the evaluation inputs are in it */
    g->cand.progress = NULL;
    g->cand.warning = NULL;
    g->cand.profile = NULL;
    g->cand.recipe_text = NULL;
    tm_status st = find_template(g, o, err);
    if (!st) st = tm_torch_bridge_get(&g->bridge, err);
    if (!st) st = make_temp(g, output, err);
    if (st) return st;

    tm_greedy_ingredient *t = calloc(g->n, sizeof *t);
    size_t *kept = calloc(g->n, sizeof *kept);
    if (!t || !kept) {
        free(t);
        free(kept);
        return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    }
    /* 1. Each input alone. */
    for (size_t i = 0; i < g->n && !st; i++) {
        t[i].input = i;
        st = score_soup(g, &i, 1, &t[i].score, err);
    }
    /* 2. Best first (stable: insertion sort). */
    for (size_t i = 1; i < g->n && !st; i++) {
        tm_greedy_ingredient x = t[i];
        size_t j = i;
        for (; j > 0 && better(&x, &t[j - 1]); j--) t[j] = t[j - 1];
        t[j] = x;
    }
    /* 3. Grow the soup. */
    size_t n_kept = 0;
    double best = 0;
    if (!st) {
        kept[n_kept++] = t[0].input;
        t[0].kept = 1;
        t[0].soup_score = best = t[0].score;
    }
    for (size_t i = 1; i < g->n && !st; i++) {
        kept[n_kept] = t[i].input;
        st = score_soup(g, kept, n_kept + 1, &t[i].soup_score, err);
        if (!st && (t[i].soup_score > best || (isnan(best) && !isnan(t[i].soup_score)))) {
            t[i].kept = 1;
            best = t[i].soup_score;
            n_kept++;
        }
    }
    /* 4. The output: the kept inputs, best first. */
    if (!st) {
        tm_merge_options fo = *o;
        fo.template_path = g->cand.template_path;
        const char **pp = malloc(n_kept * sizeof *pp);
        if (!pp) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        for (size_t j = 0; !st && j < n_kept; j++) pp[j] = g->inputs[kept[j]];
        if (!st) st = tm_merge_files_as(pp, n_kept, output, &fo, "greedy_soup", err);
        free(pp);
    }
    free(kept);
    if (st) {
        free(t);
        return st;
    }
    rep->n = g->n;
    rep->tried = t;
    rep->n_kept = n_kept;
    rep->final_score = best;
    return TM_OK;
}

void tm_greedy_report_init(tm_greedy_report *report) { TM_STRUCT_INIT(report); }

tm_status tm_greedy_soup(const char *const *inputs, size_t n, const char *output, const char *eval_module,
                         const tm_merge_options *opts, tm_greedy_report *report) {
    tm_error err = {0};
    tm_merge_options o;
    tm_merge_options_init(&o);
    if (opts && TM_STRUCT_CHECK(opts, &err)) return tm_error_publish(&err);
    if (opts) TM_STRUCT_COPY_IN(&o, opts);
    if (report && TM_STRUCT_CHECK(report, &err)) return tm_error_publish(&err);
    tm_greedy_report result;
    tm_greedy_report_init(&result);
    greedy_ctx g;
    memset(&g, 0, sizeof g);
    g.inputs = inputs;
    g.n = n;
    g.eval = eval_module;
    tm_status st = run(&g, output, &o, &result, &err);
    /* the list belongs to the caller only when its report has room for the pointer */
    int holds = report && report->struct_size >= offsetof(tm_greedy_report, n_kept);
    if (report) TM_STRUCT_COPY_OUT(report, &result);
    if (!holds) free(result.tried);
    if (g.temp) {
        unlink(g.temp);
        tm_temporary_untrack(g.temp);
        free(g.temp);
    }
    free(g.template_path);
    return st ? tm_error_publish(&err) : TM_OK;
}

void tm_greedy_report_free(tm_greedy_report *report) {
    if (!report || report->struct_size < offsetof(tm_greedy_report, n_kept)) return;
    free(report->tried);
    size_t size = report->struct_size;
    memset(report, 0, size < sizeof *report ? size : sizeof *report);
    report->struct_size = size;
}
