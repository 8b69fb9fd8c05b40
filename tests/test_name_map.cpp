// The one name -> index map (csrc/core/name_map.h) against std::unordered_map: growth from empty
// past many doublings, duplicates refused with the first value kept, lookups of absent names,
// keys that collide in their low hash bits.
#include <catch2/catch.hpp>

#include <string>
#include <unordered_map>
#include <vector>

#include "core/name_map.h"

TEST_CASE("name map: grows from empty, keeps the first value of a name, agrees with std::unordered_map") {
    tm_name_map m = TM_NAME_MAP_INIT;
    std::vector<std::string> names;
    for (int i = 0; i < 100000; i++) names.push_back("model.layers." + std::to_string(i % 977) + ".experts." + std::to_string(i));
    std::unordered_map<std::string, size_t> ref;
    for (size_t i = 0; i < names.size(); i++) {
        REQUIRE(tm_name_map_insert(&m, names[i].c_str(), i, nullptr) == 0);
        ref.emplace(names[i], i);
    }
    CHECK(m.count == names.size());
    size_t existing = 0;
    CHECK(tm_name_map_insert(&m, names[123].c_str(), 7, &existing) == 1);  // a duplicate
    CHECK(existing == 123);
    for (const auto &[name, idx] : ref) {
        size_t v = SIZE_MAX;
        REQUIRE(tm_name_map_find(&m, name.c_str(), &v) == 1);
        REQUIRE(v == idx);
    }
    size_t v = 0;
    CHECK(tm_name_map_find(&m, "model.layers.0.experts.100000", &v) == 0);
    CHECK(tm_name_map_find(&m, "", &v) == 0);
    tm_name_map_free(&m);
    CHECK(tm_name_map_find(&m, names[0].c_str(), &v) == 0);  // a freed map is empty, and reusable
    CHECK(tm_name_map_insert(&m, "", 5, nullptr) == 0);         // the empty name is a name
    CHECK((tm_name_map_find(&m, "", &v) == 1 && v == 5));
    tm_name_map_free(&m);
}

TEST_CASE("name map: reserve sizes once, and refuses sizes that overflow") {
    tm_name_map m = TM_NAME_MAP_INIT;
    REQUIRE(tm_name_map_reserve(&m, 1000) == 0);
    const uint64_t *slots = m.slots;
    std::vector<std::string> names;
    for (int i = 0; i < 1000; i++) names.push_back(std::to_string(i));
    for (size_t i = 0; i < names.size(); i++) REQUIRE(tm_name_map_insert(&m, names[i].c_str(), i, nullptr) == 0);
    CHECK(m.slots == slots);  // no regrowth after reserving
    CHECK(tm_name_map_reserve(&m, SIZE_MAX / 2) == -1);
    CHECK(m.slots == slots);  // unchanged by a refused reserve
    tm_name_map_free(&m);
}
