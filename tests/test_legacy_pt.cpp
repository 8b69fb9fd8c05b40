// The legacy (non-zip) torch.save reader: files written at test time by Python torch with
// _use_new_zipfile_serialization=False (checked against what Python says it saved), hand-made
// legacy files that break one rule each, and the real legacy files of ../shared/realworld
// (checked against the static oracle TENSORS.tsv) when present.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <algorithm>
#include <iterator>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "formats/legacy_pt.h"
#include "formats/pickle.h"
#include "test_support.hpp"


namespace {

using tm_test::Bytes;

// ---- Files and Python ---------------------------------------------------------------------

const std::string &tmp() {
    static tm_test::TempDir d("legacy");
    return d.path;
}

using tm_test::read_file;
using tm_test::write_file;

std::vector<std::string> split(const std::string &s, char sep) {
    std::vector<std::string> out;
    std::string cur;
    std::istringstream in(s);
    while (std::getline(in, cur, sep)) out.push_back(cur);
    if (!s.empty() && s.back() == sep) out.push_back("");
    return out;
}

// Writes legacy files with Python torch, plus meta.tsv: one row per tensor with what Python
// saw (path, dtype, shape, stride, storage offset, storage numel) and a file of its contiguous
// bytes. Then hand-made legacy files (h_*.pt), each breaking one rule.
const char *const fixtures_py = R"PY(
import sys, os, io, pickle, struct, collections, warnings, torch
warnings.simplefilter('ignore')
out = sys.argv[1]
torch.manual_seed(0)
meta = open(os.path.join(out, 'meta.tsv'), 'w')
nbin = [0]

def record(fname, obj):
    def walk(prefix, o):
        if isinstance(o, torch.Tensor):
            nbin[0] += 1
            bn = 'bin%d' % nbin[0]
            with open(os.path.join(out, bn), 'wb') as f:
                f.write(o.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            meta.write('\t'.join([fname, prefix, str(o.dtype).replace('torch.', ''),
                                  'x'.join(map(str, o.shape)), 'x'.join(map(str, o.stride())),
                                  str(o.storage_offset()), str(o.storage().size()), bn]) + '\n')
        elif isinstance(o, dict):
            for k, v in o.items():
                walk((prefix + '.' if prefix else '') + str(k), v)
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(prefix + '[%d]' % i, v)
    walk('', obj)

def save(fname, obj, **kw):
    torch.save(obj, os.path.join(out, fname), _use_new_zipfile_serialization=False, **kw)
    record(fname, obj)

m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                        torch.nn.Linear(4, 2))
m.train()
m(torch.randn(5, 3))
save('sd.pt', m.state_dict())
save('proto4.pt', m.state_dict(), pickle_protocol=4)
save('proto1.pt', {'w': torch.randn(2, 3), 'n': torch.tensor(5)}, pickle_protocol=1)

def ints(dtype, lo, hi):
    return torch.randint(lo, hi, (3, 4), dtype=torch.int64).to(dtype)
save('dtypes.pt', {
    'f64': torch.randn(2, 3, dtype=torch.float64), 'f32': torch.randn(4, 2),
    'f16': torch.randn(3, 3).half(), 'bf16': torch.randn(5).bfloat16(),
    'i64': ints(torch.int64, -2**40, 2**40), 'i32': ints(torch.int32, -2**31, 2**31 - 1),
    'i16': ints(torch.int16, -2**15, 2**15 - 1), 'i8': ints(torch.int8, -128, 127),
    'u8': ints(torch.uint8, 0, 255), 'bool': torch.rand(7) > 0.5})

base = torch.arange(48, dtype=torch.float32) * 0.5
save('views.pt', collections.OrderedDict([
    ('slice', base[5:15]), ('base', base), ('mat_t', base.view(6, 8).t()),
    ('sub', base.view(6, 8)[1:4, 2:7]), ('step', base[1::3]), ('other', torch.ones(2, 2))]))

save('scalars.pt', {'s_f': torch.tensor(3.5), 's_i': torch.tensor(-7), 'empty': torch.zeros(0),
                    'empty3d': torch.zeros(3, 0, 2, dtype=torch.float64),
                    'one': torch.tensor([1.25])})

opt = torch.optim.Adam(m.parameters(), lr=0.01)
m(torch.randn(5, 3)).sum().backward()
opt.step()
save('nested.pt', {'epoch': 5, 'state_dict': m.state_dict(), 'optimizer': opt.state_dict(),
                   'best': 0.5, 'args': {'lr': 0.1, 'name': 'run'},
                   'history': [torch.tensor([1., 2.]), (torch.tensor([3]),)]})

save('small.pt', {'w': torch.arange(3, dtype=torch.float32),
                  'i': torch.tensor([1, 2], dtype=torch.int32)})
torch.save(m, os.path.join(out, 'module.pt'), _use_new_zipfile_serialization=False)
torch.save(m.state_dict(), os.path.join(out, 'zip.pt'))
meta.close()

# ---- Hand-made legacy files ----
MAGIC = 0x1950a86a20f9469cfc6c
SYS = {'protocol_version': 1001, 'little_endian': True,
       'type_sizes': {'short': 2, 'int': 4, 'long': 4}}
class St:
    def __init__(self, typ, key, numel, view=None):
        self.typ, self.key, self.numel, self.view = typ, key, numel, view
class T:
    def __init__(self, st, off, size, stride):
        self.a = (st, off, size, stride)
    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.a + (False, collections.OrderedDict()))
class P(pickle.Pickler):
    def persistent_id(self, o):
        if isinstance(o, St):
            return ('storage', o.typ, o.key, 'cpu', o.numel, o.view)
        return None
def craft(fname, obj, records, keys, sys_info=SYS, version=1001, magic=MAGIC):
    b = io.BytesIO()
    for x in (magic, version, sys_info):
        pickle.dump(x, b, protocol=2)
    P(b, protocol=2).dump(obj)
    if keys is not None:
        pickle.dump(keys, b, protocol=2)
    for n, payload in records:
        b.write(struct.pack('<q', n))
        b.write(payload)
    with open(os.path.join(out, fname), 'wb') as f:
        f.write(b.getvalue())
F, L, B = torch.FloatStorage, torch.LongStorage, torch.ByteStorage
fl = struct.pack('<4f', 1.5, -2.0, 3.25, 4.0)
lo = struct.pack('<2q', -5, 2**40)
def ok_obj():
    return {'a': T(St(F, '1', 4), 1, (3,), (1,)), 'b': T(St(L, '0', 2), 0, (2,), (1,))}
ok_rec = [(2, lo), (4, fl)]
craft('h_ok.pt', ok_obj(), ok_rec, ['0', '1'])
craft('h_intkeys.pt', {'a': T(St(F, 1, 4), 1, (3,), (1,)), 'b': T(St(L, 0, 2), 0, (2,), (1,))},
      ok_rec, [0, 1])
craft('h_trailing.pt', ok_obj(), ok_rec + [(0, b'garbage')], ['0', '1'])
craft('h_unknown_key.pt', ok_obj(), ok_rec + [(1, b'\0' * 4)], ['0', '1', '2'])
craft('h_unlisted.pt', ok_obj(), [(4, fl)], ['1'])
craft('h_dup.pt', ok_obj(), [(2, lo), (2, lo), (4, fl)], ['0', '0', '1'])
craft('h_nokeys.pt', ok_obj(), ok_rec, None)
craft('h_keys_dict.pt', ok_obj(), ok_rec, {'0': 1})
craft('h_keys_float.pt', ok_obj(), ok_rec, ['0', 1.5])
craft('h_count_mismatch.pt', ok_obj(), [(2, lo), (5, fl + b'\0' * 4)], ['0', '1'])
craft('h_negative_count.pt', ok_obj(), [(-1, lo), (4, fl)], ['0', '1'])
craft('h_huge.pt', {'a': T(St(F, '0', 2**61), 0, (2,), (1,))}, [(2**61, fl)], ['0'])
craft('h_overflow.pt', {'a': T(St(F, '0', 2**62 + 1), 0, (2,), (1,))}, [(2**62 + 1, fl)], ['0'])
craft('h_short.pt', {'a': T(St(F, '0', 4), 0, (4,), (1,))}, [(4, fl[:12])], ['0'])
big = dict(SYS); big['little_endian'] = False
craft('h_bigendian.pt', ok_obj(), ok_rec, ['0', '1'], sys_info=big)
craft('h_sysinfo_list.pt', ok_obj(), ok_rec, ['0', '1'], sys_info=[1, 2])
craft('h_view.pt', {'a': T(St(F, '0', 4, ('77', 1, 2)), 0, (2,), (1,))}, [(4, fl)], ['0'])
craft('h_version.pt', ok_obj(), ok_rec, ['0', '1'], version=1000)
craft('h_magic.pt', ok_obj(), ok_rec, ['0', '1'], magic=12345)
craft('h_two_dtypes.pt', {'a': T(St(F, '0', 4), 0, (4,), (1,)),
                          'b': T(St(B, '0', 16), 0, (16,), (1,))}, [(4, fl)], ['0'])
craft('h_two_dtypes_bad.pt', {'a': T(St(F, '0', 4), 0, (4,), (1,)),
                              'b': T(St(B, '0', 17), 0, (17,), (1,))}, [(4, fl)], ['0'])
craft('h_no_storages.pt', {'epoch': 3, 'name': 'x'}, [], [])
)PY";

void need_fixtures() {
    static bool done = false;
    if (done) return;
    std::string script = tmp() + "/fixtures.py", log = tmp() + "/fixtures.log";
    write_file(script, fixtures_py);
    std::string cmd = std::string(TM_TEST_PYTHON) + " '" + script + "' '" + tmp() + "' > '" +
                      log + "' 2>&1";
    int rc = std::system(cmd.c_str());
    if (rc != 0) {
        Bytes out = read_file(log);
        FAIL("python fixtures failed:\n" << std::string(out.begin(), out.end()));
    }
    done = true;
}

Bytes fixture(const std::string &name) { return read_file(tmp() + "/" + name); }

// ---- Opening and walking -------------------------------------------------------------------

struct Opened {
    Bytes data;
    std::string label;
    tm_legacy_pt *lp = nullptr;
    tm_error err{};
    tm_status st = TM_OK;
    Opened(Bytes b, std::string lbl) : data(std::move(b)), label(std::move(lbl)) {
        st = tm_legacy_pt_open(data.data(), data.size(), label.c_str(), &lp, &err);
        if (st != TM_OK) REQUIRE(lp == nullptr);
    }
    Opened(const Opened &) = delete;
    Opened &operator=(const Opened &) = delete;
    ~Opened() { tm_legacy_pt_free(lp); }
    std::string msg() const { return err.msg; }
    const tm_pk_value *root() const { return tm_legacy_pt_root(lp); }
};

std::unique_ptr<Opened> open_fixture(const std::string &name) {
    return std::make_unique<Opened>(fixture(name), name);
}

std::unique_ptr<Opened> open_ok(const std::string &name) {
    auto o = open_fixture(name);
    INFO(name << ": " << o->msg());
    REQUIRE(o->st == TM_OK);
    REQUIRE(o->root() != nullptr);
    return o;
}

// A refusal: the status, a one-line message naming the file and containing what.
void check_refused(const Opened &o, tm_status want, const std::string &what) {
    INFO(o.label << ": " << o.msg());
    CHECK(o.st == want);
    CHECK(o.lp == nullptr);
    CHECK(o.msg().rfind(o.label + ": ", 0) == 0);
    CHECK(o.msg().find('\n') == std::string::npos);
    CHECK_THAT(o.msg(), Catch::Contains(what));
}

using Named = std::vector<std::pair<std::string, const tm_pk_value *>>;

// Tensors reachable through dicts, lists and tuples, named like Python's walk: dict keys
// joined with '.', list items as "[i]". Objects are not entered.
void walk(const tm_pk_value *v, const std::string &prefix, Named &out) {
    switch (v->kind) {
    case TM_PK_TENSOR: out.emplace_back(prefix, v); break;
    case TM_PK_DICT:
        for (size_t i = 0; i < v->u.dict.n; i++) {
            const tm_pk_value *k = v->u.dict.keys[i];
            std::string ks;
            if (k->kind == TM_PK_STRING) ks.assign(k->u.str.data, k->u.str.len);
            else if (k->kind == TM_PK_INT) ks = std::to_string(k->u.integer);
            else continue;
            walk(v->u.dict.values[i], prefix.empty() ? ks : prefix + "." + ks, out);
        }
        break;
    case TM_PK_LIST:
    case TM_PK_TUPLE:
        for (size_t i = 0; i < v->u.seq.n; i++)
            walk(v->u.seq.items[i], prefix + "[" + std::to_string(i) + "]", out);
        break;
    default: break;
    }
}

Named tensors(const Opened &o) {
    Named n;
    walk(o.root(), "", n);
    return n;
}

const tm_pk_value *find(const Named &n, const std::string &path) {
    for (const auto &p : n)
        if (p.first == path) return p.second;
    return nullptr;
}

std::string dims(int32_t n, const int64_t *v, const char *scalar = "") {
    if (n == 0) return scalar;
    std::string s;
    for (int32_t i = 0; i < n; i++) s += (i ? "x" : "") + std::to_string(v[i]);
    return s;
}

struct Range {
    uint64_t offset = 0, nbytes = 0;
};

Range storage_range(const Opened &o, const tm_pk_value *storage) {
    Range r;
    tm_error err{};
    tm_status st = tm_legacy_pt_storage(o.lp, storage, &r.offset, &r.nbytes, &err);
    INFO(err.msg);
    REQUIRE(st == TM_OK);
    REQUIRE(r.offset <= o.data.size());
    REQUIRE(r.nbytes <= o.data.size() - r.offset);
    return r;
}

// The tensor's elements, read with its strides from the file bytes, as a contiguous array.
Bytes gather(const Opened &o, const tm_pk_value *t) {
    Range r = storage_range(o, t->u.tensor.storage);
    size_t item = tm_dtype_size(t->u.tensor.dtype);
    int32_t nd = t->u.tensor.ndim;
    uint64_t numel = 1;
    for (int32_t d = 0; d < nd; d++) numel *= static_cast<uint64_t>(t->u.tensor.shape[d]);
    Bytes out;
    std::vector<int64_t> idx(static_cast<size_t>(nd), 0);
    for (uint64_t n = 0; n < numel; n++) {
        int64_t e = t->u.tensor.offset;
        for (int32_t d = 0; d < nd; d++) e += idx[static_cast<size_t>(d)] * t->u.tensor.stride[d];
        uint64_t at = static_cast<uint64_t>(e) * item;
        REQUIRE(at + item <= r.nbytes);
        const uint8_t *p = o.data.data() + r.offset + at;
        out.insert(out.end(), p, p + item);
        for (int32_t d = nd - 1; d >= 0; d--) {
            if (++idx[static_cast<size_t>(d)] < t->u.tensor.shape[d]) break;
            idx[static_cast<size_t>(d)] = 0;
        }
    }
    return out;
}

int64_t storage_numel(const tm_pk_value *t) { return t->u.tensor.storage->u.storage.numel; }

struct MetaRow {
    std::string path, dtype, shape, stride, bin;
    long long offset = 0, storage_numel = 0;
};

std::map<std::string, std::vector<MetaRow>> meta() {
    std::map<std::string, std::vector<MetaRow>> out;
    std::ifstream f(tmp() + "/meta.tsv");
    std::string line;
    while (std::getline(f, line)) {
        auto c = split(line, '\t');
        REQUIRE(c.size() == 8);
        out[c[0]].push_back(MetaRow{c[1], c[2], c[3], c[4], c[7], std::stoll(c[5]),
                                    std::stoll(c[6])});
    }
    return out;
}

// ---- The real-world corpus -----------------------------------------------------------------

const std::string kCorpus = tm_test::realworld_dir();

bool corpus_present() {
    return !tm_test::realworld_file("MANIFEST.tsv").empty() && !tm_test::realworld_file("TENSORS.tsv").empty();
}

struct OracleRow {
    std::string path, dtype, shape, key, stride, location;
    long long offset = 0, storage_numel = 0;
};

std::vector<OracleRow> oracle_rows(const std::string &file) {
    std::vector<OracleRow> out;
    std::ifstream f(kCorpus + "/TENSORS.tsv");
    std::string line;
    std::getline(f, line);
    while (std::getline(f, line)) {
        auto c = split(line, '\t');
        if (c.size() < 10 || c[0] != file) continue;
        out.push_back(OracleRow{c[1], c[2], c[3], c[4], c[6], c[8], std::stoll(c[5]),
                                std::stoll(c[7])});
    }
    return out;
}

std::string oracle_dtype(tm_dtype d) {
    static const std::map<tm_dtype, std::string> m = {
        {TM_FLOAT64, "f64"}, {TM_FLOAT32, "f32"}, {TM_FLOAT16, "f16"}, {TM_BFLOAT16, "bf16"},
        {TM_INT64, "i64"},   {TM_INT32, "i32"},   {TM_INT16, "i16"},   {TM_INT8, "i8"},
        {TM_UINT8, "u8"},    {TM_BOOL, "bool"}};
    auto it = m.find(d);
    return it == m.end() ? tm_dtype_name(d) : it->second;
}

// Opens a corpus file and checks every tensor against its oracle rows; returns the tensors.
Named check_against_oracle(const std::string &file, std::unique_ptr<Opened> &keep) {
    INFO(file);
    keep = std::make_unique<Opened>(read_file(kCorpus + "/" + file), file);
    INFO(keep->msg());
    REQUIRE(keep->st == TM_OK);
    CHECK(tm_legacy_pt_looks_like(keep->data.data(), keep->data.size()));
    Named got = tensors(*keep);
    auto rows = oracle_rows(file);
    REQUIRE(!rows.empty());
    CHECK(got.size() == rows.size());
    for (const OracleRow &r : rows) {
        INFO(r.path);
        const tm_pk_value *t = find(got, r.path);
        REQUIRE(t != nullptr);
        CHECK(oracle_dtype(t->u.tensor.dtype) == r.dtype);
        CHECK(dims(t->u.tensor.ndim, t->u.tensor.shape, "()") == r.shape);
        CHECK(dims(t->u.tensor.ndim, t->u.tensor.stride, "()") == r.stride);
        CHECK(t->u.tensor.offset == r.offset);
        const tm_pk_value *s = t->u.tensor.storage;
        CHECK(std::string(s->u.storage.key) == r.key);
        CHECK(std::string(s->u.storage.location) == r.location);
        CHECK(s->u.storage.numel == r.storage_numel);
        Range rg = storage_range(*keep, s);
        CHECK(rg.nbytes == static_cast<uint64_t>(r.storage_numel) * tm_dtype_size(t->u.tensor.dtype));
        // the record's int64 element count sits just before its bytes
        REQUIRE(rg.offset >= 8);
        int64_t header;
        std::memcpy(&header, keep->data.data() + rg.offset - 8, 8);
        CHECK(header == r.storage_numel);
        uint64_t numel = 1;
        for (int32_t d = 0; d < t->u.tensor.ndim; d++) numel *= uint64_t(t->u.tensor.shape[d]);
        CHECK(gather(*keep, t).size() == numel * tm_dtype_size(t->u.tensor.dtype));
    }
    return got;
}

const char *const kLegacyFiles[] = {"sd.pt",      "proto4.pt", "proto1.pt", "dtypes.pt",
                                    "views.pt",   "scalars.pt", "nested.pt", "small.pt"};

}  // namespace

// ---- Files written by torch ----------------------------------------------------------------

TEST_CASE("legacy .pt: the signature is recognised on legacy files only", "[legacy]") {
    need_fixtures();
    for (const char *name : kLegacyFiles) {
        INFO(name);
        Bytes b = fixture(name);
        CHECK(tm_legacy_pt_looks_like(b.data(), b.size()));
    }
    Bytes sd = fixture("sd.pt");
    const uint8_t want[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c,
                            0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
    REQUIRE(sd.size() > sizeof want);
    CHECK(std::memcmp(sd.data(), want, sizeof want) == 0);
    CHECK(tm_legacy_pt_looks_like(want, sizeof want));
    for (size_t n = 0; n < sizeof want; n++) {
        Bytes prefix(want, want + n);  // exact-size copies so any over-read is caught
        CHECK_FALSE(tm_legacy_pt_looks_like(prefix.data(), prefix.size()));
    }
    Bytes zip = fixture("zip.pt");
    CHECK_FALSE(tm_legacy_pt_looks_like(zip.data(), zip.size()));
    Bytes c(want, want + sizeof want);
    c[13] ^= 1;
    CHECK_FALSE(tm_legacy_pt_looks_like(c.data(), c.size()));
    CHECK_FALSE(tm_legacy_pt_looks_like(nullptr, 0));
}

TEST_CASE("legacy .pt: every tensor torch saved reads back with its layout and bytes", "[legacy]") {
    need_fixtures();
    auto m = meta();
    REQUIRE(m.size() == 8);
    for (const auto &[file, rows] : m) {
        INFO(file);
        auto o = open_ok(file);
        Named got = tensors(*o);
        CHECK(got.size() == rows.size());
        for (const MetaRow &r : rows) {
            INFO(r.path);
            const tm_pk_value *t = find(got, r.path);
            REQUIRE(t != nullptr);
            CHECK(tm_dtype_name(t->u.tensor.dtype) == r.dtype);
            CHECK(dims(t->u.tensor.ndim, t->u.tensor.shape) == r.shape);
            CHECK(dims(t->u.tensor.ndim, t->u.tensor.stride) == r.stride);
            CHECK(t->u.tensor.offset == r.offset);
            CHECK(storage_numel(t) == r.storage_numel);
            Range rg = storage_range(*o, t->u.tensor.storage);
            CHECK(rg.nbytes == static_cast<uint64_t>(r.storage_numel) *
                                   tm_dtype_size(t->u.tensor.dtype));
            CHECK(gather(*o, t) == fixture(r.bin));
        }
    }
}

TEST_CASE("legacy .pt: a state dict keeps its key order and its 0-dim counter", "[legacy]") {
    need_fixtures();
    auto o = open_ok("sd.pt");
    const tm_pk_value *sd = o->root();
    REQUIRE(sd->kind == TM_PK_DICT);
    const char *keys[] = {"0.weight",       "0.bias",        "1.weight",
                          "1.bias",         "1.running_mean", "1.running_var",
                          "1.num_batches_tracked", "3.weight", "3.bias"};
    REQUIRE(sd->u.dict.n == 9);
    for (size_t i = 0; i < 9; i++) {
        const tm_pk_value *k = sd->u.dict.keys[i];
        REQUIRE(k->kind == TM_PK_STRING);
        CHECK(std::string(k->u.str.data) == keys[i]);
    }
    const tm_pk_value *nbt = tm_pk_dict_get(sd, "1.num_batches_tracked");
    REQUIRE(nbt->kind == TM_PK_TENSOR);
    CHECK(nbt->u.tensor.dtype == TM_INT64);
    CHECK(nbt->u.tensor.ndim == 0);
    Bytes v = gather(*o, nbt);
    int64_t count;
    REQUIRE(v.size() == 8);
    std::memcpy(&count, v.data(), 8);
    CHECK(count == 1);
}

TEST_CASE("legacy .pt: views of one storage share one byte range at their offsets", "[legacy]") {
    need_fixtures();
    auto o = open_ok("views.pt");
    Named n = tensors(*o);
    const tm_pk_value *base = find(n, "base");
    REQUIRE(base != nullptr);
    Range rb = storage_range(*o, base->u.tensor.storage);
    CHECK(rb.nbytes == 48 * 4);
    for (const char *name : {"slice", "mat_t", "sub", "step"}) {
        INFO(name);
        const tm_pk_value *t = find(n, name);
        REQUIRE(t != nullptr);
        CHECK(t->u.tensor.storage == base->u.tensor.storage);
        CHECK(storage_range(*o, t->u.tensor.storage).offset == rb.offset);
    }
    CHECK(find(n, "slice")->u.tensor.offset == 5);
    CHECK(find(n, "sub")->u.tensor.offset == 10);
    const tm_pk_value *other = find(n, "other");
    CHECK(other->u.tensor.storage != base->u.tensor.storage);
    CHECK(storage_range(*o, other->u.tensor.storage).offset != rb.offset);
    // mat_t is the transpose: element [j][i] is base[i*8 + j] = (i*8 + j) / 2
    Bytes mt = gather(*o, find(n, "mat_t"));
    float x;
    std::memcpy(&x, mt.data() + 4 * (3 * 6 + 2), 4);  // [3][2] = base[2*8+3]
    CHECK(x == 9.5f);
    CHECK(tm_legacy_pt_n_storages(o->lp) == 2);
}

TEST_CASE("legacy .pt: 0-dim and empty tensors are read", "[legacy]") {
    need_fixtures();
    auto o = open_ok("scalars.pt");
    Named n = tensors(*o);
    const tm_pk_value *sf = find(n, "s_f");
    REQUIRE(sf != nullptr);
    CHECK(sf->u.tensor.ndim == 0);
    Bytes v = gather(*o, sf);
    float f;
    REQUIRE(v.size() == 4);
    std::memcpy(&f, v.data(), 4);
    CHECK(f == 3.5f);
    for (const char *name : {"empty", "empty3d"}) {
        INFO(name);
        const tm_pk_value *t = find(n, name);
        REQUIRE(t != nullptr);
        CHECK(storage_range(*o, t->u.tensor.storage).nbytes == 0);
        CHECK(gather(*o, t).empty());
    }
}

TEST_CASE("legacy .pt: a nested training checkpoint exposes its model and optimizer", "[legacy]") {
    need_fixtures();
    auto o = open_ok("nested.pt");
    const tm_pk_value *r = o->root();
    REQUIRE(r->kind == TM_PK_DICT);
    const tm_pk_value *epoch = tm_pk_dict_get(r, "epoch");
    REQUIRE(epoch != nullptr);
    REQUIRE(epoch->kind == TM_PK_INT);
    CHECK(epoch->u.integer == 5);
    const tm_pk_value *sd = tm_pk_dict_get(r, "state_dict");
    REQUIRE(sd != nullptr);
    REQUIRE(sd->kind == TM_PK_DICT);
    CHECK(sd->u.dict.n == 9);
    Named n = tensors(*o);
    const tm_pk_value *step = find(n, "optimizer.state.0.step");
    REQUIRE(step != nullptr);
    CHECK(step->u.tensor.ndim == 0);
    CHECK(find(n, "optimizer.state.0.exp_avg_sq") != nullptr);
    CHECK(find(n, "history[1][0]") != nullptr);
}

TEST_CASE("legacy .pt: records follow the key list at unaligned offsets up to the end of the file", "[legacy]") {
    need_fixtures();
    bool unaligned = false;
    for (const char *name : kLegacyFiles) {
        INFO(name);
        auto o = open_ok(name);
        size_t n = tm_legacy_pt_n_storages(o->lp);
        REQUIRE(n > 0);
        uint64_t prev_end = 0;
        std::set<std::string> keys;
        for (size_t i = 0; i < n; i++) {
            const char *key = nullptr;
            uint64_t off = 0, nb = 0;
            REQUIRE(tm_legacy_pt_storage_at(o->lp, i, &key, &off, &nb) == TM_OK);
            REQUIRE(key != nullptr);
            CHECK(keys.insert(key).second);
            REQUIRE(off >= 8);
            CHECK(off - 8 >= prev_end);
            if (i) CHECK(off - 8 == prev_end);  // records are back to back
            REQUIRE(off + nb <= o->data.size());
            if (off % 8) unaligned = true;
            prev_end = off + nb;
        }
        CHECK(prev_end == o->data.size());
        CHECK(tm_legacy_pt_storage_at(o->lp, n, nullptr, nullptr, nullptr) ==
              TM_ERROR_INVALID_ARGUMENT);
        // torch writes the key list sorted as strings
        std::vector<std::string> order;
        for (size_t i = 0; i < n; i++) {
            const char *key = nullptr;
            tm_legacy_pt_storage_at(o->lp, i, &key, nullptr, nullptr);
            order.push_back(key);
        }
        CHECK(std::is_sorted(order.begin(), order.end()));
    }
    CHECK(unaligned);
}

// ---- Hand-made files -----------------------------------------------------------------------

TEST_CASE("legacy .pt: each storage key maps to its own record in key-list order", "[legacy]") {
    need_fixtures();
    for (const char *name : {"h_ok.pt", "h_intkeys.pt", "h_trailing.pt"}) {
        INFO(name);
        auto o = open_ok(name);
        Named n = tensors(*o);
        REQUIRE(n.size() == 2);
        // 'a' views FloatStorage '1' = [1.5, -2, 3.25, 4] from element 1; 'b' is LongStorage '0'
        Bytes a = gather(*o, find(n, "a"));
        float fa[3];
        REQUIRE(a.size() == sizeof fa);
        std::memcpy(fa, a.data(), sizeof fa);
        CHECK(fa[0] == -2.0f);
        CHECK(fa[1] == 3.25f);
        CHECK(fa[2] == 4.0f);
        Bytes b = gather(*o, find(n, "b"));
        int64_t lb[2];
        REQUIRE(b.size() == sizeof lb);
        std::memcpy(lb, b.data(), sizeof lb);
        CHECK(lb[0] == -5);
        CHECK(lb[1] == (int64_t(1) << 40));
        Range ra = storage_range(*o, find(n, "a")->u.tensor.storage);
        Range rb = storage_range(*o, find(n, "b")->u.tensor.storage);
        CHECK(rb.offset + rb.nbytes + 8 == ra.offset);  // '0' is listed first
        CHECK(ra.nbytes == 16);
        CHECK(rb.nbytes == 16);
    }
    auto none = open_ok("h_no_storages.pt");
    CHECK(tm_legacy_pt_n_storages(none->lp) == 0);
    CHECK(tensors(*none).empty());
}

TEST_CASE("legacy .pt: one storage seen through two dtypes is sized by the first", "[legacy]") {
    need_fixtures();
    auto o = open_ok("h_two_dtypes.pt");
    Named n = tensors(*o);
    const tm_pk_value *a = find(n, "a"), *b = find(n, "b");
    REQUIRE(a != nullptr);
    REQUIRE(b != nullptr);
    CHECK(a->u.tensor.storage != b->u.tensor.storage);
    Range ra = storage_range(*o, a->u.tensor.storage), rb = storage_range(*o, b->u.tensor.storage);
    CHECK(ra.offset == rb.offset);
    CHECK(ra.nbytes == 16);
    CHECK(rb.nbytes == 16);
    CHECK(tm_legacy_pt_n_storages(o->lp) == 1);
    check_refused(*open_fixture("h_two_dtypes_bad.pt"), TM_ERROR_FORMAT, "used as 17 elements");
}

TEST_CASE("legacy .pt: a listed key that the object never references is refused", "[legacy]") {
    need_fixtures();
    check_refused(*open_fixture("h_unknown_key.pt"), TM_ERROR_FORMAT,
                  "storage key '2' (3 of 3 in the key list) is not referenced");
}

TEST_CASE("legacy .pt: a referenced storage missing from the key list is refused", "[legacy]") {
    need_fixtures();
    check_refused(*open_fixture("h_unlisted.pt"), TM_ERROR_FORMAT,
                  "storage '0' is referenced by the pickled object but missing from the storage key list");
}

TEST_CASE("legacy .pt: a key listed twice is refused", "[legacy]") {
    need_fixtures();
    check_refused(*open_fixture("h_dup.pt"), TM_ERROR_FORMAT, "storage key '0' is listed twice");
}

TEST_CASE("legacy .pt: a missing or malformed key list is refused", "[legacy]") {
    need_fixtures();
    // no fifth pickle: the storage bytes are read as one and make no sense
    auto nokeys = open_fixture("h_nokeys.pt");
    check_refused(*nokeys, nokeys->st, "storage key list pickle at byte");
    CHECK(nokeys->st != TM_OK);
    check_refused(*open_fixture("h_keys_dict.pt"), TM_ERROR_FORMAT,
                  "storage key list (fifth pickle) is a dict");
    check_refused(*open_fixture("h_keys_float.pt"), TM_ERROR_FORMAT,
                  "storage key 1 of the key list is a float");
    // a torch file cut right after the object pickle
    Bytes sd = fixture("sd.pt");
    size_t pos = 0;
    for (int i = 0; i < 4; i++) {
        tm_pickle *pk = nullptr;
        size_t used = 0;
        tm_error err{};
        REQUIRE(tm_pickle_load(sd.data() + pos, sd.size() - pos, "", nullptr, &pk, &used, &err) ==
                TM_OK);
        tm_pickle_free(pk);
        pos += used;
    }
    Opened cut(Bytes(sd.begin(), sd.begin() + static_cast<long>(pos)), "cut.pt");
    check_refused(cut, TM_ERROR_FORMAT, "cut.pt: legacy storage key list pickle at byte " +
                                            std::to_string(pos) + ": pickle: truncated pickle");
}

TEST_CASE("legacy .pt: storage sizes beyond the file are refused without overflow", "[legacy]") {
    need_fixtures();
    check_refused(*open_fixture("h_huge.pt"), TM_ERROR_FORMAT,
                  "declares 2305843009213693952 elements of 4 bytes");
    check_refused(*open_fixture("h_overflow.pt"), TM_ERROR_FORMAT,
                  "declares 4611686018427387905 elements of 4 bytes");
    check_refused(*open_fixture("h_short.pt"), TM_ERROR_FORMAT, "only 12 bytes remain");
    check_refused(*open_fixture("h_count_mismatch.pt"), TM_ERROR_FORMAT,
                  "holds 5 elements but its persistent id says 4");
    check_refused(*open_fixture("h_negative_count.pt"), TM_ERROR_FORMAT,
                  "holds -1 elements but its persistent id says 2");
    // the same through a torch file: a record's count made larger than what follows
    Bytes sd = fixture("sd.pt");
    Opened ok(sd, "sd.pt");
    REQUIRE(ok.st == TM_OK);
    uint64_t off = 0, nb = 0;
    REQUIRE(tm_legacy_pt_storage_at(ok.lp, 0, nullptr, &off, &nb) == TM_OK);
    Bytes bad = sd;
    int64_t huge = INT64_MAX;
    std::memcpy(bad.data() + off - 8, &huge, 8);
    Opened o(bad, "sd.pt");
    check_refused(o, TM_ERROR_FORMAT, "persistent id says");
}

TEST_CASE("legacy .pt: big-endian files are refused", "[legacy]") {
    need_fixtures();
    check_refused(*open_fixture("h_bigendian.pt"), TM_ERROR_UNSUPPORTED,
                  "h_bigendian.pt: big-endian checkpoints are not supported");
    // a torch file whose sys_info says little_endian False (NEWTRUE -> NEWFALSE)
    Bytes sd = fixture("sd.pt");
    std::string s(sd.begin(), sd.end());
    size_t at = s.find("little_endian");
    REQUIRE(at != std::string::npos);
    size_t t = s.find('\x88', at);
    REQUIRE(t != std::string::npos);
    REQUIRE(t - at < 20);
    sd[t] = 0x89;
    Opened o(sd, "model.pt");
    check_refused(o, TM_ERROR_UNSUPPORTED, "model.pt: big-endian checkpoints are not supported");
}

TEST_CASE("legacy .pt: the magic number and protocol version and sys_info are checked", "[legacy]") {
    need_fixtures();
    check_refused(*open_fixture("h_magic.pt"), TM_ERROR_FORMAT, "magic number");
    check_refused(*open_fixture("h_version.pt"), TM_ERROR_UNSUPPORTED,
                  "protocol version 1000 is not supported");
    check_refused(*open_fixture("h_sysinfo_list.pt"), TM_ERROR_FORMAT, "sys_info is a list");
    auto zip = open_fixture("zip.pt");
    CHECK(zip->st != TM_OK);
    CHECK_THAT(zip->msg(), Catch::StartsWith("zip.pt: "));
    Opened empty(Bytes{}, "empty.pt");
    CHECK(empty.st == TM_ERROR_FORMAT);
    CHECK_THAT(empty.msg(), Catch::StartsWith("empty.pt: legacy magic number pickle at byte 0"));
}

TEST_CASE("legacy .pt: storage views from PyTorch before 0.4 are refused clearly", "[legacy]") {
    need_fixtures();
    check_refused(*open_fixture("h_view.pt"), TM_ERROR_UNSUPPORTED, "storage views (legacy view_metadata)");
}

// (No ';' or ',' in test names: catch_discover_tests would split the name and run nothing.)
TEST_CASE("legacy .pt: a whole pickled module opens and its module persistent ids are inert", "[legacy]") {
    need_fixtures();
    auto o = open_ok("module.pt");
    CHECK(o->root()->kind == TM_PK_OBJECT);  // torch.save(model): the module object itself
    CHECK(tensors(*o).empty());              // the plain walk does not enter objects...
    tm_checkpoint *ck = nullptr;
    REQUIRE(tm_checkpoint_open((tmp() + "/module.pt").c_str(), nullptr, &ck) == TM_OK);
    CHECK(tm_checkpoint_n_tensors(ck) == 9);  // ...state-dict discovery does: 2 Linear + BatchNorm
    tm_checkpoint_free(ck);
}

TEST_CASE("legacy .pt: storage lookup refuses values that are not storages of the file", "[legacy]") {
    need_fixtures();
    auto o = open_ok("h_ok.pt");
    auto other = open_ok("sd.pt");
    Named n = tensors(*o);
    uint64_t off = 0, nb = 0;
    tm_error err{};
    CHECK(tm_legacy_pt_storage(o->lp, n[0].second, &off, &nb, &err) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(tm_legacy_pt_storage(o->lp, nullptr, &off, &nb, &err) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(tm_legacy_pt_storage(nullptr, n[0].second->u.tensor.storage, &off, &nb, &err) ==
          TM_ERROR_INVALID_ARGUMENT);
    const tm_pk_value *foreign = tensors(*other)[0].second->u.tensor.storage;
    CHECK(tm_legacy_pt_storage(o->lp, foreign, &off, &nb, &err) == TM_ERROR_NOT_FOUND);
    CHECK_THAT(std::string(err.msg), Catch::Contains("is not in this file"));
    CHECK(tm_legacy_pt_root(nullptr) == nullptr);
    CHECK(tm_legacy_pt_n_storages(nullptr) == 0);
    tm_legacy_pt_free(nullptr);
    tm_legacy_pt *lp = reinterpret_cast<tm_legacy_pt *>(1);
    CHECK(tm_legacy_pt_open(nullptr, 5, "x.pt", &lp, &err) == TM_ERROR_INVALID_ARGUMENT);
    CHECK(lp == nullptr);
}

// ---- Hostile bytes -------------------------------------------------------------------------

TEST_CASE("legacy .pt: every truncation of a small file is a clean error", "[legacy][hostile]") {
    need_fixtures();
    for (const char *name : {"small.pt", "h_ok.pt"}) {
        Bytes full = fixture(name);
        for (size_t n = 0; n < full.size(); n++) {
            Opened o(Bytes(full.begin(), full.begin() + static_cast<long>(n)), name);
            INFO(name << " cut to " << n << " bytes: " << o.msg());
            REQUIRE(o.st != TM_OK);
            REQUIRE(o.msg().rfind(std::string(name) + ": ", 0) == 0);
            REQUIRE(o.msg().find('\n') == std::string::npos);
        }
        Opened o(full, name);
        CHECK(o.st == TM_OK);
    }
}

TEST_CASE("legacy .pt: corrupting any byte never crashes or escapes the file", "[legacy][hostile]") {
    need_fixtures();
    const uint8_t repl[] = {0x00, 0x01, 0x02, 0x7f, 0x80, 0xff, '(', 'N', 't', 'R', 'e', '.'};
    size_t opened = 0;
    for (const char *name : {"small.pt", "h_ok.pt"}) {
        Bytes full = fixture(name);
        for (size_t i = 0; i < full.size(); i++)
            for (uint8_t r : repl) {
                Bytes b = full;
                b[i] = r;
                Opened o(b, name);
                if (o.st != TM_OK) {
                    CHECK(!o.msg().empty());
                    continue;
                }
                opened++;
                for (const auto &t : tensors(o)) (void)gather(o, t.second);
            }
    }
    CHECK(opened > 0);
}

// ---- Real files --------------------------------------------------------------------------

TEST_CASE("legacy .pt: the four real qnet37 checkpoints match the oracle", "[legacy][realworld]") {
    if (!corpus_present()) return;
    const char *files[] = {"CatoGit__banana-navigation/checkpoint.pth",
                           "AhmedGharbi96__Navigation_with_DQN/checkpoint.pth",
                           "AmrBenSalem__DeepRL-Navigation/checkpoint.pth",
                           "Byambaa0325__Unity-Navigation-DQN/checkpoint.pth"};
    for (const char *f : files) {
        std::unique_ptr<Opened> o;
        Named got = check_against_oracle(f, o);
        CHECK(got.size() == 6);
        for (const auto &t : got) CHECK(t.second->u.tensor.dtype == TM_FLOAT32);
        CHECK(tm_legacy_pt_n_storages(o->lp) == 6);
    }
}

TEST_CASE("legacy .pt: real cgcnn checkpoints from torch 0.3 with rebuild v1 match the oracle", "[legacy][realworld]") {
    if (!corpus_present()) return;
    const char *files[] = {"txie-93__cgcnn/bulk-moduli.pth.tar", "txie-93__cgcnn/shear-moduli.pth.tar",
                           "txie-93__cgcnn/poisson-ratio.pth.tar", "txie-93__cgcnn/efermi.pth.tar",
                           "txie-93__cgcnn/semi-metal-classification.pth.tar"};
    for (const char *f : files) {
        INFO(f);
        std::unique_ptr<Opened> o;
        check_against_oracle(f, o);
        const tm_pk_value *sd = tm_pk_dict_get(o->root(), "state_dict");
        REQUIRE(sd != nullptr);
        REQUIRE(sd->kind == TM_PK_DICT);
        CHECK(sd->u.dict.n == 46);
        for (size_t i = 0; i < sd->u.dict.n; i++) CHECK(sd->u.dict.values[i]->kind == TM_PK_TENSOR);
    }
}

TEST_CASE("legacy .pt: the real burn file with two views of one storage matches the oracle", "[legacy][realworld]") {
    if (!corpus_present()) return;
    std::unique_ptr<Opened> o;
    Named got = check_against_oracle("tracel-ai__burn/legacy_uncloned_views.pt", o);
    const tm_pk_value *t1 = find(got, "tensor1"), *t2 = find(got, "tensor2");
    REQUIRE(t1 != nullptr);
    REQUIRE(t2 != nullptr);
    CHECK(t1->u.tensor.storage == t2->u.tensor.storage);
    CHECK(t1->u.tensor.offset == 10);
    CHECK(t2->u.tensor.offset == 50);
    Range r = storage_range(*o, t1->u.tensor.storage);
    CHECK(r.nbytes == 400);
    CHECK(r.offset + r.nbytes == o->data.size());
    CHECK(tm_legacy_pt_n_storages(o->lp) == 1);
}

TEST_CASE("legacy .pt: every legacy file of the real corpus opens", "[legacy][realworld]") {
    if (!corpus_present()) return;
    std::ifstream f(kCorpus + "/MANIFEST.tsv");
    std::string line;
    std::getline(f, line);
    int n = 0;
    while (std::getline(f, line)) {
        auto c = split(line, '\t');
        if (c.size() < 6) continue;
        Bytes b = read_file(kCorpus + "/" + c[0]);
        bool legacy = tm_legacy_pt_looks_like(b.data(), b.size());
        INFO(c[0]);
        CHECK(legacy == (c[5] == "legacy-pt"));
        if (!legacy) continue;
        Opened o(b, c[0]);
        INFO(o.msg());
        CHECK(o.st == TM_OK);
        n++;
    }
    CHECK(n == 10);
}
