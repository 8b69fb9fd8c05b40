// Recipe parsing (csrc/recipe/): the method and its parameters come from the method table, in
// FusionBench's and mergekit's shapes; errors name the recipe, line and column. The models are
// empty files: loading a recipe only checks that they exist.
#include <cmath>
#include <string>

#include "recipe/recipe.h"
#include "test_support.hpp"

namespace {

struct Loaded {
    tm_recipe r{};
    tm_error err{};
    tm_status st;
    explicit Loaded(const std::string &yaml, std::vector<std::string> overrides = {}) {
        std::vector<const char *> ov;
        for (auto &o : overrides) ov.push_back(o.c_str());
        st = tm_recipe_load(&r, yaml.c_str(), 0, ov.data(), ov.size(), nullptr, nullptr, &err);
    }
    ~Loaded() { tm_recipe_free(&r); }
    const tm_param *param(const char *name) const {
        for (size_t k = 0; k < r.n_params; k++)
            if (std::string(r.params[k].name) == name) return &r.params[k];
        return nullptr;
    }
};

struct Models {
    tm_test::TempDir dir;
    std::string a, b, c;
    Models() : a(dir.path + "/a.pt"), b(dir.path + "/b.pt"), c(dir.path + "/c.pt") {
        for (auto *p : {&a, &b, &c}) tm_test::write_file(*p, std::string());
    }
    std::string list() const { return "[" + a + ", " + b + ", " + c + "]"; }
};

}  // namespace

TEST_CASE("FusionBench method configs give the method and its parameters", "[recipe]") {
    Models m;
    Loaded l("name: weighted_average\nnormalize: false\nweights: [0.2, 0.3, 0.5]\nmodels: " + m.list() +
             "\noutput: out.pt\n");
    REQUIRE(l.st == TM_OK);
    CHECK(std::string(l.r.method->name) == "weighted_average");
    const tm_param *w = l.param("weights");
    REQUIRE(w);
    REQUIRE(w->n_numbers == 3);
    CHECK(w->numbers[0] == 0.2);
    CHECK(w->numbers[2] == 0.5);
    const tm_param *n = l.param("normalize");
    REQUIRE(n);
    CHECK(std::string(n->text) == "false");
    CHECK(!l.r.per_tensor);
}

TEST_CASE("a recipe without a method name gets the first method taking its parameters", "[recipe]") {
    Models m;
    Loaded plain("models: " + m.list() + "\noutput: out.pt\n");
    REQUIRE(plain.st == TM_OK);
    CHECK(std::string(plain.r.method->name) == "simple_average");
    Loaded weighted("method: {weights: [1, 2, 3]}\nmodels: " + m.list() + "\noutput: out.pt\n");
    REQUIRE(weighted.st == TM_OK);
    CHECK(std::string(weighted.r.method->name) == "weighted_average");
}

TEST_CASE("FusionBench's _target_ class names a method of the table", "[recipe]") {
    Models m;
    Loaded l("_target_: fusion_bench.method.WeightedAverageAlgorithm\nweights: [1, 1, 2]\nmodels: " + m.list() +
             "\noutput: out.pt\n");
    REQUIRE(l.st == TM_OK);
    CHECK(std::string(l.r.method->name) == "weighted_average");
}

TEST_CASE("mergekit per-model weights and per-tensor rules resolve per tensor", "[recipe]") {
    Models m;
    std::string yaml = "merge_method: linear\nmodels:\n"
                       "  - model: " + m.a + "\n    parameters: {weight: [{filter: lm_head, value: 0}, {value: 2}]}\n"
                       "  - model: " + m.b + "\n    parameters: {weight: 1}\n"
                       "  - model: " + m.c + "\n"
                       "parameters: {weight: 3, normalize: false}\noutput: out.pt\n";
    Loaded l(yaml);
    REQUIRE(l.st == TM_OK);
    CHECK(std::string(l.r.method->name) == "weighted_average");
    CHECK(l.r.per_tensor);
    const tm_param *w = l.param("weights");
    REQUIRE(w);
    REQUIRE(w->n_numbers == 3);
    CHECK(w->numbers[0] == 2);  // the catch-all rule
    CHECK(w->numbers[1] == 1);
    CHECK(w->numbers[2] == 3);  // the top-level default
    double v[3] = {9, 9, 9};
    tm_recipe_tensor_param(&l.r, "model.lm_head.weight", "weights", 3, v);
    CHECK(v[0] == 0);
    CHECK(v[1] == 1);
    CHECK(v[2] == 3);
    tm_recipe_tensor_param(&l.r, "model.embed.weight", "weights", 3, v);
    CHECK(v[0] == 2);
}

TEST_CASE("max_shard_size reads the one byte-size grammar", "[recipe]") {
    Models m;
    Loaded l("name: simple_average\nmodels: " + m.list() + "\nmax_shard_size: 2GB\noutput: out/\n");
    REQUIRE(l.st == TM_OK);
    CHECK(l.r.max_shard_size == 2000000000ull);
    Loaded gib("name: simple_average\nmodels: " + m.list() + "\nmax_shard_size: 2GiB\noutput: out/\n");
    CHECK(gib.r.max_shard_size == (2ull << 30));
    Loaded bad("name: simple_average\nmodels: " + m.list() + "\nmax_shard_size: lots\noutput: out/\n");
    CHECK(bad.st == TM_ERROR_INVALID_ARGUMENT);
    CHECK_THAT(bad.err.msg, Catch::Contains("<recipe>:3:17: max_shard_size") && Catch::Contains("'lots'"));
}

TEST_CASE("recipe errors name the line, the column and the parameter", "[recipe]") {
    Models m;
    struct Case {
        std::string yaml, needle;
    } cases[] = {
        {"name: fisher_merging\nmodels: " + m.list() + "\noutput: o.pt\n",
         "<recipe>:1:7: unknown method 'fisher_merging' (torchmerge runs simple_average, weighted_average (linear)"},
        {"name: simple_average\nweights: [1, 2, 3]\nmodels: " + m.list() + "\noutput: o.pt\n",
         "<recipe>:2:10: simple_average takes no weights (methods that do: weighted_average, task_arithmetic"},
        {"name: weighted_average\nweights: [1, 2]\nmodels: " + m.list() + "\noutput: o.pt\n",
         "<recipe>:2:10: expected 3 weights (one per model), got 2"},
        {"name: weighted_average\nweights: [1, -1, 0]\nmodels: " + m.list() + "\noutput: o.pt\n",
         "<recipe>:2:10: the weights sum to 0"},
        {"name: weighted_average\nmodels: " + m.list() + "\noutput: o.pt\n", "<recipe>:1:7: weighted_average needs weights"},
        {"name: weighted_average\nnormalize: sometimes\nweights: [1, 2, 3]\nmodels: " + m.list() + "\noutput: o.pt\n",
         "<recipe>:2:12: normalize: expected true or false, got 'sometimes'"},
        {"name: weighted_average\nweights: ???\nmodels: " + m.list() + "\noutput: o.pt\n",
         "<recipe>:2:10: weights is mandatory ('?\?\?')"},
        {"name: weighted_average\nweights: [1, 2, 3]\nmethod: {weights: [1, 2, 3]}\nmodels: " + m.list() +
             "\noutput: o.pt\n",
         "weights is given twice: as weights (line 2) and as method.weights (line 3)"},
    };
    for (auto &c : cases) {
        INFO(c.yaml);
        Loaded l(c.yaml);
        CHECK(l.st != TM_OK);
        CHECK_THAT(l.err.msg, Catch::Contains(c.needle));
    }
}

TEST_CASE("overrides set method parameters like any key", "[recipe]") {
    Models m;
    Loaded l("name: weighted_average\nweights: ???\nmodels: " + m.list() + "\noutput: o.pt\n",
             {"weights=[1,1,2]", "normalize=false"});
    REQUIRE(l.st == TM_OK);
    const tm_param *w = l.param("weights");
    REQUIRE(w);
    CHECK(w->numbers[2] == 2);
    CHECK(std::string(l.param("normalize")->text) == "false");
}
