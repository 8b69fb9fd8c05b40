"""torchmerge.load and torchmerge.inspect against torch.load (values, dtypes, shapes, strides,
storage offsets, shared storages), on the generated fixtures and on the real-world corpus; files
torch.load(weights_only=True) refuses; hostile pickles; copy-on-write views of the file."""
import csv
import hashlib
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import torchmerge
from conftest import ROOT, realworld_dir

sys.path.insert(0, str(ROOT / "tests" / "python"))
import hostile_inputs as h  # noqa: E402  (pickle builders; nothing there unpickles anything)


def torch_reference(path, key, trusted=False):
    """What torch gives for the state dict torchmerge reads: torch.load descended by key (with
    weights_only unless the file is one of our generated fixtures), or a TorchScript module's
    state_dict()."""
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    obj = torch.load(str(path), map_location="cpu", weights_only=not trusted)
    for part in key.split(".") if key else []:
        obj = obj[part]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def same_values(a, b):
    """Bit for bit (so NaNs and -0.0 count too)."""
    if a.is_quantized:
        return torch.equal(a.int_repr(), b.int_repr())
    bits = lambda t: t.reshape(-1).contiguous().view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def storage_ptr(t):
    return t.storage().data_ptr()


def assert_same_as_torch(ours, ref):
    assert list(ours) == list(ref)
    for k, r in ref.items():
        t = ours[k]
        assert (t.dtype, tuple(t.shape), t.stride(), t.storage_offset()) == \
            (r.dtype, tuple(r.shape), r.stride(), r.storage_offset()), k
        assert t.storage().size() == r.storage().size(), k
        assert same_values(t, r), k
    # two keys share a storage in ours exactly when they do in torch's
    keys = [k for k in ref if ref[k].storage().size() > 0]
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (storage_ptr(ours[a]) == storage_ptr(ours[b])) == (storage_ptr(ref[a]) == storage_ptr(ref[b])), (a, b)


FIXTURES = ["sd_a", "kv_a", "nested_a", "tied_a", "views_a", "dtype_a", "ts_a", "namespace", "plainN_a",
            "plain1_a", "template"]


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("mmap", [True, False])
def test_load_equals_torch_load_on_the_fixtures(fx, name, mmap):
    path = fx / (name + ".pt")
    ours = torchmerge.load(path, mmap=mmap)
    assert_same_as_torch(ours, torch_reference(path, torchmerge.inspect(path).key, trusted=True))


def test_shared_storages_are_shared_and_views_see_each_other(fx):
    sd = torchmerge.load(fx / "views_a.pt")
    ref = torch.load(str(fx / "views_a.pt"))
    assert storage_ptr(sd["base"]) == storage_ptr(sd["slice"]) == storage_ptr(sd["transposed"])
    sd["base"][1, 0] = 1234.5  # slice starts at row 1 of base
    assert sd["slice"][0, 0].item() == 1234.5 and sd["transposed"][0, 1].item() == 1234.5
    assert ref["slice"][0, 0].item() != 1234.5


def test_load_of_a_quantized_checkpoint_matches_torch(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    sd = {"pt": torch.quantize_per_tensor(x, 0.05, 3, torch.qint8),
          "pt_t": torch.quantize_per_tensor(x, 0.1, 120, torch.quint8).t(),
          "pc": torch.quantize_per_channel(x, torch.rand(4, dtype=torch.float64) + 0.01,
                                           torch.tensor([0, 1, -2, 3]), 0, torch.qint8),
          "i32": torch.quantize_per_tensor(x, 0.001, 0, torch.qint32), "f": x}
    path = tmp_path / "q.pt"
    torch.save(sd, str(path))
    ours, ref = torchmerge.load(path), torch.load(str(path))
    for k, r in ref.items():
        t = ours[k]
        assert (t.dtype, t.shape, t.stride()) == (r.dtype, r.shape, r.stride()), k
        if r.is_quantized:
            assert t.qscheme() == r.qscheme(), k
            assert torch.equal(t.int_repr(), r.int_repr()) and torch.equal(t.dequantize(), r.dequantize()), k
        else:
            assert torch.equal(t, r)
    listed = {e.name: e for e in torchmerge.inspect(path)}
    assert listed["pt"].qscheme == "per_tensor_affine" and listed["pt"].q_scale == 0.05 and listed["pt"].q_zero_point == 3
    assert listed["pc"].qscheme == "per_channel_affine" and listed["pc"].q_axis == 0
    assert listed["pc"].q_zero_points == (0, 1, -2, 3)
    assert listed["f"].qscheme is None


# ---- copy-on-write views of the file ------------------------------------------------------------

def mapped_files_of(ptr):
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= ptr < end:
                return parts[5].strip() if len(parts) > 5 else ""
    return None


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["sd_a.pt", "st.safetensors"])
def test_tensors_are_copy_on_write_views_of_the_file(fx, tmp_path, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        torchmerge.save(torchmerge.load(fx / "sd_a.pt"), path)
    else:
        path.write_bytes((fx / name).read_bytes())
    before = sha(path)
    sd = torchmerge.load(path)
    w = sd["fc.weight"]
    assert mapped_files_of(w.data_ptr()) == str(path.resolve())  # zero copy: the file's pages
    original = w.clone()
    w.fill_(7.0)  # allowed: the page is copied for this process only
    assert torch.equal(sd["fc.weight"], torch.full_like(original, 7.0))
    assert sha(path) == before
    assert torch.equal(torchmerge.load(path)["fc.weight"], original)
    copied = torchmerge.load(path, mmap=False)["fc.weight"]
    assert mapped_files_of(copied.data_ptr()) != str(path.resolve())
    assert torch.equal(copied, original)


def test_tensors_outlive_every_handle(fx):
    sd = torchmerge.load(fx / "tied_a.pt")
    ref = torch.load(str(fx / "tied_a.pt"))
    import gc
    gc.collect()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


# ---- files torch's weights_only refuses; hostile files ------------------------------------------

def test_files_weights_only_refuses_load_without_running_their_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    # {'state_dict': {'w': tensor}, 'hook': codecs.open(marker, 'w')}: a real unpickler creates
    # marker; torchmerge's reader keeps codecs.open as an inert placeholder and never calls it.
    evil = h.g("codecs", "open") + h.tup(h.s(str(marker)), h.s("w")) + h.REDUCE
    inner = h.EMPTY_DICT + h.MARK + h.s("w") + h.tensor("0", 4, 0, (2, 2), (2, 1)) + h.SETITEMS
    pkl = h.PROTO2 + h.EMPTY_DICT + h.MARK + h.s("state_dict") + inner + h.s("hook") + evil + h.SETITEMS + h.STOP
    path = tmp_path / "hook.pt"
    path.write_bytes(h.torch_zip(pkl, {"0": h.floats(4)}))
    with pytest.raises(Exception):
        torch.load(str(path), weights_only=True)
    assert not marker.exists()
    sd = torchmerge.load(path)
    assert list(sd) == ["w"] and torch.equal(sd["w"], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert torchmerge.inspect(path).key == "state_dict"
    assert not marker.exists(), "THE PICKLE RAN"
    # guard: the payload does run under an unrestricted unpickler (the test proves something)
    torch.load(str(path), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["evil.pt", "evil_eval.pt"])
def test_code_running_pickles_are_refused_and_never_run(fx, tmp_path, name):
    path = tmp_path / name
    path.write_bytes((fx / name).read_bytes())
    marker = fx / "PWNED"
    with pytest.raises(torchmerge.TorchmergeError) as err:
        torchmerge.load(path)
    assert err.value.status == "TM_ERROR_UNSAFE" and "\n" not in str(err.value)
    assert not marker.exists()


def test_errors_are_one_line_torchmerge_errors(fx, tmp_path):
    for path, needle in [(fx / "truncated.pt", "truncated.pt"), (fx / "badmagic.pt", "badmagic.pt"),
                         (tmp_path / "nope.pt", "nope.pt")]:
        with pytest.raises(torchmerge.TorchmergeError) as err:
            torchmerge.load(path)
        assert isinstance(err.value, RuntimeError)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(torchmerge.TorchmergeError) as err:
        torchmerge.load(fx / "ambiguous.pt")
    assert err.value.status == "TM_ERROR_AMBIGUOUS"
    assert list(torchmerge.load(fx / "ambiguous.pt", key="ema")) == list(torch.load(str(fx / "ambiguous.pt"))["ema"])


def test_inspect_lists_tensors_metadata_and_candidate_state_dicts(fx, tmp_path):
    info = torchmerge.inspect(fx / "views_a.pt")
    ref = torch.load(str(fx / "views_a.pt"))
    assert [e.name for e in info] == list(ref) and info.format == "pt"
    for e in info:
        r = ref[e.name]
        assert (e.dtype, e.shape, e.stride, e.storage_offset) == (r.dtype, tuple(r.shape), r.stride(),
                                                                   r.storage_offset())
    amb = torchmerge.inspect(fx / "ambiguous.pt")
    assert amb.tensors == [] and [k for k, _ in amb.state_dicts] == ["model", "ema"]
    assert all(n == len(torch.load(str(fx / "sd_a.pt"))) for _, n in amb.state_dicts)
    torch.save({}, str(tmp_path / "empty_dict.pt"))
    assert len(torchmerge.inspect(tmp_path / "empty_dict.pt")) == 0
    torchmerge.save({"x": torch.ones(2)}, tmp_path / "m.safetensors", metadata={"author": "me"})
    assert torchmerge.inspect(tmp_path / "m.safetensors").metadata == {"author": "me"}
    torchmerge.merge([fx / "sd_a.pt", fx / "sd_b.pt"], tmp_path / "merged.safetensors", quiet=True)
    assert torchmerge.inspect(tmp_path / "merged.safetensors").metadata["torchmerge_method"] == "simple_average"


# ---- the real-world corpus ----------------------------------------------------------------------

def manifest():
    d = realworld_dir()
    if d is None:
        return []
    with open(d / "MANIFEST.tsv") as f:
        return [r for r in csv.DictReader(f, delimiter="\t")]


def oracle_rows():
    d = realworld_dir()
    out = {}
    with open(d / "TENSORS.tsv") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            # whole pickled modules: "x._modules.0._parameters.weight" is the state-dict name "x.0.weight"
            name = ".".join(p for p in r["tensor_path"].split(".") if p not in ("_modules", "_parameters", "_buffers"))
            out.setdefault(r["file"], {})[name] = r
    return out


ORACLE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "f64": torch.float64, "bf16": torch.bfloat16,
                 "i64": torch.int64, "i32": torch.int32, "u8": torch.uint8, "i8": torch.int8, "bool": torch.bool}


def dims(text):
    return tuple(int(x) for x in text.strip("()").split("x") if x)


ROWS = manifest()
REFUSED = {"syoyo__safetensors-cpp/safetensors_abuse_attempt_1.safetensors",  # malformed on purpose
           "FluxML__SafeTensors.jl/model.safetensors",  # float8 tensors: no torchmerge dtype
           "Tashu014__lora-imdb-distilbert/training_args.bin",  # no tensors at all
           "LaurentMazare__tch-rs/foo_2019-05.pt"}  # a 2019 TorchScript layout without data.pkl


@pytest.mark.parametrize("row", ROWS or [None], ids=[r["file"] for r in ROWS] or ["absent"])
def test_load_on_the_real_world_corpus(row):
    if row is None:
        pytest.skip("the real-world corpus is absent (set TM_REALWORLD_DIR)")
    d = realworld_dir()
    path = d / row["file"]
    if row["file"] in REFUSED:
        with pytest.raises(torchmerge.TorchmergeError) as err:
            torchmerge.load(path)
        assert "\n" not in str(err.value) and row["file"].split("/")[-1] in str(err.value)
        return
    ours = torchmerge.load(path)
    key = torchmerge.inspect(path).key
    try:
        if row["format"] == "torchscript" or row["format"] == "safetensors":
            raise RuntimeError("compared below")
        ref = torch_reference(path, key)
    except Exception:
        ref = None
    if row["format"] == "torchscript":
        try:
            ref = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception:
            ref = None
    if ref is not None:
        assert_same_as_torch(ours, ref)
        return
    if row["format"] == "safetensors":
        ref = read_safetensors(path)
        assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
        return
    # torch refuses the file (weights_only) or cannot rebuild it: the static oracle of the corpus
    oracle = oracle_rows().get(row["file"], {})
    assert ours, "no tensors"
    seen = {}
    for name, t in ours.items():
        full = key + "." + name if key else name
        if full not in oracle:
            continue
        o = oracle[full]
        assert t.dtype == ORACLE_DTYPES[o["dtype"]], full
        assert tuple(t.shape) == dims(o["shape"]) and t.stride() == dims(o["stride"]), full
        assert t.storage_offset() == int(o["storage_offset_elems"]) and t.storage().size() == int(o["storage_numel"])
        seen.setdefault(o["storage_key"], set()).add(storage_ptr(t))
    assert seen, "no tensor of %s matches the oracle" % row["file"]
    assert all(len(ptrs) == 1 for ptrs in seen.values())  # one storage in the file, one in ours
    assert len({next(iter(p)) for p in seen.values()}) == len(seen)


def read_safetensors(path):
    """An independent reader: the header's JSON and the raw bytes."""
    import json
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    out = {}
    for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, e = v["data_offsets"]
        data = bytearray(raw[8 + n + b:8 + n + e])
        out[k] = (torch.frombuffer(data, dtype=dt[v["dtype"]]) if data else torch.empty(0, dtype=dt[v["dtype"]])) \
            .reshape(v["shape"])
    return {k: out[k] for k in header}


class QuantizedBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        x = torch.randn(3, 4)
        self.register_buffer("q", torch.quantize_per_tensor(x, 0.1, 2, torch.qint8))
        self.register_buffer("pc", torch.quantize_per_channel(x, torch.rand(3, dtype=torch.float64) + 0.1,
                                                              torch.tensor([0, 1, 2]), 0, torch.quint8))
        self.w = torch.nn.Parameter(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w


def test_quantized_tensors_inside_a_torchscript_archive(tmp_path):
    path = tmp_path / "qts.pt"
    torch.jit.save(torch.jit.script(QuantizedBuffers()), str(path))
    ref, ours = torch.jit.load(str(path)).state_dict(), torchmerge.load(path)
    assert list(ours) == list(ref)
    for k, r in ref.items():
        t = ours[k]
        assert (t.dtype, t.shape, t.stride()) == (r.dtype, r.shape, r.stride()), k
        if r.is_quantized:
            assert t.qscheme() == r.qscheme() and torch.equal(t.int_repr(), r.int_repr()), k
            assert torch.equal(t.dequantize(), r.dequantize()), k
        else:
            assert torch.equal(t, r), k


def test_hugging_face_folders_of_pt_and_safetensors_shards(fx, tmp_path):
    import json
    sd = torch.load(str(fx / "sd_a.pt"))
    keys = list(sd)
    half = len(keys) // 2
    folder = tmp_path / "hf_bin"
    folder.mkdir()
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    for name, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, str(folder / name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    torchmerge.save(sd, str(tmp_path / "hf_st") + "/", max_shard_size=100)
    for path in (folder, tmp_path / "hf_st"):
        ours = torchmerge.load(path)
        assert sorted(ours) == sorted(sd), path
        for k in sd:
            assert same_values(ours[k], sd[k]), (path, k)
            # zero copy from every shard
            assert mapped_files_of(ours[k].data_ptr()).startswith(str(path.resolve()) + "/") or ours[k].numel() == 0
