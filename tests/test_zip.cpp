// Zip reader and writer: round trips, interoperability with Python's zipfile and torch, and
// hostile input (truncation, corruption, zip bombs) that must fail cleanly.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "formats/zip_reader.h"
#include "formats/zip_writer.h"
#include "formats/zip_writer_testing.h"
#include "test_support.hpp"

namespace {

using tm_test::Bytes;

const char *kPython = TM_TEST_PYTHON;

// Zip members are named *.zip only for the humans reading a failed test's paths.
struct TempFile : tm_test::TempFile {
    explicit TempFile(const char *suffix = ".zip") : tm_test::TempFile(suffix) {}
};
using tm_test::read_file;

int run_python(const std::string &script, const std::string &arg) {
    std::string cmd = std::string(kPython) + " -c \"" + script + "\" '" + arg + "' >/dev/null";
    return std::system(cmd.c_str());
}

uint32_t crc_of(const Bytes &b) {
    return (uint32_t)crc32(crc32(0L, Z_NULL, 0), b.data(), (uInt)b.size());
}

Bytes pattern(size_t n, uint32_t seed) {
    Bytes b(n);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        b[i] = (uint8_t)(x >> 24);
    }
    return b;
}

Bytes raw_deflate(const Bytes &in) {
    z_stream zs{};
    REQUIRE(deflateInit2(&zs, 9, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY) == Z_OK);
    Bytes out(deflateBound(&zs, (uLong)in.size()) + 16);
    zs.next_in = const_cast<Bytef *>(in.data());
    zs.avail_in = (uInt)in.size();
    zs.next_out = out.data();
    zs.avail_out = (uInt)out.size();
    REQUIRE(deflate(&zs, Z_FINISH) == Z_STREAM_END);
    out.resize(zs.total_out);
    deflateEnd(&zs);
    return out;
}

struct Member {
    std::string name;
    Bytes data;
};

// Writes members with our writer; threshold lowers the zip64 switch (0 = default).
void write_archive(const std::string &path, const std::vector<Member> &members,
                   uint64_t zip64_threshold = 0) {
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    REQUIRE(fd >= 0);
    tm_error err{};
    tm_zip_writer *zw = nullptr;
    REQUIRE(tm_zip_writer_open(fd, path.c_str(), &zw, &err) == TM_OK);
    if (zip64_threshold) tm_zip_writer_set_zip64_threshold(zw, zip64_threshold);
    for (const Member &m : members) {
        INFO(err.msg);
        REQUIRE(tm_zip_writer_add(zw, m.name.c_str(), m.data.data(), m.data.size(), &err) ==
                TM_OK);
    }
    INFO(err.msg);
    REQUIRE(tm_zip_writer_finish(zw, &err) == TM_OK);
    tm_zip_writer_free(zw);
    close(fd);
}

Bytes write_to_bytes(const std::vector<Member> &members, uint64_t zip64_threshold = 0) {
    TempFile tmp;
    write_archive(tmp.path, members, zip64_threshold);
    return read_file(tmp.path);
}

std::vector<Member> sample_members() {
    return {
        {"archive/data.pkl", pattern(300, 1)},
        {"archive/data/0", pattern(1 << 20, 2)},
        {"archive/empty", {}},
        {"archive/data/1", pattern(7, 3)},
        {"archive/version", {'3', '\n'}},
    };
}

// Opens buf and checks that every member reads back as expected, 64-byte aligned.
void check_archive(const Bytes &buf, const std::vector<Member> &members) {
    tm_error err{};
    tm_zip_reader *zr = nullptr;
    INFO(err.msg);
    REQUIRE(tm_zip_reader_open(buf.data(), buf.size(), "t.zip", &zr, &err) == TM_OK);
    REQUIRE(tm_zip_reader_count(zr) == members.size());
    for (size_t i = 0; i < members.size(); i++) {
        const Member &m = members[i];
        const tm_zip_entry *e = tm_zip_reader_entry(zr, i);
        REQUIRE(e != nullptr);
        CHECK(std::string(e->name) == m.name);
        CHECK(tm_zip_reader_find(zr, m.name.c_str()) == e);
        CHECK(e->method == 0);
        CHECK(e->size == m.data.size());
        CHECK(e->comp_size == m.data.size());
        CHECK(e->data_offset % 64 == 0);
        CHECK(e->crc32 == crc_of(m.data));
        const uint8_t *bytes = nullptr;
        uint8_t *owned = nullptr;
        REQUIRE(tm_zip_reader_read(zr, e, UINT64_MAX, &bytes, &owned, &err) == TM_OK);
        CHECK(owned == nullptr);  // stored members are not copied
        CHECK(bytes == buf.data() + e->data_offset);
        CHECK(Bytes(bytes, bytes + e->size) == m.data);
    }
    CHECK(tm_zip_reader_entry(zr, members.size()) == nullptr);
    CHECK(tm_zip_reader_find(zr, "missing") == nullptr);
    tm_zip_reader_free(zr);
}

// A hand-built archive member, for inputs our writer would never produce.
struct RawMember {
    std::string name;
    uint16_t method;
    Bytes comp;
    uint64_t size;
    uint32_t crc;
    uint16_t flags;
    bool mark_sizes = false;  // central directory sizes set to the zip64 marker
    Bytes cd_extra;
    RawMember(std::string n, uint16_t meth, Bytes c, uint64_t sz, uint32_t cr, uint16_t fl = 0)
        : name(std::move(n)), method(meth), comp(std::move(c)), size(sz), crc(cr), flags(fl) {}
};

void put16(Bytes &b, uint32_t v) {
    b.push_back((uint8_t)v);
    b.push_back((uint8_t)(v >> 8));
}
void put32(Bytes &b, uint32_t v) {
    put16(b, v & 0xFFFF);
    put16(b, v >> 16);
}
void set32(Bytes &b, size_t at, uint32_t v) {
    for (int i = 0; i < 4; i++) b[at + i] = (uint8_t)(v >> (8 * i));
}
void set16(Bytes &b, size_t at, uint32_t v) {
    b[at] = (uint8_t)v;
    b[at + 1] = (uint8_t)(v >> 8);
}

Bytes build_zip(const std::vector<RawMember> &ms, const std::string &comment = "") {
    Bytes out, cd;
    for (const RawMember &m : ms) {
        uint32_t off = (uint32_t)out.size();
        put32(out, 0x04034b50);
        put16(out, 20);
        put16(out, m.flags);
        put16(out, m.method);
        put16(out, 0);
        put16(out, 0x21);
        put32(out, m.crc);
        put32(out, (uint32_t)m.comp.size());
        put32(out, (uint32_t)m.size);
        put16(out, (uint32_t)m.name.size());
        put16(out, 0);
        out.insert(out.end(), m.name.begin(), m.name.end());
        out.insert(out.end(), m.comp.begin(), m.comp.end());

        put32(cd, 0x02014b50);
        put16(cd, 20);
        put16(cd, 20);
        put16(cd, m.flags);
        put16(cd, m.method);
        put16(cd, 0);
        put16(cd, 0x21);
        put32(cd, m.crc);
        put32(cd, m.mark_sizes ? 0xFFFFFFFFu : (uint32_t)m.comp.size());
        put32(cd, m.mark_sizes ? 0xFFFFFFFFu : (uint32_t)m.size);
        put16(cd, (uint32_t)m.name.size());
        put16(cd, (uint32_t)m.cd_extra.size());
        put16(cd, 0);
        put16(cd, 0);
        put16(cd, 0);
        put32(cd, 0);
        put32(cd, off);
        cd.insert(cd.end(), m.name.begin(), m.name.end());
        cd.insert(cd.end(), m.cd_extra.begin(), m.cd_extra.end());
    }
    uint32_t cd_off = (uint32_t)out.size();
    out.insert(out.end(), cd.begin(), cd.end());
    put32(out, 0x06054b50);
    put16(out, 0);
    put16(out, 0);
    put16(out, (uint32_t)ms.size());
    put16(out, (uint32_t)ms.size());
    put32(out, (uint32_t)cd.size());
    put32(out, cd_off);
    put16(out, (uint32_t)comment.size());
    out.insert(out.end(), comment.begin(), comment.end());
    return out;
}

RawMember deflated(const std::string &name, const Bytes &data) {
    return RawMember{name, 8, raw_deflate(data), data.size(), crc_of(data)};
}

tm_status open_status(const Bytes &buf, std::string *msg = nullptr) {
    tm_error err{};
    tm_zip_reader *zr = nullptr;
    tm_status st = tm_zip_reader_open(buf.data(), buf.size(), "t.zip", &zr, &err);
    if (msg) *msg = err.msg;
    if (st == TM_OK) {
        CHECK(zr != nullptr);
    } else {
        CHECK(zr == nullptr);
    }
    tm_zip_reader_free(zr);
    return st;
}

// Reads member name; returns the status, the bytes in *data and the message in *msg.
tm_status read_member(const Bytes &buf, const char *name, uint64_t max_size, Bytes *data,
                      std::string *msg) {
    tm_error err{};
    tm_zip_reader *zr = nullptr;
    tm_status st = tm_zip_reader_open(buf.data(), buf.size(), "t.zip", &zr, &err);
    if (st == TM_OK) {
        const tm_zip_entry *e = tm_zip_reader_find(zr, name);
        REQUIRE(e != nullptr);
        const uint8_t *bytes = nullptr;
        uint8_t *owned = nullptr;
        st = tm_zip_reader_read(zr, e, max_size, &bytes, &owned, &err);
        if (st == TM_OK && data) data->assign(bytes, bytes + e->size);
        if (st != TM_OK) {
            CHECK(bytes == nullptr);
            CHECK(owned == nullptr);
        }
        std::free(owned);
    }
    tm_zip_reader_free(zr);
    if (msg) *msg = err.msg;
    return st;
}

const char *kPyTestzip =
    "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None; "
    "print(len(z.namelist()))";

}  // namespace

TEST_CASE("zip writer output reads back with every member's bytes, crc and 64-byte alignment",
          "[zip]") {
    std::vector<Member> members = sample_members();
    check_archive(write_to_bytes(members), members);
}

TEST_CASE("zip writer output is byte-for-byte reproducible", "[zip]") {
    std::vector<Member> members = sample_members();
    CHECK(write_to_bytes(members) == write_to_bytes(members));
}

TEST_CASE("zip writer output mirrors PyTorch's layout: data descriptors and FB padding",
          "[zip]") {
    Bytes buf = write_to_bytes({{"a/data.pkl", {1, 2, 3}}});
    // Local header: flags 0x0808, crc and sizes deferred to the descriptor.
    CHECK(buf[6] == 0x08);
    CHECK(buf[7] == 0x08);
    for (int i = 14; i < 26; i++) CHECK(buf[i] == 0);
    size_t extra = 30 + std::strlen("a/data.pkl");
    CHECK(buf[extra] == 'F');
    CHECK(buf[extra + 1] == 'B');
    CHECK(buf[64] == 1);
    // Data descriptor right after the 3 data bytes.
    CHECK(buf[67] == 'P');
    CHECK(buf[68] == 'K');
    CHECK(buf[69] == 7);
    CHECK(buf[70] == 8);
}

TEST_CASE("Python's zipfile reads and verifies the writer's archive", "[zip][python]") {
    TempFile tmp;
    write_archive(tmp.path, sample_members());
    CHECK(run_python(kPyTestzip, tmp.path) == 0);
    CHECK(run_python("import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); "
                     "assert z.read('archive/version') == b'3\\n'; "
                     "assert z.read('archive/empty') == b''",
                     tmp.path) == 0);
}

TEST_CASE("zip64 records (forced by a low threshold) are written and read back", "[zip][zip64]") {
    std::vector<Member> members = sample_members();
    for (uint64_t threshold : {uint64_t(1), uint64_t(100), uint64_t(5000)}) {
        INFO("threshold " << threshold);
        TempFile tmp;
        write_archive(tmp.path, members, threshold);
        Bytes buf = read_file(tmp.path);
        const uint8_t eocd64[] = {'P', 'K', 6, 6};
        CHECK(std::search(buf.begin(), buf.end(), eocd64, eocd64 + 4) != buf.end());
        check_archive(buf, members);
        CHECK(run_python(kPyTestzip, tmp.path) == 0);
    }
}

TEST_CASE("zip64 entry count marker is used at threshold and the zip64 record wins", "[zip][zip64]") {
    std::vector<Member> members;
    for (int i = 0; i < 20; i++) members.push_back({"m" + std::to_string(i), pattern(i, i)});
    // 20 entries with a threshold of 10: the 16-bit count fields carry the 0xFFFF marker.
    Bytes buf = write_to_bytes(members, 10);
    check_archive(buf, members);
    size_t eocd = buf.size() - 22;
    CHECK(buf[eocd + 10] == 0xFF);
    CHECK(buf[eocd + 11] == 0xFF);
}

TEST_CASE("zip reader reads members Python's zipfile deflated, with an archive comment",
          "[zip][python]") {
    TempFile tmp;
    REQUIRE(run_python("import zipfile,sys; z=zipfile.ZipFile(sys.argv[1],'w',zipfile.ZIP_DEFLATED); "
                       "z.writestr('text.txt', b'hello world '*1000); z.writestr('empty', b''); "
                       "z.writestr('stored.bin', bytes(range(256)), compress_type=zipfile.ZIP_STORED); "
                       "z.comment=b'a comment'; z.close()",
                       tmp.path) == 0);
    Bytes buf = read_file(tmp.path);
    std::string text;
    for (int i = 0; i < 1000; i++) text += "hello world ";
    Bytes data;
    std::string msg;
    REQUIRE(read_member(buf, "text.txt", UINT64_MAX, &data, &msg) == TM_OK);
    CHECK(std::string(data.begin(), data.end()) == text);
    REQUIRE(read_member(buf, "empty", UINT64_MAX, &data, &msg) == TM_OK);
    CHECK(data.empty());
    REQUIRE(read_member(buf, "stored.bin", UINT64_MAX, &data, &msg) == TM_OK);
    CHECK(data.size() == 256);
    CHECK(data[255] == 255);

    tm_error err{};
    tm_zip_reader *zr = nullptr;
    REQUIRE(tm_zip_reader_open(buf.data(), buf.size(), "t.zip", &zr, &err) == TM_OK);
    CHECK(tm_zip_reader_find(zr, "text.txt")->method == 8);
    CHECK(tm_zip_reader_find(zr, "text.txt")->comp_size < text.size());
    tm_zip_reader_free(zr);
}

TEST_CASE("zip reader reads a hand-built deflated member and checks its CRC", "[zip]") {
    Bytes payload = pattern(5000, 9);
    payload.insert(payload.end(), 20000, 'a');
    Bytes buf = build_zip({deflated("d", payload)});
    Bytes data;
    std::string msg;
    REQUIRE(read_member(buf, "d", UINT64_MAX, &data, &msg) == TM_OK);
    CHECK(data == payload);

    RawMember bad = deflated("d", payload);
    bad.crc ^= 1;
    CHECK(read_member(build_zip({bad}), "d", UINT64_MAX, &data, &msg) == TM_ERROR_FORMAT);
    CHECK(msg.find("CRC-32") != std::string::npos);
}

TEST_CASE("zip reader refuses a member declared larger than max_size", "[zip]") {
    Bytes payload(4096, 'x');
    Bytes data;
    std::string msg;
    Bytes buf = build_zip({deflated("big", payload)});
    CHECK(read_member(buf, "big", 4095, &data, &msg) == TM_ERROR_LIMIT);
    CHECK(msg.find("'big'") != std::string::npos);
    CHECK(msg.find("4096") != std::string::npos);
    CHECK(read_member(buf, "big", 4096, &data, &msg) == TM_OK);

    RawMember huge = deflated("huge", payload);
    huge.size = 0xFFFFFFF0u;  // a declared size that must never be allocated
    CHECK(read_member(build_zip({huge}), "huge", 1 << 20, &data, &msg) == TM_ERROR_LIMIT);

    Bytes stored_buf = build_zip({RawMember{"s", 0, payload, payload.size(), crc_of(payload)}});
    CHECK(read_member(stored_buf, "s", 100, &data, &msg) == TM_ERROR_LIMIT);
}

TEST_CASE("zip reader stops at the declared size of a deflated member (zip bomb)", "[zip]") {
    Bytes zeros(10 << 20, 0);
    RawMember bomb = deflated("bomb", zeros);
    bomb.size = 1000;
    Bytes data;
    std::string msg;
    CHECK(read_member(build_zip({bomb}), "bomb", UINT64_MAX, &data, &msg) == TM_ERROR_FORMAT);
    CHECK(msg.find("more than its declared 1000 bytes") != std::string::npos);

    RawMember exact_plus_one = deflated("b", Bytes(1001, 7));
    exact_plus_one.size = 1000;
    CHECK(read_member(build_zip({exact_plus_one}), "b", UINT64_MAX, &data, &msg) ==
          TM_ERROR_FORMAT);

    RawMember short_member = deflated("short", Bytes(500, 7));
    short_member.size = 1000;
    CHECK(read_member(build_zip({short_member}), "short", UINT64_MAX, &data, &msg) ==
          TM_ERROR_FORMAT);
    CHECK(msg.find("inflates to 500 bytes") != std::string::npos);
}

TEST_CASE("zip reader rejects truncated or corrupt deflate streams", "[zip]") {
    Bytes payload = pattern(3000, 4);
    RawMember m = deflated("d", payload);
    m.comp.resize(m.comp.size() / 2);
    Bytes data;
    std::string msg;
    CHECK(read_member(build_zip({m}), "d", UINT64_MAX, &data, &msg) == TM_ERROR_FORMAT);

    RawMember garbage{"g", 8, Bytes(64, 0xFF), 100, 0};
    CHECK(read_member(build_zip({garbage}), "g", UINT64_MAX, &data, &msg) == TM_ERROR_FORMAT);
    CHECK(msg.find("'g'") != std::string::npos);
}

TEST_CASE("zip reader reports unsupported methods at read and encryption at open", "[zip]") {
    Bytes payload(10, 'q');
    Bytes data;
    std::string msg;
    Bytes bz = build_zip({RawMember{"bz", 12, payload, payload.size(), crc_of(payload)}});
    CHECK(open_status(bz) == TM_OK);
    CHECK(read_member(bz, "bz", UINT64_MAX, &data, &msg) == TM_ERROR_UNSUPPORTED);
    CHECK(msg.find("'bz'") != std::string::npos);

    RawMember enc{"enc", 0, payload, payload.size(), crc_of(payload), 1};
    CHECK(open_status(build_zip({enc}), &msg) == TM_ERROR_UNSUPPORTED);
    CHECK(msg.find("encrypted") != std::string::npos);
}

TEST_CASE("zip reader rejects malformed directories", "[zip]") {
    Bytes a(5, 'a');
    RawMember ma{"a", 0, a, a.size(), crc_of(a)};
    std::string msg;

    SECTION("duplicate member names") {
        CHECK(open_status(build_zip({ma, ma}), &msg) == TM_ERROR_FORMAT);
        CHECK(msg.find("duplicate member name 'a'") != std::string::npos);
    }
    SECTION("a name containing NUL") {
        RawMember m = ma;
        m.name = std::string("a\0b", 3);
        CHECK(open_status(build_zip({m}), &msg) == TM_ERROR_FORMAT);
        CHECK(msg.find("NUL") != std::string::npos);
    }
    SECTION("stored member whose compressed size differs from its size") {
        RawMember m = ma;
        m.size = 4;
        CHECK(open_status(build_zip({m}), &msg) == TM_ERROR_FORMAT);
    }
    SECTION("central directory offset past the end of the file") {
        Bytes buf = build_zip({ma});
        set32(buf, buf.size() - 22 + 16, (uint32_t)buf.size() + 100);
        CHECK(open_status(buf, &msg) == TM_ERROR_FORMAT);
        CHECK(msg.rfind("t.zip: zip: central directory extends past end of file", 0) == 0);
    }
    SECTION("central directory offset pointing at member data") {
        Bytes buf = build_zip({ma});
        set32(buf, buf.size() - 22 + 16, 1);
        CHECK(open_status(buf, &msg) == TM_ERROR_FORMAT);
    }
    SECTION("entry count larger than the directory can hold") {
        Bytes buf = build_zip({ma});
        set16(buf, buf.size() - 22 + 8, 60000);
        set16(buf, buf.size() - 22 + 10, 60000);
        CHECK(open_status(buf, &msg) == TM_ERROR_FORMAT);
        CHECK(msg.find("cannot hold 60000 entries") != std::string::npos);
    }
    SECTION("local header offset pointing nowhere") {
        Bytes buf = build_zip({ma});
        size_t cd = buf.size() - 22 - (46 + 1);
        set32(buf, cd + 42, 3);
        CHECK(open_status(buf, &msg) == TM_ERROR_FORMAT);
    }
    SECTION("member data running into the central directory") {
        Bytes buf = build_zip({ma});
        size_t cd = buf.size() - 22 - (46 + 1);
        set32(buf, cd + 20, 50);
        set32(buf, cd + 24, 50);
        CHECK(open_status(buf, &msg) == TM_ERROR_FORMAT);
    }
    SECTION("not a zip at all") {
        Bytes junk(1000, 'j');
        CHECK(open_status(junk, &msg) == TM_ERROR_FORMAT);
        CHECK(msg == "t.zip: not a zip archive (no end of central directory record)");
        CHECK(open_status(Bytes{}, &msg) == TM_ERROR_FORMAT);
    }
}

TEST_CASE("zip reader takes marked sizes from the zip64 extra field and checks its length",
          "[zip][zip64]") {
    Bytes a(5, 'a');
    RawMember m{"a", 0, a, a.size(), crc_of(a)};
    m.mark_sizes = true;
    std::string msg;
    Bytes data;
    auto zip64_extra = [](size_t payload) {
        Bytes x;
        put16(x, 0x4246);  // an unrelated field first: the reader must skip it
        put16(x, 2);
        put16(x, 0x5a5a);
        put16(x, 0x0001);
        put16(x, (uint32_t)payload);
        for (size_t i = 0; i < payload; i++) x.push_back(i % 8 == 0 ? 5 : 0);
        return x;
    };
    SECTION("both sizes in the extra field") {
        m.cd_extra = zip64_extra(16);
        REQUIRE(read_member(build_zip({m}), "a", UINT64_MAX, &data, &msg) == TM_OK);
        CHECK(data == a);
    }
    SECTION("extra field too short for the marked values") {
        m.cd_extra = zip64_extra(8);
        CHECK(open_status(build_zip({m}), &msg) == TM_ERROR_FORMAT);
        CHECK(msg.find("zip64 extra field too short") != std::string::npos);
    }
    SECTION("extra field length running past the extra data") {
        m.cd_extra = zip64_extra(16);
        set16(m.cd_extra, 8, 40);
        CHECK(open_status(build_zip({m}), &msg) == TM_ERROR_FORMAT);
    }
    SECTION("markers without a zip64 extra field are taken literally") {
        CHECK(open_status(build_zip({m}), &msg) == TM_ERROR_FORMAT);
    }
}

TEST_CASE("zip reader refuses an entry that belongs to another reader", "[zip]") {
    Bytes buf = write_to_bytes({{"x", {1, 2}}});
    tm_error err{};
    tm_zip_reader *a = nullptr, *b = nullptr;
    REQUIRE(tm_zip_reader_open(buf.data(), buf.size(), "a", &a, &err) == TM_OK);
    REQUIRE(tm_zip_reader_open(buf.data(), buf.size(), "b", &b, &err) == TM_OK);
    const uint8_t *bytes = nullptr;
    uint8_t *owned = nullptr;
    CHECK(tm_zip_reader_read(a, tm_zip_reader_entry(b, 0), UINT64_MAX, &bytes, &owned, &err) ==
          TM_ERROR_INVALID_ARGUMENT);
    CHECK(bytes == nullptr);
    tm_zip_reader_free(a);
    tm_zip_reader_free(b);
}

TEST_CASE("zip reader opens an empty archive and detects zip signatures", "[zip]") {
    Bytes empty = build_zip({});
    CHECK(empty.size() == 22);
    CHECK(open_status(empty) == TM_OK);
    CHECK(tm_zip_looks_like_zip(empty.data(), empty.size()) == 1);
    Bytes one = write_to_bytes({{"x", {1}}});
    CHECK(tm_zip_looks_like_zip(one.data(), one.size()) == 1);
    const uint8_t pickle[] = {0x80, 0x02, 'P', 'K'};
    CHECK(tm_zip_looks_like_zip(pickle, sizeof pickle) == 0);
    CHECK(tm_zip_looks_like_zip(one.data(), 3) == 0);
}

TEST_CASE("zip reader fails cleanly on every truncation of an archive", "[zip][fuzz]") {
    std::vector<Bytes> archives = {
        write_to_bytes({{"a/data.pkl", pattern(40, 1)}, {"a/data/0", pattern(100, 2)}, {"e", {}}}),
        write_to_bytes({{"a/x", pattern(40, 1)}, {"b", pattern(3, 2)}}, 1),
        build_zip({deflated("d", Bytes(300, 'z')), deflated("e", pattern(50, 5))}),
    };
    for (const Bytes &full : archives) {
        for (size_t n = 0; n < full.size(); n++) {
            Bytes prefix(full.begin(), full.begin() + (ptrdiff_t)n);  // exact size: ASan sees overreads
            INFO("prefix length " << n << " of " << full.size());
            CHECK(open_status(prefix) != TM_OK);
        }
        CHECK(open_status(full) == TM_OK);
    }
}

TEST_CASE("zip reader survives every single-byte corruption", "[zip][fuzz]") {
    std::vector<Bytes> archives = {
        write_to_bytes({{"a/data.pkl", pattern(40, 1)}, {"a/data/0", pattern(100, 2)}}),
        write_to_bytes({{"a/x", pattern(40, 1)}, {"b", pattern(3, 2)}}, 1),
        build_zip({deflated("d", Bytes(300, 'z')), deflated("e", pattern(50, 5))}),
    };
    for (const Bytes &full : archives) {
        for (size_t i = 0; i < full.size(); i++) {
            for (uint8_t flip : {uint8_t(0xFF), uint8_t(0x01), uint8_t(0x80)}) {
                Bytes buf = full;
                buf[i] ^= flip;
                tm_error err{};
                tm_zip_reader *zr = nullptr;
                if (tm_zip_reader_open(buf.data(), buf.size(), "t.zip", &zr, &err) != TM_OK) {
                    CHECK(zr == nullptr);
                    CHECK(err.msg[0] != '\0');
                    continue;
                }
                for (size_t k = 0; k < tm_zip_reader_count(zr); k++) {
                    const tm_zip_entry *e = tm_zip_reader_entry(zr, k);
                    CHECK(e->data_offset <= buf.size());
                    CHECK(e->comp_size <= buf.size() - e->data_offset);
                    const uint8_t *bytes = nullptr;
                    uint8_t *owned = nullptr;
                    if (tm_zip_reader_read(zr, e, 1 << 20, &bytes, &owned, &err) == TM_OK &&
                        e->size) {
                        volatile uint8_t sink = bytes[e->size - 1];
                        (void)sink;
                    }
                    std::free(owned);
                }
                tm_zip_reader_free(zr);
            }
        }
    }
}

TEST_CASE("zip writer rejects misuse of the member protocol", "[zip]") {
    TempFile tmp;
    int fd = open(tmp.path.c_str(), O_WRONLY | O_TRUNC);
    REQUIRE(fd >= 0);
    tm_error err{};
    tm_zip_writer *zw = nullptr;
    REQUIRE(tm_zip_writer_open(fd, "out.pt", &zw, &err) == TM_OK);
    const uint8_t data[8] = {1, 2, 3, 4, 5, 6, 7, 8};

    REQUIRE(tm_zip_writer_begin(zw, "a", 4, &err) == TM_OK);
    CHECK(tm_zip_writer_begin(zw, "b", 4, &err) == TM_ERROR_INTERNAL);
    CHECK(tm_zip_writer_write(zw, data, 5, &err) == TM_ERROR_INTERNAL);
    CHECK(std::string(err.msg).find("declared 4") != std::string::npos);
    REQUIRE(tm_zip_writer_write(zw, data, 3, &err) == TM_OK);
    CHECK(tm_zip_writer_end(zw, &err) == TM_ERROR_INTERNAL);
    CHECK(std::string(err.msg).find("3 bytes written but 4 declared") != std::string::npos);
    CHECK(tm_zip_writer_finish(zw, &err) == TM_ERROR_INTERNAL);
    REQUIRE(tm_zip_writer_write(zw, data + 3, 1, &err) == TM_OK);
    REQUIRE(tm_zip_writer_end(zw, &err) == TM_OK);
    CHECK(tm_zip_writer_end(zw, &err) == TM_ERROR_INTERNAL);
    CHECK(tm_zip_writer_write(zw, data, 1, &err) == TM_ERROR_INTERNAL);
    CHECK(tm_zip_writer_begin(zw, "", 0, &err) == TM_ERROR_INVALID_ARGUMENT);

    REQUIRE(tm_zip_writer_add(zw, "a", data, 2, &err) == TM_OK);
    CHECK(tm_zip_writer_finish(zw, &err) == TM_ERROR_INTERNAL);
    CHECK(std::string(err.msg).find("'a' written twice") != std::string::npos);
    tm_zip_writer_free(zw);
    close(fd);
}

TEST_CASE("zip writer refuses a descriptor not at offset 0", "[zip]") {
    TempFile tmp;
    int fd = open(tmp.path.c_str(), O_RDWR | O_TRUNC);
    REQUIRE(fd >= 0);
    REQUIRE(write(fd, "xx", 2) == 2);
    tm_error err{};
    tm_zip_writer *zw = nullptr;
    CHECK(tm_zip_writer_open(fd, "out.pt", &zw, &err) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(zw == nullptr);
    close(fd);
}

TEST_CASE("zip writer reports a full disk as an I/O error naming the output", "[zip]") {
    int fd = open("/dev/full", O_WRONLY);
    if (fd < 0) {
        WARN("no /dev/full; skipped");
        return;
    }
    tm_error err{};
    tm_zip_writer *zw = nullptr;
    REQUIRE(tm_zip_writer_open(fd, "out.pt", &zw, &err) == TM_OK);
    SECTION("large member bypassing the buffer") {
        Bytes big(5 << 20, 1);
        CHECK(tm_zip_writer_add(zw, "big", big.data(), big.size(), &err) == TM_ERROR_IO);
    }
    SECTION("small members failing at finish") {
        REQUIRE(tm_zip_writer_add(zw, "small", "abc", 3, &err) == TM_OK);
        CHECK(tm_zip_writer_finish(zw, &err) == TM_ERROR_IO);
    }
    std::string msg = err.msg;
    CHECK(msg.rfind("out.pt: ", 0) == 0);
    CHECK(msg.find(std::strerror(ENOSPC)) != std::string::npos);
    CHECK(tm_zip_writer_finish(zw, &err) == TM_ERROR_IO);  // failure is sticky
    tm_zip_writer_free(zw);
    close(fd);
}

TEST_CASE("zip writer writes to a pipe the same bytes as to a file", "[zip]") {
    std::vector<Member> members = sample_members();
    Bytes expected = write_to_bytes(members);
    int p[2];
    REQUIRE(pipe(p) == 0);
    Bytes got;
    std::thread reader([&] {
        uint8_t chunk[65536];
        ssize_t n;
        while ((n = read(p[0], chunk, sizeof chunk)) > 0) got.insert(got.end(), chunk, chunk + n);
    });
    tm_error err{};
    tm_zip_writer *zw = nullptr;
    tm_status st = tm_zip_writer_open(p[1], "pipe", &zw, &err);
    for (const Member &m : members)
        if (st == TM_OK) st = tm_zip_writer_add(zw, m.name.c_str(), m.data.data(), m.data.size(), &err);
    if (st == TM_OK) st = tm_zip_writer_finish(zw, &err);
    tm_zip_writer_free(zw);
    close(p[1]);
    reader.join();
    close(p[0]);
    INFO(err.msg);
    REQUIRE(st == TM_OK);
    CHECK(got == expected);
}

namespace {

// Saves a small state dict with torch.
void torch_save(const std::string &path) {
    REQUIRE(run_python("import torch,sys; torch.save({'a': torch.arange(10.), "
                       "'b': torch.ones(2, 3, dtype=torch.float16)}, sys.argv[1])",
                       path) == 0);
}

const char *kTorchCheck =
    "import torch,sys; d=torch.load(sys.argv[1]); "
    "assert torch.equal(d['a'], torch.arange(10.)); "
    "assert torch.equal(d['b'], torch.ones(2, 3, dtype=torch.float16)); print('torch ok')";

}  // namespace

TEST_CASE("zip reader reads a torch.save archive with 64-byte aligned records",
          "[zip][torch]") {
    TempFile tmp(".pt");
    torch_save(tmp.path);
    Bytes buf = read_file(tmp.path);
    tm_error err{};
    tm_zip_reader *zr = nullptr;
    INFO(err.msg);
    REQUIRE(tm_zip_reader_open(buf.data(), buf.size(), tmp.path.c_str(), &zr, &err) == TM_OK);
    std::string prefix;
    for (size_t i = 0; i < tm_zip_reader_count(zr); i++) {
        const tm_zip_entry *e = tm_zip_reader_entry(zr, i);
        std::string name = e->name;
        if (name.size() > 9 && name.compare(name.size() - 9, 9, "/data.pkl") == 0)
            prefix = name.substr(0, name.size() - 9);
        CHECK(e->data_offset % 64 == 0);
        CHECK(e->method == 0);
    }
    REQUIRE(!prefix.empty());
    const tm_zip_entry *version = tm_zip_reader_find(zr, (prefix + "/version").c_str());
    REQUIRE(version != nullptr);
    const tm_zip_entry *storage = tm_zip_reader_find(zr, (prefix + "/data/0").c_str());
    REQUIRE(storage != nullptr);
    REQUIRE(storage->size == 40);
    const uint8_t *bytes = nullptr;
    uint8_t *owned = nullptr;
    REQUIRE(tm_zip_reader_read(zr, storage, UINT64_MAX, &bytes, &owned, &err) == TM_OK);
    float values[10];
    std::memcpy(values, bytes, sizeof values);
    for (int i = 0; i < 10; i++) CHECK(values[i] == (float)i);
    tm_zip_reader_free(zr);
}

TEST_CASE("torch.load reads a torch archive rewritten by the zip writer, zip64 included",
          "[zip][torch]") {
    TempFile src(".pt");
    torch_save(src.path);
    Bytes buf = read_file(src.path);
    tm_error err{};
    tm_zip_reader *zr = nullptr;
    REQUIRE(tm_zip_reader_open(buf.data(), buf.size(), "src.pt", &zr, &err) == TM_OK);
    std::vector<Member> members;
    for (size_t i = 0; i < tm_zip_reader_count(zr); i++) {
        const tm_zip_entry *e = tm_zip_reader_entry(zr, i);
        const uint8_t *bytes = nullptr;
        uint8_t *owned = nullptr;
        REQUIRE(tm_zip_reader_read(zr, e, UINT64_MAX, &bytes, &owned, &err) == TM_OK);
        members.push_back({e->name, Bytes(bytes, bytes + e->size)});
        std::free(owned);
    }
    tm_zip_reader_free(zr);
    for (uint64_t threshold : {uint64_t(0), uint64_t(1)}) {
        INFO("zip64 threshold " << threshold);
        TempFile out(".pt");
        write_archive(out.path, members, threshold);
        CHECK(run_python(kTorchCheck, out.path) == 0);
        check_archive(read_file(out.path), members);
    }
}
