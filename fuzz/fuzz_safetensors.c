/* Fuzz target: the safetensors header parser and validator (csrc/formats/safetensors.h). */
#include "fuzz_common.h"

#include "formats/safetensors.h"

int TM_FUZZ_ENTRY(const uint8_t *data, size_t size) {
    tm_error err = {0};
    tm_safetensors *st = NULL;
    (void)tm_safetensors_looks_like(data, size);
    tm_status s = tm_safetensors_open(data, size, "fuzz.safetensors", &st, &err);
    tm_fuzz_check_error(s, &err);
    if (s) {
        if (st) TM_FUZZ_FAIL("failed open returned a reader");
        return 0;
    }
    uint64_t off = tm_safetensors_data_offset(st), dsize = tm_safetensors_data_size(st);
    if (off > size || dsize != size - off) TM_FUZZ_FAIL("data section outside the file");
    for (size_t i = 0; i < tm_safetensors_count(st); i++) {
        const tm_st_tensor *t = tm_safetensors_tensor(st, i);
        if (!t || !t->name) TM_FUZZ_FAIL("tensor %zu missing", i);
        if (t->begin > t->end || t->end > dsize) TM_FUZZ_FAIL("tensor '%s' outside the data", t->name);
        if (t->end - t->begin != t->numel * tm_dtype_size(t->dtype))
            TM_FUZZ_FAIL("tensor '%s' size differs from its shape", t->name);
        if (tm_safetensors_find(st, t->name) != (int64_t)i) TM_FUZZ_FAIL("find('%s') != %zu", t->name, i);
        tm_fuzz_touch(tm_safetensors_tensor_data(st, i), t->end - t->begin);
    }
    for (size_t i = 0; i < tm_safetensors_metadata_count(st); i++) {
        const char *k = tm_safetensors_metadata_key(st, i), *v = tm_safetensors_metadata_value(st, i);
        if (!k || !v || tm_safetensors_metadata_find(st, k) != v) TM_FUZZ_FAIL("metadata %zu", i);
    }
    tm_safetensors_free(st);
    return 0;
}
