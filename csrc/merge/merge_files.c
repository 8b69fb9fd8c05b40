/* tm_merge_files: the streaming file merge. For each output storage, blocks of elements are
 * read from every input (views over the mapped files), merged by the method of the table in
 * float64, rounded once and written; the input pages are dropped once used. Memory stays near one block per input plus
 * LibTorch-free code; TorchScript output alone loads LibTorch (through the bridge).
 *
 * This file is the entry point only: it checks the arguments, opens the inputs, chooses the
 * output format, plans, and hands the plan to that format's sink (sink_*.c), which runs the
 * pipeline (pipeline.c) over the per-unit arithmetic (merge_unit.c). C11. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/atomic_output.h"
#include "core/fs.h"
#include "core/struct_size.h"
#include "merge/merge_files_internal.h"
#include "merge/merge_ctx.h"
#include "merge/mask_writer.h"
#include "merge/merge_unit.h"
#include "merge/model_passes.h"
#include "merge/output_metadata.h"
#include "merge/sink.h"

static void warn(const merge_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void warn(const merge_ctx *c, const char *fmt, ...) {
    if (!c->o->warning) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    c->o->warning(c->o->warning_user, msg);
}

/* Refuses an output that would replace an input or the template, before anything is opened. */
static tm_status check_paths(const merge_ctx *c, const char *const *paths, const char *output, int folder,
                             tm_error *err) {
    for (size_t i = 0; i < c->n; i++) {
        if (!paths[i]) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "input %zu is NULL", i + 1);
        if (tm_same_file(paths[i], output))
            return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: the output would replace an input", output);
    }
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
    if (tm_same_file(c->o->base, output))
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: the output would replace the base model", output);
    return TM_OK;
}

/* The output format: as asked, else from OUT (a folder or *.safetensors), else TorchScript when
 * there is a module to fill (a template, or a module as the first input), else pt. Called with
 * st, the inputs' opening status: a failed first input is not asked whether it is a module. */
static tm_format choose_format(const merge_ctx *c, const char *output, int folder, tm_status st) {
    tm_format format = c->o->format;
    size_t olen = strlen(output);
    if (format == TM_FORMAT_AUTO && (folder || (olen > 12 && strcmp(output + olen - 12, ".safetensors") == 0)))
        format = TM_FORMAT_SAFETENSORS;
    if (format == TM_FORMAT_AUTO)
        format = c->o->template_path || (!st && tm_checkpoint_is_module(c->in[0])) ? TM_FORMAT_TORCHSCRIPT : TM_FORMAT_PT;
    return format;
}

/* Opens the inputs, chooses the format and plans the output (the profile's "load"). */
static tm_status open_and_plan(merge_ctx *c, const char *const *paths, const char *output, int folder,
                               tm_format *format, tm_error *err) {
    double t0 = tm_merge_now();
    c->in = calloc(c->n, sizeof *c->in);
    if (!c->in) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    tm_open_options oo;
    tm_open_options_init(&oo);
    oo.key = c->o->key;
    tm_status st = TM_OK;
    for (size_t i = 0; i < c->n && !st; i++) {
        st = tm_checkpoint_open_err(paths[i], &oo, &c->in[i], err);
        c->prof.load_calls++;
    }
    if (!st && c->o->base) {
        st = tm_checkpoint_open_err(c->o->base, &oo, &c->base, err);
        c->prof.load_calls++;
    }
    *format = choose_format(c, output, folder, st);
    if (!st) st = tm_plan_build(&c->plan, c->in, c->n, c->o, *format == TM_FORMAT_SAFETENSORS, err);
    if (!st && c->base) st = tm_plan_check_base(&c->plan, c->in, c->base, err);
    c->prof.load_seconds += tm_merge_now() - t0;
    return st;
}

static tm_status write_torchscript(merge_ctx *c, const char *const *paths, const char *output, tm_error *err) {
    const char *module = c->o->template_path;
    if (!module && tm_checkpoint_is_module(c->in[0])) module = paths[0];
    if (!module)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT,
                            "%s: TorchScript output needs module inputs or a --template MODULE", paths[0]);
    int streamed = 0;
    tm_status st = tm_sink_torchscript_write(c, module, output, &streamed, err);
    if (!st && !streamed) st = tm_sink_torchscript_libtorch_write(c, module, output, err);
    if (!st && c->ignored.count)
        warn(c, "ignored %zu tensors that %s holds no parameter or buffer for: %s%s", c->ignored.count, module,
             c->ignored.text, c->ignored.count > 10 ? ", …" : "");
    return st;
}

static tm_status write_safetensors(merge_ctx *c, const char *const *paths, const char *output, int folder,
                                   tm_error *err) {
    tm_output_metadata m = {0};
    tm_status st = tm_output_metadata_build(c, paths, &m, err);
    if (!st && folder) st = tm_sink_safetensors_folder_write(c, output, &m, err);
    else if (!st) st = tm_sink_safetensors_write(c, output, &m, err);
    tm_output_metadata_free(&m);
    for (size_t k = 0; k < c->plan.n_keys && !st; k++)
        if (c->plan.alias_of[k] >= 0)
            warn(c, "'%s' shares its storage with '%s' (tied weights): safetensors stores it once, under '%s'; "
                    "the alias is recorded in __metadata__['torchmerge_aliases']",
                 c->plan.keys[k], c->plan.keys[c->plan.alias_of[k]], c->plan.keys[c->plan.alias_of[k]]);
    return st;
}

static tm_status write_output(merge_ctx *c, const char *const *paths, const char *output, int folder,
                              tm_format format, tm_error *err) {
    if (format == TM_FORMAT_TORCHSCRIPT) return write_torchscript(c, paths, output, err);
    if (format == TM_FORMAT_SAFETENSORS) return write_safetensors(c, paths, output, folder, err);
    return tm_sink_pt_write(c, output, err);
}

static tm_status run(merge_ctx *c, const char *const *paths, const char *output, tm_error *err) {
    if (c->n == 0) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "no input files");
    if (!paths) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "inputs is NULL");
    if (!output || !*output) return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "no output path");
    tm_status st = tm_merge_method(c, err);
    if (st) return st;
    int folder = tm_fs_is_folder_output(output);
    st = check_paths(c, paths, output, folder, err);
    tm_format format = TM_FORMAT_AUTO;
    if (!st) st = open_and_plan(c, paths, output, folder, &format, err);
    if (st) return st;
    if (format != TM_FORMAT_SAFETENSORS && folder)
        return tm_error_set(err, TM_ERROR_INVALID_ARGUMENT, "%s: is a folder; folder output is sharded safetensors", output);
    if (c->xr) st = c->xr->agree(c->xr->user, c, format, err); /* a merge across hosts: distributed.c */
    if (!st && c->o->masks_out) st = tm_mask_writer_open(c, c->o->masks_out, output, err);
    if (!st) st = tm_model_passes(c, err);
    if (!st) st = c->xr && c->xr->discard_output ? tm_cross_rank_discard(c, err)
                                                 : write_output(c, paths, output, folder, format, err);
    if (!st) st = tm_mask_writer_commit(c, err);
    tm_mask_writer_abort(c);
    if (!st && c->differing.count)
        warn(c, "non-floating tensors differ between inputs; taken from %s: %s%s",
             c->base ? tm_checkpoint_path(c->base) : paths[0], c->differing.text,
             c->differing.count > 10 ? ", …" : "");
    return st;
}

void tm_merge_options_init(tm_merge_options *opts) {
    TM_STRUCT_INIT(opts);
    if (!opts) return;
    opts->format = TM_FORMAT_AUTO;
    opts->keys = TM_KEYS_STRICT;
    opts->dtype = TM_FLOAT32;
}

void tm_profile_init(tm_profile *profile) { TM_STRUCT_INIT(profile); }

tm_status tm_merge_files_as(const char *const *inputs, size_t n, const char *output, const tm_merge_options *opts,
                            const char *label, tm_error *err) {
    /* The caller's fields over the defaults: an older, shorter struct gets defaults for the rest. */
    tm_merge_options o;
    tm_merge_options_init(&o);
    if (opts && TM_STRUCT_CHECK(opts, err)) return err->status;
    if (opts) TM_STRUCT_COPY_IN(&o, opts);
    if (o.distributed) return tm_merge_distributed(inputs, n, output, &o, label, err);
    return tm_merge_files_xr(inputs, n, output, &o, label, NULL, err);
}

tm_status tm_merge_files_xr(const char *const *inputs, size_t n, const char *output, const tm_merge_options *opts,
                            const char *label, const tm_cross_rank *xr, tm_error *err) {
    tm_merge_options o = *opts;
    if (o.profile && TM_STRUCT_CHECK(o.profile, err)) return err->status;
    merge_ctx c;
    memset(&c, 0, sizeof c);
    c.o = &o;
    c.xr = xr;
    c.label = label;
    c.n = n;
    tm_profile_init(&c.prof);
    tm_status st = run(&c, inputs, output, err);
    if (o.profile) TM_STRUCT_COPY_OUT(o.profile, &c.prof);
    tm_plan_free(&c.plan);
    for (size_t i = 0; c.in && i < n; i++) tm_checkpoint_free(c.in[i]);
    tm_checkpoint_free(c.base);
    free(c.in);
    free(c.model);
    tm_param_values_free(&c.params);
    return st;
}

tm_status tm_merge_files(const char *const *inputs, size_t n, const char *output, const tm_merge_options *opts) {
    tm_error err = {0};
    tm_status st = tm_merge_files_as(inputs, n, output, opts, NULL, &err);
    return st ? tm_error_publish(&err) : TM_OK;
}
