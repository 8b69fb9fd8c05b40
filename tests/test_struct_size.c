/* The ABI can grow: a caller compiled against an older, shorter layout of a struct (a smaller
 * struct_size) gets the defaults for the fields it lacks, and the library writes nothing past
 * its struct_size; a struct never initialised (struct_size 0) is refused. Also the method table
 * as the public API describes it, method parameters as name/value pairs, and the byte-size
 * grammar. Plain C99 (-std=c99 -pedantic -Werror).
 * usage: test_struct_size FIXTURE_DIR WORKDIR */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "c_check.h"
#include "torchmerge.h"


static const char *fixtures, *workdir;

static const char *path_in(const char *dir, const char *name) {
    static char buf[16][1200];
    static int next;
    char *b = buf[next++ % 16];
    sprintf(b, "%s/%s", dir, name);
    return b;
}

/* A caller whose tm_merge_options ended before `keys` (struct_size says so) and who left
 * garbage past it: the library must use the default (strict) key policy, so inputs with
 * different names are refused, where the garbage (union) would have merged them. */
static void test_old_merge_options_get_defaults(void) {
    const char *inputs[2];
    tm_merge_options o;
    tm_merge_options_init(&o);
    inputs[0] = path_in(fixtures, "sd_a.pt");
    inputs[1] = path_in(fixtures, "extra_key.pt");
    o.keys = TM_KEYS_UNION;
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "union.pt"), &o) == TM_OK);
    o.struct_size = offsetof(tm_merge_options, keys);
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "old.pt"), &o) == TM_ERROR_MISMATCH);
    CHECK(strstr(tm_errmsg(), "extra_key.pt") != NULL);
    CHECK(access(path_in(workdir, "old.pt"), F_OK) != 0);
    /* A caller whose struct ends before the callbacks: none are called (they are garbage). */
    tm_merge_options_init(&o);
    o.struct_size = offsetof(tm_merge_options, progress);
    o.progress = (void (*)(void *, size_t, size_t))1; /* would crash if called */
    o.warning = (void (*)(void *, const char *))1;
    o.profile = (tm_profile *)1;
    CHECK(tm_merge_files(inputs, 1, path_in(workdir, "old2.pt"), &o) == TM_OK);
}

static void test_uninitialised_structs_are_refused(void) {
    const char *inputs[1];
    tm_merge_options o;
    tm_tensor_info info;
    tm_checkpoint *ck = NULL;
    tm_open_options oo;
    memset(&o, 0, sizeof o);
    inputs[0] = path_in(fixtures, "sd_a.pt");
    CHECK(tm_merge_files(inputs, 1, path_in(workdir, "zero.pt"), &o) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "struct_size") != NULL);
    memset(&oo, 0, sizeof oo);
    CHECK(tm_checkpoint_open(inputs[0], &oo, &ck) == TM_ERROR_INVALID_ARGUMENT && ck == NULL);
    CHECK(tm_checkpoint_open(inputs[0], NULL, &ck) == TM_OK);
    memset(&info, 0, sizeof info);
    CHECK(tm_checkpoint_tensor(ck, 0, &info) == TM_ERROR_INVALID_ARGUMENT);
    tm_checkpoint_free(ck);
}

/* Records the library fills are written only as far as the caller's struct_size. */
static void test_old_output_structs_are_not_overrun(void) {
    tm_checkpoint *ck = NULL;
    tm_tensor_info info;
    tm_profile prof;
    tm_merge_options o;
    const char *inputs[2];
    CHECK(tm_checkpoint_open(path_in(fixtures, "sd_a.pt"), NULL, &ck) == TM_OK);
    if (!ck) return;
    tm_tensor_info_init(&info);
    info.struct_size = offsetof(tm_tensor_info, numel);
    info.numel = 12345;
    info.nbytes = 678;
    CHECK(tm_checkpoint_tensor(ck, 0, &info) == TM_OK);
    CHECK(info.name != NULL && info.ndim >= 0);
    CHECK(info.numel == 12345 && info.nbytes == 678);
    tm_checkpoint_free(ck);

    tm_profile_init(&prof);
    prof.struct_size = offsetof(tm_profile, merge_seconds);
    prof.merge_seconds = -7;
    prof.save_calls = 99;
    tm_merge_options_init(&o);
    o.profile = &prof;
    inputs[0] = path_in(fixtures, "sd_a.pt");
    inputs[1] = path_in(fixtures, "sd_b.pt");
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "prof.pt"), &o) == TM_OK);
    CHECK(prof.load_seconds > 0);
    CHECK(prof.merge_seconds == -7 && prof.save_calls == 99);
}

static void test_method_table(void) {
    size_t i, j, n = tm_method_count();
    int64_t w = tm_method_find("weighted_average");
    tm_method_info m;
    tm_method_param_info p;
    CHECK(n >= 2);
    CHECK(tm_method_find("simple_average") == 0);
    CHECK(w == 1 && tm_method_find("linear") == w);
    CHECK(tm_method_find("no_such_method") == -1);
    tm_method_info_init(&m);
    CHECK(tm_method_get((size_t)w, &m) == TM_OK);
    CHECK(strcmp(m.name, "weighted_average") == 0 && m.n_params == 2 && !m.needs_base);
    CHECK(m.aliases[0] && strcmp(m.aliases[0], "linear") == 0 && m.aliases[1] == NULL);
    for (j = 0; j < m.n_params; j++) {
        tm_method_param_info_init(&p);
        CHECK(tm_method_param((size_t)w, j, &p) == TM_OK);
        CHECK(p.name && p.help && *p.help);
    }
    tm_method_param_info_init(&p);
    CHECK(tm_method_param((size_t)w, 0, &p) == TM_OK);
    CHECK(strcmp(p.name, "weights") == 0 && p.per_input && p.required && p.kind == TM_PARAM_NUMBER);
    CHECK(tm_method_param((size_t)w, 1, &p) == TM_OK);
    CHECK(strcmp(p.name, "normalize") == 0 && p.kind == TM_PARAM_BOOL && strcmp(p.default_value, "true") == 0);
    CHECK(tm_method_param((size_t)w, 2, &p) == TM_ERROR_INVALID_ARGUMENT);
    for (i = 0; i < n; i++) {
        tm_method_info_init(&m);
        CHECK(tm_method_get(i, &m) == TM_OK && tm_method_find(m.name) == (int64_t)i);
    }
    CHECK(tm_method_get(n, &m) == TM_ERROR_INVALID_ARGUMENT);
}

/* Parameters travel as name/value pairs: numbers or text, checked by the table's declaration. */
static void test_params_as_pairs(void) {
    const char *inputs[2];
    double w[2] = {1, 3};
    tm_param params[2];
    tm_merge_options o;
    inputs[0] = path_in(fixtures, "plain1_a.pt");
    inputs[1] = path_in(fixtures, "plain1_b.pt");
    tm_merge_options_init(&o);
    o.method = "weighted_average";
    params[0].name = "weights";
    params[0].text = NULL;
    params[0].numbers = w;
    params[0].n_numbers = 2;
    params[1].name = "normalize";
    params[1].text = "false";
    params[1].numbers = NULL;
    params[1].n_numbers = 0;
    o.params = params;
    o.n_params = 2;
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "pairs.pt"), &o) == TM_OK);
    params[0].text = "1,3";
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "pairs_text.pt"), &o) == TM_OK);
    params[0].text = "1,3,5";
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "bad.pt"), &o) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "weights") != NULL);
    params[0].text = "1,x";
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "bad.pt"), &o) == TM_ERROR_INVALID_ARGUMENT);
    params[0].text = "1,3";
    params[1].text = "sometimes";
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "bad.pt"), &o) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "normalize") != NULL);
    params[1].name = "density";
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "bad.pt"), &o) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "density") != NULL);
    o.n_params = 0;
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "bad.pt"), &o) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "needs weights") != NULL);
    o.method = "simple_average";
    o.n_params = 1;
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "bad.pt"), &o) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "simple_average has no parameter 'weights'") != NULL);
    o.method = "no_such_method";
    o.n_params = 0;
    CHECK(tm_merge_files(inputs, 2, path_in(workdir, "bad.pt"), &o) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "no_such_method") != NULL);
    CHECK(access(path_in(workdir, "bad.pt"), F_OK) != 0);
}

static void test_byte_sizes(void) {
    uint64_t b = 0;
    CHECK(tm_byte_size_parse("500MB", &b) == TM_OK && b == 500000000ull);
    CHECK(tm_byte_size_parse("2GB", &b) == TM_OK && b == 2000000000ull);
    CHECK(tm_byte_size_parse("2G", &b) == TM_OK && b == 2000000000ull);
    CHECK(tm_byte_size_parse("2GiB", &b) == TM_OK && b == 2147483648ull);
    CHECK(tm_byte_size_parse("2gib", &b) == TM_OK && b == 2147483648ull);
    CHECK(tm_byte_size_parse("5e9", &b) == TM_OK && b == 5000000000ull);
    CHECK(tm_byte_size_parse("1048576", &b) == TM_OK && b == 1048576ull);
    CHECK(tm_byte_size_parse("1.5 KiB", &b) == TM_OK && b == 1536ull);
    CHECK(tm_byte_size_parse("0", &b) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(tm_byte_size_parse("-5MB", &b) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(tm_byte_size_parse("5 parsecs", &b) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "5 parsecs") != NULL);
    CHECK(tm_byte_size_parse("20000000TB", &b) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(tm_byte_size_parse("nan", &b) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(tm_byte_size_parse(NULL, &b) == TM_ERROR_INVALID_ARGUMENT);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: test_struct_size FIXTURE_DIR WORKDIR\n");
        return 2;
    }
    fixtures = argv[1];
    workdir = argv[2];
    test_old_merge_options_get_defaults();
    test_uninitialised_structs_are_refused();
    test_old_output_structs_are_not_overrun();
    test_method_table();
    test_params_as_pairs();
    test_byte_sizes();
    return tm_check_summary();
}
