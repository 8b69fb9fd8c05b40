/* Fuzz target: the legacy (non-zip) torch.save reader (csrc/formats/legacy_pt.h): five pickles
 * in a row, then raw storage records. */
#include "fuzz_common.h"

#include "formats/legacy_pt.h"
#include "formats/state_dict_walk.h"

int TM_FUZZ_ENTRY(const uint8_t *data, size_t size) {
    tm_error err = {0};
    tm_legacy_pt *lp = NULL;
    (void)tm_legacy_pt_looks_like(data, size);
    tm_status st = tm_legacy_pt_open(data, size, "fuzz.pt", &lp, &err);
    tm_fuzz_check_error(st, &err);
    if (st) {
        if (lp) TM_FUZZ_FAIL("failed open returned a reader");
        return 0;
    }
    tm_pickle_limits lim; /* the legacy reader unpickles with the defaults */
    tm_pickle_limits_default(&lim);
    tm_fuzz_walk w = {1000000, lim.max_depth};
    tm_fuzz_walk_value(&w, tm_legacy_pt_root(lp), 0, 0);
    for (size_t i = 0; i < tm_legacy_pt_n_storages(lp); i++) {
        const char *key = NULL;
        uint64_t off = 0, n = 0;
        if (tm_legacy_pt_storage_at(lp, i, &key, &off, &n)) TM_FUZZ_FAIL("storage_at(%zu) failed", i);
        if (!key || off > size || n > size - off) TM_FUZZ_FAIL("storage %zu outside the file", i);
        tm_fuzz_touch(data + off, n);
    }
    tm_named_tensors nt;
    tm_error werr = {0};
    st = tm_state_dict_walk(tm_legacy_pt_root(lp), NULL, "fuzz.pt", &nt, &werr);
    tm_fuzz_check_error(st, &werr);
    for (size_t i = 0; !st && i < nt.n; i++) {
        const tm_pk_value *t = nt.items[i].tensor;
        uint64_t off = 0, n = 0;
        tm_error serr = {0};
        tm_status s2 = tm_legacy_pt_storage(lp, t->u.tensor.storage, &off, &n, &serr);
        tm_fuzz_check_error(s2, &serr);
        if (s2) continue;
        if (off > size || n > size - off) TM_FUZZ_FAIL("tensor storage outside the file");
        tm_fuzz_touch(data + off, n);
    }
    tm_named_tensors_free(&nt);
    tm_legacy_pt_free(lp);
    return 0;
}
