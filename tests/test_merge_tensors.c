/* tm_merge_tensors: one tensor in the caller's memory merged by the method code of a file
 * merge. Checked against float64 references computed here (rounded once by the C cast from
 * double to float), with strided inputs, parameters as name/value pairs, an older caller's
 * shorter tm_tensor_data, and each bad argument's message. Plain C99. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "c_check.h"
#include "torchmerge.h"

static tm_tensor_data f32(const float *data, int32_t ndim, const int64_t *shape, const int64_t *stride) {
    tm_tensor_data t;
    tm_tensor_data_init(&t);
    t.dtype = TM_FLOAT32;
    t.ndim = ndim;
    t.shape = shape;
    t.stride = stride;
    t.data = data;
    return t;
}

/* weighted_average of three 2x3 float32 tensors: Σ wᵢxᵢ / Σ wᵢ in double, rounded once. */
static void test_weighted_average_is_rounded_once(void) {
    static const float x[3][6] = {{1.f, 2.f, 3.f, 4.f, 5.f, 6.f},
                                  {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f},
                                  {-7.f, 1e-3f, 3.25f, 1e7f, -2.f, 0.f}};
    static const int64_t shape[2] = {2, 3};
    tm_tensor_data in[3];
    double w[3] = {0.2, 0.5, 0.3};
    tm_param p[1];
    tm_merge_options o;
    float out[6];
    int i, e, exact = 1;
    for (i = 0; i < 3; i++) in[i] = f32(x[i], 2, shape, NULL);
    p[0].name = "weights";
    p[0].text = NULL;
    p[0].numbers = w;
    p[0].n_numbers = 3;
    tm_merge_options_init(&o);
    o.method = "weighted_average";
    o.params = p;
    o.n_params = 1;
    CHECK(tm_merge_tensors(in, 3, NULL, "w", &o, TM_FLOAT32, out) == TM_OK);
    for (e = 0; e < 6; e++) {
        double s = 0;
        for (i = 0; i < 3; i++) s += w[i] * (double)x[i][e];
        exact = exact && out[e] == (float)(s / (w[0] + w[1] + w[2]));
    }
    CHECK(exact);
}

/* task_arithmetic on a transposed (strided) input: b + λ Σ (xᵢ − b), elements in the row-major
 * order of the shape, whatever the strides. */
static void test_task_arithmetic_reads_strided_inputs(void) {
    static const float base[6] = {1, 2, 3, 4, 5, 6};
    static const float a[6] = {1.5f, 2, 3, 4, 5, 7};
    static const float at[6] = {10, 40, 20, 50, 30, 60}; /* a 3x2 buffer read as its 2x3 transpose */
    static const int64_t shape[2] = {2, 3}, tstride[2] = {1, 2};
    tm_tensor_data in[2], b;
    tm_param p[1];
    tm_merge_options o;
    float out[6];
    int e, exact = 1;
    static const float t_elems[6] = {10, 20, 30, 40, 50, 60};
    in[0] = f32(a, 2, shape, NULL);
    in[1] = f32(at, 2, shape, tstride);
    b = f32(base, 2, shape, NULL);
    p[0].name = "lambda";
    p[0].text = "0.3";
    p[0].numbers = NULL;
    p[0].n_numbers = 0;
    tm_merge_options_init(&o);
    o.method = "task_arithmetic";
    o.params = p;
    o.n_params = 1;
    CHECK(tm_merge_tensors(in, 2, &b, "t", &o, TM_FLOAT32, out) == TM_OK);
    for (e = 0; e < 6; e++) {
        double d = ((double)a[e] - base[e]) + ((double)t_elems[e] - base[e]);
        exact = exact && out[e] == (float)(base[e] + 0.3 * d);
    }
    CHECK(exact);
}

/* A 0-d tensor, and float64 output. */
static void test_zero_dim_to_float64(void) {
    static const float x[2] = {1.25f, -3.5f};
    tm_tensor_data in[2];
    double out = 0;
    in[0] = f32(&x[0], 0, NULL, NULL);
    in[1] = f32(&x[1], 0, NULL, NULL);
    CHECK(tm_merge_tensors(in, 2, NULL, "s", NULL, TM_FLOAT64, &out) == TM_OK);
    CHECK(out == (1.25 - 3.5) / 2);
}

static void test_errors_name_the_problem(void) {
    static const float x[6] = {0};
    static const int64_t s23[2] = {2, 3}, s32[2] = {3, 2};
    static const int64_t ints[6] = {0};
    tm_tensor_data in[2];
    tm_merge_options o;
    float out[6];
    in[0] = f32(x, 2, s23, NULL);
    in[1] = f32(x, 2, s32, NULL);
    CHECK(tm_merge_tensors(in, 2, NULL, "w", NULL, TM_FLOAT32, out) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "tensor 'w'") && strstr(tm_errmsg(), "shape"));
    in[1] = in[0];
    in[1].dtype = TM_INT64;
    in[1].data = ints;
    CHECK(tm_merge_tensors(in, 2, NULL, "w", NULL, TM_FLOAT32, out) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "int64") != NULL);
    in[1] = in[0];
    tm_merge_options_init(&o);
    o.method = "task_arithmetic";
    CHECK(tm_merge_tensors(in, 2, NULL, "w", &o, TM_FLOAT32, out) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tm_errmsg(), "base") != NULL);
    CHECK(tm_merge_tensors(in, 2, NULL, "w", NULL, TM_INT32, out) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(tm_merge_tensors(in, 0, NULL, "w", NULL, TM_FLOAT32, out) == TM_ERROR_INVALID_ARGUMENT);
    in[1].struct_size = 0; /* never initialised */
    CHECK(tm_merge_tensors(in, 2, NULL, "w", NULL, TM_FLOAT32, out) == TM_ERROR_INVALID_ARGUMENT);
}

int main(void) {
    test_weighted_average_is_rounded_once();
    test_task_arithmetic_reads_strided_inputs();
    test_zero_dim_to_float64();
    test_errors_name_the_problem();
    return tm_check_summary();
}
