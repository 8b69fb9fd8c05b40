/* The public header used from plain C99 (compiled with -std=c99 -pedantic -Werror): open and
 * iterate checkpoints, in-memory add/mul/save, merging files, error reporting.
 * usage: test_c_api FIXTURE_DIR (made by tests/fixtures/make_fixtures.py) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "c_check.h"
#include "torchmerge.h"


static char workdir[1024];

/* Each call gets its own buffer (never reused), so paths can be kept in arrays. */
static const char *path_of(const char *name) {
    static char buf[64][1200];
    static int next;
    char *b = buf[next++ % 64];
    sprintf(b, "%s/%s", workdir, name);
    return b;
}

static float *read_f32(tm_checkpoint *ck, const char *name, size_t *numel) {
    int64_t i = tm_checkpoint_find(ck, name);
    tm_tensor_info info;
    tm_tensor_info_init(&info);
    float *data;
    if (i < 0 || tm_checkpoint_tensor(ck, (size_t)i, &info) != TM_OK) return NULL;
    if (info.dtype != TM_FLOAT32) return NULL;
    data = (float *)malloc(info.nbytes ? (size_t)info.nbytes : 1);
    if (tm_checkpoint_read(ck, (size_t)i, data, (size_t)info.nbytes) != TM_OK) {
        free(data);
        return NULL;
    }
    *numel = (size_t)info.numel;
    return data;
}

static void test_status_and_dtype_tables(void) {
    tm_dtype d;
    CHECK(strcmp(tm_status_name(TM_OK), "TM_OK") == 0);
    CHECK(strcmp(tm_status_name(TM_ERROR_FORMAT), "TM_ERROR_FORMAT") == 0);
    CHECK(strlen(tm_strerror(TM_ERROR_IO)) > 0);
    CHECK(strcmp(tm_version(), TORCHMERGE_VERSION_STRING) == 0);
    CHECK(tm_dtype_from_name("bf16", &d) == TM_OK && d == TM_BFLOAT16);
    CHECK(tm_dtype_from_name("torch.float16", &d) == TM_OK && d == TM_FLOAT16);
    CHECK(tm_dtype_from_name("float128", &d) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(tm_dtype_size(TM_COMPLEX128) == 16 && tm_dtype_size(TM_BOOL) == 1);
    CHECK(tm_dtype_is_floating(TM_BFLOAT16) && !tm_dtype_is_floating(TM_INT64));
}

static void test_open_and_iterate(void) {
    tm_checkpoint *ck = NULL;
    size_t i, n, total = 0;
    CHECK(tm_checkpoint_open(path_of("sd_a.pt"), NULL, &ck) == TM_OK);
    if (!ck) return;
    CHECK(strcmp(tm_checkpoint_format(ck), "pt") == 0);
    n = tm_checkpoint_n_tensors(ck);
    CHECK(n > 3);
    for (i = 0; i < n; i++) {
        tm_tensor_info info;
        tm_tensor_info_init(&info);
        CHECK(tm_checkpoint_tensor(ck, i, &info) == TM_OK);
        CHECK(info.name != NULL && info.storage_data != NULL);
        CHECK(tm_checkpoint_find(ck, info.name) == (int64_t)i);
        total += (size_t)info.nbytes;
    }
    CHECK(total > 0);
    CHECK(tm_checkpoint_find(ck, "no.such.tensor") == -1);
    CHECK(tm_checkpoint_tensor(ck, n, NULL) != TM_OK);
    tm_checkpoint_free(ck);
    tm_checkpoint_free(NULL); /* NULL-safe */
}

static void test_nested_checkpoint_found_by_key(void) {
    tm_checkpoint *ck = NULL;
    tm_open_options oo;
    CHECK(tm_checkpoint_open(path_of("nested_a.pt"), NULL, &ck) == TM_OK);
    if (ck) CHECK(strcmp(tm_checkpoint_key(ck), "state_dict") == 0);
    tm_checkpoint_free(ck);
    CHECK(tm_checkpoint_open(path_of("ambiguous.pt"), NULL, &ck) == TM_ERROR_AMBIGUOUS);
    CHECK(ck == NULL);
    CHECK(strstr(tm_errmsg(), "'model'") && strstr(tm_errmsg(), "'ema'"));
    tm_open_options_init(&oo);
    oo.key = "ema";
    CHECK(tm_checkpoint_open(path_of("ambiguous.pt"), &oo, &ck) == TM_OK);
    tm_checkpoint_free(ck);

    /* the keys the ambiguous file offers, in file order; none for a state dict or a nested file
     * with one */
    tm_key_list keys;
    tm_key_list_init(&keys);
    CHECK(tm_checkpoint_list_keys(path_of("ambiguous.pt"), &keys) == TM_OK);
    CHECK(keys.n == 2);
    if (keys.n == 2) CHECK(strcmp(keys.keys[0], "model") == 0 && strcmp(keys.keys[1], "ema") == 0);
    tm_key_list_free(&keys);
    CHECK(keys.n == 0 && keys.keys == NULL);
    tm_key_list_free(NULL);
    CHECK(tm_checkpoint_list_keys(path_of("nested_a.pt"), &keys) == TM_OK && keys.n == 1);
    if (keys.n == 1) CHECK(strcmp(keys.keys[0], "state_dict") == 0);
    tm_key_list_free(&keys);
    CHECK(tm_checkpoint_list_keys(path_of("sd_a.pt"), &keys) == TM_OK && keys.n == 0);
    CHECK(tm_checkpoint_list_keys(path_of("evil.pt"), &keys) == TM_ERROR_UNSAFE && keys.n == 0);
    keys.struct_size = 0;
    CHECK(tm_checkpoint_list_keys(path_of("ambiguous.pt"), &keys) == TM_ERROR_INVALID_ARGUMENT);
}

static void test_errors_name_the_file(void) {
    tm_checkpoint *ck = NULL;
    CHECK(tm_checkpoint_open(path_of("truncated.pt"), NULL, &ck) != TM_OK);
    CHECK(strstr(tm_errmsg(), "truncated.pt") != NULL);
    CHECK(tm_checkpoint_open(path_of("does-not-exist.pt"), NULL, &ck) == TM_ERROR_IO);
    CHECK(strstr(tm_errmsg(), "does-not-exist.pt") != NULL);
    CHECK(tm_checkpoint_open(path_of("evil.pt"), NULL, &ck) == TM_ERROR_UNSAFE);
}

static void test_state_dict_add_mul_equals_mean(void) {
    tm_state_dict *a = NULL, *b = NULL, *c = NULL;
    tm_checkpoint *ck = NULL;
    size_t na = 0, nb = 0, nc = 0, nm = 0, i;
    float *xa, *xb, *xc, *xm;
    tm_checkpoint *ca, *cb, *cc;
    CHECK(tm_state_dict_load(path_of("sd_a.pt"), NULL, &a) == TM_OK);
    CHECK(tm_state_dict_load(path_of("sd_b.pt"), NULL, &b) == TM_OK);
    CHECK(tm_state_dict_load(path_of("sd_c.pt"), NULL, &c) == TM_OK);
    if (!a || !b || !c) return;
    CHECK(tm_state_dict_add(a, b, 1.0) == TM_OK);
    CHECK(tm_state_dict_add(a, c, 1.0) == TM_OK);
    CHECK(tm_state_dict_mul(a, 1.0 / 3.0) == TM_OK);
    CHECK(tm_state_dict_save(a, path_of("capi_mean.pt"), TM_FORMAT_PT, NULL) == TM_OK);

    CHECK(tm_checkpoint_open(path_of("capi_mean.pt"), NULL, &ck) == TM_OK);
    tm_checkpoint_open(path_of("sd_a.pt"), NULL, &ca);
    tm_checkpoint_open(path_of("sd_b.pt"), NULL, &cb);
    tm_checkpoint_open(path_of("sd_c.pt"), NULL, &cc);
    xm = read_f32(ck, "fc.weight", &nm);
    xa = read_f32(ca, "fc.weight", &na);
    xb = read_f32(cb, "fc.weight", &nb);
    xc = read_f32(cc, "fc.weight", &nc);
    CHECK(xm && xa && xb && xc && nm == na && na == nb && nb == nc && nm > 0);
    if (xm && xa && xb && xc)
        for (i = 0; i < nm; i++) {
            double ref = ((double)xa[i] + xb[i] + xc[i]) / 3.0;
            CHECK(fabs(xm[i] - ref) <= 1e-6 * (1.0 + fabs(ref)));
        }
    free(xm); free(xa); free(xb); free(xc);
    tm_checkpoint_free(ck); tm_checkpoint_free(ca); tm_checkpoint_free(cb); tm_checkpoint_free(cc);

    /* Mismatched keys are refused with the key named. */
    {
        tm_state_dict *e = NULL;
        int64_t shape[1] = {2};
        float v[2] = {1, 2};
        CHECK(tm_state_dict_new(&e) == TM_OK);
        CHECK(tm_state_dict_set(e, "only.here", TM_FLOAT32, 1, shape, v) == TM_OK);
        CHECK(tm_state_dict_size(e) == 1 && tm_state_dict_find(e, "only.here") == 0);
        CHECK(tm_state_dict_add(a, e, 1.0) == TM_ERROR_MISMATCH);
        CHECK(strstr(tm_errmsg(), "only.here") != NULL);
        tm_state_dict_free(e);
    }
    tm_state_dict_free(a); tm_state_dict_free(b); tm_state_dict_free(c);
    tm_state_dict_free(NULL);
}

/* A build without LibTorch (-DTORCHMERGE_WITH_TORCH=OFF) has no libtorchmerge_torch.so: the
 * in-memory state dicts fail with one line saying what is missing and how to build it. */
static void test_state_dict_needs_the_torch_half(void) {
    tm_state_dict *a = NULL;
    CHECK(tm_state_dict_load(path_of("sd_a.pt"), NULL, &a) == TM_ERROR_UNSUPPORTED);
    CHECK(a == NULL);
    CHECK(strstr(tm_errmsg(), "libtorchmerge_torch.so") != NULL);
    CHECK(strstr(tm_errmsg(), "-DTORCHMERGE_WITH_TORCH=ON") != NULL);
    CHECK(strchr(tm_errmsg(), '\n') == NULL);
}

static void test_merge_files_with_options(void) {
    const char *inputs[3];
    tm_merge_options o;
    tm_profile prof;
    double w[3] = {1.0, 1.0, 2.0};
    tm_param weights;
    tm_checkpoint *ck = NULL, *ca = NULL, *cc = NULL;
    size_t nm = 0, na = 0, nc = 0, i;
    float *xm, *xa, *xc;
    inputs[0] = path_of("sd_a.pt");
    inputs[1] = path_of("sd_a.pt");
    inputs[2] = path_of("sd_c.pt");
    tm_merge_options_init(&o);
    tm_profile_init(&prof);
    CHECK(o.struct_size == sizeof o && o.method == NULL && o.keys == TM_KEYS_STRICT && o.format == TM_FORMAT_AUTO);
    weights.name = "weights";
    weights.text = NULL;
    weights.numbers = w;
    weights.n_numbers = 3;
    o.method = "weighted_average";
    o.params = &weights;
    o.n_params = 1;
    o.profile = &prof;
    CHECK(tm_merge_files(inputs, 3, path_of("capi_weighted.pt"), &o) == TM_OK);
    CHECK(prof.load_calls > 0 && prof.merge_calls > 0 && prof.save_calls > 0);
    tm_checkpoint_open(path_of("capi_weighted.pt"), NULL, &ck);
    tm_checkpoint_open(path_of("sd_a.pt"), NULL, &ca);
    tm_checkpoint_open(path_of("sd_c.pt"), NULL, &cc);
    xm = read_f32(ck, "fc.weight", &nm);
    xa = read_f32(ca, "fc.weight", &na);
    xc = read_f32(cc, "fc.weight", &nc);
    CHECK(xm && xa && xc && nm == na && na == nc);
    if (xm && xa && xc)
        for (i = 0; i < nm; i++) {
            double ref = 0.5 * xa[i] + 0.5 * xc[i];
            CHECK(fabs(xm[i] - ref) <= 1e-6 * (1.0 + fabs(ref)));
        }
    free(xm); free(xa); free(xc);
    tm_checkpoint_free(ck); tm_checkpoint_free(ca); tm_checkpoint_free(cc);

    weights.n_numbers = 2;
    CHECK(tm_merge_files(inputs, 3, path_of("capi_bad.pt"), &o) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "weights") != NULL);
    inputs[1] = path_of("shape_mismatch.pt");
    CHECK(tm_merge_files(inputs, 2, path_of("capi_bad.pt"), NULL) == TM_ERROR_MISMATCH);
    CHECK(strstr(tm_errmsg(), "shape_mismatch.pt") != NULL);
    {
        FILE *f = fopen(path_of("capi_bad.pt"), "rb");
        CHECK(f == NULL); /* nothing written on failure */
        if (f) fclose(f);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FIXTURE_DIR\n", argv[0]);
        return 2;
    }
    sprintf(workdir, "%.1000s", argv[1]);
    test_status_and_dtype_tables();
    test_open_and_iterate();
    test_nested_checkpoint_found_by_key();
    test_errors_name_the_file();
    if (TM_TEST_WITH_TORCH)
        test_state_dict_add_mul_equals_mean();
    else
        test_state_dict_needs_the_torch_half();
    test_merge_files_with_options();
    return tm_check_summary();
}
