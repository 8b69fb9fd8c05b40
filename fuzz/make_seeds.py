#!/usr/bin/python3
"""Writes the seed corpora of the fuzz targets.

    /usr/bin/python3 fuzz/make_seeds.py OUTDIR [--fixtures DIR] [--realworld DIR]

OUTDIR/<target>/ gets one file per seed for each target of fuzz/CMakeLists.txt:

  zip          every zip archive: the test fixtures (torch.save, TorchScript), the real-world
               files (their big members cut to 64 bytes so they stay small), archives with
               deflated members, zip64 records, comments, empty archives
  pickle       every data.pkl / constants.pkl member of those archives, the pickles of the
               legacy files, and plain pickles of protocols 0-5
  legacy_pt    torch.save(..., _use_new_zipfile_serialization=False) files (protocols 2 and 4)
               and the small real-world legacy files
  safetensors  hand-written safetensors files (every dtype, metadata, scalars, empty tensors)
               and the small real-world ones
  checkpoint   every small file above, whatever its format
and every small file of tests/hostile/TARGET/ (past crashers) for its target.

Inputs: DIR of tests/fixtures/make_fixtures.py (generated into OUTDIR/_fixtures when not
given) and the real-world corpus (default /work/shared/realworld, skipped when absent).
Files over each target's -max_len (fuzz/run.sh) are left out, except big zips and legacy
files, which are shrunk first. Deterministic; needs Python torch (/usr/bin/python3).
"""
import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys
import zipfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAX_LEN = {"zip": 65536, "pickle": 65536, "legacy_pt": 65536, "safetensors": 16384,
           "checkpoint": 65536}


class Corpus:
    def __init__(self, root):
        self.root = root
        self.count = collections.Counter()

    def add(self, target, data, name=""):
        if len(data) > MAX_LEN[target] or not data:
            return
        d = os.path.join(self.root, target)
        os.makedirs(d, exist_ok=True)
        h = hashlib.sha1(data).hexdigest()[:16]
        path = os.path.join(d, (name + "-" if name else "") + h)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
            self.count[target] += 1


def kind_of(data):
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(data) >= 9 and data[8:9] == b"{" and struct.unpack("<Q", data[:8])[0] <= len(data) - 8:
        return "safetensors"
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data.startswith(b"L1195"):
        return "legacy_pt"
    return "other"


def pickles_in(data, limit=5):
    """The consecutive pickles at the start of data (a legacy file holds five)."""
    out, pos = [], 0
    while pos < len(data) and len(out) < limit:
        try:
            end = None
            for op, arg, at in pickletools.genops(io.BytesIO(data[pos:])):
                if op.name == "STOP":
                    end = at + 1
                    break
        except Exception:
            break
        if end is None:
            break
        out.append(data[pos:pos + end])
        pos += end
    return out, pos


def shrink_zip(data, keep=64):
    """The archive rewritten with every member over 4 KiB cut to keep bytes (same names and
    compression), so big real-world files still seed the zip reader."""
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if len(body) > 4096:
                body = body[:keep]
            zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = info.compress_type
            dst.writestr(zi, body)
    return buf.getvalue()


def shrink_legacy(data):
    """The five pickles followed by storage records cut to 8 elements each (the pickled
    sizes no longer match, which also exercises those checks)."""
    pks, pos = pickles_in(data)
    return b"".join(pks) + data[pos:pos + 256]


def add_file(corpus, data, name, filename=""):
    kind = kind_of(data)
    if filename.endswith(".safetensors"):
        kind = "safetensors"
    corpus.add("checkpoint", data, name)
    if kind == "zip":
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            for info in zf.infolist():
                if info.filename.endswith(".pkl"):
                    corpus.add("pickle", zf.read(info), name + "-" + os.path.basename(info.filename))
        except Exception:
            pass
        if len(data) > MAX_LEN["zip"]:
            try:
                data = shrink_zip(data)
                corpus.add("checkpoint", data, name + "-shrunk")
            except Exception:
                return
        corpus.add("zip", data, name)
    elif kind == "legacy_pt":
        pks, _ = pickles_in(data)
        for i, p in enumerate(pks):
            corpus.add("pickle", p, "%s-legacy%d" % (name, i))
        if len(data) > MAX_LEN["legacy_pt"]:
            data = shrink_legacy(data)
            corpus.add("checkpoint", data, name + "-shrunk")
        corpus.add("legacy_pt", data, name)
    elif kind == "safetensors":
        corpus.add("safetensors", data, name)


# ---- generated seeds ------------------------------------------------------------------------

ST_DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
             "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
             "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
             "BOOL": (torch.bool, 1), "C64": (torch.complex64, 8)}


def safetensors_bytes(tensors, metadata=None):
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape) in tensors.items():
        n = 1
        for s in shape:
            n *= s
        size = n * ST_DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + size]}
        blobs.append(bytes((i * 7 + 3) & 0xff for i in range(size)))
        off += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def generated(corpus, work):
    torch.manual_seed(0)
    # legacy torch.save, protocols 2 and 4
    objs = {
        "flat": {"w": torch.randn(3, 4), "b": torch.randn(4)},
        "views": {"base": torch.arange(12.).reshape(3, 4), "t": torch.arange(12.).reshape(3, 4).t()},
        "dtypes": {str(dt): torch.ones(2, dtype=dt) for dt in
                   (torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool)},
        "nested": {"epoch": 1, "state_dict": collections.OrderedDict(a=torch.zeros(2, 2)),
                   "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}},
        "module": torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)),
        "tensor": torch.randn(5),
        "param": torch.nn.Parameter(torch.randn(2)),
        "empty": {"e": torch.empty(0), "s": torch.tensor(1.5)},
    }
    for name, obj in objs.items():
        for proto in (2, 4):
            buf = io.BytesIO()
            torch.save(obj, buf, pickle_protocol=proto, _use_new_zipfile_serialization=False)
            add_file(corpus, buf.getvalue(), "legacy-%s-p%d" % (name, proto))
            buf = io.BytesIO()
            torch.save(obj, buf, pickle_protocol=proto)
            add_file(corpus, buf.getvalue(), "zip-%s-p%d" % (name, proto))

    # plain pickles of every protocol
    values = [
        {"a": [1, 2.5, None, True, "x" * 40, b"by\x00tes"], "b": (1, (2, (3,))), "c": {1, 2}},
        collections.OrderedDict([("k%d" % i, i * 1000003) for i in range(20)]),
        [2 ** 70, -2 ** 70, -1, 0, 255, 65536, 2 ** 31, -2 ** 63, 1e300, float("inf")],
        frozenset(["a", "b"]), bytearray(b"abc"), "unicode \u20ac \U0001f600",
    ]
    for i, v in enumerate(values):
        for proto in range(0, 6):
            corpus.add("pickle", pickle.dumps(v, protocol=proto), "plain%d-p%d" % (i, proto))
    shared = [1, 2]
    corpus.add("pickle", pickle.dumps({"x": shared, "y": shared}, protocol=2), "memo")

    # safetensors
    all_dtypes = {"t_" + k.lower(): (k, (2, 3)) for k in ST_DTYPES}
    cases = {
        "dtypes": (all_dtypes, {"format": "pt"}),
        "scalar-empty": ({"s": ("F32", ()), "e": ("F32", (0,)), "e2": ("I64", (3, 0))}, None),
        "one": ({"weight": ("F16", (4, 4))}, {"format": "pt", "note": "x"}),
        "many": ({"layer.%d.weight" % i: ("F32", (i % 3 + 1, 2)) for i in range(30)}, None),
    }
    for name, (tensors, meta) in cases.items():
        add_file(corpus, safetensors_bytes(tensors, meta), "st-" + name)

    # zips: deflated members, zip64, comments, empty
    def zbytes(members, compression=zipfile.ZIP_STORED, force64=False, comment=b""):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=compression) as zf:
            zf.comment = comment
            for n, d in members:
                zi = zipfile.ZipInfo(n, date_time=(1980, 1, 1, 0, 0, 0))
                zi.compress_type = compression
                with zf.open(zi, "w", force_zip64=force64) as f:
                    f.write(d)
        return buf.getvalue()
    small = io.BytesIO()
    torch.save({"w": torch.randn(2, 2)}, small)
    zf = zipfile.ZipFile(io.BytesIO(small.getvalue()))
    members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    add_file(corpus, zbytes(members, zipfile.ZIP_DEFLATED), "zip-deflated")
    add_file(corpus, zbytes(members, force64=True), "zip-zip64")
    add_file(corpus, zbytes(members, comment=b"a comment"), "zip-comment")
    add_file(corpus, zbytes([]), "zip-empty")
    add_file(corpus, zbytes([("a/data.pkl", b"\x80\x02}q\x00.")], zipfile.ZIP_DEFLATED), "zip-tiny")


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--fixtures")
    ap.add_argument("--realworld", default=os.path.join(os.path.dirname(REPO), "shared", "realworld"))
    args = ap.parse_args(argv[1:])
    out = os.path.abspath(args.outdir)
    for t in MAX_LEN:
        shutil.rmtree(os.path.join(out, t), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    fixtures = args.fixtures
    if not fixtures:
        fixtures = os.path.join(out, "_fixtures")
        subprocess.run([sys.executable, os.path.join(REPO, "tests", "fixtures", "make_fixtures.py"),
                        fixtures], check=True)
    corpus = Corpus(out)
    for name in sorted(os.listdir(fixtures)):
        path = os.path.join(fixtures, name)
        if os.path.isfile(path) and name != "PWNED":
            with open(path, "rb") as f:
                add_file(corpus, f.read(), "fx-" + os.path.splitext(name)[0])
    if os.path.isdir(args.realworld):
        for dirpath, _, files in sorted(os.walk(args.realworld)):
            for name in sorted(files):
                if name.endswith((".tsv", ".md", ".py")) or name == "SHA256SUMS":
                    continue
                with open(os.path.join(dirpath, name), "rb") as f:
                    add_file(corpus, f.read(), "rw-" + os.path.basename(dirpath)[:24], name)
    else:
        print("make_seeds: %s not found, real-world seeds skipped" % args.realworld)
    generated(corpus, out)
    # past crashers and hand-made hostile inputs (tests/hostile/TARGET/) seed their target,
    # except the big ones (the 2^200-path module walks): each run of those takes a second
    # under the sanitizers and would slow every mutation of them down as much
    hostile = os.path.join(REPO, "tests", "hostile")
    for target in MAX_LEN:
        d = os.path.join(hostile, target)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            path = os.path.join(d, name)
            if os.path.getsize(path) <= 16384:
                with open(path, "rb") as f:
                    corpus.add(target, f.read(), "hostile")
    print("make_seeds: " + ", ".join("%s %d" % (t, corpus.count[t]) for t in MAX_LEN))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
