// Unit tests of the safe unpickler and the state-dict pickle writer, against pickles made by
// the real Python pickle / torch.save at test time.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "formats/pickle.h"
#include "formats/pickle_writer.h"
#include "test_support.hpp"


namespace {

using tm_test::Bytes;

// ---- Files and Python ---------------------------------------------------------------------

const std::string &tmp() {
    static tm_test::TempDir d("pickle");
    return d.path;
}

using tm_test::read_file;
using tm_test::write_file;

// Runs a Python script with argv[1] = the temp dir; returns its exit status, and fails the
// test showing its output when it does not exit 0 (unless expect_fail).
int python(const std::string &name, const std::string &code) {
    std::string script = tmp() + "/" + name + ".py";
    write_file(script, code.data(), code.size());
    std::string log = tmp() + "/" + name + ".log";
    std::string cmd = std::string(TM_TEST_PYTHON) + " '" + script + "' '" + tmp() + "' > '" + log +
                      "' 2>&1";
    int rc = std::system(cmd.c_str());
    if (rc != 0) {
        Bytes out = read_file(log);
        FAIL_CHECK("python " << name << " failed:\n" << std::string(out.begin(), out.end()));
    }
    return rc;
}

// Fixtures that need only the pickle module (fast: no torch import).
const char *const plain_fixtures = R"PY(
import sys, os, pickle, collections, argparse, subprocess
out = sys.argv[1]
def w(name, data):
    with open(os.path.join(out, name), 'wb') as f: f.write(data)
L = [7, 8]
obj = {'ints': [0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**31, 2**63 - 1, -2**63,
                2**64, -2**70],
       'f': 1.5, 'neg': -0.25, 'big': 1e300,
       's': 'h\u00e9llo\n\\ \u65e5\r\x00', 'b': b'\x00\xffab', 'ba': bytearray(b'xy'),
       'none': None, 't': True, 'fa': False, 'tup': (1, 2, 3, 4), 'tup1': ('x',), 'empty': (),
       'set': {1, 2}, 'fs': frozenset([3]), 'nested': [[1, [2, [3]]], {}], 'shared': [L, L],
       'od': collections.OrderedDict([('k', 1), ('j', 2)]), 'ns': argparse.Namespace(lr=0.5)}
for p in range(6):
    w('proto%d.pkl' % p, pickle.dumps(obj, protocol=p))
class Evil:
    def __reduce__(self): return (os.system, ('true',))
class Popen:
    def __reduce__(self): return (subprocess.Popen, (['true'],))
class Eval:
    def __reduce__(self): return (eval, ('1',))
for p in range(6):
    w('evil_system%d.pkl' % p, pickle.dumps(Evil(), protocol=p))
    w('evil_popen%d.pkl' % p, pickle.dumps(Popen(), protocol=p))
    w('evil_eval%d.pkl' % p, pickle.dumps(Eval(), protocol=p))
)PY";

// Fixtures from torch.save / torch.jit.save.
const char *const torch_fixtures = R"PY(
import sys, os, io, zipfile, argparse, torch
out = sys.argv[1]
def w(name, data):
    with open(os.path.join(out, name), 'wb') as f: f.write(data)
def datapkl(obj, **kw):
    buf = io.BytesIO(); torch.save(obj, buf, **kw)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    return z.read([n for n in z.namelist() if n.endswith('/data.pkl')][0])
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
w('sd.pkl', datapkl(m.state_dict()))
w('kv.pkl', datapkl(m.state_dict(keep_vars=True)))
w('ns.pkl', datapkl({'args': argparse.Namespace(lr=0.1, name='run'), 'epoch': 3,
                     'state_dict': m.state_dict()}))
buf = io.BytesIO(); torch.save(m.state_dict(), buf, _use_new_zipfile_serialization=False)
w('legacy.pt', buf.getvalue())
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(2, 3)
        self.register_buffer('b', torch.arange(4))
        self.x = [1, 2]
    def forward(self, x): return self.l(x)
buf = io.BytesIO(); torch.jit.save(torch.jit.script(M()), buf)
z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
w('ts.pkl', z.read([n for n in z.namelist() if n.endswith('/data.pkl')][0]))
# what the writer must reproduce byte for byte
x = torch.arange(10.)
w('exact.pkl', datapkl({'a': x, 'v': x[2:5], 'n': torch.zeros(2, 2, 2, 2, dtype=torch.int64),
                        's': torch.tensor(3.5, dtype=torch.float64),
                        '\u00f1\u65e5': torch.ones(3, dtype=torch.bool)}))
w('exact_big.pkl', datapkl({'t%d' % i: torch.zeros(i % 7 + 1) for i in range(1100)}))
w('exact_empty.pkl', datapkl({}))
)PY";

void need_plain_fixtures() {
    static bool done = false;
    if (!done) REQUIRE(python("plain_fixtures", plain_fixtures) == 0);
    done = true;
}

void need_torch_fixtures() {
    static bool done = false;
    if (!done) REQUIRE(python("torch_fixtures", torch_fixtures) == 0);
    done = true;
}

Bytes fixture(const std::string &name) { return read_file(tmp() + "/" + name); }

// ---- Loading and inspecting ---------------------------------------------------------------

struct Loaded {
    tm_status st = TM_OK;
    tm_pickle *pk = nullptr;
    tm_error err{};
    size_t consumed = 0;
    ~Loaded() { tm_pickle_free(pk); }
    const tm_pk_value *root() const { return tm_pickle_root(pk); }
    std::string msg() const { return err.msg; }
};

std::unique_ptr<Loaded> load(const uint8_t *data, size_t n, const tm_pickle_limits *lim = nullptr,
                             const char *label = "model.pt: data.pkl") {
    auto l = std::make_unique<Loaded>();
    l->st = tm_pickle_load(data, n, label, lim, &l->pk, &l->consumed, &l->err);
    if (l->st != TM_OK) REQUIRE(l->pk == nullptr);
    return l;
}

std::unique_ptr<Loaded> load(const Bytes &b, const tm_pickle_limits *lim = nullptr) {
    return load(b.data(), b.size(), lim);
}

std::unique_ptr<Loaded> load_ok(const Bytes &b) {
    auto l = load(b);
    INFO(l->msg());
    REQUIRE(l->st == TM_OK);
    REQUIRE(l->consumed == b.size());
    return l;
}

const tm_pk_value *get(const tm_pk_value *d, const char *key) {
    const tm_pk_value *v = tm_pk_dict_get(d, key);
    INFO("key " << key);
    REQUIRE(v != nullptr);
    return v;
}

std::string str(const tm_pk_value *v) {
    REQUIRE((v->kind == TM_PK_STRING || v->kind == TM_PK_BYTES || v->kind == TM_PK_BIGINT));
    REQUIRE(std::strlen(v->u.str.data) <= v->u.str.len);
    return std::string(v->u.str.data, v->u.str.len);
}

const tm_pk_value *item(const tm_pk_value *v, size_t i) {
    REQUIRE((v->kind == TM_PK_TUPLE || v->kind == TM_PK_LIST || v->kind == TM_PK_SET));
    REQUIRE(i < v->u.seq.n);
    return v->u.seq.items[i];
}

int64_t ival(const tm_pk_value *v) {
    REQUIRE(v->kind == TM_PK_INT);
    return v->u.integer;
}

std::vector<int64_t> dims(const int64_t *d, int32_t n) { return std::vector<int64_t>(d, d + n); }

// Finds dict key position (to check insertion order).
long key_pos(const tm_pk_value *d, const char *key) {
    for (size_t i = 0; i < d->u.dict.n; i++) {
        const tm_pk_value *k = d->u.dict.keys[i];
        if (k->kind == TM_PK_STRING && str(k) == key) return (long)i;
    }
    return -1;
}

// ---- Building pickles by hand --------------------------------------------------------------

struct PB {
    std::string s;
    PB &op(int c) { s.push_back(static_cast<char>(c)); return *this; }
    PB &raw(const std::string &x) { s += x; return *this; }
    PB &le(uint64_t x, int n) {
        for (int i = 0; i < n; i++) op(static_cast<int>((x >> (8 * i)) & 0xff));
        return *this;
    }
    PB &proto(int v) { return op(0x80).op(v); }
    PB &uni(const std::string &x) { op('X').le(x.size(), 4); return raw(x); }
    PB &glob(const std::string &m, const std::string &n) { return op('c').raw(m + "\n" + n + "\n"); }
    PB &sglob(const std::string &m, const std::string &n) {  // protocol 4 STACK_GLOBAL
        op(0x8c).op(static_cast<int>(m.size())).raw(m);
        op(0x8c).op(static_cast<int>(n.size())).raw(n);
        return op(0x93);
    }
    PB &i1(int v) { return op('K').op(v); }
    PB &i4(int32_t v) { return op('J').le(static_cast<uint32_t>(v), 4); }
    PB &i8(int64_t v) { return op(0x8a).op(8).le(static_cast<uint64_t>(v), 8); }
    PB &mark() { return op('('); }
    PB &stop() { return op('.'); }
    Bytes bytes() const { return Bytes(s.begin(), s.end()); }
};

// ('storage', torch.<type>, key, 'cpu', numel) BINPERSID
PB &storage(PB &b, const std::string &mod, const std::string &type, const std::string &key,
            int64_t numel) {
    b.mark().uni("storage").glob(mod, type).uni(key).uni("cpu").i8(numel).op('t').op('Q');
    return b;
}

PB &dims_tuple(PB &b, const std::vector<int64_t> &d) {
    b.mark();
    for (int64_t x : d) b.i8(x);
    return b.op('t');
}

// _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())
Bytes tensor_v2(const std::string &type, int64_t numel, int64_t offset,
                const std::vector<int64_t> &size, const std::vector<int64_t> &stride) {
    PB b;
    b.proto(2).glob("torch._utils", "_rebuild_tensor_v2").mark();
    storage(b, "torch", type, "0", numel).i8(offset);
    dims_tuple(b, size);
    dims_tuple(b, stride);
    b.op(0x89).glob("collections", "OrderedDict").op(')').op('R').op('t').op('R').stop();
    return b.bytes();
}

// _rebuild_tensor_v3(storage, offset, size, stride, False, OrderedDict(), torch.<dtype>)
Bytes tensor_v3(const std::string &stype, int64_t numel, const std::string &dtype,
                const std::vector<int64_t> &size, const std::vector<int64_t> &stride) {
    PB b;
    b.proto(2).glob("torch._utils", "_rebuild_tensor_v3").mark();
    storage(b, stype == "UntypedStorage" ? "torch.storage" : "torch", stype, "k", numel).i8(0);
    dims_tuple(b, size);
    dims_tuple(b, stride);
    b.op(0x89).glob("collections", "OrderedDict").op(')').op('R').glob("torch", dtype);
    b.op('t').op('R').stop();
    return b.bytes();
}

const tm_pk_value *check_tensor(const tm_pk_value *t, tm_dtype dtype, std::vector<int64_t> shape,
                                std::vector<int64_t> stride, int64_t offset = 0) {
    REQUIRE(t->kind == TM_PK_TENSOR);
    CHECK(t->u.tensor.dtype == dtype);
    CHECK(dims(t->u.tensor.shape, t->u.tensor.ndim) == shape);
    CHECK(dims(t->u.tensor.stride, t->u.tensor.ndim) == stride);
    CHECK(t->u.tensor.offset == offset);
    REQUIRE(t->u.tensor.storage != nullptr);
    REQUIRE(t->u.tensor.storage->kind == TM_PK_STORAGE);
    return t->u.tensor.storage;
}

}  // namespace

// ---- Plain pickles ------------------------------------------------------------------------

TEST_CASE("pickle: protocols 0-5 of a nested structure", "[pickle]") {
    need_plain_fixtures();
    for (int proto = 0; proto <= 5; proto++) {
        DYNAMIC_SECTION("protocol " << proto) {
            Bytes b = fixture("proto" + std::to_string(proto) + ".pkl");
            auto l = load_ok(b);
            const tm_pk_value *r = l->root();
            REQUIRE(r->kind == TM_PK_DICT);
            CHECK(r->u.dict.n == 19);
            CHECK(key_pos(r, "ints") == 0);
            CHECK(key_pos(r, "ns") == 18);

            const tm_pk_value *ints = get(r, "ints");
            REQUIRE(ints->kind == TM_PK_LIST);
            REQUIRE(ints->u.seq.n == 14);
            const int64_t want[] = {0, 1, -1, 255, 256, 65535, 65536, INT32_MAX, INT32_MIN,
                                    (int64_t)1 << 31, INT64_MAX, INT64_MIN};
            for (size_t i = 0; i < 12; i++) CHECK(ival(item(ints, i)) == want[i]);
            const tm_pk_value *big = item(ints, 12);  // 2**64
            REQUIRE(big->kind == TM_PK_BIGINT);
            CHECK(str(big) == std::string("\0\0\0\0\0\0\0\0\x01", 9));
            const tm_pk_value *nbig = item(ints, 13);  // -2**70
            REQUIRE(nbig->kind == TM_PK_BIGINT);
            CHECK(str(nbig) == std::string("\0\0\0\0\0\0\0\0\xc0", 9));

            REQUIRE(get(r, "f")->kind == TM_PK_FLOAT);
            CHECK(get(r, "f")->u.real == 1.5);
            CHECK(get(r, "neg")->u.real == -0.25);
            CHECK(get(r, "big")->u.real == 1e300);
            REQUIRE(get(r, "s")->kind == TM_PK_STRING);
            CHECK(str(get(r, "s")) == std::string("h\xc3\xa9llo\n\\ \xe6\x97\xa5\r\0", 14));
            REQUIRE(get(r, "b")->kind == TM_PK_BYTES);
            CHECK(str(get(r, "b")) == std::string("\0\xff" "ab", 4));
            REQUIRE(get(r, "ba")->kind == TM_PK_BYTES);
            CHECK(str(get(r, "ba")) == "xy");
            CHECK(get(r, "none")->kind == TM_PK_NONE);
            REQUIRE(get(r, "t")->kind == TM_PK_BOOL);
            CHECK(get(r, "t")->u.boolean == 1);
            REQUIRE(get(r, "fa")->kind == TM_PK_BOOL);
            CHECK(get(r, "fa")->u.boolean == 0);

            const tm_pk_value *tup = get(r, "tup");
            REQUIRE(tup->kind == TM_PK_TUPLE);
            REQUIRE(tup->u.seq.n == 4);
            CHECK(ival(item(tup, 3)) == 4);
            REQUIRE(get(r, "tup1")->kind == TM_PK_TUPLE);
            CHECK(str(item(get(r, "tup1"), 0)) == "x");
            REQUIRE(get(r, "empty")->kind == TM_PK_TUPLE);
            CHECK(get(r, "empty")->u.seq.n == 0);

            const tm_pk_value *set = get(r, "set");
            REQUIRE(set->kind == TM_PK_SET);
            REQUIRE(set->u.seq.n == 2);
            CHECK(ival(item(set, 0)) + ival(item(set, 1)) == 3);
            const tm_pk_value *fs = get(r, "fs");
            REQUIRE(fs->kind == TM_PK_SET);
            REQUIRE(fs->u.seq.n == 1);
            CHECK(ival(item(fs, 0)) == 3);

            const tm_pk_value *nested = get(r, "nested");
            REQUIRE(nested->kind == TM_PK_LIST);
            const tm_pk_value *n1 = item(nested, 0);
            CHECK(ival(item(n1, 0)) == 1);
            CHECK(ival(item(item(item(n1, 1), 1), 0)) == 3);
            REQUIRE(item(nested, 1)->kind == TM_PK_DICT);
            CHECK(item(nested, 1)->u.dict.n == 0);

            const tm_pk_value *shared = get(r, "shared");
            REQUIRE(shared->u.seq.n == 2);
            CHECK(item(shared, 0) == item(shared, 1));  // one list, through the memo
            CHECK(ival(item(item(shared, 0), 1)) == 8);

            const tm_pk_value *od = get(r, "od");
            REQUIRE(od->kind == TM_PK_DICT);
            REQUIRE(od->u.dict.n == 2);
            CHECK(ival(get(od, "k")) == 1);
            CHECK(key_pos(od, "j") == 1);

            const tm_pk_value *ns = get(r, "ns");
            REQUIRE(ns->kind == TM_PK_OBJECT);
            CHECK(std::string(ns->u.object.module) == "argparse");
            CHECK(std::string(ns->u.object.name) == "Namespace");
            REQUIRE(ns->u.object.state != nullptr);
            REQUIRE(ns->u.object.state->kind == TM_PK_DICT);
            CHECK(get(ns->u.object.state, "lr")->u.real == 0.5);
        }
    }
}

TEST_CASE("pickle: Python 2 style opcodes and stack opcodes", "[pickle]") {
    // protocol 0/1 as Python 2 wrote them: STRING, INT bools, LONG with L, BINSTRING, __builtin__
    PB b;
    b.mark().op('d')
        .raw("S'key'\n").raw("(I01\nI00\nI-7\nL12345678901234567890123L\nS'a\\x41\\n\\'\\101'\n")
        .op('T').le(3, 4).raw("xyz").op('U').op(2).raw("hi")
        .raw("F-2.5\n")
        .raw("c__builtin__\nset\n((lI1\naI1\natR")  // duplicate set items are kept as given
        .raw("tp5\ns")
        .raw("S'k2'\ng5\ns").stop();
    auto l = load_ok(b.bytes());
    const tm_pk_value *t = get(l->root(), "key");
    REQUIRE(t->kind == TM_PK_TUPLE);
    REQUIRE(t->u.seq.n == 9);
    CHECK(item(t, 0)->kind == TM_PK_BOOL);
    CHECK(item(t, 0)->u.boolean == 1);
    CHECK(item(t, 1)->u.boolean == 0);
    CHECK(ival(item(t, 2)) == -7);
    REQUIRE(item(t, 3)->kind == TM_PK_BIGINT);  // 12345678901234567890123 = 0x29d42b64e76714244cb
    CHECK(str(item(t, 3)) == std::string("\xcb\x44\x42\x71\x76\x4e\xb6\x42\x9d\x02", 10));
    CHECK(str(item(t, 4)) == "aA\n'A");
    CHECK(item(t, 4)->kind == TM_PK_STRING);
    CHECK(str(item(t, 5)) == "xyz");
    CHECK(str(item(t, 6)) == "hi");
    CHECK(item(t, 7)->u.real == -2.5);
    REQUIRE(item(t, 8)->kind == TM_PK_SET);
    CHECK(item(t, 8)->u.seq.n == 2);
    CHECK(get(l->root(), "k2") == t);

    // POP (also of a MARK), POP_MARK, DUP, FRAME, MEMOIZE, EMPTY_SET + ADDITEMS, FROZENSET,
    // NEWOBJ_EX
    PB d;
    d.proto(4).op(0x95).le(0, 8).op(']').op(0x94).op('N').op('0').mark().i1(1).i1(2).op('1')
        .mark().op('N').op('0').op('0')  // POP with an empty stack pops the MARK
        .mark().i1(5).op(0x91).op('a')    // frozenset
        .op(0x8f).op(0x94).mark().i1(1).i1(2).op(0x90).op('a')
        .sglob("__main__", "Cfg").op(')').op('}').op(0x92).op('a')
        .op('h').op(0).op('2').op('0').op('0').op('h').op(0).stop();
    auto ld = load_ok(d.bytes());
    const tm_pk_value *lst = ld->root();
    REQUIRE(lst->kind == TM_PK_LIST);
    REQUIRE(lst->u.seq.n == 3);
    CHECK(item(lst, 0)->kind == TM_PK_SET);
    CHECK(ival(item(item(lst, 0), 0)) == 5);
    CHECK(item(lst, 1)->u.seq.n == 2);
    REQUIRE(item(lst, 2)->kind == TM_PK_OBJECT);
    CHECK(std::string(item(lst, 2)->u.object.name) == "Cfg");
}

TEST_CASE("pickle: self-containing data is refused but cycles through objects are kept", "[pickle]") {
    PB a;
    a.proto(2).op(']').op('q').op(0).op('h').op(0).op('a').stop();  // l = []; l.append(l)
    auto la = load(a.bytes());
    CHECK(la->st == TM_ERROR_UNSUPPORTED);
    CHECK_THAT(la->msg(), Catch::Contains("contains itself"));

    // obj.__dict__ = {'self': obj}: fine, objects are opaque
    PB b;
    b.proto(2).glob("argparse", "Namespace").op(')').op(0x81).op('q').op(0)
        .op('}').mark().uni("self").op('h').op(0).op('u').op('b').stop();
    auto lb = load_ok(b.bytes());
    const tm_pk_value *o = lb->root();
    REQUIRE(o->kind == TM_PK_OBJECT);
    CHECK(get(o->u.object.state, "self") == o);
}

TEST_CASE("pickle: dict keys are deduplicated like Python", "[pickle]") {
    PB b;
    b.proto(2).op('}').mark();
    for (int i = 0; i < 50; i++) b.uni("k" + std::to_string(i)).i1(i);
    b.uni("k3").i1(99).i4(1).i1(1).op(0x88).i1(2).op('u').stop();  // True == 1 as a key
    auto l = load_ok(b.bytes());
    const tm_pk_value *d = l->root();
    CHECK(d->u.dict.n == 51);
    CHECK(ival(get(d, "k3")) == 99);
    CHECK(key_pos(d, "k3") == 3);
    CHECK(ival(get(d, "k49")) == 49);
    CHECK(ival(d->u.dict.values[50]) == 2);
}

// ---- Torch checkpoints -----------------------------------------------------------------

TEST_CASE("pickle: torch.save(model.state_dict()) data.pkl", "[pickle][torch]") {
    need_torch_fixtures();
    auto l = load_ok(fixture("sd.pkl"));
    const tm_pk_value *sd = l->root();
    REQUIRE(sd->kind == TM_PK_DICT);  // OrderedDict; its _metadata BUILD is ignored
    REQUIRE(sd->u.dict.n == 7);
    const char *names[] = {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                           "1.running_var", "1.num_batches_tracked"};
    for (int i = 0; i < 7; i++) CHECK(key_pos(sd, names[i]) == i);
    const tm_pk_value *st = check_tensor(get(sd, "0.weight"), TM_FLOAT32, {4, 3}, {3, 1});
    CHECK(st->u.storage.has_dtype == 1);
    CHECK(st->u.storage.dtype == TM_FLOAT32);
    CHECK(std::string(st->u.storage.key) == "0");
    CHECK(std::string(st->u.storage.location) == "cpu");
    CHECK(st->u.storage.numel == 12);
    CHECK(get(sd, "0.weight")->u.tensor.is_parameter == 0);
    CHECK(get(sd, "0.weight")->u.tensor.requires_grad == 0);
    check_tensor(get(sd, "0.bias"), TM_FLOAT32, {4}, {1});
    const tm_pk_value *nbt = get(sd, "1.num_batches_tracked");
    const tm_pk_value *nst = check_tensor(nbt, TM_INT64, {}, {});
    CHECK(nst->u.storage.numel == 1);
    CHECK(std::string(nst->u.storage.key) == "6");
    CHECK(get(sd, "0.weight")->u.tensor.storage != get(sd, "0.bias")->u.tensor.storage);
}

TEST_CASE("pickle: parameters from state_dict(keep_vars=True)", "[pickle][torch]") {
    need_torch_fixtures();
    auto l = load_ok(fixture("kv.pkl"));
    const tm_pk_value *sd = l->root();
    const tm_pk_value *w = get(sd, "0.weight");
    check_tensor(w, TM_FLOAT32, {4, 3}, {3, 1});
    CHECK(w->u.tensor.is_parameter == 1);
    CHECK(w->u.tensor.requires_grad == 1);
    CHECK(get(sd, "1.bias")->u.tensor.is_parameter == 1);
    CHECK(get(sd, "1.running_mean")->u.tensor.is_parameter == 0);
}

TEST_CASE("pickle: checkpoint with an argparse.Namespace keeps its tensors", "[pickle][torch]") {
    need_torch_fixtures();
    auto l = load_ok(fixture("ns.pkl"));
    const tm_pk_value *r = l->root();
    const tm_pk_value *args = get(r, "args");
    REQUIRE(args->kind == TM_PK_OBJECT);
    CHECK(std::string(args->u.object.module) == "argparse");
    CHECK(std::string(args->u.object.name) == "Namespace");
    REQUIRE(args->u.object.state);
    CHECK(str(get(args->u.object.state, "name")) == "run");
    CHECK(ival(get(r, "epoch")) == 3);
    const tm_pk_value *sd = get(r, "state_dict");
    REQUIRE(sd->kind == TM_PK_DICT);
    CHECK(sd->u.dict.n == 7);
    check_tensor(get(sd, "0.weight"), TM_FLOAT32, {4, 3}, {3, 1});
}

TEST_CASE("pickle: legacy torch.save holds several pickles in a row", "[pickle][torch]") {
    need_torch_fixtures();
    Bytes b = fixture("legacy.pt");
    size_t pos = 0;
    std::vector<std::unique_ptr<Loaded>> parts;
    for (int i = 0; i < 5; i++) {
        auto l = load(b.data() + pos, b.size() - pos);
        INFO(l->msg());
        REQUIRE(l->st == TM_OK);
        REQUIRE(l->consumed > 0);
        pos += l->consumed;
        parts.push_back(std::move(l));
    }
    // magic number, protocol version, sys info, the state dict, the storage keys
    CHECK(parts[0]->root()->kind == TM_PK_BIGINT);
    CHECK(ival(parts[1]->root()) == 1001);
    CHECK(parts[2]->root()->kind == TM_PK_DICT);
    const tm_pk_value *sd = parts[3]->root();
    REQUIRE(sd->kind == TM_PK_DICT);
    const tm_pk_value *st = check_tensor(get(sd, "0.weight"), TM_FLOAT32, {4, 3}, {3, 1});
    CHECK(st->u.storage.numel == 12);
    const tm_pk_value *keys = parts[4]->root();
    REQUIRE(keys->kind == TM_PK_LIST);
    REQUIRE(keys->u.seq.n == 7);
    bool listed = false;
    for (size_t i = 0; i < 7; i++) listed = listed || str(item(keys, i)) == st->u.storage.key;
    CHECK(listed);
}

TEST_CASE("pickle: TorchScript data.pkl", "[pickle][torch]") {
    need_torch_fixtures();
    auto l = load_ok(fixture("ts.pkl"));
    const tm_pk_value *m = l->root();
    REQUIRE(m->kind == TM_PK_OBJECT);
    CHECK(std::string(m->u.object.module) == "__torch__");
    const tm_pk_value *state = m->u.object.state;
    REQUIRE(state);
    check_tensor(get(state, "b"), TM_INT64, {4}, {1});
    const tm_pk_value *x = get(state, "x");  // torch.jit._pickle.build_intlist([1, 2])
    REQUIRE(x->kind == TM_PK_LIST);
    CHECK(ival(item(x, 1)) == 2);
    const tm_pk_value *lin = get(state, "l");
    REQUIRE(lin->kind == TM_PK_OBJECT);
    CHECK(std::string(lin->u.object.module) == "__torch__.torch.nn.modules.linear");
    const tm_pk_value *w = get(lin->u.object.state, "weight");
    check_tensor(w, TM_FLOAT32, {3, 2}, {2, 1});
    CHECK(w->u.tensor.requires_grad == 1);
}

TEST_CASE("pickle: storages and v1/v3 rebuilds and bounds", "[pickle]") {
    SECTION("two pids with one key give one storage; int keys become decimal strings") {
        PB b;
        b.proto(2).mark();
        storage(b, "torch", "FloatStorage", "7", 4);
        storage(b, "torch.cuda", "FloatStorage", "7", 4);
        b.mark().uni("storage").glob("torch", "HalfStorage").i4(123456).uni("cuda:1").i1(3)
            .op('N').op('t').op('Q');
        b.op('t').stop();
        auto l = load_ok(b.bytes());
        const tm_pk_value *t = l->root();
        CHECK(item(t, 0) == item(t, 1));
        const tm_pk_value *s = item(t, 2);
        REQUIRE(s->kind == TM_PK_STORAGE);
        CHECK(std::string(s->u.storage.key) == "123456");
        CHECK(std::string(s->u.storage.location) == "cuda:1");
        CHECK(s->u.storage.dtype == TM_FLOAT16);
    }
    SECTION("_rebuild_tensor (v1)") {
        PB b;
        b.proto(2).glob("torch._utils", "_rebuild_tensor").mark();
        storage(b, "torch", "DoubleStorage", "0", 10).i1(4);
        dims_tuple(b, {2, 3});
        dims_tuple(b, {1, 2});
        b.op('t').op('R').stop();
        auto l = load_ok(b.bytes());
        check_tensor(l->root(), TM_FLOAT64, {2, 3}, {1, 2}, 4);  // last element 4+1+4 = 9
    }
    SECTION("_rebuild_tensor_v3 with an untyped storage") {
        auto l = load_ok(tensor_v3("UntypedStorage", 8, "float16", {4}, {1}));
        const tm_pk_value *st = check_tensor(l->root(), TM_FLOAT16, {4}, {1});
        CHECK(st->u.storage.has_dtype == 0);
        CHECK(st->u.storage.numel == 8);
        auto bad = load(tensor_v3("UntypedStorage", 8, "float16", {5}, {1}));
        CHECK(bad->st == TM_ERROR_FORMAT);
        CHECK_THAT(bad->msg(), Catch::Contains("outside its storage"));
        // a quantized dtype means nothing without the scale and zero point of _rebuild_qtensor
        auto q = load(tensor_v3("UntypedStorage", 8, "qint8", {4}, {1}));
        CHECK(q->st == TM_ERROR_FORMAT);
        CHECK_THAT(q->msg(), Catch::Contains("a plain tensor on a quantized storage"));
        auto q4 = load(tensor_v3("UntypedStorage", 8, "quint4x2", {4}, {1}));
        CHECK(q4->st == TM_ERROR_UNSUPPORTED);
        CHECK_THAT(q4->msg(), Catch::Contains("dtype quint4x2 is not supported"));
        auto mismatch = load(tensor_v3("FloatStorage", 8, "float16", {4}, {1}));
        CHECK(mismatch->st == TM_ERROR_FORMAT);
        auto typed = load_ok(tensor_v3("BFloat16Storage", 8, "bfloat16", {2, 4}, {4, 1}));
        check_tensor(typed->root(), TM_BFLOAT16, {2, 4}, {4, 1});
    }
    SECTION("views outside the storage and hostile sizes are refused") {
        CHECK(load_ok(tensor_v2("FloatStorage", 6, 0, {2, 3}, {3, 1}))->root()->kind ==
              TM_PK_TENSOR);
        auto over = load(tensor_v2("FloatStorage", 6, 1, {2, 3}, {3, 1}));
        CHECK(over->st == TM_ERROR_FORMAT);
        CHECK_THAT(over->msg(), Catch::Contains("model.pt: data.pkl: pickle: REDUCE at offset") &&
                                    Catch::Contains("tensor views elements outside its storage"));
        CHECK(load(tensor_v2("FloatStorage", 6, 0, {(int64_t)1 << 62, 4}, {4, 1}))->st ==
              TM_ERROR_FORMAT);
        CHECK(load(tensor_v2("FloatStorage", 6, INT64_MAX, {1}, {1}))->st == TM_ERROR_FORMAT);
        CHECK(load(tensor_v2("FloatStorage", 6, 0, {2, -3}, {3, 1}))->st == TM_ERROR_FORMAT);
        CHECK(load(tensor_v2("FloatStorage", 6, 0, {2, 3}, {3, -1}))->st == TM_ERROR_FORMAT);
        CHECK(load(tensor_v2("FloatStorage", 6, -1, {2}, {1}))->st == TM_ERROR_FORMAT);
        CHECK(load(tensor_v2("FloatStorage", 6, 0, {2, 3}, {3}))->st == TM_ERROR_FORMAT);
        CHECK(load(tensor_v2("FloatStorage", 6, 0, std::vector<int64_t>(17, 1),
                             std::vector<int64_t>(17, 1)))->st == TM_ERROR_UNSUPPORTED);
        // empty tensors do not touch their storage
        CHECK(load_ok(tensor_v2("FloatStorage", 0, 5, {0, 3}, {3, 1}))->root()->kind ==
              TM_PK_TENSOR);
        // a storage with no dtype needs v3
        CHECK(load(tensor_v2("UntypedStorage", 6, 0, {2}, {1}))->st == TM_ERROR_UNSUPPORTED);
    }
    SECTION("unsupported persistent ids") {
        PB b;
        b.proto(2).mark().uni("module").uni("x").op('t').op('Q').stop();
        auto l = load(b.bytes());
        CHECK(l->st == TM_ERROR_UNSUPPORTED);
        CHECK_THAT(l->msg(), Catch::Contains("unsupported persistent id"));
        PB c;
        c.proto(2).uni("7").op('Q').stop();
        CHECK(load(c.bytes())->st == TM_ERROR_UNSUPPORTED);
        PB d;
        d.raw("P7\n.");
        CHECK(load(d.bytes())->st == TM_ERROR_UNSUPPORTED);
        PB e;
        e.proto(2).mark().uni("storage").glob("torch", "QUInt4x2Storage").uni("0").uni("cpu").i1(1)
            .op('t').op('Q').stop();
        CHECK(load(e.bytes())->st == TM_ERROR_UNSUPPORTED);
    }
    SECTION("calling something that is not a global") {
        PB b;
        b.proto(2).i1(1).op(')').op('R').stop();
        auto l = load(b.bytes());
        CHECK(l->st == TM_ERROR_FORMAT);
        CHECK_THAT(l->msg(), Catch::Contains("REDUCE at offset 5"));
    }
}

// ---- Hostile input ---------------------------------------------------------------------------

TEST_CASE("pickle: code-running globals are refused", "[pickle][unsafe]") {
    need_plain_fixtures();
    for (const char *kind : {"system", "popen", "eval"})
        for (int p = 0; p <= 5; p++) {
            std::string name = std::string("evil_") + kind + std::to_string(p) + ".pkl";
            INFO(name);
            auto l = load(fixture(name));
            CHECK(l->st == TM_ERROR_UNSAFE);
            CHECK_THAT(l->msg(), Catch::Contains("refusing global"));
        }

    struct G { const char *m, *n; int unsafe; };
    const G cases[] = {
        {"os", "system", 1}, {"posix", "system", 1}, {"nt", "system", 1},
        {"subprocess", "Popen", 1}, {"builtins", "eval", 1}, {"__builtin__", "eval", 1},
        {"builtins", "exec", 1}, {"builtins", "getattr", 1}, {"builtins", "__import__", 1},
        {"__builtin__", "apply", 1}, {"builtins", "open", 1}, {"importlib.util", "find_spec", 1},
        {"os.path", "join", 1}, {"pickle", "loads", 1}, {"sys", "modules", 1},
        {"argparse", "_os.system", 1}, {"collections", "OrderedDict.__init__.__globals__", 1},
        {"torch", "__builtins__", 1}, {"runpy", "run_path", 1}, {"ctypes", "CDLL", 1},
        {"builtins", "set", 0}, {"__builtin__", "frozenset", 0}, {"builtins", "object", 0},
        {"collections", "OrderedDict", 0}, {"__main__", "MyConfig", 0},
        {"torch._utils", "_rebuild_tensor_v2", 0}, {"numpy.core.multiarray", "scalar", 0},
        {"torch.jit._pickle", "build_intlist", 0}, {"osx_helpers", "thing", 0},
        {"mypkg.Outer", "Inner.Deeper", 0},
    };
    for (const G &g : cases) {
        INFO(g.m << "." << g.n);
        PB a, s, i;
        a.glob(g.m, g.n).stop();
        s.proto(4).sglob(g.m, g.n).stop();
        i.mark().op('i').raw(std::string(g.m) + "\n" + g.n + "\n").stop();
        for (const PB *b : {&a, &s, &i}) {
            auto l = load(b->bytes());
            if (g.unsafe) {
                CHECK(l->st == TM_ERROR_UNSAFE);
                CHECK_THAT(l->msg(), Catch::Contains("refusing global"));
            } else {
                INFO(l->msg());
                CHECK(l->st != TM_ERROR_UNSAFE);
            }
        }
    }
    PB b;
    b.glob("os", "system").stop();
    auto l = load(b.bytes());
    CHECK(l->msg() == "model.pt: data.pkl: pickle: GLOBAL at offset 0: refusing global os.system");
}

TEST_CASE("pickle: memo indices", "[pickle]") {
    PB a;
    a.proto(2).op('h').op(5).stop();
    auto la = load(a.bytes());
    CHECK(la->st == TM_ERROR_FORMAT);
    CHECK_THAT(la->msg(), Catch::Contains("memo index 5 not defined"));
    PB b;  // the largest LONG_BINPUT index is fine: nothing is sized by it
    b.proto(2).op('N').op('r').le(0xffffffff, 4).op('0').op('j').le(0xffffffff, 4).stop();
    auto lb = load_ok(b.bytes());
    CHECK(lb->root()->kind == TM_PK_NONE);
    PB c;
    c.proto(2).op('j').le(0xfffffffe, 4).stop();
    CHECK(load(c.bytes())->st == TM_ERROR_FORMAT);
    PB d;
    d.op('N').raw("p99999999999999999999\n").stop();
    CHECK(load(d.bytes())->st == TM_ERROR_FORMAT);
    PB e;
    e.op('N').raw("p18446744073709551615\ng18446744073709551615\n").stop();
    CHECK(load_ok(e.bytes())->root()->kind == TM_PK_NONE);

    PB g;  // a key first stored sparse stays one entry once dense keys reach it (MEMOIZE
           // then keeps hitting key 5000, as in Python)
    g.proto(4).op('N').op('r').le(5000, 4);
    for (int i = 0; i < 6000; i++) g.op(0x94);
    g.i1(7).op('r').le(5000, 4).op('0').op('0').op('j').le(4999, 4).op('0').op('j').le(5000, 4);
    auto lg = load_ok(g.stop().bytes());
    CHECK(ival(lg->root()) == 7);

    tm_pickle_limits lim;
    tm_pickle_limits_default(&lim);
    lim.max_memo = 10;
    PB f;
    f.proto(4).op('N');
    for (int i = 0; i < 11; i++) f.op(0x94);
    auto lf = load(f.stop().bytes(), &lim);
    CHECK(lf->st == TM_ERROR_LIMIT);
}

TEST_CASE("pickle: every truncation of a real pickle is an error", "[pickle]") {
    need_plain_fixtures();
    Bytes sd = tensor_v2("FloatStorage", 6, 0, {2, 3}, {3, 1});
    for (const Bytes &b : {fixture("proto0.pkl"), fixture("proto2.pkl"), fixture("proto5.pkl"), sd}) {
        for (size_t n = 0; n < b.size(); n++) {
            auto l = load(b.data(), n);
            INFO("prefix " << n << ": " << l->msg());
            CHECK(l->st != TM_OK);
        }
    }
    auto l = load(sd.data(), sd.size() - 1);
    CHECK_THAT(l->msg(), Catch::Contains("truncated pickle"));
}

TEST_CASE("pickle: corrupted bytes never crash", "[pickle]") {
    need_plain_fixtures();
    Bytes base = fixture("proto2.pkl");
    Bytes t = tensor_v2("FloatStorage", 6, 0, {2, 3}, {3, 1});
    const uint8_t repl[] = {0x00, 0x01, 0x7f, 0x80, 0xff, '(', 'N', 't', 'R', 'b', 'u', 'a', '.'};
    for (const Bytes &src : {base, t}) {
        for (size_t i = 0; i < src.size(); i++)
            for (uint8_t r : repl) {
                Bytes b = src;
                b[i] = r;
                auto l = load(b);
                (void)l;
            }
    }
    SUCCEED();
}

TEST_CASE("pickle: nesting one million deep is refused quickly", "[pickle][limits]") {
    const size_t N = 1000000;
    auto t0 = std::chrono::steady_clock::now();
    SECTION("MARKs") {
        std::string s = std::string(N, '(') + std::string(N, 'l') + ".";
        auto l = load(Bytes(s.begin(), s.end()));
        CHECK(l->st == TM_ERROR_LIMIT);
        CHECK_THAT(l->msg(), Catch::Contains("MARK at offset 1000"));
    }
    SECTION("lists appended into each other") {
        std::string s = "\x80\x02" + std::string(N - 1, ']') + std::string(N - 2, 'a') + ".";
        auto l = load(Bytes(s.begin(), s.end()));
        CHECK(l->st == TM_ERROR_LIMIT);
        CHECK_THAT(l->msg(), Catch::Contains("nesting deeper than 1000"));
    }
    SECTION("tuples") {
        std::string s = "\x80\x02N" + std::string(N - 2, '\x85') + ".";
        auto l = load(Bytes(s.begin(), s.end()));
        CHECK(l->st == TM_ERROR_LIMIT);
    }
    auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(secs < 5.0);
}

TEST_CASE("pickle: depth and stack limits are exact", "[pickle][limits]") {
    auto nested = [](size_t depth) {
        std::string s = "\x80\x02" + std::string(depth, ']') + std::string(depth - 1, 'a') + ".";
        return Bytes(s.begin(), s.end());
    };
    CHECK(load(nested(1000))->st == TM_OK);
    CHECK(load(nested(1001))->st == TM_ERROR_LIMIT);
    std::string marks = std::string(1000, '(') + "N" + std::string(1000, 't') + ".";
    CHECK(load(Bytes(marks.begin(), marks.end()))->st == TM_OK);
    std::string more = std::string(1001, '(') + "N" + std::string(1001, 't') + ".";
    CHECK(load(Bytes(more.begin(), more.end()))->st == TM_ERROR_LIMIT);

    tm_pickle_limits lim;
    tm_pickle_limits_default(&lim);
    lim.max_stack = 100;
    std::string nones = std::string(101, 'N') + ".";
    CHECK(load(Bytes(nones.begin(), nones.end()), &lim)->st == TM_ERROR_LIMIT);
    lim.max_stack = 1000000;
    lim.max_items = 1000;
    std::string appends = "](" + std::string(1500, 'N') + "e.";
    CHECK(load(Bytes(appends.begin(), appends.end()), &lim)->st == TM_ERROR_LIMIT);
}

TEST_CASE("pickle: declared lengths are checked before reading", "[pickle][limits]") {
    PB a;
    a.proto(4).op(0x8d).le(0x7fffffffffffffffULL, 8).raw("abc");
    auto la = load(a.bytes());
    CHECK(la->st == TM_ERROR_FORMAT);
    CHECK_THAT(la->msg(), Catch::Contains("truncated pickle"));
    PB b;
    b.proto(2).op('X').le(0xffffffff, 4).raw("abc");
    CHECK(load(b.bytes())->st == TM_ERROR_FORMAT);
    PB c;
    c.proto(4).op(0x8e).le(~0ULL, 8);
    CHECK(load(c.bytes())->st == TM_ERROR_FORMAT);
    PB d;
    d.proto(2).op('T').le(0x80000000u, 4);
    CHECK(load(d.bytes())->st == TM_ERROR_FORMAT);
    PB e;
    e.proto(2).op(0x8b).le(0xfffffff0u, 4);
    CHECK(load(e.bytes())->st == TM_ERROR_FORMAT);

    tm_pickle_limits lim;
    tm_pickle_limits_default(&lim);
    lim.max_string = 8;
    PB f;
    f.proto(2).uni("123456789").stop();
    CHECK(load(f.bytes(), &lim)->st == TM_ERROR_LIMIT);
    PB g;
    g.raw("V123456789\n.");
    CHECK(load(g.bytes(), &lim)->st == TM_ERROR_LIMIT);
    PB h;
    h.raw("I" + std::string(5000, '9') + "\n.");
    CHECK(load(h.bytes())->st == TM_ERROR_LIMIT);
    PB i;
    i.proto(6).op('N').stop();
    CHECK(load(i.bytes())->st == TM_ERROR_UNSUPPORTED);
    PB j;
    j.proto(2).op(0x82).op(1).stop();
    CHECK(load(j.bytes())->st == TM_ERROR_UNSUPPORTED);
    PB k;
    k.proto(5).op(0x97).stop();
    CHECK(load(k.bytes())->st == TM_ERROR_UNSUPPORTED);
    PB m;
    m.proto(2).mark().op('N').op('u').stop();
    auto lm = load(m.bytes());
    CHECK(lm->st == TM_ERROR_FORMAT);
    PB n;
    n.proto(2).op('}').op('N').op('u').stop();
    auto ln = load(n.bytes());
    CHECK(ln->msg() == "model.pt: data.pkl: pickle: SETITEMS at offset 4: no MARK");
}

// ---- Writer --------------------------------------------------------------------------------

namespace {

struct OutTensor {
    std::string name, key;
    tm_dtype dtype;
    std::vector<int64_t> shape, stride;
    int64_t offset, numel;
};

Bytes write_pickle(const std::vector<OutTensor> &ts) {
    std::vector<tm_pk_out_tensor> in;
    for (const OutTensor &t : ts)
        in.push_back({t.name.c_str(), t.dtype, (int32_t)t.shape.size(), t.shape.data(),
                      t.stride.data(), t.offset, t.key.c_str(), t.numel});
    tm_byte_buffer buf{nullptr, 0, 0};
    tm_error err{};
    tm_status st = tm_pickle_write_state_dict(in.data(), in.size(), &buf, &err);
    INFO(err.msg);
    REQUIRE(st == TM_OK);
    Bytes out(buf.data, buf.data + buf.size);
    std::free(buf.data);
    return out;
}

const std::vector<OutTensor> exact_tensors = {
    {"a", "0", TM_FLOAT32, {10}, {1}, 0, 10},
    {"v", "0", TM_FLOAT32, {3}, {1}, 2, 10},
    {"n", "1", TM_INT64, {2, 2, 2, 2}, {8, 4, 2, 1}, 0, 16},
    {"s", "2", TM_FLOAT64, {}, {}, 0, 1},
    {"\xc3\xb1\xe6\x97\xa5", "3", TM_BOOL, {3}, {1}, 0, 3},
};

}  // namespace

TEST_CASE("pickle writer: bytes identical to torch.save", "[pickle][writer][torch]") {
    need_torch_fixtures();
    CHECK(write_pickle(exact_tensors) == fixture("exact.pkl"));
    std::vector<OutTensor> big;
    for (int i = 0; i < 1100; i++) {
        int64_t n = i % 7 + 1;
        big.push_back({"t" + std::to_string(i), std::to_string(i), TM_FLOAT32, {n}, {1}, 0, n});
    }
    CHECK(write_pickle(big) == fixture("exact_big.pkl"));
    CHECK(write_pickle({}) == fixture("exact_empty.pkl"));
}

TEST_CASE("pickle writer: our unpickler reads it back", "[pickle][writer]") {
    std::vector<OutTensor> ts = exact_tensors;
    ts.push_back({"huge", "9", TM_UINT8, {(int64_t)1 << 40}, {1}, 0, (int64_t)1 << 40});
    ts.push_back({"offset", "9", TM_UINT8, {2}, {(int64_t)3 << 32}, 70000, (int64_t)1 << 40});
    Bytes b = write_pickle(ts);
    auto l = load_ok(b);
    const tm_pk_value *d = l->root();
    REQUIRE(d->kind == TM_PK_DICT);
    REQUIRE(d->u.dict.n == ts.size());
    for (size_t i = 0; i < ts.size(); i++) {
        const OutTensor &t = ts[i];
        INFO(t.name);
        CHECK(str(d->u.dict.keys[i]) == t.name);
        const tm_pk_value *st = check_tensor(d->u.dict.values[i], t.dtype, t.shape, t.stride,
                                             t.offset);
        CHECK(std::string(st->u.storage.key) == t.key);
        CHECK(st->u.storage.numel == t.numel);
        CHECK(st->u.storage.dtype == t.dtype);
    }
    CHECK(get(d, "a")->u.tensor.storage == get(d, "v")->u.tensor.storage);
    CHECK(get(d, "huge")->u.tensor.storage == get(d, "offset")->u.tensor.storage);

    // appends to an existing buffer; rejects bad input without touching it
    tm_byte_buffer buf{nullptr, 0, 0};
    tm_error err{};
    tm_pk_out_tensor good = {"x", TM_FLOAT32, 0, nullptr, nullptr, 0, "0", 1};
    REQUIRE(tm_pickle_write_state_dict(&good, 1, &buf, &err) == TM_OK);
    size_t one = buf.size;
    REQUIRE(tm_pickle_write_state_dict(&good, 1, &buf, &err) == TM_OK);
    CHECK(buf.size == 2 * one);
    CHECK(std::memcmp(buf.data, buf.data + one, one) == 0);
    tm_pk_out_tensor bad = good;
    bad.name = "\xff";
    CHECK(tm_pickle_write_state_dict(&bad, 1, &buf, &err) == TM_ERROR_INVALID_ARGUMENT);
    bad = good;
    bad.dtype = TM_DTYPE_COUNT;
    CHECK(tm_pickle_write_state_dict(&bad, 1, &buf, &err) == TM_ERROR_INVALID_ARGUMENT);
    bad = good;
    bad.storage_key = "";
    CHECK(tm_pickle_write_state_dict(&bad, 1, &buf, &err) == TM_ERROR_INVALID_ARGUMENT);
    bad = good;
    bad.storage_offset = 1;  // scalar at element 1 of a 1-element storage
    CHECK(tm_pickle_write_state_dict(&bad, 1, &buf, &err) == TM_ERROR_INVALID_ARGUMENT);
    int64_t shape[2] = {2, 3}, stride[2] = {3, 1};
    tm_pk_out_tensor view = {"m", TM_FLOAT32, 2, shape, stride, 0, "0", 6};
    CHECK(tm_pickle_write_state_dict(&view, 1, &buf, &err) == TM_OK);
    buf.size = 2 * one;
    view.storage_numel = 5;
    CHECK(tm_pickle_write_state_dict(&view, 1, &buf, &err) == TM_ERROR_INVALID_ARGUMENT);
    shape[0] = 0;  // empty tensors never read their storage
    CHECK(tm_pickle_write_state_dict(&view, 1, &buf, &err) == TM_OK);
    buf.size = 2 * one;
    CHECK(buf.size == 2 * one);
    std::free(buf.data);
}

TEST_CASE("pickle writer: torch.load(weights_only=True) reads it", "[pickle][writer][torch]") {
    std::vector<OutTensor> ts = exact_tensors;
    ts.push_back({"big", "4", TM_INT64, {3}, {1}, 0, 3});
    ts.push_back({"h", "5", TM_FLOAT16, {2}, {1}, 0, 2});
    ts.push_back({"c", "6", TM_COMPLEX64, {1}, {1}, 0, 1});
    ts.push_back({"i8", "7", TM_INT8, {2}, {1}, 0, 2});
    Bytes b = write_pickle(ts);
    std::string dir = tmp() + "/wo";
    REQUIRE(std::system(("mkdir -p '" + dir + "'").c_str()) == 0);
    write_file(dir + "/data.pkl", b.data(), b.size());
    float f0[10];
    for (int i = 0; i < 10; i++) f0[i] = (float)i;
    write_file(dir + "/0", f0, sizeof f0);
    int64_t l1[16];
    for (int i = 0; i < 16; i++) l1[i] = i - 8;
    write_file(dir + "/1", l1, sizeof l1);
    double d2 = 3.5;
    write_file(dir + "/2", &d2, sizeof d2);
    uint8_t b3[3] = {1, 0, 1};
    write_file(dir + "/3", b3, sizeof b3);
    int64_t l4[3] = {(int64_t)1 << 40, -((int64_t)1 << 35), INT64_MIN};
    write_file(dir + "/4", l4, sizeof l4);
    uint16_t h5[2] = {0x3c00, 0xc000};  // 1.0, -2.0
    write_file(dir + "/5", h5, sizeof h5);
    float c6[2] = {1.5f, -0.5f};
    write_file(dir + "/6", c6, sizeof c6);
    int8_t i7[2] = {-128, 127};
    write_file(dir + "/7", i7, sizeof i7);
    const char *check = R"PY(
import sys, os, zipfile, torch
d = os.path.join(sys.argv[1], 'wo')
path = os.path.join(d, 'out.pt')
with zipfile.ZipFile(path, 'w') as z:
    z.write(os.path.join(d, 'data.pkl'), 'archive/data.pkl')
    for k in '01234567':
        z.write(os.path.join(d, k), 'archive/data/' + k)
    z.writestr('archive/version', '3\n')
sd = torch.load(path, weights_only=True)
assert type(sd) is dict, type(sd)
assert list(sd) == ['a', 'v', 'n', 's', '\u00f1\u65e5', 'big', 'h', 'c', 'i8'], list(sd)
assert sd['a'].tolist() == [float(i) for i in range(10)]
assert sd['v'].tolist() == [2.0, 3.0, 4.0] and sd['v'].storage_offset() == 2
assert sd['v'].storage().data_ptr() == sd['a'].storage().data_ptr()
assert sd['n'].shape == (2, 2, 2, 2) and sd['n'].dtype == torch.int64
assert sd['n'].flatten().tolist() == list(range(-8, 8))
assert sd['s'].dim() == 0 and sd['s'].item() == 3.5 and sd['s'].dtype == torch.float64
assert sd['\u00f1\u65e5'].tolist() == [True, False, True]
assert sd['big'].tolist() == [2**40, -2**35, -2**63]
assert sd['h'].dtype == torch.float16 and sd['h'].tolist() == [1.0, -2.0]
assert sd['c'].dtype == torch.complex64 and sd['c'].tolist() == [complex(1.5, -0.5)]
assert sd['i8'].dtype == torch.int8 and sd['i8'].tolist() == [-128, 127]
assert not any(t.requires_grad for t in sd.values())
)PY";
    CHECK(python("weights_only", check) == 0);
}
