// The small filesystem helpers (core/fs, the temporary-name rule of core/atomic_output) and the
// metadata an output records (merge/output_metadata): the messages and limits the merge and the
// readers rely on.
#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "core/atomic_output.h"
#include "core/fs.h"
#include "merge/merge_unit.h"
#include "merge/output_metadata.h"
#include "test_support.hpp"

using tm_test::TempDir;

TEST_CASE("tm_fs_write_file creates, fsyncs and refuses to replace", "[fs]") {
    TempDir d("fs");
    std::string p = d.path + "/a.json";
    tm_error err{};
    REQUIRE(tm_fs_write_file(p.c_str(), "{}\n", 3, &err) == TM_OK);
    CHECK(tm_test::read_file(p) == tm_test::Bytes{'{', '}', '\n'});
    CHECK(tm_fs_write_file(p.c_str(), "x", 1, &err) == TM_ERROR_IO);
    CHECK(std::string(err.msg) == p + ": cannot create: File exists");
}

TEST_CASE("tm_fs_read_file reads whole files, NUL-terminated, up to a limit", "[fs]") {
    TempDir d("fs");
    std::string p = d.path + "/f";
    std::string text(10000, 'x');
    tm_test::write_file(p, text);
    char *buf = nullptr;
    size_t len = 0;
    tm_error err{};
    REQUIRE(tm_fs_read_file(p.c_str(), SIZE_MAX, nullptr, &buf, &len, &err) == TM_OK);
    CHECK(len == text.size());
    CHECK(std::string(buf) == text);
    std::free(buf);
    // Exactly the limit is fine; one byte more is not, whether it ends inside a read or not.
    REQUIRE(tm_fs_read_file(p.c_str(), 10000, nullptr, &buf, &len, &err) == TM_OK);
    std::free(buf);
    for (size_t limit : {9999, 4096, 100}) {
        buf = nullptr;
        CHECK(tm_fs_read_file(p.c_str(), limit, "the recipe", &buf, &len, &err) == TM_ERROR_LIMIT);
        CHECK(buf == nullptr);
        CHECK(std::string(err.msg) == p + ": the recipe may hold at most " + std::to_string(limit) + " bytes");
    }
    std::string missing = d.path + "/missing.yaml";
    CHECK(tm_fs_read_file(missing.c_str(), 100, "the recipe", &buf, &len, &err) == TM_ERROR_NOT_FOUND);
    CHECK(std::string(err.msg) == missing + ": cannot open the recipe: No such file or directory");
    CHECK(tm_fs_read_file(missing.c_str(), 100, nullptr, &buf, &len, &err) == TM_ERROR_NOT_FOUND);
    CHECK(std::string(err.msg) == missing + ": cannot open: No such file or directory");
    // An empty file is an empty string, not an error.
    std::string empty = d.path + "/empty";
    tm_test::write_file(empty, "");
    REQUIRE(tm_fs_read_file(empty.c_str(), 0, nullptr, &buf, &len, &err) == TM_OK);
    CHECK(len == 0);
    CHECK(buf[0] == '\0');
    std::free(buf);
}

TEST_CASE("flat folders are removed whole; folder outputs are recognised", "[fs]") {
    TempDir d("fs");
    std::string sub = d.path + "/shards";
    REQUIRE(mkdir(sub.c_str(), 0777) == 0);
    tm_test::write_file(sub + "/a", "1");
    tm_test::write_file(sub + "/.hidden", "2");
    CHECK(tm_fs_is_folder_output(sub.c_str()));
    CHECK(tm_fs_is_folder_output((d.path + "/not_yet/").c_str()));
    CHECK(!tm_fs_is_folder_output((d.path + "/not_yet").c_str()));
    CHECK(!tm_fs_is_folder_output((sub + "/a").c_str()));
    tm_fs_remove_flat_folder(sub.c_str());
    struct stat sb;
    CHECK(stat(sub.c_str(), &sb) != 0);
}

TEST_CASE("temporaries are hidden beside their target, a folder's beside the folder", "[fs]") {
    char *a = tm_temporary_name("/x/y/model.pt", "tmp");
    char *b = tm_temporary_name("/x/y/soup//", "tmp");
    char *c = tm_temporary_name("model.pt", "greedy");
    CHECK(std::string(a) == "/x/y/.model.pt.tmp.XXXXXX");
    CHECK(std::string(b) == "/x/y/.soup.tmp.XXXXXX");
    CHECK(std::string(c) == "./.model.pt.greedy.XXXXXX");
    std::free(a);
    std::free(b);
    std::free(c);
}

TEST_CASE("the output metadata records the merge in a fixed order", "[fs][metadata]") {
    tm_merge_options o;
    tm_merge_options_init(&o);
    double w[2] = {0.25, 0.75};
    tm_param weights = {"weights", nullptr, w, 2};
    o.method = "weighted_average";
    o.params = &weights;
    o.n_params = 1;
    o.recipe_text = "method: weighted_average\n";
    merge_ctx c{};
    c.o = &o;
    c.n = 2;
    tm_error err{};
    REQUIRE(tm_merge_method(&c, &err) == TM_OK);
    const char *paths[2] = {"/models/a.pt", "b.safetensors"};
    tm_output_metadata m{};
    REQUIRE(tm_output_metadata_build(&c, paths, &m, &err) == TM_OK);
    REQUIRE(m.n == 8);
    const char *keys[] = {"format", "torchmerge_version", "torchmerge_method", "torchmerge_params",
                          "torchmerge_weights", "torchmerge_normalize", "torchmerge_inputs", "torchmerge_recipe"};
    for (size_t i = 0; i < m.n; i++) CHECK(std::string(m.keys[i]) == keys[i]);
    CHECK(std::string(m.values[2]) == "weighted_average");
    CHECK(std::string(m.values[3]) == "{\"weights\":[0.25,0.75],\"normalize\":true}");
    CHECK(std::string(m.values[4]) == "[0.25,0.75]");
    CHECK(std::string(m.values[5]) == "true");
    CHECK(std::string(m.values[6]) == "[\"a.pt\",\"b.safetensors\"]");
    CHECK(std::string(m.values[7]) == o.recipe_text);
    tm_output_metadata_free(&m);
    CHECK(m.n == 0);
    tm_param_values_free(&c.params);
}
