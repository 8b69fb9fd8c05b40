/* Fuzz target: the safe unpickler (csrc/formats/pickle.h) on one pickle stream, as found in a
 * torch.save zip's data.pkl or a TorchScript archive's data.pkl/constants.pkl, then the
 * state-dict discovery that runs on its result. */
#include "fuzz_common.h"

#include "formats/state_dict_walk.h"

int TM_FUZZ_ENTRY(const uint8_t *data, size_t size) {
    tm_error err = {0};
    tm_pickle *pk = NULL;
    size_t consumed = 0;
    tm_pickle_limits lim;
    tm_pickle_limits_default(&lim);
    tm_status st = tm_pickle_load(data, size, "fuzz.pt: data.pkl", NULL, &pk, &consumed, &err);
    tm_fuzz_check_error(st, &err);
    if (st) {
        if (pk) TM_FUZZ_FAIL("failed load returned a pickle");
        return 0;
    }
    if (consumed == 0 || consumed > size) TM_FUZZ_FAIL("consumed %zu of %zu bytes", consumed, size);
    tm_fuzz_walk w = {1000000, lim.max_depth};
    tm_fuzz_walk_value(&w, tm_pickle_root(pk), 0, 0);
    for (size_t i = 0; i < tm_pickle_n_storages(pk); i++) {
        const tm_pk_value *s = tm_pickle_storage(pk, i);
        if (!s || s->kind != TM_PK_STORAGE) TM_FUZZ_FAIL("storage %zu is not a storage", i);
        tm_fuzz_walk_value(&w, s, 0, 0);
    }
    if (tm_pickle_storage(pk, tm_pickle_n_storages(pk))) TM_FUZZ_FAIL("storage past the end");

    static const char *const keys[] = {NULL, "state_dict"};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        tm_named_tensors nt;
        tm_error werr = {0};
        st = tm_state_dict_walk(tm_pickle_root(pk), keys[k], "fuzz.pt", &nt, &werr);
        tm_fuzz_check_error(st, &werr);
        if (!st) {
            if (!nt.key) TM_FUZZ_FAIL("state dict walk without a key");
            for (size_t i = 0; i < nt.n; i++) {
                if (!nt.items[i].name) TM_FUZZ_FAIL("tensor %zu without a name", i);
                if (!nt.items[i].tensor || nt.items[i].tensor->kind != TM_PK_TENSOR)
                    TM_FUZZ_FAIL("state dict entry '%s' is not a tensor", nt.items[i].name);
            }
        }
        tm_named_tensors_free(&nt);
    }
    tm_pickle_free(pk);
    return 0;
}
