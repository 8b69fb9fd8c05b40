// The merge plan on files written by Python torch: key policies (strict, intersection, union),
// tensors sharing a storage (merged once as the whole storage, or, for formats without shared
// storage, split with exact aliases written once), and the output layout of each tensor. The
// expectations are written from how the files were made, not from the plan's code.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "merge/plan.h"
#include "test_support.hpp"

namespace {

// a0/a1: keys a,b,c / b,c,d. t0/t1: one storage of 6 floats seen as "w" (2x3), "w_tied" (the
// same view: an alias), "tail" (elements 3..5) and "t" (w transposed), plus "solo". u1: like t1
// but "w_tied" has a storage of its own (untied in that input).
const char *kScript = R"PY(
import sys, torch
d = sys.argv[1]
torch.manual_seed(0)
torch.save({"a": torch.randn(2), "b": torch.randn(3), "c": torch.randn(4)}, d + "/a0.pt")
torch.save({"b": torch.randn(3), "c": torch.randn(4), "d": torch.randn(5)}, d + "/a1.pt")
def tied(untie):
    base = torch.randn(6)
    w = base.view(2, 3)
    return {"w": w, "w_tied": w.clone() if untie else w, "tail": base[3:], "t": w.t(),
            "solo": torch.randn(2)}
torch.save(tied(False), d + "/t0.pt")
torch.save(tied(False), d + "/t1.pt")
torch.save(tied(True), d + "/u1.pt")
)PY";

struct Files {
    tm_test::TempDir dir{"plan"};
    Files() {
        std::string script = dir.path + "/make.py";
        tm_test::write_file(script, kScript);
        std::string cmd = std::string(TM_TEST_PYTHON) + " '" + script + "' '" + dir.path + "'";
        REQUIRE(std::system(cmd.c_str()) == 0);
    }
    std::string operator()(const char *name) const { return dir.path + "/" + name; }
};

const Files &files() {
    static Files f;
    return f;
}

struct Plan {
    std::vector<tm_checkpoint *> in;
    tm_plan plan{};
    tm_error err{};
    tm_status st = TM_OK;
    Plan(std::vector<std::string> paths, tm_key_policy keys, int split_shared) {
        for (auto &p : paths) {
            tm_checkpoint *ck = nullptr;
            REQUIRE(tm_checkpoint_open_err(files()(p.c_str()).c_str(), nullptr, &ck, &err) == TM_OK);
            in.push_back(ck);
        }
        tm_merge_options o;
        tm_merge_options_init(&o);
        o.keys = keys;
        st = tm_plan_build(&plan, in.data(), in.size(), &o, split_shared, &err);
    }
    ~Plan() {
        tm_plan_free(&plan);
        for (auto *ck : in) tm_checkpoint_free(ck);
    }
    std::vector<std::string> keys() const { return {plan.keys, plan.keys + plan.n_keys}; }
    size_t key(const std::string &name) const {
        for (size_t k = 0; k < plan.n_keys; k++)
            if (name == plan.keys[k]) return k;
        FAIL("no key " << name);
        return 0;
    }
    // Each unit as the names it writes.
    std::vector<std::vector<std::string>> units() const {
        std::vector<std::vector<std::string>> out;
        for (size_t u = 0; u < plan.n_units; u++) {
            out.emplace_back();
            for (size_t j = 0; j < plan.units[u].n_keys; j++) out.back().push_back(plan.keys[plan.units[u].keys[j]]);
        }
        return out;
    }
};

using Names = std::vector<std::string>;

}  // namespace

TEST_CASE("strict keys: differing names are refused, naming what each side lacks") {
    Plan p({"a0.pt", "a1.pt"}, TM_KEYS_STRICT, 0);
    REQUIRE(p.st == TM_ERROR_MISMATCH);
    std::string msg = p.err.msg;
    CHECK(msg.find("lacks 'a'") != std::string::npos);
    CHECK(msg.find("lacks: 'd'") != std::string::npos);
}

TEST_CASE("intersection keeps the common names in the first input's order") {
    Plan p({"a0.pt", "a1.pt"}, TM_KEYS_INTERSECTION, 0);
    REQUIRE(p.st == TM_OK);
    CHECK(p.keys() == Names{"b", "c"});
    for (size_t k = 0; k < 2; k++) {
        CHECK(tm_plan_where(&p.plan, k, 0) >= 0);
        CHECK(tm_plan_where(&p.plan, k, 1) >= 0);
    }
}

TEST_CASE("union keeps every name, the first input's then the new ones, and marks who lacks what") {
    Plan p({"a0.pt", "a1.pt"}, TM_KEYS_UNION, 0);
    REQUIRE(p.st == TM_OK);
    CHECK(p.keys() == Names{"a", "b", "c", "d"});
    CHECK(tm_plan_where(&p.plan, p.key("a"), 1) == -1);
    CHECK(tm_plan_where(&p.plan, p.key("d"), 0) == -1);
    CHECK(tm_plan_where(&p.plan, p.key("d"), 1) >= 0);
    CHECK(p.plan.n_units == 4);
    CHECK(p.plan.units[p.plan.unit_of[p.key("d")]].numel == 5);
}

TEST_CASE("a storage shared the same way in every input is merged once, whole") {
    Plan p({"t0.pt", "t1.pt"}, TM_KEYS_STRICT, 0);
    REQUIRE(p.st == TM_OK);
    CHECK(p.units() == std::vector<Names>{{"w", "w_tied", "tail", "t"}, {"solo"}});
    CHECK(p.plan.units[0].whole_storage == 1);
    CHECK(p.plan.units[0].numel == 6);
    // Views keep their layout in the whole storage; single tensors are written contiguous.
    int64_t stride[TM_MAX_NDIM], offset = -1;
    tm_plan_output_layout(&p.plan, p.in.data(), p.key("t"), stride, &offset);
    CHECK((stride[0] == 1 && stride[1] == 3 && offset == 0));
    tm_plan_output_layout(&p.plan, p.in.data(), p.key("tail"), stride, &offset);
    CHECK((stride[0] == 1 && offset == 3));
    tm_plan_output_layout(&p.plan, p.in.data(), p.key("solo"), stride, &offset);
    CHECK((stride[0] == 1 && offset == 0));
    for (size_t k = 0; k < p.plan.n_keys; k++) CHECK(p.plan.alias_of[k] == -1);
}

TEST_CASE("without shared storage in the output, views are split and exact aliases kept once") {
    Plan p({"t0.pt", "t1.pt"}, TM_KEYS_STRICT, 1);
    REQUIRE(p.st == TM_OK);
    CHECK(p.units() == std::vector<Names>{{"w"}, {"tail"}, {"t"}, {"solo"}});
    CHECK(p.plan.alias_of[p.key("w_tied")] == int64_t(p.key("w")));
    CHECK(p.plan.alias_of[p.key("t")] == -1);  // same storage, another view: not an alias
    int64_t stride[TM_MAX_NDIM], offset = -1;
    tm_plan_output_layout(&p.plan, p.in.data(), p.key("t"), stride, &offset);
    CHECK((stride[0] == 2 && stride[1] == 1 && offset == 0));  // contiguous 3x2
    for (const auto &u : p.units()) CHECK(u.size() == 1);
}

TEST_CASE("a storage tied in one input but not in another is merged tensor by tensor") {
    for (int split : {0, 1}) {
        Plan p({"t0.pt", "u1.pt"}, TM_KEYS_STRICT, split);
        REQUIRE(p.st == TM_OK);
        CHECK(p.plan.n_units == 5);
        for (size_t k = 0; k < p.plan.n_keys; k++) CHECK(p.plan.alias_of[k] == -1);
        for (size_t u = 0; u < p.plan.n_units; u++) CHECK(p.plan.units[u].whole_storage == 0);
    }
}

TEST_CASE("a storage whose views are only partly merged (union) is not merged whole") {
    // t0 against a0: none of t0's names is in a0, so every t0 key misses an input.
    Plan p({"t0.pt", "a0.pt"}, TM_KEYS_UNION, 0);
    REQUIRE(p.st == TM_OK);
    CHECK(p.plan.n_units == p.plan.n_keys);
    for (size_t u = 0; u < p.plan.n_units; u++) CHECK(p.plan.units[u].whole_storage == 0);
}
