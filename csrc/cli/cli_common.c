#define _GNU_SOURCE
#include "cli/cli_common.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int tm_cli_quiet;

void tm_cli_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("torchmerge: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int tm_cli_usage_error(const char *help, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("torchmerge: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see %s)\n", help);
    va_end(ap);
    return TM_EXIT_USAGE;
}

int tm_cli_set_format(tm_merge_options *o, const char *arg, const char *help) {
    if (strcmp(arg, "pt") == 0) o->format = TM_FORMAT_PT;
    else if (strcmp(arg, "torchscript") == 0) o->format = TM_FORMAT_TORCHSCRIPT;
    else if (strcmp(arg, "safetensors") == 0) o->format = TM_FORMAT_SAFETENSORS;
    else return tm_cli_usage_error(help, "--format: expected pt, torchscript or safetensors, got '%s'", arg);
    return 0;
}

int tm_cli_set_dtype(tm_merge_options *o, const char *arg, const char *help) {
    if (tm_dtype_from_name(arg, &o->dtype) != TM_OK || !tm_dtype_is_floating(o->dtype) ||
        o->dtype == TM_COMPLEX64 || o->dtype == TM_COMPLEX128)
        return tm_cli_usage_error(help, "--dtype: expected float32, float16, bfloat16 or float64, got '%s'", arg);
    o->has_dtype = 1;
    return 0;
}

int tm_cli_set_keys(tm_merge_options *o, const char *arg, const char *help) {
    if (strcmp(arg, "strict") == 0) o->keys = TM_KEYS_STRICT;
    else if (strcmp(arg, "intersection") == 0) o->keys = TM_KEYS_INTERSECTION;
    else if (strcmp(arg, "union") == 0) o->keys = TM_KEYS_UNION;
    else return tm_cli_usage_error(help, "--keys: expected strict, intersection or union, got '%s'", arg);
    return 0;
}

static void on_warning(void *user, const char *msg) {
    (void)user;
    if (!tm_cli_quiet) fprintf(stderr, "torchmerge: warning: %s\n", msg);
}

static void on_progress(void *user, size_t done, size_t total) {
    (void)user;
    int width = 30, filled = total ? (int)(width * done / total) : width;
    fprintf(stderr, "\r[%.*s%*s] %zu/%zu tensors", filled, "##############################",
            width - filled, "", done, total);
    if (done == total) fputc('\n', stderr);
}

void tm_cli_set_callbacks(tm_merge_options *o) {
    o->warning = on_warning;
    if (!tm_cli_quiet && isatty(STDERR_FILENO)) o->progress = on_progress;
}

static void on_signal(int sig) {
    tm_remove_temporary_outputs();
    signal(sig, SIG_DFL);
    raise(sig);
}

void tm_cli_install_signal_handlers(void) {
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGHUP, on_signal);
    signal(SIGBUS, on_signal); /* an input truncated while mapped */
    signal(SIGXFSZ, SIG_IGN);
}

void tm_cli_print_profile(const tm_profile *p) {
    fprintf(stderr, "%-8s %8s %12s %12s\n", "action", "calls", "mean (s)", "total (s)");
    const char *names[3] = {"load", "merge", "save"};
    double totals[3] = {p->load_seconds, p->merge_seconds, p->save_seconds};
    uint64_t calls[3] = {p->load_calls, p->merge_calls, p->save_calls};
    for (int i = 0; i < 3; i++)
        fprintf(stderr, "%-8s %8llu %12.6f %12.6f\n", names[i], (unsigned long long)calls[i],
                calls[i] ? totals[i] / (double)calls[i] : 0.0, totals[i]);
}

int tm_cli_int(const char *arg, const char *flag, long lo, long hi, int *out, const char *help) {
    char *end;
    errno = 0;
    long v = strtol(arg, &end, 10);
    if (errno || end == arg || *end || v < lo || v > hi)
        return tm_cli_usage_error(help, "%s: '%s' is not a whole number in [%ld, %ld]", flag, arg, lo, hi);
    *out = (int)v;
    return 0;
}
