"""End-to-end tests of the torchmerge CLI on the formats of issue 3: legacy (non-zip) torch.save
files, pickle protocols 4 and 5, safetensors in and out, sharded Hugging Face folders in and out.

Run with the Debian interpreter that has torch 1.13:

    TORCHMERGE_BIN=build/torchmerge /usr/bin/python3 -m pytest -q tests/python/test_formats.py

The inputs are generated once per session (deterministic: every tensor comes from its own
torch.manual_seed) into a temporary folder by the `inp` fixture. There is no safetensors package
here, so safetensors files are written and parsed by hand (8-byte little-endian header length,
JSON header, raw little-endian bytes) with json + struct + torch.frombuffer. Every output is
compared with the float64 reference of reference.py (within one ulp of the output dtype).
"""
import collections
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import reference as ref

REPO = Path(__file__).resolve().parents[2]

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
import fixture_models as fm  # noqa: E402
import make_fixtures  # noqa: E402  (its re-exec only happens when run as a script)

SD_KEYS = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
           "bn.running_var", "bn.num_batches_tracked", "fc.weight", "fc.bias"]
TIED_KEYS = ["emb.weight", "ln.weight", "ln.bias", "head.weight"]
HF_SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json"]


# ---- running the CLI -------------------------------------------------------------------------

from cli_runner import BIN, ERROR_PREFIX, WARNING_PREFIX, Result, assert_error, assert_ok, tm  # noqa: E402,F401


def name_re(name: str) -> str:
    return r"(?<![\w.])" + re.escape(name) + r"(?![\w.])"


def shape_re(shape) -> str:
    dims = [str(int(d)) for d in shape]
    if not dims:
        return r"(\[\]|\(\)|\bscalar\b)"
    inner = r"\s*,\s*".join(dims)
    return r"(\[" + inner + r"\]|\(" + inner + r",?\))"


def listing(folder: Path):
    return sorted(os.listdir(folder))


def tree_hashes(root: Path) -> dict:
    out = {}
    for dirpath, _, files in os.walk(str(root)):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---- safetensors by hand ---------------------------------------------------------------------

ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.complex64: "C64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
DTYPE_FROM_ST = {v: k for k, v in ST_DTYPE.items()}


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def write_safetensors(path, tensors, metadata=None) -> None:
    """A safetensors file as the reference writer makes it: header padded with spaces to a
    multiple of 8 bytes, tensors contiguous in the given order."""
    header = collections.OrderedDict()
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for name, t in tensors.items():
        b = tensor_bytes(t)
        header[name] = {"dtype": ST_DTYPE[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@dataclass
class SafeTensors:
    header_len: int
    header_raw: bytes
    entries: "collections.OrderedDict"  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict                      # {} when absent
    tensors: "collections.OrderedDict"  # name -> torch.Tensor
    data_size: int


def read_safetensors(path) -> SafeTensors:
    """Parses path by hand and checks its structure: a JSON object header, string-to-string
    __metadata__, known dtypes, and byte ranges that tile the data section exactly."""
    data = Path(path).read_bytes()
    assert len(data) >= 8, "%s: shorter than 8 bytes" % path
    (n,) = struct.unpack("<Q", data[:8])
    assert 8 + n <= len(data), "%s: header length %d beyond the file" % (path, n)
    raw = data[8:8 + n]
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=collections.OrderedDict)
    assert isinstance(header, dict), path
    meta = header.pop("__metadata__", None)
    if meta is not None:
        assert isinstance(meta, dict), "%s: __metadata__ is not an object" % path
        for k, v in meta.items():
            assert isinstance(k, str) and isinstance(v, str), \
                "%s: __metadata__[%r] = %r is not a string" % (path, k, v)
    base = 8 + n
    data_size = len(data) - base
    tensors = collections.OrderedDict()
    ranges = []
    for name, e in header.items():
        assert set(e) == {"dtype", "shape", "data_offsets"}, (path, name, e)
        dtype = DTYPE_FROM_ST[e["dtype"]]
        begin, end = e["data_offsets"]
        numel = 1
        for d in e["shape"]:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        assert end - begin == numel * itemsize, (path, name, e)
        ranges.append((begin, end, name))
        buf = bytearray(data[base + begin:base + end])
        if numel == 0:
            t = torch.empty(e["shape"], dtype=dtype)
        else:
            t = torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])
        tensors[name] = t
    pos = 0
    for begin, end, name in sorted(ranges):
        assert begin == pos, "%s: tensor %r starts at %d, expected %d (gap or overlap)" % (
            path, name, begin, pos)
        pos = end
    assert pos == data_size, "%s: data section has %d bytes, tensors cover %d" % (
        path, data_size, pos)
    return SafeTensors(n, raw, header, meta or {}, tensors, data_size)


def assert_header_padded(st: SafeTensors, path) -> None:
    """The data section starts at an 8-byte multiple, the padding being spaces after the JSON."""
    assert (8 + st.header_len) % 8 == 0, "%s: data starts at %d" % (path, 8 + st.header_len)
    text = st.header_raw.decode("utf-8")
    stripped = text.rstrip(" ")
    assert stripped.endswith("}"), "%s: header padding is not spaces: %r" % (path, text[-16:])
    assert len(text) - len(stripped) < 8, "%s: more padding than needed" % path


def read_folder(folder: Path):
    """The tensors of a folder output: (name -> tensor, {shard file: SafeTensors}, index|None)."""
    shards = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))
    out, parsed = collections.OrderedDict(), {}
    for s in shards:
        st = read_safetensors(folder / s)
        parsed[s] = st
        for k, v in st.tensors.items():
            assert k not in out, "tensor %r in two shards" % k
            out[k] = v
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    return out, parsed, index


# ---- generated inputs ------------------------------------------------------------------------

def fixture_sd(tag):
    return fm.make_fixture_net(fm.SEEDS[tag], fm.TRAIN_STEPS[tag]).state_dict()


def blocks_dict(seed):
    """Float32 tensors for shard-size tests: w0..w5 of 512 bytes, 'big' of 2400 bytes, w6."""
    torch.manual_seed(seed)
    d = collections.OrderedDict()
    for i in range(6):
        d["w%d" % i] = torch.randn(128)
    d["big"] = torch.randn(600)
    d["w6"] = torch.randn(128)
    return d


BLOCK_BYTES = [512] * 6 + [2400, 512]


def hf_config(tag):
    return collections.OrderedDict([
        ("architectures", ["FixtureNet"]),
        ("model_type", "fixture"),
        ("hidden_size", 4),
        ("name_or_path", "fixture-%s" % tag),
        ("layer_norm_eps", 1e-05),
        ("tie_word_embeddings", False),
        ("rope_scaling", None),
        ("torch_dtype", "float32"),
        ("transformers_version", "4.40.0"),
        ("id2label", {"0": "cat", "1": "dog"}),
    ])


def write_hf_side_files(folder: Path, tag: str) -> None:
    (folder / "config.json").write_text(json.dumps(hf_config(tag), indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"max_new_tokens": 8 + ord(tag), "do_sample": False}, indent=2) + "\n")
    (folder / "tokenizer.json").write_text(json.dumps(
        {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, tag: 2}}}) + "\n")


# How the FixtureNet state dict is split into shards.
ST_SHARDS = [["conv.weight", "conv.bias"],
             ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"],
             ["fc.weight", "fc.bias"]]
BIN_SHARDS = [SD_KEYS[:5], SD_KEYS[5:]]


def write_index(path: Path, weight_map: dict, total: int) -> None:
    # Hugging Face writes the weight map sorted by name.
    doc = {"metadata": {"total_size": total},
           "weight_map": collections.OrderedDict(sorted(weight_map.items()))}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def make_hf_folder(folder: Path, kind: str, sd, tag: str) -> None:
    folder.mkdir()
    write_hf_side_files(folder, tag)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if kind == "st":
        write_safetensors(folder / "model.safetensors", sd, {"format": "pt"})
    elif kind == "binsingle":
        torch.save(collections.OrderedDict(sd), str(folder / "pytorch_model.bin"))
    elif kind == "sharded":
        wm = {}
        for i, names in enumerate(ST_SHARDS):
            fname = "model-%05d-of-%05d.safetensors" % (i + 1, len(ST_SHARDS))
            write_safetensors(folder / fname, collections.OrderedDict((k, sd[k]) for k in names),
                              {"format": "pt"})
            wm.update({k: fname for k in names})
        write_index(folder / "model.safetensors.index.json", wm, total)
    elif kind == "bin":
        wm = {}
        for i, names in enumerate(BIN_SHARDS):
            fname = "pytorch_model-%05d-of-%05d.bin" % (i + 1, len(BIN_SHARDS))
            torch.save(collections.OrderedDict((k, sd[k]) for k in names), str(folder / fname))
            wm.update({k: fname for k in names})
        write_index(folder / "pytorch_model.bin.index.json", wm, total)
    else:
        raise ValueError(kind)


HF_KINDS = ["st", "sharded", "bin", "binsingle"]
HF_INDEX = {"sharded": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}

HF_KIND_PARAMS = HF_KINDS


class Inputs:
    def __init__(self, d: Path):
        self.dir = d
        self.sd = {}  # name -> the state dict the file was made from (what torchmerge must see)
        self.hashes = {}

    def __call__(self, *names):
        paths = [self.dir / n for n in names]
        return paths[0] if len(paths) == 1 else paths

    def sds(self, *names):
        return [self.sd[n] for n in names]


def legacy_save(obj, path, **kw):
    torch.save(obj, str(path), _use_new_zipfile_serialization=False, **kw)


@pytest.fixture(scope="session")
def inp(tmp_path_factory):
    d = tmp_path_factory.mktemp("format_inputs")
    x = Inputs(d)
    p = lambda name: d / name  # noqa: E731

    for tag in "abc":
        sd = fixture_sd(tag)
        torch.save(sd, str(p("sd_%s.pt" % tag)))
        x.sd["sd_%s.pt" % tag] = sd
        legacy_save(sd, p("legacy_sd_%s.pt" % tag))
        x.sd["legacy_sd_%s.pt" % tag] = sd
        kv = fm.make_fixture_net(fm.SEEDS[tag], fm.TRAIN_STEPS[tag]).state_dict(keep_vars=True)
        legacy_save(kv, p("legacy_kv_%s.pt" % tag))
        x.sd["legacy_kv_%s.pt" % tag] = sd
        nested = make_fixtures.nested_checkpoint(tag)
        legacy_save(nested, p("legacy_nested_%s.pt" % tag))
        x.sd["legacy_nested_%s.pt" % tag] = nested["state_dict"]
        tied = fm.make_tiny_lm(fm.SEEDS[tag]).state_dict()
        torch.save(tied, str(p("tied_%s.pt" % tag)))
        legacy_save(tied, p("legacy_tied_%s.pt" % tag))
        x.sd["tied_%s.pt" % tag] = x.sd["legacy_tied_%s.pt" % tag] = tied
        write_safetensors(p("st_%s.safetensors" % tag), sd, {"format": "pt"})
        x.sd["st_%s.safetensors" % tag] = sd

    for i, tag in enumerate("ab"):
        sd = x.sd["sd_%s.pt" % tag]
        for proto in (4, 5):
            torch.save(sd, str(p("proto%d_zip_%s.pt" % (proto, tag))), pickle_protocol=proto)
            legacy_save(sd, p("proto%d_legacy_%s.pt" % (proto, tag)), pickle_protocol=proto)
            x.sd["proto%d_zip_%s.pt" % (proto, tag)] = sd
            x.sd["proto%d_legacy_%s.pt" % (proto, tag)] = sd
        legacy_save(fm.make_fixture_net(fm.SEEDS[tag], fm.TRAIN_STEPS[tag]),
                    p("legacy_module_%s.pt" % tag))
        x.sd["legacy_module_%s.pt" % tag] = sd
        views = make_fixtures.views_dict(10 + i)
        legacy_save(views, p("legacy_views_%s.pt" % tag))
        x.sd["legacy_views_%s.pt" % tag] = views
        st_views = collections.OrderedDict((k, v.contiguous()) for k, v in views.items())
        write_safetensors(p("st_views_%s.safetensors" % tag), st_views)
        x.sd["st_views_%s.safetensors" % tag] = st_views
        dtypes = make_fixtures.dtype_dict(10 + i)
        legacy_save(dtypes, p("legacy_dtype_%s.pt" % tag))
        x.sd["legacy_dtype_%s.pt" % tag] = dtypes
        st_dtypes = collections.OrderedDict((k, v) for k, v in dtypes.items() if k != "c128")
        write_safetensors(p("st_dtype_%s.safetensors" % tag), st_dtypes)
        x.sd["st_dtype_%s.safetensors" % tag] = st_dtypes
        blocks = blocks_dict(30 + i)
        torch.save(blocks, str(p("blocks_%s.pt" % tag)))
        x.sd["blocks_%s.pt" % tag] = blocks
        torch.manual_seed(40 + i)
        cx = collections.OrderedDict([("w", torch.randn(3)),
                                      ("z", torch.randn(2, dtype=torch.complex128))])
        torch.save(cx, str(p("c128_%s.pt" % tag)))
        x.sd["c128_%s.pt" % tag] = cx
        c64 = collections.OrderedDict([("w", cx["w"]), ("z64", cx["z"].to(torch.complex64))])
        torch.save(c64, str(p("c64_%s.pt" % tag)))
        x.sd["c64_%s.pt" % tag] = c64
        for kind in HF_KINDS:
            make_hf_folder(p("hf_%s_%s" % (kind, tag)), kind, sd, tag)
            x.sd["hf_%s_%s" % (kind, tag)] = sd

    # An index whose second shard is missing.
    broken = p("hf_missing_shard")
    broken.mkdir()
    write_hf_side_files(broken, "a")
    sd = x.sd["sd_a.pt"]
    first = collections.OrderedDict((k, sd[k]) for k in SD_KEYS[:4])
    write_safetensors(broken / "model-00001-of-00002.safetensors", first, {"format": "pt"})
    write_index(broken / "model.safetensors.index.json",
                {k: "model-%05d-of-00002.safetensors" % (1 if k in first else 2) for k in SD_KEYS},
                sum(t.numel() * t.element_size() for t in sd.values()))

    # Indexes whose shards lie outside their folder; the shard file itself is valid, so only
    # the refusal can stop it.
    escape = p("escape")
    escape.mkdir()
    write_safetensors(escape / "x.safetensors", sd, {"format": "pt"})
    (escape / "sub").mkdir()
    for i, shard in enumerate(["../x.safetensors", str(escape / "x.safetensors"),
                               "sub/../../x.safetensors"]):
        folder = escape / ("hf%d" % i)
        (folder / "sub").mkdir(parents=True)
        write_index(folder / "model.safetensors.index.json", {k: shard for k in SD_KEYS},
                    sum(t.numel() * t.element_size() for t in sd.values()))

    x.hashes = tree_hashes(d)
    return x


@pytest.fixture
def work(tmp_path):
    return tmp_path


def merge(work, out, *args):
    """Runs a merge writing `out` (a name inside work, or a path) and checks that it succeeded
    and left nothing else in work."""
    before = set(os.listdir(work))
    slash = "/" if str(out).endswith("/") else ""
    out = work / out if not os.path.isabs(str(out)) else Path(out)
    res = tm(*args[:1], "-o", str(out) + slash, *args[1:], cwd=work)
    assert_ok(res)
    after = set(os.listdir(work))
    assert after - before <= {out.name}, "temporary files left behind: %s\n%s" % (
        sorted(after - before), res.describe())
    return res


def load_pt(path: Path) -> dict:
    out = torch.load(str(path), map_location="cpu", weights_only=True)
    assert type(out) is dict, "output is a %s, not a plain dict" % type(out).__name__
    return out


def merge_pt(work, *args):
    res = merge(work, "out.pt", *args)
    return load_pt(work / "out.pt"), res


def merge_st(work, *args, name="out.safetensors"):
    res = merge(work, name, *args)
    st = read_safetensors(work / name)
    assert_header_padded(st, name)
    return st, res


def check_metadata(meta, method, n_inputs, input_names, weights=None):
    """The merge as recorded: the method, all its parameters (torchmerge_params, defaults
    included), the weights again as torchmerge_weights where the method has weights, inputs."""
    assert meta.get("format") == "pt", meta
    assert meta.get("torchmerge_method") == method, meta
    params = json.loads(meta["torchmerge_params"])
    if weights is None:  # simple_average: normalize (always true) is its one parameter
        assert params == {"normalize": True} and "torchmerge_weights" not in meta, meta
    else:
        w = json.loads(meta["torchmerge_weights"])
        assert w == params["weights"], meta
        assert params["normalize"] is True and meta["torchmerge_normalize"] == "true", meta
        assert isinstance(w, list) and len(w) == n_inputs, meta
        assert all(isinstance(v, (int, float)) for v in w), meta
        s, sg = sum(w), sum(weights)  # the weights as given, or normalised: proportional either way
        for got, given in zip(w, weights):
            assert abs(got / s - given / sg) < 1e-12, (w, weights)
    assert json.loads(meta["torchmerge_inputs"]) == list(input_names), meta


# ---- legacy torch.save files ----------------------------------------------------------------

def test_legacy_state_dicts_merge_to_float64_reference(inp, work):
    names = ("legacy_sd_a.pt", "legacy_sd_b.pt", "legacy_sd_c.pt")
    raw = open(str(inp(names[0])), "rb").read(8)
    assert not raw.startswith(b"PK"), "fixture: not a legacy file"
    out, res = merge_pt(work, "simple_average", *inp(*names))
    merged = ref.reference_merge(ref.load_state_dicts(inp(*names)))
    assert merged.order == SD_KEYS
    ref.assert_state_dict_matches(out, merged)
    ref.assert_state_dict_matches(out, ref.reference_merge(inp.sds(*names)))
    assert int(out["bn.num_batches_tracked"]) == 1
    assert any("num_batches_tracked" in w for w in res.warnings), res.describe()


def test_legacy_weighted_average_matches_reference(inp, work):
    names = ("legacy_sd_a.pt", "legacy_sd_b.pt", "legacy_sd_c.pt")
    out, _ = merge_pt(work, "weighted_average", "--weights", "1,2,7", *inp(*names))
    ref.assert_state_dict_matches(out, ref.reference_merge(inp.sds(*names), [1, 2, 7]))


def test_legacy_keep_vars_parameters_merge_like_plain_tensors(inp, work):
    names = ("legacy_kv_a.pt", "legacy_kv_b.pt", "legacy_kv_c.pt")
    loaded = ref.load_state_dicts(inp(*names))
    assert isinstance(loaded[0]["fc.weight"], torch.nn.Parameter), "fixture: not keep_vars"
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    ref.assert_state_dict_matches(out, ref.reference_merge(loaded))
    ref.assert_state_dict_matches(out, ref.reference_merge(inp.sds("sd_a.pt", "sd_b.pt", "sd_c.pt")))


def test_legacy_nested_checkpoints_use_their_state_dict_entry(inp, work):
    names = ("legacy_nested_a.pt", "legacy_nested_b.pt", "legacy_nested_c.pt")
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    merged = ref.reference_merge(ref.load_state_dicts(inp(*names)))
    ref.assert_state_dict_matches(out, merged)
    assert "epoch" not in out and not any("momentum" in k for k in out)
    raw = ref.load_raw(inp(names[0]))
    assert len(raw["optimizer"]["state"]) > 0  # fixture: the optimizer does hold tensors


def test_legacy_nested_checkpoint_with_key_option(inp, work):
    out, _ = merge_pt(work, "simple_average", "--key", "state_dict",
                      *inp("legacy_nested_a.pt", "sd_b.pt"))
    ref.assert_state_dict_matches(out, ref.reference_merge(
        inp.sds("legacy_nested_a.pt", "sd_b.pt")))



def test_legacy_pickled_whole_module_yields_its_state_dict(inp, work):
    out, _ = merge_pt(work, "simple_average", *inp("legacy_module_a.pt", "legacy_module_b.pt"))
    ref.assert_state_dict_matches(out, ref.reference_merge(
        inp.sds("legacy_module_a.pt", "legacy_module_b.pt")))


def test_legacy_views_sharing_one_storage_merge_by_value(inp, work):
    names = ("legacy_views_a.pt", "legacy_views_b.pt")
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    ref.assert_state_dict_matches(out, ref.reference_merge(ref.load_state_dicts(inp(*names))))
    assert torch.equal(out["transposed"], out["base"].t())
    assert torch.equal(out["slice"], out["base"][1:3])
    assert torch.equal(out["strided"], out["base"][::2])
    assert torch.equal(out["column"], out["base"][:, 1])
    assert torch.equal(out["scalar_view"], out["base"][2, 3])
    assert out["empty2d"].shape == torch.Size([3, 0])


def test_legacy_every_dtype_floats_averaged_others_from_first_input(inp, work):
    names = ("legacy_dtype_a.pt", "legacy_dtype_b.pt")
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    a, b = ref.load_state_dicts(inp(*names))
    ref.assert_state_dict_matches(out, ref.reference_merge([a, b]))
    for name, dtype in make_fixtures.DTYPE_NAMES.items():
        assert out[name].dtype == dtype, name
        if not ref.is_averaged(dtype):
            assert torch.equal(out[name], a[name]), name


@pytest.mark.parametrize("order", [("legacy_sd_a.pt", "sd_b.pt", "legacy_sd_c.pt"),
                                   ("sd_a.pt", "legacy_sd_b.pt", "sd_c.pt")],
                         ids=["legacy-first", "zip-first"])
def test_legacy_and_zip_inputs_mix(inp, work, order):
    out, _ = merge_pt(work, "simple_average", *inp(*order))
    ref.assert_state_dict_matches(out, ref.reference_merge(ref.load_state_dicts(inp(*order))))
    assert int(out["bn.num_batches_tracked"]) == 1


def test_legacy_tied_weights_stay_tied_in_pt_output(inp, work):
    names = ("legacy_tied_a.pt", "legacy_tied_b.pt", "legacy_tied_c.pt")
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    merged = ref.reference_merge(ref.load_state_dicts(inp(*names)))
    assert merged.order == TIED_KEYS
    ref.assert_state_dict_matches(out, merged)
    assert out["emb.weight"].data_ptr() == out["head.weight"].data_ptr(), "the tie was broken"
    assert out["emb.weight"].storage().data_ptr() == out["head.weight"].storage().data_ptr()


def test_legacy_and_zip_tied_inputs_mix_and_stay_tied(inp, work):
    out, _ = merge_pt(work, "simple_average", *inp("legacy_tied_a.pt", "tied_b.pt"))
    ref.assert_state_dict_matches(out, ref.reference_merge(
        inp.sds("legacy_tied_a.pt", "tied_b.pt")))
    assert out["emb.weight"].data_ptr() == out["head.weight"].data_ptr(), "the tie was broken"


def test_inspect_json_reports_legacy_format(inp, work):
    res = tm("inspect", "--json", inp("legacy_sd_a.pt"), cwd=work)
    assert_ok(res)
    doc = json.loads(res.stdout)
    assert doc["format"] == "pt-legacy"
    sd = inp.sd["legacy_sd_a.pt"]
    assert [t["name"] for t in doc["tensors"]] == list(sd)
    for t in doc["tensors"]:
        assert t["dtype"] == ref.NAME_BY_DTYPE[sd[t["name"]].dtype]
        assert t["shape"] == list(sd[t["name"]].shape)


# ---- pickle protocols 4 and 5 ----------------------------------------------------------------

@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("proto", [4, 5])
def test_pickle_protocol_inputs_merge_to_reference(inp, work, proto, container):
    names = ("proto%d_%s_a.pt" % (proto, container), "proto%d_%s_b.pt" % (proto, container))
    if container == "zip":
        import zipfile
        with zipfile.ZipFile(inp(names[0])) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
            assert zf.read(pkl[0])[:2] == bytes([0x80, proto]), "fixture: wrong protocol"
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    ref.assert_state_dict_matches(out, ref.reference_merge(ref.load_state_dicts(inp(*names))))
    ref.assert_state_dict_matches(out, ref.reference_merge(inp.sds("sd_a.pt", "sd_b.pt")))


def test_pickle_protocol_5_mixed_with_protocol_2_and_legacy(inp, work):
    names = ("proto5_zip_a.pt", "legacy_sd_b.pt", "sd_c.pt")
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    ref.assert_state_dict_matches(out, ref.reference_merge(inp.sds(*names)))


# ---- safetensors output ----------------------------------------------------------------------

def test_handwritten_safetensors_fixture_round_trips(inp):
    """Guards the tests below: the hand-written inputs parse back to their state dicts."""
    for name in ("st_a.safetensors", "st_dtype_a.safetensors"):
        st = read_safetensors(inp(name))
        assert_header_padded(st, name)
        assert list(st.tensors) == list(inp.sd[name])
        for k, v in inp.sd[name].items():
            assert st.tensors[k].dtype == v.dtype and torch.equal(st.tensors[k], v), k


def test_safetensors_output_by_extension_matches_reference(inp, work):
    names = ("sd_a.pt", "sd_b.pt", "sd_c.pt")
    st, res = merge_st(work, "simple_average", *inp(*names))
    merged = ref.reference_merge(inp.sds(*names))
    assert set(st.entries) == set(SD_KEYS)
    ref.assert_state_dict_matches(st.tensors, merged, check_order=False)
    assert st.entries["bn.num_batches_tracked"]["dtype"] == "I64"
    assert st.entries["bn.num_batches_tracked"]["shape"] == []
    assert int(st.tensors["bn.num_batches_tracked"]) == 1
    assert st.entries["fc.weight"]["dtype"] == "F32"
    assert listing(work) == ["out.safetensors"]


def test_format_safetensors_option_writes_safetensors_whatever_the_extension(inp, work):
    names = ("sd_a.pt", "sd_b.pt")
    merge(work, "merged.bin", "simple_average", "--format", "safetensors", *inp(*names))
    st = read_safetensors(work / "merged.bin")
    assert_header_padded(st, "merged.bin")
    ref.assert_state_dict_matches(st.tensors, ref.reference_merge(inp.sds(*names)),
                                  check_order=False)
    assert open(str(work / "merged.bin"), "rb").read(2) != b"PK"


@pytest.mark.parametrize("names", [("n",), ("ab", "abcdefg"), ("x" * 13, "y" * 100, "z")],
                         ids=["short", "mixed", "long"])
def test_safetensors_header_is_padded_to_an_8_byte_multiple(work, names):
    torch.manual_seed(5)
    a = collections.OrderedDict((n, torch.randn(3)) for n in names)
    b = collections.OrderedDict((n, torch.randn(3)) for n in names)
    torch.save(a, str(work / "a.pt"))
    torch.save(b, str(work / "b.pt"))
    st, _ = merge_st(work, "simple_average", work / "a.pt", work / "b.pt")
    assert st.header_len % 8 == 0
    ref.assert_state_dict_matches(st.tensors, ref.reference_merge([a, b]), check_order=False)


def test_safetensors_metadata_records_simple_average(inp, work):
    names = ("sd_a.pt", "legacy_sd_b.pt", "st_c.safetensors")
    st, _ = merge_st(work, "simple_average", *inp(*names))
    check_metadata(st.metadata, "simple_average", 3, names)


def test_safetensors_metadata_records_weighted_average_weights(inp, work):
    names = ("sd_a.pt", "sd_b.pt", "sd_c.pt")
    st, _ = merge_st(work, "weighted_average", "--weights", "0.2,0.3,0.5", *inp(*names))
    check_metadata(st.metadata, "weighted_average", 3, names, weights=[0.2, 0.3, 0.5])
    ref.assert_state_dict_matches(st.tensors, ref.reference_merge(inp.sds(*names), [0.2, 0.3, 0.5]),
                                  check_order=False)


def test_safetensors_metadata_inputs_are_basenames_of_folders_and_index_files(inp, work):
    args = (inp("hf_sharded_a"), inp("hf_bin_b") / HF_INDEX["bin"], inp("st_c.safetensors"))
    st, _ = merge_st(work, "simple_average", *args)
    assert json.loads(st.metadata["torchmerge_inputs"]) == [
        "hf_sharded_a", HF_INDEX["bin"], "st_c.safetensors"]


@pytest.mark.parametrize("dtype_name,st_name", [("bfloat16", "BF16"), ("float16", "F16"),
                                                ("float64", "F64")])
def test_dtype_override_to_safetensors(inp, work, dtype_name, st_name):
    names = ("sd_a.pt", "sd_b.pt", "sd_c.pt")
    st, _ = merge_st(work, "simple_average", "--dtype", dtype_name, *inp(*names))
    dtype = ref.DTYPE_BY_NAME[dtype_name]
    for k, e in st.entries.items():
        assert e["dtype"] == ("I64" if k == "bn.num_batches_tracked" else st_name), (k, e)
    ref.assert_state_dict_matches(st.tensors, ref.reference_merge(inp.sds(*names), dtype=dtype),
                                  check_order=False)


def test_complex64_to_safetensors_is_C64(inp, work):
    names = ("c64_a.pt", "c64_b.pt")
    st, _ = merge_st(work, "simple_average", *inp(*names))
    assert st.entries["z64"]["dtype"] == "C64"
    ref.assert_state_dict_matches(st.tensors, ref.reference_merge(inp.sds(*names)),
                                  check_order=False)


def test_complex128_to_safetensors_is_an_error_naming_the_tensor(inp, work):
    res = tm("simple_average", "-o", work / "out.safetensors", *inp("c128_a.pt", "c128_b.pt"),
             cwd=work)
    assert_error(res, "out.safetensors", "'z'", "complex128")
    assert listing(work) == []


def test_complex128_to_safetensors_folder_is_an_error_leaving_no_folder(inp, work):
    res = tm("simple_average", "-o", str(work / "outdir") + "/", *inp("c128_a.pt", "c128_b.pt"),
             cwd=work)
    assert_error(res, "outdir", "'z'", "complex128")
    assert listing(work) == []


# ---- safetensors input -----------------------------------------------------------------------

def test_safetensors_inputs_merge_to_reference(inp, work):
    names = ("st_a.safetensors", "st_b.safetensors", "st_c.safetensors")
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    merged = ref.reference_merge(inp.sds(*names))
    ref.assert_state_dict_matches(out, merged, check_order=False)
    assert set(out) == set(SD_KEYS)
    assert out["bn.num_batches_tracked"].shape == torch.Size([])
    assert int(out["bn.num_batches_tracked"]) == 1


@pytest.mark.parametrize("names", [("st_a.safetensors", "sd_b.pt", "legacy_sd_c.pt"),
                                   ("sd_a.pt", "st_b.safetensors", "legacy_sd_c.pt"),
                                   ("legacy_sd_a.pt", "sd_b.pt", "st_c.safetensors")],
                         ids=["st-first", "pt-first", "legacy-first"])
def test_safetensors_inputs_mixed_with_pt_inputs(inp, work, names):
    out, _ = merge_pt(work, "weighted_average", "--weights", "1,2,7", *inp(*names))
    ref.assert_state_dict_matches(out, ref.reference_merge(inp.sds(*names), [1, 2, 7]),
                                  check_order=False)
    assert int(out["bn.num_batches_tracked"]) == 1


def test_safetensors_inputs_of_every_dtype(inp, work):
    names = ("st_dtype_a.safetensors", "st_dtype_b.safetensors")
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    a, b = inp.sds(*names)
    ref.assert_state_dict_matches(out, ref.reference_merge([a, b]), check_order=False)
    for k, v in a.items():
        assert out[k].dtype == v.dtype, k
        if not ref.is_averaged(v.dtype):
            assert torch.equal(out[k], v), k


def test_safetensors_inputs_to_safetensors_output(inp, work):
    names = ("st_dtype_a.safetensors", "st_dtype_b.safetensors")
    st, _ = merge_st(work, "simple_average", *inp(*names))
    a, _b = inp.sds(*names)
    for k, v in a.items():
        assert st.entries[k]["dtype"] == ST_DTYPE[v.dtype], k
    ref.assert_state_dict_matches(st.tensors, ref.reference_merge(inp.sds(*names)),
                                  check_order=False)


def test_safetensors_input_mixed_with_pt_dtype_inputs(inp, work):
    # bf16/f16/c64 etc. from a safetensors file averaged with the same names from a zip .pt
    names = ("st_dtype_a.safetensors", "legacy_dtype_b.pt")
    res = tm("simple_average", "--keys", "intersection", "-o", work / "out.pt", *inp(*names),
             cwd=work)
    assert_ok(res)
    out = load_pt(work / "out.pt")
    a = inp.sd[names[0]]
    b = inp.sd[names[1]]
    ref.assert_state_dict_matches(out, ref.reference_merge([a, b], keys="intersection"),
                                  check_order=False)
    assert "c128" not in out


def test_views_of_one_storage_to_safetensors_are_written_as_separate_tensors(inp, work):
    names = ("legacy_views_a.pt", "legacy_views_b.pt")
    st, res = merge_st(work, "simple_average", *inp(*names))
    merged = ref.reference_merge(inp.sds(*names))
    assert set(st.entries) == set(merged.order)
    ref.assert_state_dict_matches(st.tensors, merged, check_order=False)
    assert torch.equal(st.tensors["transposed"], st.tensors["base"].t())
    assert torch.equal(st.tensors["column"], st.tensors["base"][:, 1])
    assert st.entries["empty"]["shape"] == [0] and st.entries["empty2d"]["shape"] == [3, 0]
    assert st.entries["scalar"]["shape"] == [] and st.entries["scalar_view"]["shape"] == []
    assert st.data_size == sum(t.numel() * 4 for t in merged.expected.values())
    assert "torchmerge_aliases" not in st.metadata  # views are not aliases


def test_safetensors_inputs_with_scalar_and_empty_tensors(inp, work):
    names = ("st_views_a.safetensors", "st_views_b.safetensors")
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    merged = ref.reference_merge(inp.sds(*names))
    ref.assert_state_dict_matches(out, merged, check_order=False)
    assert out["scalar"].shape == torch.Size([]) and out["empty2d"].shape == torch.Size([3, 0])


# ---- tied weights ----------------------------------------------------------------------------

def test_tied_weights_to_safetensors_are_stored_once_with_alias_metadata(inp, work):
    names = ("tied_a.pt", "tied_b.pt", "tied_c.pt")
    st, res = merge_st(work, "simple_average", *inp(*names))
    merged = ref.reference_merge(inp.sds(*names))
    assert set(st.entries) == {"emb.weight", "ln.weight", "ln.bias"}
    for k in ("emb.weight", "ln.weight", "ln.bias"):
        ref.assert_close_ulp(st.tensors[k], merged.expected[k], merged.dtypes[k],
                             magnitude=merged.magnitude[k], name=k)
    assert st.data_size == (10 * 4 + 4 + 4) * 4
    assert json.loads(st.metadata["torchmerge_aliases"]) == {"head.weight": "emb.weight"}
    tie = [w for w in res.warnings if "head.weight" in w and "emb.weight" in w]
    assert len(tie) == 1, res.describe()


def test_tied_weights_from_legacy_inputs_to_safetensors(inp, work):
    names = ("legacy_tied_a.pt", "legacy_tied_b.pt")
    st, res = merge_st(work, "simple_average", *inp(*names))
    assert set(st.entries) == {"emb.weight", "ln.weight", "ln.bias"}
    assert json.loads(st.metadata["torchmerge_aliases"]) == {"head.weight": "emb.weight"}
    merged = ref.reference_merge(inp.sds(*names))
    ref.assert_close_ulp(st.tensors["emb.weight"], merged.expected["emb.weight"], torch.float32,
                         magnitude=merged.magnitude["emb.weight"], name="emb.weight")
    assert any("head.weight" in w and "emb.weight" in w for w in res.warnings), res.describe()


def test_tied_weights_warning_is_silenced_by_quiet(inp, work):
    st, res = merge_st(work, "simple_average", "-q", *inp("tied_a.pt", "tied_b.pt"))
    assert res.stderr == "", res.describe()
    assert "torchmerge_aliases" in st.metadata


def test_tied_weights_to_folder_output(inp, work):
    names = ("tied_a.pt", "tied_b.pt")
    res = merge(work, "outdir/", "simple_average", "--max-shard-size", "100", *inp(*names))
    tensors, shards, index = check_sharded_folder(work / "outdir",
                                                  ["emb.weight", "ln.weight", "ln.bias"], 100)
    assert "head.weight" not in index["weight_map"]
    assert index["metadata"]["total_size"] == (10 * 4 + 4 + 4) * 4
    merged = ref.reference_merge(inp.sds(*names))
    for k in tensors:
        ref.assert_close_ulp(tensors[k], merged.expected[k], torch.float32,
                             magnitude=merged.magnitude[k], name=k)
    for st in shards.values():
        assert json.loads(st.metadata["torchmerge_aliases"]) == {"head.weight": "emb.weight"}
    assert any("head.weight" in w and "emb.weight" in w for w in res.warnings), res.describe()


def test_untied_inputs_have_no_alias_metadata(inp, work):
    st, res = merge_st(work, "simple_average", *inp("sd_a.pt", "sd_b.pt"))
    assert "torchmerge_aliases" not in st.metadata
    assert not any("tied" in w for w in res.warnings), res.describe()


# ---- folder output ---------------------------------------------------------------------------

SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def greedy_shards(sizes, max_size):
    """Number of shards of the usual greedy split (a new shard when the next tensor would
    overflow a non-empty one)."""
    n, cur = 0, 0
    for s in sizes:
        if n == 0 or (cur > 0 and cur + s > max_size):
            n += 1
            cur = 0
        cur += s
    return n


def check_sharded_folder(folder: Path, expected_names, max_size):
    """The folder's shards are model-0000i-of-0000N.safetensors (or a single model.safetensors
    without index), each at most max_size bytes of tensor data unless it holds one tensor, every
    shard has format=pt metadata, and the index covers every tensor with the right total."""
    tensors, shards, index = read_folder(folder)
    assert set(tensors) == set(expected_names), (sorted(tensors), sorted(expected_names))
    for name, st in shards.items():
        assert_header_padded(st, name)
        assert st.metadata.get("format") == "pt", (name, st.metadata)
        if len(st.entries) > 1:
            assert st.data_size <= max_size, "%s holds %d bytes > %d" % (name, st.data_size, max_size)
    total = sum(st.data_size for st in shards.values())
    if len(shards) == 1:
        assert list(shards) == ["model.safetensors"]
        assert index is None, "a single shard needs no index"
        assert not (folder / "model.safetensors.index.json").exists()
    else:
        n = len(shards)
        for i, name in enumerate(sorted(shards)):
            m = SHARD_RE.match(name)
            assert m, name
            assert (int(m.group(1)), int(m.group(2))) == (i + 1, n), name
        assert index is not None, "no model.safetensors.index.json"
        assert index["metadata"]["total_size"] == total
        assert total == sum(t.numel() * t.element_size() for t in tensors.values())
        wm = index["weight_map"]
        assert set(wm) == set(tensors), (sorted(wm), sorted(tensors))
        for k, shard in wm.items():
            assert k in shards[shard].entries, "weight_map[%r] = %r, which lacks it" % (k, shard)
    return tensors, shards, index


@pytest.mark.parametrize("size,max_bytes", [
    ("1KiB", 1024), ("1K", 1000), ("1024", 1024), ("1000", 1000), ("2KiB", 2048),
    ("2.5K", 2500), ("0.001M", 1000), ("0.0009765625MiB", 1024),
])
def test_folder_output_shards_by_max_shard_size(inp, work, size, max_bytes):
    names = ("blocks_a.pt", "blocks_b.pt")
    merge(work, "outdir/", "simple_average", "--max-shard-size", size, *inp(*names))
    merged = ref.reference_merge(inp.sds(*names))
    tensors, shards, _ = check_sharded_folder(work / "outdir", merged.order, max_bytes)
    assert len(shards) == greedy_shards(BLOCK_BYTES, max_bytes), sorted(shards)
    ref.assert_state_dict_matches(tensors, merged, check_order=False)
    assert listing(work) == ["outdir"]


def test_max_shard_size_decimal_and_binary_suffixes_differ(inp, work):
    names = ("blocks_a.pt", "blocks_b.pt")
    merge(work, "kib/", "simple_average", "--max-shard-size", "1KiB", *inp(*names))
    merge(work, "k/", "simple_average", "--max-shard-size", "1K", *inp(*names))
    # 512-byte tensors: two fit in 1024 bytes, not in 1000.
    assert len(read_folder(work / "kib")[1]) == 5
    assert len(read_folder(work / "k")[1]) == 8


def test_tensor_larger_than_max_shard_size_gets_a_shard_of_its_own(inp, work):
    names = ("blocks_a.pt", "blocks_b.pt")
    merge(work, "outdir/", "simple_average", "--max-shard-size", "2KiB", *inp(*names))
    tensors, shards, index = check_sharded_folder(work / "outdir", list(inp.sd[names[0]]), 2048)
    big = index["weight_map"]["big"]
    assert list(shards[big].entries) == ["big"]
    assert shards[big].data_size == 2400 > 2048


def test_single_shard_folder_is_model_safetensors_without_index(inp, work):
    names = ("sd_a.pt", "sd_b.pt", "sd_c.pt")
    merge(work, "outdir/", "simple_average", *inp(*names))
    assert listing(work / "outdir") == ["model.safetensors"]
    merged = ref.reference_merge(inp.sds(*names))
    tensors, shards, _ = check_sharded_folder(work / "outdir", SD_KEYS, 5 << 30)
    ref.assert_state_dict_matches(tensors, merged, check_order=False)
    check_metadata(shards["model.safetensors"].metadata, "simple_average", 3, names)


def test_folder_output_index_total_size_and_weight_map(inp, work):
    names = ("sd_a.pt", "sd_b.pt", "sd_c.pt")
    merge(work, "outdir/", "weighted_average", "--weights", "1,2,7", "--max-shard-size", "200",
          *inp(*names))
    merged = ref.reference_merge(inp.sds(*names), [1, 2, 7])
    tensors, shards, index = check_sharded_folder(work / "outdir", SD_KEYS, 200)
    assert len(shards) > 1
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in inp.sd["sd_a.pt"].values())
    assert set(index["weight_map"]) == set(SD_KEYS)
    ref.assert_state_dict_matches(tensors, merged, check_order=False)
    for st in shards.values():
        check_metadata(st.metadata, "weighted_average", 3, names, weights=[1, 2, 7])


def test_existing_folder_output_is_replaced_atomically(inp, work):
    out = work / "outdir"
    out.mkdir()
    (out / "stale.txt").write_text("old\n")
    (out / "model-00001-of-00009.safetensors").write_bytes(b"old shard")
    names = ("blocks_a.pt", "blocks_b.pt")
    res = tm("simple_average", "--max-shard-size", "1KiB", "-o", out, *inp(*names), cwd=work)
    assert_ok(res)
    assert listing(work) == ["outdir"], "temporary or old folders left beside the output"
    assert not any(n.startswith(".") for n in os.listdir(work))
    got = listing(out)
    assert "stale.txt" not in got and "model-00001-of-00009.safetensors" not in got, got
    assert got == sorted(["model-%05d-of-00005.safetensors" % i for i in range(1, 6)]
                         + ["model.safetensors.index.json"]), got
    tensors, _, _ = check_sharded_folder(out, list(inp.sd[names[0]]), 1024)
    ref.assert_state_dict_matches(tensors, ref.reference_merge(inp.sds(*names)), check_order=False)


def test_existing_folder_replaced_with_trailing_slash_too(inp, work):
    out = work / "outdir"
    out.mkdir()
    (out / "stale.txt").write_text("old\n")
    res = tm("simple_average", "-o", str(out) + "/", *inp("sd_a.pt", "sd_b.pt"), cwd=work)
    assert_ok(res)
    assert listing(work) == ["outdir"]
    assert listing(out) == ["model.safetensors"]


def test_failed_merge_leaves_existing_folder_untouched(inp, work):
    out = work / "outdir"
    out.mkdir()
    (out / "keep.txt").write_text("keep\n")
    before = tree_hashes(out)
    res = tm("simple_average", "-o", out, *inp("c128_a.pt", "c128_b.pt"), cwd=work)
    assert_error(res, "complex128")
    assert tree_hashes(out) == before
    assert listing(work) == ["outdir"], "temporary folder left behind"


def copy_folder(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def test_folder_output_replacing_its_own_input_folder_is_refused(inp, work):
    src = work / "model"
    copy_folder(inp("hf_st_a"), src)
    before = tree_hashes(src)
    for out in (str(src) + "/", str(src)):
        res = tm("simple_average", "-o", out, src, inp("hf_st_b"), cwd=work)
        assert_error(res, "model")
        assert tree_hashes(src) == before, "the input folder was replaced"
        assert listing(work) == ["model"]



@pytest.mark.parametrize("kind,inner", [("st", "model.safetensors"),
                                        ("sharded", HF_INDEX["sharded"])])
def test_folder_output_over_the_folder_of_an_input_file_is_refused(inp, work, kind, inner):
    src = work / "model"
    copy_folder(inp("hf_%s_a" % kind), src)
    before = tree_hashes(src)
    res = tm("simple_average", "-o", str(src) + "/", src / inner, inp("hf_st_b"), cwd=work)
    assert_error(res, "model")
    assert tree_hashes(src) == before, "the folder holding an input was replaced"
    assert listing(work) == ["model"]


@pytest.mark.parametrize("size", ["0", "abc", "1X", "-5", "K", ""])
def test_invalid_max_shard_size_is_a_usage_error(inp, work, size):
    res = tm("simple_average", "--max-shard-size", size, "-o", str(work / "outdir") + "/",
             *inp("sd_a.pt", "sd_b.pt"), cwd=work)
    assert res.rc == 2, res.describe()
    assert "max-shard-size" in res.stderr, res.describe()
    assert listing(work) == []


# ---- Hugging Face folder inputs --------------------------------------------------------------

@pytest.mark.parametrize("kind", HF_KIND_PARAMS)
def test_hf_folder_inputs_merge_to_reference(inp, work, kind):
    names = ("hf_%s_a" % kind, "hf_%s_b" % kind)
    out, _ = merge_pt(work, "simple_average", *inp(*names))
    assert set(out) == set(SD_KEYS)
    ref.assert_state_dict_matches(out, ref.reference_merge(inp.sds(*names)), check_order=False)
    assert int(out["bn.num_batches_tracked"]) == 1
    assert listing(work) == ["out.pt"]  # side files go only to folder outputs


@pytest.mark.parametrize("kind", ["sharded", "bin"])
def test_hf_index_json_path_works_like_the_folder(inp, work, kind):
    a = inp("hf_%s_a" % kind)
    b = inp("hf_%s_b" % kind) / HF_INDEX[kind]
    out, _ = merge_pt(work, "simple_average", b, a)
    ref.assert_state_dict_matches(out, ref.reference_merge(
        inp.sds("hf_%s_b" % kind, "hf_%s_a" % kind)), check_order=False)
    assert int(out["bn.num_batches_tracked"]) == 2  # hf_*_b is sd_b, and it comes first


def test_hf_folders_and_files_mix(inp, work):
    args = (inp("hf_sharded_a"), inp("hf_sharded_b") / HF_INDEX["sharded"], inp("hf_st_b"),
            inp("hf_binsingle_a"), inp("st_c.safetensors"), inp("legacy_sd_c.pt"))
    out, _ = merge_pt(work, "weighted_average", "--weights", "1,2,3,4,5,6", *args)
    sds = inp.sds("hf_sharded_a", "hf_sharded_b", "hf_st_b", "hf_binsingle_a",
                  "st_c.safetensors", "legacy_sd_c.pt")
    ref.assert_state_dict_matches(out, ref.reference_merge(sds, [1, 2, 3, 4, 5, 6]),
                                  check_order=False)


@pytest.mark.parametrize("kind", HF_KIND_PARAMS)
def test_folder_output_copies_first_input_folder_side_files(inp, work, kind):
    names = ("hf_%s_a" % kind, "hf_%s_b" % kind)
    merge(work, "outdir/", "simple_average", *inp(*names))
    out = work / "outdir"
    assert listing(out) == sorted(HF_SIDE_FILES + ["model.safetensors"]), listing(out)
    for f in HF_SIDE_FILES:
        assert (out / f).read_bytes() == (inp(names[0]) / f).read_bytes(), f
    tensors, _, _ = check_sharded_folder(out, SD_KEYS, 5 << 30)
    ref.assert_state_dict_matches(tensors, ref.reference_merge(inp.sds(*names)), check_order=False)


@pytest.mark.parametrize("kind", ["sharded", "bin"])
def test_folder_output_copies_side_files_of_first_input_given_as_index(inp, work, kind):
    first = "hf_%s_b" % kind
    args = (inp(first) / HF_INDEX[kind], inp("hf_st_a"))
    merge(work, "outdir/", "simple_average", "--max-shard-size", "100", *args)
    out = work / "outdir"
    for f in HF_SIDE_FILES:
        assert (out / f).read_bytes() == (inp(first) / f).read_bytes(), f
    assert not (out / HF_INDEX["bin"]).exists()
    assert not any(n.endswith(".bin") for n in os.listdir(out))
    tensors, shards, index = check_sharded_folder(out, SD_KEYS, 100)
    assert len(shards) > 1
    assert set(os.listdir(out)) == set(HF_SIDE_FILES) | set(shards) | {
        "model.safetensors.index.json"}
    ref.assert_state_dict_matches(tensors, ref.reference_merge(inp.sds(first, "hf_st_a")),
                                  check_order=False)


def test_folder_output_from_plain_files_has_no_side_files(inp, work):
    merge(work, "outdir/", "simple_average", *inp("sd_a.pt", "hf_st_b"))
    assert listing(work / "outdir") == ["model.safetensors"]


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_folder_output_dtype_sets_config_torch_dtype(inp, work, dtype_name):
    names = ("hf_sharded_a", "hf_sharded_b")
    merge(work, "outdir/", "simple_average", "--dtype", dtype_name, *inp(*names))
    out = work / "outdir"
    cfg = json.loads((out / "config.json").read_text())
    src = hf_config("a")
    assert cfg["torch_dtype"] == dtype_name
    assert {k: v for k, v in cfg.items() if k != "torch_dtype"} == \
        {k: v for k, v in src.items() if k != "torch_dtype"}
    for f in ("generation_config.json", "tokenizer.json"):
        assert (out / f).read_bytes() == (inp(names[0]) / f).read_bytes(), f
    tensors, shards, _ = check_sharded_folder(out, SD_KEYS, 5 << 30)
    st_name = {"float16": "F16", "bfloat16": "BF16"}[dtype_name]
    for k, e in shards["model.safetensors"].entries.items():
        assert e["dtype"] == ("I64" if k == "bn.num_batches_tracked" else st_name), (k, e)
    ref.assert_state_dict_matches(tensors, ref.reference_merge(
        inp.sds(*names), dtype=ref.DTYPE_BY_NAME[dtype_name]), check_order=False)


def test_hf_folder_to_single_safetensors_file(inp, work):
    names = ("hf_binsingle_a", "hf_sharded_b")
    st, _ = merge_st(work, "simple_average", *inp(*names))
    ref.assert_state_dict_matches(st.tensors, ref.reference_merge(inp.sds(*names)),
                                  check_order=False)
    assert listing(work) == ["out.safetensors"]


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["folder", "index"])
def test_index_with_missing_shard_is_an_error_naming_the_shard(inp, work, via):
    bad = inp("hf_missing_shard")
    if via == "index":
        bad = bad / "model.safetensors.index.json"
    res = tm("simple_average", "-o", work / "out.pt", bad, inp("sd_a.pt"), cwd=work)
    assert_error(res, "model-00002-of-00002.safetensors")
    assert listing(work) == []
    res = tm("inspect", bad, cwd=work)
    assert_error(res, "model-00002-of-00002.safetensors")
    assert res.stdout == ""


@pytest.mark.parametrize("i", [0, 1, 2], ids=["dotdot", "absolute", "sub-dotdot"])
def test_index_shard_outside_its_folder_is_refused(inp, work, i):
    folder = inp("escape") / ("hf%d" % i)
    for bad in (folder, folder / "model.safetensors.index.json"):
        res = tm("simple_average", "-o", work / "out.pt", bad, inp("sd_a.pt"), cwd=work)
        assert_error(res, "model.safetensors.index.json")
        assert listing(work) == []
        res = tm("inspect", bad, cwd=work)
        assert_error(res, "model.safetensors.index.json")


@pytest.mark.parametrize("existing", [True, False], ids=["existing-folder", "trailing-slash"])
def test_format_pt_with_folder_output_is_an_error(inp, work, existing):
    out = work / "outdir"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("keep\n")
    res = tm("simple_average", "--format", "pt", "-o", str(out) + ("" if existing else "/"),
             *inp("sd_a.pt", "sd_b.pt"), cwd=work)
    assert res.rc == 1, res.describe()
    assert_error(res, "outdir")
    assert "folder" in res.errors[0] or "director" in res.errors[0], res.describe()
    if existing:
        assert listing(out) == ["keep.txt"]
        assert listing(work) == ["outdir"]
    else:
        assert listing(work) == []


def test_format_torchscript_with_folder_output_is_an_error(inp, work):
    out = work / "outdir"
    out.mkdir()
    res = tm("simple_average", "--format", "torchscript", "-o", out,
             *inp("sd_a.pt", "sd_b.pt"), cwd=work)
    assert res.rc in (1, 2), res.describe()
    assert listing(out) == [] and listing(work) == ["outdir"]


def test_folder_without_weights_is_an_error(work, inp):
    empty = work / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text("{}\n")
    res = tm("simple_average", "-o", work / "out.pt", empty, inp("sd_a.pt"), cwd=work)
    assert_error(res, "empty_model")
    assert listing(work) == ["empty_model"]


# ---- inspect ---------------------------------------------------------------------------------

def check_inspect_text(res, sd):
    assert_ok(res)
    lines = res.stdout.splitlines()
    for k, t in sd.items():
        mine = [l for l in lines if re.search(name_re(k), l)]
        assert mine, "%r not listed\n%s" % (k, res.describe())
        dtype = ref.NAME_BY_DTYPE[t.dtype]
        assert any(re.search(name_re(dtype), l) and re.search(shape_re(t.shape), l)
                   for l in mine), "%r: no line with %s %s\n%s" % (k, dtype, list(t.shape),
                                                                 res.describe())


@pytest.mark.parametrize("kind", HF_KINDS)
def test_inspect_folder_lists_every_tensor(inp, work, kind):
    name = "hf_%s_a" % kind
    check_inspect_text(tm("inspect", inp(name), cwd=work), inp.sd[name])
    res = tm("inspect", "--json", inp(name), cwd=work)
    assert_ok(res)
    doc = json.loads(res.stdout)
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(SD_KEYS)
    assert doc["total_nbytes"] == sum(t.numel() * t.element_size() for t in inp.sd[name].values())


@pytest.mark.parametrize("kind", ["sharded", "bin"])
def test_inspect_index_json_lists_every_tensor(inp, work, kind):
    name = "hf_%s_a" % kind
    path = inp(name) / HF_INDEX[kind]
    check_inspect_text(tm("inspect", path, cwd=work), inp.sd[name])
    res = tm("inspect", "--json", path, cwd=work)
    assert_ok(res)
    doc = json.loads(res.stdout)
    got = {t["name"]: t for t in doc["tensors"]}
    assert sorted(got) == sorted(SD_KEYS) and len(doc["tensors"]) == len(SD_KEYS)
    for k, t in inp.sd[name].items():
        assert got[k]["dtype"] == ref.NAME_BY_DTYPE[t.dtype] and got[k]["shape"] == list(t.shape)


def test_inspect_json_on_safetensors_gives_format_safetensors(inp, work):
    res = tm("inspect", "--json", inp("st_dtype_a.safetensors"), cwd=work)
    assert_ok(res)
    doc = json.loads(res.stdout)
    assert doc["format"] == "safetensors"
    sd = inp.sd["st_dtype_a.safetensors"]
    assert [t["name"] for t in doc["tensors"]] == list(sd)
    for t in doc["tensors"]:
        x = sd[t["name"]]
        assert t["dtype"] == ref.NAME_BY_DTYPE[x.dtype], t
        assert t["shape"] == list(x.shape), t
        assert t["nbytes"] == x.numel() * x.element_size(), t
    assert doc["total_nbytes"] == sum(x.numel() * x.element_size() for x in sd.values())


def test_inspect_merged_safetensors_output(inp, work):
    merge_st(work, "simple_average", *inp("sd_a.pt", "sd_b.pt"))
    res = tm("inspect", "--json", work / "out.safetensors", cwd=work)
    assert_ok(res)
    doc = json.loads(res.stdout)
    assert doc["format"] == "safetensors"
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(SD_KEYS)


def test_merged_folder_output_can_be_merged_again(inp, work):
    merge(work, "outdir/", "simple_average", "--max-shard-size", "200", *inp("sd_a.pt", "sd_b.pt"))
    out, _ = merge_pt(work, "simple_average", work / "outdir", inp("sd_c.pt"))
    first = ref.reference_merge(inp.sds("sd_a.pt", "sd_b.pt"))
    again = ref.reference_merge([ref.expected_state_dict(first), inp.sd["sd_c.pt"]])
    ref.assert_state_dict_matches(out, again, check_order=False)


# ---- housekeeping ----------------------------------------------------------------------------


def test_sharded_bin_tensors_each_read_their_own_storage(inp, work):
    res = tm("inspect", "--json", inp("hf_bin_a"), cwd=work)
    assert_ok(res)
    doc = json.loads(res.stdout)
    storages = [t["storage"] for t in doc["tensors"]]
    assert len(set(storages)) == len(SD_KEYS), doc["tensors"]  # no tensor shares a storage
    merge(work, "one.safetensors", "simple_average", inp("hf_bin_a"))
    st = read_safetensors(work / "one.safetensors")
    for k, v in inp.sd["hf_bin_a"].items():
        assert torch.equal(st.tensors[k], v), k


def test_zz_inputs_are_never_modified(inp):
    """Runs last (file order): no test may have changed, added or removed an input file."""
    assert tree_hashes(inp.dir) == inp.hashes
