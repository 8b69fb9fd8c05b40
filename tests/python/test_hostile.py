"""Hostile and broken inputs: the CLI must refuse them cleanly.

    TORCHMERGE_BIN=build/torchmerge /usr/bin/python3 -m pytest -q tests/python/test_hostile.py

Every input here is distinct: every truncation of four small checkpoints (torch.save zip,
legacy torch.save, safetensors, TorchScript), 1200 random bit-flip variants, and a catalogue
of crafted files (lengths and offsets past the end, numel x itemsize overflowing 64 bits,
negative and absurd shapes, strides outside the storage, undefined memo indexes, one million
nested lists, opcodes building huge objects, zip bombs, duplicate zip members, safetensors
overlaps and gaps, module cycles, pickles that run code through every opcode that can call).

For each, `torchmerge inspect FILE` and `torchmerge simple_average -o OUT GOOD FILE` must
 - exit with status 1 (bit flips may also succeed: 0) and never by a signal,
 - print exactly one stderr line, 'torchmerge: error: ...', naming the file (and the tensor
   where one is involved),
 - finish within 20 s, within 4 GiB of address space (RLIMIT_AS, via prlimit; under
   AddressSanitizer its own hard_rss_limit_mb instead),
 - leave no output and no temporary file, and never run the payload (no marker file).
The number of distinct inputs is printed in the terminal summary (conftest.py).
"""
import concurrent.futures
import hashlib
import io
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import conftest
import hostile_inputs as H

from cli_runner import BIN, ERROR_PREFIX, require_binary  # noqa: E402
TIMEOUT = 20
MEMORY = 4 << 30
JOBS = max(2, os.cpu_count() or 2)


def _sanitized() -> bool:
    """True when the CLI (or the library it loads) is built with AddressSanitizer."""
    for p in [BIN] + sorted(BIN.parent.glob("libtorchmerge.so*")):
        try:
            if b"__asan_init" in p.read_bytes():
                return True
        except OSError:
            pass
    return False


ASAN = BIN.is_file() and _sanitized()


@dataclass
class Result:
    args: list
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def lines(self):
        return [l for l in self.stderr.splitlines() if l.strip()]

    def describe(self) -> str:
        return "torchmerge %s\n-> exit %s after %.1fs\nstdout:\n%s\nstderr:\n%s" % (
            " ".join(map(str, self.args)), self.rc, self.seconds, self.stdout[-2000:], self.stderr[-4000:])


def tm(*args, cwd) -> Result:
    """Runs the CLI within TIMEOUT seconds and MEMORY bytes of address space."""
    require_binary()
    env = dict(os.environ, LC_ALL="C")
    argv = [str(BIN)] + [str(a) for a in args]
    if ASAN:
        # RLIMIT_AS cannot coexist with ASan's shadow memory: bound the heap through ASan. A
        # sanitizer report exits 99, so it cannot pass for the CLI's own error status 1.
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + \
            ":detect_leaks=1:hard_rss_limit_mb=4096:max_allocation_size_mb=4096:allocator_may_return_null=1:exitcode=99"
        env["UBSAN_OPTIONS"] = env.get("UBSAN_OPTIONS", "") + ":halt_on_error=1:exitcode=99"
    else:
        argv = ["prlimit", "--as=%d" % MEMORY, "--core=0", "--"] + argv
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        return Result(list(args), "timeout", (e.stdout or b"").decode("utf-8", "replace"),
                      (e.stderr or b"").decode("utf-8", "replace"), TIMEOUT)
    return Result(list(args), p.returncode, p.stdout.decode("utf-8", "replace"),
                  p.stderr.decode("utf-8", "replace"), time.monotonic() - t0)


def error_problem(res: Result, name: str, needles=(), allow_success=False):
    """None when res is the clean refusal of the file called name, else what is wrong."""
    if allow_success and res.rc == 0 and not res.lines:
        return None
    if res.rc != 1:
        return "exit status %s (expected 1)" % res.rc
    if len(res.lines) != 1 or not res.lines[0].startswith(ERROR_PREFIX):
        return "stderr is not one 'torchmerge: error:' line"
    line = res.lines[0]
    if name not in line:
        return "the error does not name the file %s" % name
    for n in needles:
        if n not in line:
            return "%r is not in the error" % n
    return None


def assert_refused(res: Result, name: str, *needles):
    problem = error_problem(res, name, needles)
    assert problem is None, problem + "\n" + res.describe()
    return res.lines[0]


# ---- inputs -------------------------------------------------------------------------------------

class Bases:
    """Small valid checkpoints of every format, the bytes of their pieces, and a work folder."""

    def __init__(self, d: Path):
        self.dir = d
        torch.manual_seed(6)
        sd = {"w": torch.randn(2, 3), "b": torch.randn(3)}
        self.files = {}
        buf = io.BytesIO()
        torch.save(sd, buf)
        self.files["zip"] = buf.getvalue()
        buf = io.BytesIO()
        torch.save(sd, buf, _use_new_zipfile_serialization=False)
        self.files["legacy"] = buf.getvalue()
        self.files["safetensors"] = H.safetensors(
            {"__metadata__": {"format": "pt"},
             "b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
             "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [12, 36]}},
            sd["b"].numpy().tobytes() + sd["w"].numpy().tobytes())
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
        self.files["torchscript"] = buf.getvalue()
        self.ext = {"zip": ".pt", "legacy": ".pt", "safetensors": ".safetensors", "torchscript": ".pt"}
        for kind, data in self.files.items():
            (d / ("good_" + kind + self.ext[kind])).write_bytes(data)
        self.good = d / "good_zip.pt"

    def path(self, kind):
        return self.dir / ("good_" + kind + self.ext[kind])


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return Bases(tmp_path_factory.mktemp("hostile_bases"))


def run_case(work: Path, bases: Bases, name: str, data: bytes, needles=(), allow_success=False,
             merge=True, marker: Path = None):
    """Writes data to work/name, runs inspect and a merge against it; returns the problems."""
    path = work / name
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    problems = []
    out = work / ("out_" + name.replace("/", "_") + ".pt")
    runs = [("inspect", tm("inspect", path, cwd=work))]
    if merge:
        # the merge's first input decides the output format: --format pt keeps LibTorch out
        runs.append(("merge", tm("simple_average", "--format", "pt", "-o", out, bases.good, path, cwd=work)))
    for what, res in runs:
        p = error_problem(res, name, needles, allow_success)
        if p:
            problems.append("%s %s: %s\n%s" % (what, name, p, res.describe()))
        if what == "merge" and res.rc != 0 and out.exists():
            problems.append("merge %s: failed but left %s" % (name, out.name))
    leftovers = [f for f in os.listdir(work) if ".tmp." in f]
    if leftovers:
        problems.append("%s: temporary files left: %s" % (name, leftovers))
    if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        problems.append("%s: the input was modified" % name)
    if marker is not None and marker.exists():
        problems.append("%s: THE PAYLOAD RAN (%s exists)" % (name, marker))
    path.unlink()
    if out.exists():
        out.unlink()
    return problems


def run_many(work: Path, bases: Bases, cases, **kw):
    """cases: [(name, data)], run JOBS at a time, each in its own sub-folder."""
    def one(item):
        k, (name, data) = item
        sub = work / ("c%05d" % k)
        sub.mkdir()
        try:
            return run_case(sub, bases, name, data, **kw)
        finally:
            shutil.rmtree(sub, ignore_errors=True)
    problems = []
    with concurrent.futures.ThreadPoolExecutor(JOBS) as ex:
        for p in ex.map(one, enumerate(cases)):
            problems.extend(p)
    return problems


def report(problems, total):
    assert not problems, "%d of %d inputs misbehaved; the first ones:\n\n%s" % (
        len(problems), total, "\n\n".join(problems[:5]))


# ---- every truncation ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "torchscript"])
def test_every_truncation_is_a_clean_error(bases, tmp_path, kind):
    data = bases.files[kind]
    cases = [("trunc_%s_%05d%s" % (kind, n, bases.ext[kind]), data[:n]) for n in range(len(data))]
    # the merge needs LibTorch-free inputs only; the prefix of a file is never a valid file
    problems = run_many(tmp_path, bases, cases, merge=(kind != "torchscript"))
    conftest.count_hostile("truncations", len(cases))
    report(problems, len(cases))


# ---- random bit flips ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "torchscript"])
def test_bit_flips_never_crash_or_hang(bases, tmp_path, kind):
    rng = random.Random(0x7A5E + len(kind))
    data = bases.files[kind]
    cases, seen = [], set()
    while len(cases) < 300:
        b = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
        b = bytes(b)
        if b in seen or b == data:
            continue
        seen.add(b)
        cases.append(("flip_%s_%03d%s" % (kind, len(cases), bases.ext[kind]), b))
    problems = run_many(tmp_path, bases, cases, allow_success=True, merge=(kind != "torchscript"))
    conftest.count_hostile("bit flips", len(cases))
    report(problems, len(cases))


# ---- crafted inputs ---------------------------------------------------------------------------

F = H.floats


def zpt(entries, records=None, **kw):
    return H.torch_zip(H.state_dict(entries), records, **kw)


ITEMSIZE = {"FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "LongStorage": 8}


def one_tensor(numel, offset, size, stride, kind="FloatStorage", record=None, name="w"):
    rec = bytes(max(numel, 0) * ITEMSIZE.get(kind, 4)) if record is None else record
    return zpt([(name, H.tensor("0", numel, offset, size, stride, kind))], {"0": rec})


def nested_lists(n):
    return H.PROTO2 + H.EMPTY_LIST * n + H.APPEND * (n - 1) + H.STOP


def list_copy_bomb(copies):
    """A list of 999,999 None, then list(L) called `copies` times: every call copies it."""
    n = 999_999
    out = H.PROTO2 + H.MARK + H.NONE * n + b"l" + H.put(0) + H.MARK
    out += (H.g("builtins", "list") + H.get(0) + H.TUPLE1 + H.REDUCE) * copies
    return out + H.TUPLE + H.STOP


def module_obj(memo, params, modules):
    """An nn.Module-like object (placeholder class) with state {'_parameters': params,
    '_modules': modules}, memoized as memo."""
    return (H.g("torch.nn.modules.module", "Module") + H.EMPTY_TUPLE + H.NEWOBJ + H.put(memo)
            + H.EMPTY_DICT + H.MARK + H.s("_parameters") + params + H.s("_modules") + modules
            + H.s("_buffers") + H.EMPTY_DICT + H.SETITEMS + H.BUILD)


def module_cycle():
    # m = Module(); m._modules = {'self': m}
    return H.PROTO2 + module_obj(0, H.EMPTY_DICT, H.EMPTY_DICT + H.s("self") + H.get(0) + b"s") + H.STOP


def module_dag(depth):
    """depth modules, each holding the next twice: 2^depth paths to the last one's tensor."""
    t = H.tensor("0", 4, 0, (4,), (1,))
    out = H.PROTO2 + module_obj(0, H.EMPTY_DICT + H.s("w") + t + b"s", H.EMPTY_DICT) + H.put(1)
    for k in range(2, depth + 2):
        mods = H.EMPTY_DICT + H.MARK + H.s("a") + H.get(k - 1) + H.s("b") + H.get(k - 1) + H.SETITEMS
        out += module_obj(1000 + k, H.EMPTY_DICT, mods) + H.put(k)
    return out + H.STOP


def zip_bomb(declared, actual, pickle_head=b""):
    """data.pkl deflated: pickle_head then `actual` zero bytes; the directory says `declared`."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts, crc = [c.compress(pickle_head)], zlib.crc32(pickle_head)
    chunk, left = bytes(1 << 20), actual
    while left > 0:
        piece = chunk[:min(left, len(chunk))]
        parts.append(c.compress(piece))
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    parts.append(c.flush())
    body = b"".join(parts)
    name, vname, ver = b"archive/data.pkl", b"archive/version", b"3\n"
    local = H.local_header(name, body, 8, size=declared, crc=crc)
    head = local + body + H.local_header(vname, ver) + ver
    cd = (H.central_header(name, 0, len(body), declared, 8, crc)
          + H.central_header(vname, len(local) + len(body), len(ver), len(ver), 0, zlib.crc32(ver)))
    return head + cd + H.eocd(2, len(cd), len(head))


def dup_members():
    pkl = H.state_dict([("w", H.tensor("0", 4, 0, (4,), (1,)))])
    members = [(b"archive/data.pkl", pkl, 0, -1), (b"archive/data/0", F(4), 0, -1),
               (b"archive/data/0", F(8), 0, -1)]
    return H.raw_zip(members)


def st_two(offsets_a, offsets_b, data_len, shape_a=(2,), shape_b=(2,)):
    return H.safetensors({"a": {"dtype": "F32", "shape": list(shape_a), "data_offsets": list(offsets_a)},
                          "b": {"dtype": "F32", "shape": list(shape_b), "data_offsets": list(offsets_b)}},
                         bytes(data_len))


def legacy_one(numel, offset, size, stride, record_count=None, record=None, **kw):
    obj = H.PROTO2 + H.EMPTY_DICT + H.s("w") + H.legacy_tensor("0", numel, offset, size, stride) + b"s" + H.STOP
    rec = F(numel) if record is None else record
    return H.legacy_pt(obj, ["0"], [(numel if record_count is None else record_count, rec)], **kw)


def ts_with_constants(pickle_bytes):
    """A TorchScript-like archive (code/ present) whose data.pkl is pickle_bytes."""
    return H.torch_zip(pickle_bytes, {}, prefix="model",
                       extra=[("model/code/__torch__.py", b"class M(Module):\n  pass\n"),
                              ("model/constants.pkl", H.PROTO2 + H.EMPTY_TUPLE + H.STOP)])


def zpt_raw(pickle_bytes):
    return H.torch_zip(pickle_bytes, {"0": F(4)})


def _deflated_record():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, comp in (("archive/data.pkl", H.state_dict([("w", H.tensor("0", 4, 0, (4,), (1,)))]),
                                  zipfile.ZIP_STORED),
                                 ("archive/data/0", F(4), zipfile.ZIP_DEFLATED),
                                 ("archive/version", b"3\n", zipfile.ZIP_STORED)):
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = comp
            zf.writestr(zi, data)
    return buf.getvalue()


def _twice_via_modules():
    """Two submodules whose names join to the same tensor name ('a.b' + 'w' twice)."""
    t = H.tensor("0", 4, 0, (4,), (1,))
    leaf = module_obj(10, H.EMPTY_DICT + H.s("w") + t + b"s", H.EMPTY_DICT)
    mid = module_obj(11, H.EMPTY_DICT, H.EMPTY_DICT + H.s("b") + leaf + b"s")
    root = module_obj(12, H.EMPTY_DICT + H.s("a.b.w") + H.tensor("0", 4, 0, (4,), (1,)) + b"s",
                      H.EMPTY_DICT + H.s("a") + mid + b"s")
    return H.torch_zip(H.PROTO2 + root + H.STOP, {"0": F(4)})


CRAFTED = {
    # name: (builder, needles in the error line)
    # -- lengths and offsets past the end of the file
    "zip_cd_offset_past_eof": (lambda: H.raw_zip([(b"archive/data.pkl", H.state_dict([]), 0, -1)],
                                                 cd_offset_delta=1 << 20), ["central directory"]),
    "zip_local_header_past_eof": (lambda: H.raw_zip([(b"archive/data.pkl", H.state_dict([]), 0, -1)],
                                                    local_offsets=[1 << 30]), ["local header"]),
    "zip_entry_count_lies": (lambda: H.raw_zip([(b"archive/data.pkl", H.state_dict([]), 0, -1)], count=60000), []),
    "zip_eocd_only": (lambda: H.eocd(0, 0, 0), []),
    "zip_member_size_past_eof": (lambda: H.raw_zip([(b"archive/data.pkl", H.state_dict([]), 0, 0xF0000000)],
                                                   comp_sizes=[0xF0000000]), ["archive/data.pkl"]),
    "zip_deflated_member_past_eof": (lambda: H.raw_zip([(b"archive/data.pkl", H.deflate(H.state_dict([])), 8, 100)],
                                                       comp_sizes=[0xF0000000]), ["archive/data.pkl"]),
    "storage_record_missing": (lambda: zpt([("w", H.tensor("7", 4, 0, (4,), (1,)))], {"0": F(4)}), ["'w'", "missing"]),
    "storage_record_shorter_than_numel": (lambda: one_tensor(1000, 0, (10,), (1,), record=F(10)), ["'w'"]),
    "storage_record_compressed": (_deflated_record, ["'w'", "compressed"]),
    "pickle_binunicode_past_eof": (lambda: H.torch_zip(H.PROTO2 + b"X" + struct.pack("<I", 0xfffffff0) + b"abc"), ["truncated"]),
    "pickle_binbytes8_2e63": (lambda: H.torch_zip(H.PROTO4 + b"\x8e" + struct.pack("<Q", 2 ** 63) + b"x"), ["truncated"]),
    "pickle_frame_past_eof": (lambda: H.torch_zip(H.PROTO4 + b"\x95" + struct.pack("<Q", 2 ** 40) + H.NONE + H.STOP), ["frame"]),
    "pickle_no_stop": (lambda: H.torch_zip(H.PROTO2 + H.EMPTY_DICT), ["STOP"]),
    "safetensors_header_len_past_eof": (lambda: struct.pack("<Q", 1 << 40) + b"{}", []),
    "safetensors_offsets_past_eof": (lambda: H.safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                                           bytes(8)), ["'w'"]),
    "legacy_record_count_past_eof": (lambda: legacy_one(4, 0, (4,), (1,), record_count=1 << 40), []),
    "legacy_record_truncated": (lambda: legacy_one(4, 0, (4,), (1,), record=F(2)), ["truncated"]),
    # -- numel x itemsize overflowing 64 bits
    "numel_times_itemsize_overflows": (lambda: one_tensor(1, 0, (2 ** 62,), (0,), "DoubleStorage"), ["'w'"]),
    "numel_overflows_u64": (lambda: one_tensor(1, 0, (2 ** 32, 2 ** 32, 2), (0, 0, 0)), []),
    "empty_tensor_with_huge_dims": (lambda: one_tensor(1, 0, (0, 2 ** 62, 2 ** 62), (1, 1, 1)), ["'w'"]),
    "storage_numel_times_itemsize_overflows": (lambda: one_tensor(2 ** 62, 0, (4,), (1,), "DoubleStorage", record=F(4)), ["'w'"]),
    "safetensors_numel_overflow": (lambda: H.safetensors({"w": {"dtype": "F64", "shape": [2 ** 52, 2 ** 52],
                                                                  "data_offsets": [0, 8]}}, bytes(8)), ["'w'"]),
    "safetensors_bytes_overflow": (lambda: H.safetensors({"w": {"dtype": "F64", "shape": [2 ** 31, 2 ** 31],
                                                                 "data_offsets": [0, 8]}}, bytes(8)), ["'w'"]),
    "legacy_numel_overflow": (lambda: legacy_one(2 ** 62, 0, (4,), (1,), record=F(4)), []),
    # -- negative and absurd shapes
    "negative_size": (lambda: one_tensor(4, 0, (-1, 4), (4, 1)), []),
    "negative_stride": (lambda: one_tensor(4, 0, (2, 2), (-2, 1)), []),
    "negative_offset": (lambda: one_tensor(4, -1, (2,), (1,)), []),
    "absurd_shape_normal_strides": (lambda: one_tensor(4, 0, (2 ** 40, 2 ** 20), (2 ** 20, 1)), []),
    "seventeen_dims": (lambda: one_tensor(1, 0, (1,) * 17, (1,) * 17), []),
    "size_stride_length_differ": (lambda: one_tensor(4, 0, (2, 2), (2,)), []),
    "size_is_a_string": (lambda: zpt([("w", H.g("torch._utils", "_rebuild_tensor_v2") + H.MARK + H.storage("0", 4)
                                        + H.i(0) + H.s("abc") + H.tup(H.i(1)) + H.NEWFALSE
                                        + H.g("collections", "OrderedDict") + H.EMPTY_TUPLE + H.REDUCE
                                        + H.TUPLE + H.REDUCE)], {"0": F(4)}), []),
    "safetensors_negative_shape": (lambda: H.safetensors({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                                                         bytes(4)), ["'w'"]),
    "safetensors_fractional_shape": (lambda: H.safetensors({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}},
                                                           bytes(4)), ["'w'"]),
    "legacy_negative_shape": (lambda: legacy_one(4, 0, (-4,), (1,)), []),
    # -- strides reaching outside the storage
    "stride_past_storage": (lambda: one_tensor(11, 0, (3, 4), (4, 1)), []),
    "offset_past_storage": (lambda: one_tensor(4, 4, (1,), (1,)), []),
    "huge_stride_overflow": (lambda: one_tensor(4, 0, (2, 2), (2 ** 62, 1)), []),
    "stride_span_overflow": (lambda: one_tensor(4, 2 ** 62, (3,), (2 ** 62,)), []),
    "view_past_record_bytes": (lambda: one_tensor(4, 0, (4,), (1,), record=F(3)), ["'w'"]),
    "legacy_view_past_storage": (lambda: legacy_one(4, 1, (4,), (1,)), []),
    "dtype_view_past_untyped_storage": (lambda: zpt([("w", H.g("torch._utils", "_rebuild_tensor_v2") + H.MARK
                                                      + H.tup(H.s("storage"), H.g("torch.storage", "UntypedStorage"),
                                                              H.s("0"), H.s("cpu"), H.i(16)) + H.BINPERSID
                                                      + H.i(0) + H.tup(H.i(4)) + H.tup(H.i(1)) + H.NEWFALSE
                                                      + H.g("collections", "OrderedDict") + H.EMPTY_TUPLE + H.REDUCE
                                                      + H.TUPLE + H.REDUCE)], {"0": F(4)}), []),
    # -- memo indexes out of range
    "memo_binget_undefined": (lambda: H.torch_zip(H.PROTO2 + H.get(5) + H.STOP), ["memo"]),
    "memo_long_binget_max": (lambda: H.torch_zip(H.PROTO2 + b"j\xff\xff\xff\xff" + H.STOP), ["memo"]),
    "memo_get_text_huge": (lambda: H.torch_zip(b"g99999999999999999999999\n."), ["memo"]),
    "memo_put_sparse_then_get": (lambda: H.torch_zip(H.PROTO2 + H.NONE + b"r\xff\xff\xff\x7f" + H.get(0) + H.STOP), ["memo"]),
    "memo_in_tensor_args": (lambda: zpt([("w", H.g("torch._utils", "_rebuild_tensor_v2") + H.MARK + H.get(200)
                                          + H.TUPLE + H.REDUCE)]), ["memo"]),
    # -- nesting
    "lists_nested_1e6_deep": (lambda: H.torch_zip(nested_lists(1_000_000)), ["nesting"]),
    "marks_nested_1e6_deep": (lambda: H.torch_zip(b"(" * 1_000_000 + b"l" * 1_000_000 + b"."), ["MARK"]),
    "tuples_nested_1e6_deep": (lambda: H.torch_zip(H.PROTO2 + H.NONE + H.TUPLE1 * 1_000_000 + H.STOP), ["nesting"]),
    "dicts_nested_1e5_deep": (lambda: H.torch_zip(H.PROTO2 + (H.EMPTY_DICT + H.s("k")) * 100_000 + H.NONE
                                                  + b"s" * 100_000 + H.STOP), ["nesting"]),
    "dict_contains_itself": (lambda: H.torch_zip(H.PROTO2 + H.EMPTY_DICT + H.put(0) + H.s("me") + H.get(0) + b"s" + H.STOP),
                             ["itself"]),
    "module_contains_itself": (lambda: H.torch_zip(module_cycle()), ["itself"]),
    "module_dag_2e200_paths": (lambda: zpt_raw(module_dag(200)), ["limit"]),
    # -- opcodes building huge objects
    "list_copies_past_50M_values": (lambda: H.torch_zip(list_copy_bomb(60)), ["values (limit)"]),
    "stack_of_1e6_values": (lambda: H.torch_zip(H.PROTO2 + H.NONE * 1_000_001 + H.STOP), ["stack"]),
    "memo_1e6_entries": (lambda: H.torch_zip(H.PROTO4 + H.NONE + H.MEMOIZE * 1_000_001 + H.STOP), ["memo"]),
    "decimal_int_1e5_digits": (lambda: H.torch_zip(b"I" + b"9" * 100_000 + b"\n."), ["digits"]),
    "long4_1e6_bytes_then_stop": (lambda: H.torch_zip(H.PROTO2 + b"\x8b" + struct.pack("<I", 1_000_000)
                                                      + b"\x7f" * 1_000_000 + H.STOP), []),
    "dict_1e6_setitems_one_key": (lambda: H.torch_zip(H.PROTO2 + H.EMPTY_DICT + H.MARK
                                                      + (H.s("k") + H.NONE) * 400_000 + H.SETITEMS + H.STOP), []),
    "tensor_names_64KiB": (lambda: zpt([("n" * 70_000, H.tensor("0", 4, 0, (4,), (1,)))], {"0": F(4)}), ["limit"]),
    # -- zip bombs
    "zip_bomb_declares_2GiB": (lambda: zip_bomb(2 << 30, 1 << 20), ["limit"]),
    "zip_bomb_declares_900MiB_holds_1KiB": (lambda: zip_bomb(900 << 20, 1 << 10), ["inflates"]),
    "zip_bomb_holds_more_than_declared": (lambda: zip_bomb(1 << 10, 64 << 20), ["more than"]),
    "zip_bomb_300MiB_of_zeros": (lambda: zip_bomb(300 << 20, 300 << 20), []),
    "zip_bomb_string_over_256MiB": (lambda: zip_bomb((256 << 20) + 1 + 11, (256 << 20) + 1,
                                                      H.PROTO4 + b"\x8d" + struct.pack("<Q", (256 << 20) + 1)),
                                    ["string limit"]),
    # -- duplicate member names
    "zip_duplicate_storage_member": (dup_members, ["duplicate"]),
    "zip_duplicate_data_pkl": (lambda: H.raw_zip([(b"archive/data.pkl", H.state_dict([]), 0, -1),
                                                  (b"archive/data.pkl", H.state_dict([]), 0, -1)]), ["duplicate"]),
    "tensor_name_twice": (_twice_via_modules, ["twice"]),
    "safetensors_name_twice": (lambda: H.safetensors(None, bytes(8), raw_header=(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')), ["twice"]),
    # -- safetensors overlaps and gaps
    "safetensors_overlap": (lambda: st_two((0, 8), (4, 12), 12), ["overlap"]),
    "safetensors_gap": (lambda: st_two((0, 8), (12, 20), 20), ["gap"]),
    "safetensors_not_from_zero": (lambda: st_two((4, 12), (12, 20), 20), ["belong to no tensor"]),
    "safetensors_trailing_bytes": (lambda: st_two((0, 8), (8, 16), 24), ["trailing"]),
    "safetensors_same_range_twice": (lambda: st_two((0, 8), (0, 8), 8), ["overlap"]),
    "safetensors_end_before_begin": (lambda: st_two((8, 0), (0, 8), 8), ["'a'"]),
    "safetensors_header_not_json": (lambda: H.safetensors(None, b"", raw_header=b"{not json"), ["JSON"]),
    "safetensors_header_nul_escape": (lambda: H.safetensors(None, bytes(4), raw_header=(
        b'{"a\\u0000b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')), ["NUL"]),
    "safetensors_dtype_unknown": (lambda: H.safetensors({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}},
                                                        bytes(4)), ["'w'", "Q7"]),
    # -- legacy file structure
    "legacy_bad_magic": (lambda: H.legacy_pt(H.PROTO2 + H.EMPTY_DICT + H.STOP, [], [],
                                             magic=H.PROTO2 + H.i(0x1950a86a20f9469cfc6c) + H.STOP)
                         .replace(b"\x6c\xfc\x9c\x46", b"\x6c\xfc\x9c\x47", 1), []),
    "legacy_protocol_1000": (lambda: legacy_one(4, 0, (4,), (1,), version=1000), ["1000"]),
    "legacy_big_endian": (lambda: legacy_one(4, 0, (4,), (1,), sys_info=H.PROTO2 + H.EMPTY_DICT + H.s("little_endian")
                                             + H.NEWFALSE + b"s" + H.STOP), ["big-endian"]),
    "legacy_key_listed_twice": (lambda: H.legacy_pt(H.PROTO2 + H.EMPTY_DICT + H.s("w")
                                                     + H.legacy_tensor("0", 1, 0, (1,), (1,)) + b"s" + H.STOP,
                                                     ["0", "0"], [(1, F(1)), (1, F(1))]), ["twice"]),
    "legacy_unlisted_storage": (lambda: H.legacy_pt(H.PROTO2 + H.EMPTY_DICT + H.s("w")
                                                    + H.legacy_tensor("0", 1, 0, (1,), (1,)) + b"s" + H.STOP,
                                                    [], []), ["missing"]),
    # -- names that would break the one-line error
    "tensor_name_with_newline": (lambda: zpt([("evil\nname", H.tensor("0", 100, 0, (100,), (1,)))], {"0": F(4)}),
                                 ["evil\\x0Aname"]),
    "zip_member_name_with_newline": (lambda: H.raw_zip([(b"archive/data.pkl", H.state_dict([]), 0, -1),
                                                        (b"x\ny", b"", 0, -1), (b"x\ny", b"", 0, -1)]), ["x\\x0Ay"]),
    # -- other inputs that are not what they claim
    "torchscript_code_but_bad_pickle": (lambda: ts_with_constants(H.PROTO2 + H.get(3) + H.STOP), ["memo"]),
    "unsupported_persistent_id": (lambda: H.torch_zip(H.PROTO2 + H.tup(H.s("module"), H.NONE) + H.BINPERSID + H.STOP),
                                  ["persistent id"]),
    "storage_type_unknown": (lambda: one_tensor(4, 0, (4,), (1,), kind="QUInt4x2Storage"), ["QUInt4x2Storage"]),
    # quantized storages are read through _rebuild_qtensor only: a plain rebuild has no scale
    "quantized_storage_plain_tensor": (lambda: one_tensor(4, 0, (4,), (1,), kind="QInt8Storage"),
                                       ["plain tensor on a quantized storage"]),
    "protocol_6": (lambda: H.torch_zip(b"\x80\x06" + H.NONE + H.STOP), ["protocol"]),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_input_is_refused(bases, tmp_path, case):
    build, needles = CRAFTED[case]
    data = build()
    ext = ".safetensors" if case.startswith("safetensors") else ".pt"
    problems = run_case(tmp_path, bases, case + ext, data, needles=needles)
    conftest.count_hostile("crafted", 1)
    assert not problems, "\n\n".join(problems)


# ---- pickles that run code -----------------------------------------------------------------

REFUSAL = re.compile(r"refusing global ([\w.]+)")
EVIL = [(n, gl, r) for n, gl, _, r in H.evil_pickles("/nonexistent/M")]
CONTAINERS = ["zip", "legacy", "torchscript", "zip_deflated"]


def wrap(container, pkl):
    if container == "zip":
        return H.torch_zip(pkl)
    if container == "zip_deflated":
        return H.torch_zip(pkl, pkl_compress=zipfile.ZIP_DEFLATED)
    if container == "torchscript":
        return ts_with_constants(pkl)
    # legacy: the payload is the object pickle (4th of the five)
    return H.legacy_pt(pkl, [], [])


def test_evil_payloads_really_run_code(tmp_path):
    """Guards the refusal tests: under a real unpickler each payload creates its marker."""
    for name, _, data, runs in H.evil_pickles(str(tmp_path / "marker")):
        if not runs:
            continue
        marker = tmp_path / "marker"
        f = tmp_path / (name + ".pkl")
        f.write_bytes(data)
        subprocess.run([sys.executable, "-c", "import pickle,sys\ntry: pickle.load(open(sys.argv[1],'rb'))\n"
                        "except Exception: pass", str(f)], timeout=60)
        for _ in range(250):
            if marker.exists():
                break
            time.sleep(0.02)
        assert marker.exists(), "%s does not run its payload under pickle.load" % name
        marker.unlink()


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("name,glob,runs", EVIL, ids=[e[0] for e in EVIL])
def test_code_running_pickle_is_refused(bases, tmp_path, name, glob, runs, container):
    marker = tmp_path / "PWNED"
    data = dict((n, d) for n, _, d, _ in H.evil_pickles(str(marker)))[name]
    problems = run_case(tmp_path, bases, "evil_%s_%s.pt" % (name, container), wrap(container, data),
                        needles=["refusing global " + glob], marker=marker)
    time.sleep(0.05)  # a Popen payload would create the marker asynchronously
    if marker.exists():
        problems.append("THE PAYLOAD RAN")
    conftest.count_hostile("code-running pickles", 1)
    assert not problems, "\n\n".join(problems)


# ---- resource limits (documented in README's security section) -------------------------------

LIMITS = {
    # limit: (builder, needles)
    "nesting depth 1000": (lambda: H.torch_zip(nested_lists(1001)), ["nesting deeper than 1000 (limit)"]),
    "nesting depth 1000 (MARK)": (lambda: H.torch_zip(b"(" * 1001 + H.NONE + b"t" * 1001 + b"."),
                                  ["nesting deeper than 1000 (limit)"]),
    "memo 1,000,000 entries": (lambda: H.torch_zip(H.PROTO4 + H.NONE + H.MEMOIZE * 1_000_001 + H.STOP),
                               ["more than 1000000 memo entries (limit)"]),
    "string 256 MiB": (lambda: zip_bomb((256 << 20) + 1 + 11, (256 << 20) + 1,
                                        H.PROTO4 + b"\x8d" + struct.pack("<Q", (256 << 20) + 1)),
                       ["exceeds the 268435456-byte string limit"]),
    "50,000,000 values": (lambda: H.torch_zip(list_copy_bomb(60)), ["more than 50000000 values (limit)"]),
    "stack 1,000,000": (lambda: H.torch_zip(H.PROTO2 + H.NONE * 1_000_001 + H.STOP),
                        ["stack deeper than 1000000 (limit)"]),
    "data.pkl 1 GiB": (lambda: zip_bomb((1 << 30) + 1, 1 << 10), ["more than the limit of 1073741824 bytes"]),
    "decimal integer 4300 digits": (lambda: H.torch_zip(b"I" + b"7" * 4301 + b"\n."), ["longer than 4300 digits"]),
    "module nesting 256": (lambda: H.torch_zip(H.PROTO2 + _module_chain(258) + H.STOP),
                           ["modules nested deeper than 256"]),
    "100,000 module visits": (lambda: zpt_raw(module_dag(40)), ["more than 100000 modules to walk (limit)"]),
    "tensor name 64 KiB": (lambda: zpt([("n" * 65537, H.tensor("0", 4, 0, (4,), (1,)))], {"0": F(4)}),
                           ["more than 65536 (limit)"]),
    "1,000,000 tensors": (lambda: H.torch_zip(_many_tensors(1_000_001), {"0": F(4)}),
                          ["more than 1000000 tensors (limit)"]),
    "256 MiB of tensor names": (lambda: H.torch_zip(_long_names(4600), {"0": F(4)}),
                                ["tensor names of more than 268435456 bytes in all (limit)"]),
    "200,000,000 search steps": (lambda: H.torch_zip(_costly_search(100_000, 2_500), {"0": F(4)}),
                                 ["more than 200000000 steps to search (limit)"]),
    "safetensors header 100,000,000 bytes": (None, ["over the limit of 100000000"]),
}


def _many_tensors(n):
    """{'t0': T, 't1': T, ...}: one tensor (memoized) under n names."""
    out = H.PROTO2 + H.EMPTY_DICT + H.s("t") + H.tensor("0", 4, 0, (4,), (1,)) + H.put(0) + b"s"
    for start in range(1, n, 10_000):
        out += H.MARK + b"".join(H.s("t%d" % k) + H.get(0) for k in range(start, min(n, start + 10_000)))
        out += H.SETITEMS
    return out + H.STOP


def _long_names(n):
    """A module whose n submodules (distinct short names) are all one module holding one
    tensor under a 60,000-byte name: n names of 60 KB."""
    leaf = module_obj(1, H.EMPTY_DICT + H.s("w" * 60_000) + H.tensor("0", 4, 0, (4,), (1,)) + b"s",
                      H.EMPTY_DICT)
    mods = H.EMPTY_DICT + H.s("m0") + leaf + b"s" + H.MARK
    mods += b"".join(H.s("m%d" % k) + H.get(1) for k in range(1, n)) + H.SETITEMS
    return H.PROTO2 + module_obj(0, H.EMPTY_DICT, mods) + H.STOP


def _costly_search(width, n):
    """{'k0': D, ..., 'kn': D} where D maps width names to a tensor, then one non-tensor:
    deciding whether D is a state dict reads all of it, once per entry of the root."""
    d = H.EMPTY_DICT + H.MARK + H.s("a") + H.tensor("0", 4, 0, (4,), (1,)) + H.put(1)
    d += b"".join(H.s("a%d" % k) + H.get(1) for k in range(1, width)) + H.s("z") + H.NONE + H.SETITEMS
    out = H.PROTO2 + H.EMPTY_DICT + H.s("k0") + d + H.put(2) + b"s" + H.MARK
    out += b"".join(H.s("k%d" % k) + H.get(2) for k in range(1, n)) + H.SETITEMS
    return out + H.STOP


def _module_chain(depth):
    """depth nested modules, each the only submodule of the one before."""
    out = b""
    for k in range(depth):
        out += (H.g("torch.nn.modules.module", "Module") + H.EMPTY_TUPLE + H.NEWOBJ
                + H.EMPTY_DICT + H.MARK + H.s("_parameters") + H.EMPTY_DICT + H.s("_buffers") + H.EMPTY_DICT
                + H.s("_modules") + H.EMPTY_DICT + H.s("m"))
    out += (H.g("torch.nn.modules.module", "Module") + H.EMPTY_TUPLE + H.NEWOBJ + H.EMPTY_DICT + H.MARK
            + H.s("_parameters") + H.EMPTY_DICT + H.s("_modules") + H.EMPTY_DICT + H.SETITEMS + H.BUILD)
    out += (b"s" + H.SETITEMS + H.BUILD) * depth
    return out


@pytest.mark.parametrize("limit", list(LIMITS))
def test_each_resource_limit_gives_a_clear_error(bases, tmp_path, limit):
    build, needles = LIMITS[limit]
    name = "limit_" + re.sub(r"\W+", "_", limit).strip("_") + ".pt"
    path = tmp_path / name
    if build is None:
        # 8 + 100,000,001 bytes without writing them: a sparse file
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", 100_000_001) + b"{")
            f.truncate(8 + 100_000_001)
        res = tm("inspect", path, cwd=tmp_path)
        assert_refused(res, name, *needles)
        conftest.count_hostile("resource limits", 1)
        return
    problems = run_case(tmp_path, bases, name, build(), needles=needles)
    conftest.count_hostile("resource limits", 1)
    assert not problems, "\n\n".join(problems)


def test_hostile_input_count():
    """Runs last in this file: the total number of distinct hostile inputs run above."""
    counts = conftest.HOSTILE_COUNTS
    total = sum(counts.values())
    if len(counts) == 5:  # every kind ran (not a -k selection)
        assert total >= 5000, counts
    print("hostile inputs: %d (%s)" % (total, ", ".join("%s %d" % kv for kv in sorted(counts.items()))))
