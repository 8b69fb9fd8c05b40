"""End-to-end tests of the torchmerge CLI against PyTorch itself.

Run with the Debian interpreter that has torch 1.13:

    /usr/bin/python3 -m pytest tests/python -q

The binary is $TORCHMERGE_BIN, default <repo>/build/torchmerge. Inputs are generated once per
session by tests/fixtures/make_fixtures.py into a temporary folder; every merge writes into the
test's own tmp_path, which is also its working directory. Every .pt output is read back with
torch.load(weights_only=True), which also checks that the writer only emits what PyTorch's
restricted unpickler accepts, and compared with the float64 reference in reference.py.
"""
import hashlib
import importlib
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import reference as ref

REPO = Path(__file__).resolve().parents[2]
MAKE_FIXTURES = REPO / "tests" / "fixtures" / "make_fixtures.py"

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
import fixture_models as fm  # noqa: E402

make_fixtures = importlib.import_module("make_fixtures")

SD_KEYS = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
           "bn.running_var", "bn.num_batches_tracked", "fc.weight", "fc.bias"]


def version_string() -> str:
    header = (REPO / "include" / "torchmerge.h").read_text()
    return re.search(r'#define\s+TORCHMERGE_VERSION_STRING\s+"([^"]+)"', header).group(1)


# ---- running the CLI -------------------------------------------------------------------------

from cli_runner import BIN, ERROR_PREFIX, WARNING_PREFIX, Result, assert_error, assert_ok, needs_torch_half, tm  # noqa: E402,F401


def load_pt(path: Path) -> dict:
    """An output file, read the way a careful user would: weights_only=True."""
    out = torch.load(str(path), map_location="cpu", weights_only=True)
    assert type(out) is dict, "output is a %s, not a plain dict" % type(out).__name__
    for k, v in out.items():
        assert isinstance(k, str) and isinstance(v, torch.Tensor), (k, type(v))
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shape_re(shape) -> str:
    """Regex for a shape as a CLI may print it: [4, 3], [4,3], (4, 3), 4x3; [] / () / scalar."""
    dims = [str(int(d)) for d in shape]
    if not dims:
        return r"(\[\]|\(\)|\bscalar\b)"
    inner = r"\s*,\s*".join(dims)
    alts = [r"\[" + inner + r"\]", r"\(" + inner + (r",?" if len(dims) == 1 else "") + r"\)"]
    if len(dims) > 1:
        alts.append(r"(?<![\w.])" + "x".join(dims) + r"(?![\w.])")
    return "(" + "|".join(alts) + ")"


def name_re(name: str) -> str:
    return r"(?<![\w.])" + re.escape(name) + r"(?![\w.])"


# ---- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """The generated inputs: fx.dir, fx(name) -> path, and the sha256 of every file."""
    d = tmp_path_factory.mktemp("fixtures")
    subprocess.run([sys.executable, str(MAKE_FIXTURES), str(d)], check=True)
    hashes = {p.name: sha256(p) for p in sorted(d.iterdir())}
    return _Fixtures(d, hashes)


class _Fixtures:
    def __init__(self, d: Path, hashes: dict):
        self.dir = d
        self.hashes = hashes
        self.marker = d / make_fixtures.MARKER_NAME

    def __call__(self, *names):
        paths = [self.dir / n for n in names]
        return paths[0] if len(paths) == 1 else paths


@pytest.fixture
def work(tmp_path):
    """The test's working directory and output folder."""
    return tmp_path


def sds(fx, *names, key=None):
    return ref.load_state_dicts(fx(*names) if len(names) > 1 else [fx(*names)], key)


def merge_ok(work, *args) -> (dict, Result):
    """Runs a merge writing work/out.pt, checks success and that nothing else was left in
    the output folder; returns the loaded output."""
    before = set(os.listdir(work))
    res = tm(*args[:1], "-o", work / "out.pt", *args[1:], cwd=work)
    assert_ok(res)
    assert set(os.listdir(work)) == before | {"out.pt"}, "temporary files left behind"
    return load_pt(work / "out.pt"), res


# ---- averaging -------------------------------------------------------------------------------

@pytest.mark.parametrize("out_name", ["out.pt", "out.safetensors", "ts.pt"])
def test_output_bytes_do_not_depend_on_the_number_of_merging_threads(fx, work, out_name):
    inputs = fx("ts_a.pt", "ts_b.pt", "ts_c.pt") if out_name == "ts.pt" else fx("sd_a.pt", "sd_b.pt", "sd_c.pt")
    outputs, stderr = [], set()
    for threads in ("1", "2", "3", "8"):
        out = work / threads / out_name
        out.parent.mkdir()
        res = tm("weighted_average", "--weights", "0.2,0.3,0.5", "-o", out, *inputs, cwd=work,
                 env={"TORCHMERGE_THREADS": threads})
        assert res.rc == 0, res.describe()
        outputs.append(out.read_bytes())
        stderr.add(res.stderr.replace(str(out.parent), "OUT"))
    assert all(o == outputs[0] for o in outputs[1:])
    assert len(stderr) == 1, stderr  # the same warnings (e.g. differing integer tensors) too


def test_simple_average_matches_float64_reference_within_one_ulp(fx, work):
    out, res = merge_ok(work, "simple_average", *fx("sd_a.pt", "sd_b.pt", "sd_c.pt"))
    merged = ref.reference_merge(sds(fx, "sd_a.pt", "sd_b.pt", "sd_c.pt"))
    assert merged.order == SD_KEYS
    ref.assert_state_dict_matches(out, merged)
    # Non-vacuous: the inputs really differ, so the output is none of them.
    a = ref.load_state_dict(fx("sd_a.pt"))
    assert not torch.equal(out["fc.weight"], a["fc.weight"])


def test_simple_average_takes_num_batches_tracked_from_first_input_and_warns(fx, work):
    out, res = merge_ok(work, "simple_average", *fx("sd_a.pt", "sd_b.pt", "sd_c.pt"))
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.num_batches_tracked"].shape == torch.Size([])
    assert int(out["bn.num_batches_tracked"]) == 1  # sd_a's; sd_b has 2, sd_c 3
    assert any("num_batches_tracked" in w for w in res.warnings), res.describe()
    for line in res.stderr_lines:
        assert line.startswith(WARNING_PREFIX), "unexpected stderr line %r" % line

    (work / "out.pt").unlink()
    out, res = merge_ok(work, "simple_average", *fx("sd_c.pt", "sd_a.pt", "sd_b.pt"))
    assert int(out["bn.num_batches_tracked"]) == 3  # now sd_c is first


def test_simple_average_of_identical_inputs_is_silent_and_exact(fx, work):
    out, res = merge_ok(work, "simple_average", *fx("sd_b.pt", "sd_b.pt"))
    assert res.warnings == [], res.describe()
    b = ref.load_state_dict(fx("sd_b.pt"))
    for k in SD_KEYS:
        assert torch.equal(out[k], b[k]), k


@pytest.mark.parametrize("weights", ["0.2,0.3,0.5", "1,2,7"])
def test_weighted_average_normalizes_weights(fx, work, weights):
    out, _ = merge_ok(work, "weighted_average", "--weights", weights,
                      *fx("sd_a.pt", "sd_b.pt", "sd_c.pt"))
    w = [float(x) for x in weights.split(",")]
    merged = ref.reference_merge(sds(fx, "sd_a.pt", "sd_b.pt", "sd_c.pt"), w)
    ref.assert_state_dict_matches(out, merged)
    assert int(out["bn.num_batches_tracked"]) == 1


def test_weighted_average_no_normalize_sums_inputs(fx, work):
    out, _ = merge_ok(work, "weighted_average", "--no-normalize", "--weights", "1,1,1",
                      *fx("sd_a.pt", "sd_b.pt", "sd_c.pt"))
    inputs = sds(fx, "sd_a.pt", "sd_b.pt", "sd_c.pt")
    merged = ref.reference_merge(inputs, [1, 1, 1], normalize=False)
    ref.assert_state_dict_matches(out, merged)
    total = inputs[0]["fc.weight"] + inputs[1]["fc.weight"] + inputs[2]["fc.weight"]
    assert torch.allclose(out["fc.weight"], total, rtol=1e-6, atol=1e-6)


def test_weighted_average_unnormalized_weights_scale_inputs(fx, work):
    out, _ = merge_ok(work, "weighted_average", "--no-normalize", "--weights", "0.5,0.25",
                      *fx("plain1_a.pt", "plain1_b.pt"))
    merged = ref.reference_merge(sds(fx, "plain1_a.pt", "plain1_b.pt"), [0.5, 0.25],
                                 normalize=False)
    ref.assert_state_dict_matches(out, merged)


def test_weighted_average_rejects_weight_count_mismatch(fx, work):
    res = tm("weighted_average", "--weights", "0.5,0.5", "-o", work / "out.pt",
             *fx("sd_a.pt", "sd_b.pt", "sd_c.pt"), cwd=work)
    assert res.rc in (1, 2), res.describe()
    assert "weights" in res.stderr.lower(), res.describe()
    assert os.listdir(work) == []


def test_keep_vars_parameters_merge_like_plain_tensors(fx, work):
    out, _ = merge_ok(work, "simple_average", *fx("kv_a.pt", "kv_b.pt", "kv_c.pt"))
    merged = ref.reference_merge(sds(fx, "kv_a.pt", "kv_b.pt", "kv_c.pt"))
    ref.assert_state_dict_matches(out, merged)
    plain = ref.reference_merge(sds(fx, "sd_a.pt", "sd_b.pt", "sd_c.pt"))
    ref.assert_state_dict_matches(out, plain)


def test_single_entry_plain_dict(fx, work):
    out, _ = merge_ok(work, "simple_average", *fx("plain1_a.pt", "plain1_b.pt"))
    assert list(out) == ["weight"]
    ref.assert_state_dict_matches(out, ref.reference_merge(sds(fx, "plain1_a.pt", "plain1_b.pt")))


def test_many_entries_keep_first_input_order(fx, work):
    out, _ = merge_ok(work, "simple_average", *fx("plainN_a.pt", "plainN_b.pt"))
    expected_order = ["blocks.%d.weight" % i for i in range(50)]  # not sorted order
    assert list(out) == expected_order
    ref.assert_state_dict_matches(out, ref.reference_merge(sds(fx, "plainN_a.pt", "plainN_b.pt")))


def test_views_sharing_one_storage_are_merged_by_value(fx, work):
    out, _ = merge_ok(work, "simple_average", *fx("views_a.pt", "views_b.pt"))
    merged = ref.reference_merge(sds(fx, "views_a.pt", "views_b.pt"))
    ref.assert_state_dict_matches(out, merged)
    assert out["transposed"].shape == torch.Size([6, 4])
    assert out["strided"].shape == torch.Size([2, 6])
    assert out["column"].shape == torch.Size([4])
    assert out["scalar_view"].shape == torch.Size([])
    assert out["scalar"].shape == torch.Size([])
    assert out["empty"].shape == torch.Size([0])
    assert out["empty2d"].shape == torch.Size([3, 0])
    # The views' values, not their storages: transposed is base.T, slice is base[1:3], ...
    assert torch.equal(out["transposed"], out["base"].t())
    assert torch.equal(out["slice"], out["base"][1:3])
    assert torch.equal(out["strided"], out["base"][::2])
    assert torch.equal(out["column"], out["base"][:, 1])
    assert torch.equal(out["scalar_view"], out["base"][2, 3])


def test_every_dtype_is_kept_floats_averaged_others_from_first_input(fx, work):
    out, res = merge_ok(work, "simple_average", *fx("dtype_a.pt", "dtype_b.pt"))
    a, b = sds(fx, "dtype_a.pt", "dtype_b.pt")
    merged = ref.reference_merge([a, b])
    ref.assert_state_dict_matches(out, merged)
    for name, dtype in make_fixtures.DTYPE_NAMES.items():
        assert out[name].dtype == dtype, name
        if ref.is_averaged(dtype):
            assert not torch.equal(out[name], a[name]), name
        else:
            assert not torch.equal(a[name], b[name]), "fixture: %s should differ" % name
            assert torch.equal(out[name], a[name]), name


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float64"])
def test_dtype_override_converts_floating_tensors_only(fx, work, dtype_name):
    out, _ = merge_ok(work, "simple_average", "--dtype", dtype_name,
                      *fx("sd_a.pt", "sd_b.pt", "sd_c.pt"))
    dtype = ref.DTYPE_BY_NAME[dtype_name]
    merged = ref.reference_merge(sds(fx, "sd_a.pt", "sd_b.pt", "sd_c.pt"), dtype=dtype)
    ref.assert_state_dict_matches(out, merged)
    for k in SD_KEYS:
        expected = torch.int64 if k == "bn.num_batches_tracked" else dtype
        assert out[k].dtype == expected, k
    assert int(out["bn.num_batches_tracked"]) == 1


def test_dtype_override_float32_on_mixed_dtype_inputs(fx, work):
    out, _ = merge_ok(work, "simple_average", "--dtype", "float32",
                      *fx("dtype_a.pt", "dtype_b.pt"))
    a, b = sds(fx, "dtype_a.pt", "dtype_b.pt")
    merged = ref.reference_merge([a, b], dtype=torch.float32)
    assert list(out) == list(a)
    for k in ("f64", "f32", "f16", "bf16"):
        assert out[k].dtype == torch.float32, k
        ref.assert_close_ulp(out[k], merged.expected[k], torch.float32,
                             magnitude=merged.magnitude[k], name=k)
    for k in ("i64", "i32", "i16", "i8", "u8", "bool"):
        assert out[k].dtype == a[k].dtype, k
        assert torch.equal(out[k], a[k]), k
    # What --dtype float32 does to complex tensors is not specified here; they must survive.
    assert out["c64"].shape == a["c64"].shape and out["c128"].shape == a["c128"].shape


# ---- nested checkpoints ----------------------------------------------------------------------

def test_nested_checkpoints_use_their_state_dict_entry(fx, work):
    out, _ = merge_ok(work, "simple_average", *fx("nested_a.pt", "nested_b.pt", "nested_c.pt"))
    inputs = sds(fx, "nested_a.pt", "nested_b.pt", "nested_c.pt")
    raw = ref.load_raw(fx("nested_a.pt"))
    for i, name in enumerate(("nested_a.pt", "nested_b.pt", "nested_c.pt")):
        assert list(inputs[i]) == list(ref.load_raw(fx(name))["state_dict"])
    merged = ref.reference_merge(inputs)
    ref.assert_state_dict_matches(out, merged)  # the optimizer state is not merged
    assert "epoch" not in out and "optimizer" not in out
    assert not any("momentum" in k for k in out)
    assert len(raw["optimizer"]["state"]) > 0  # fixture: the optimizer does hold tensors


def test_ambiguous_nested_checkpoint_is_an_error_listing_candidates(fx, work):
    res = tm("simple_average", "-o", work / "out.pt", *fx("ambiguous.pt", "sd_c.pt"), cwd=work)
    line = assert_error(res, "ambiguous.pt")
    assert re.search(r"\bmodel\b", line) and re.search(r"\bema\b", line), res.describe()
    assert os.listdir(work) == []


def test_key_option_selects_nested_entry(fx, work):
    out, _ = merge_ok(work, "simple_average", "--key", "ema", *fx("ambiguous.pt", "sd_a.pt"))
    merged = ref.reference_merge([ref.load_state_dict(fx("ambiguous.pt"), key="ema"),
                                  ref.load_state_dict(fx("sd_a.pt"))])
    ref.assert_state_dict_matches(out, merged)
    assert int(out["bn.num_batches_tracked"]) == 2  # 'ema' is sd_b, and it comes first


def test_key_option_with_mixed_nested_and_flat_inputs(fx, work):
    out, _ = merge_ok(work, "simple_average", "--key", "state_dict",
                      *fx("nested_a.pt", "sd_b.pt", "nested_c.pt"))
    merged = ref.reference_merge([ref.load_state_dict(fx("nested_a.pt"), "state_dict"),
                                  ref.load_state_dict(fx("sd_b.pt")),
                                  ref.load_state_dict(fx("nested_c.pt"), "state_dict")])
    ref.assert_state_dict_matches(out, merged)


def test_key_option_unknown_key_is_an_error(fx, work):
    res = tm("simple_average", "--key", "nope", "-o", work / "out.pt",
             *fx("nested_a.pt", "nested_b.pt"), cwd=work)
    assert_error(res, "nested_a.pt", "nope")
    assert os.listdir(work) == []


def test_namespace_objects_in_checkpoint_are_inert(fx, work):
    out, _ = merge_ok(work, "simple_average", *fx("namespace.pt", "sd_b.pt"))
    merged = ref.reference_merge([ref.load_state_dict(fx("namespace.pt")),
                                  ref.load_state_dict(fx("sd_b.pt"))])
    ref.assert_state_dict_matches(out, merged)
    ref.assert_state_dict_matches(out, ref.reference_merge(sds(fx, "sd_a.pt", "sd_b.pt")))


# ---- shared storages -------------------------------------------------------------------------

def test_tied_weights_stay_tied_in_output(fx, work):
    out, _ = merge_ok(work, "simple_average", *fx("tied_a.pt", "tied_b.pt", "tied_c.pt"))
    merged = ref.reference_merge(sds(fx, "tied_a.pt", "tied_b.pt", "tied_c.pt"))
    assert merged.order == ["emb.weight", "ln.weight", "ln.bias", "head.weight"]
    ref.assert_state_dict_matches(out, merged)
    emb, head = out["emb.weight"], out["head.weight"]
    assert emb.data_ptr() == head.data_ptr(), "the tie was broken"
    assert emb.storage().data_ptr() == head.storage().data_ptr()
    # One storage for the tied pair: 3 storages (emb/head, ln.weight, ln.bias), 192 bytes.
    with zipfile.ZipFile(work / "out.pt") as zf:
        data = [i for i in zf.infolist() if re.search(r"(^|/)data/\d+$", i.filename)]
    assert len(data) == 3, [i.filename for i in data]
    assert sum(i.file_size for i in data) == (10 * 4 + 4 + 4) * 4


# ---- TorchScript -----------------------------------------------------------------------------

def forward_reference(state_dict, x: torch.Tensor) -> torch.Tensor:
    """The forward of the Python FixtureNet holding state_dict, in eval mode."""
    model = fm.FixtureNet()
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture
def example_input(fx):
    return torch.load(str(fx("example_input.pt")))


def check_torchscript_output(path: Path, merged, x: torch.Tensor) -> None:
    module = torch.jit.load(str(path), map_location="cpu")
    assert isinstance(module, torch.jit.ScriptModule)
    sd = module.state_dict()
    ref.assert_state_dict_matches(sd, merged, check_order=False)
    assert not module.training, "the module should keep its eval mode"
    with torch.no_grad():
        got = module(x)
    expected = forward_reference(ref.expected_state_dict(merged), x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got, expected)


def test_torchscript_inputs_produce_torchscript_module(fx, work, example_input):
    res = tm("simple_average", "-o", work / "out.pt", *fx("ts_a.pt", "ts_b.pt", "ts_c.pt"),
             cwd=work)
    assert_ok(res)
    assert os.listdir(work) == ["out.pt"]
    merged = ref.reference_merge(sds(fx, "ts_a.pt", "ts_b.pt", "ts_c.pt"))
    assert merged.order == SD_KEYS
    check_torchscript_output(work / "out.pt", merged, example_input)
    # and it is the same average as that of the equivalent state dicts
    ref.assert_state_dict_matches(torch.jit.load(str(work / "out.pt")).state_dict(),
                                  ref.reference_merge(sds(fx, "sd_a.pt", "sd_b.pt", "sd_c.pt")),
                                  check_order=False)


def test_template_fills_torchscript_module_with_merged_weights(fx, work, example_input):
    template_hash = sha256(fx("template.pt"))
    res = tm("simple_average", "--template", fx("template.pt"), "-o", work / "out.pt",
             *fx("sd_a.pt", "sd_b.pt", "sd_c.pt"), cwd=work)
    assert_ok(res)
    merged = ref.reference_merge(sds(fx, "sd_a.pt", "sd_b.pt", "sd_c.pt"))
    check_torchscript_output(work / "out.pt", merged, example_input)
    module = torch.jit.load(str(work / "out.pt"))
    assert int(module.state_dict()["bn.num_batches_tracked"]) == 1  # sd_a's, not the template's
    template = torch.jit.load(str(fx("template.pt")))
    assert not torch.equal(module.state_dict()["fc.weight"], template.state_dict()["fc.weight"])
    assert sha256(fx("template.pt")) == template_hash


def tm_loaded_libraries(*args, cwd):
    """Runs the CLI with the dynamic loader's trace on; returns (exit status, the shared objects
    it loaded, stderr)."""
    res = tm(*args, cwd=cwd, env={"LD_DEBUG": "files"})
    loaded = set(re.findall(r"file=(\S+)\s+\[\d+\];\s+(?:dynamically loaded|needed)", res.stderr))
    return res.rc, {os.path.basename(x) for x in loaded}, res.stderr


def records(path: Path) -> dict:
    with zipfile.ZipFile(str(path)) as z:
        return {n: z.read(n) for n in z.namelist()}


@pytest.mark.parametrize("template", [False, True], ids=["module_inputs", "template"])
def test_torchscript_output_is_the_template_archive_with_merged_storages_and_no_libtorch(
        fx, work, example_input, template):
    """Same dtype and layout as the template: the module's records are copied as they are and
    only its tensor storages replaced, streaming, without loading LibTorch."""
    if template:
        inputs, tpl = fx("sd_a.pt", "sd_b.pt", "sd_c.pt"), fx("template.pt")
        args = ["--template", tpl]
    else:
        inputs, args = fx("ts_a.pt", "ts_b.pt", "ts_c.pt"), []
        tpl = inputs[0]
    rc, libs, err = tm_loaded_libraries("simple_average", "-q", *args, "-o", work / "out.pt", *inputs, cwd=work)
    assert rc == 0, err[-2000:]
    assert not any(lib.startswith(("libtorchmerge_torch", "libtorch.so", "libtorch_cpu", "libc10")) for lib in libs), \
        sorted(libs)
    merged = ref.reference_merge(sds(fx, *[Path(i).name for i in inputs]))
    check_torchscript_output(work / "out.pt", merged, example_input)
    got, want = records(work / "out.pt"), records(tpl)
    assert sorted(got) == sorted(want)
    changed = sorted(n for n in want if got[n] != want[n])
    assert changed and all("/data/" in n for n in changed), changed


@needs_torch_half
def test_torchscript_output_with_a_dtype_change_goes_through_libtorch(fx, work, example_input):
    rc, libs, err = tm_loaded_libraries("simple_average", "-q", "--dtype", "float64", "-o", work / "out.pt",
                                        *fx("ts_a.pt", "ts_b.pt", "ts_c.pt"), cwd=work)
    assert rc == 0, err[-2000:]
    assert any(lib.startswith("libtorchmerge_torch") for lib in libs), sorted(libs)
    sd = torch.jit.load(str(work / "out.pt")).state_dict()
    assert sd["fc.weight"].dtype == torch.float64
    merged = ref.reference_merge(sds(fx, "ts_a.pt", "ts_b.pt", "ts_c.pt"))
    assert torch.allclose(sd["fc.weight"], merged.expected["fc.weight"].double(), rtol=0, atol=1e-6)


@needs_torch_half
def test_torchscript_template_whose_storage_is_larger_than_its_tensor_goes_through_libtorch(work):
    """A parameter that is a view into a larger storage (like cuDNN's flat RNN weights) cannot
    be replaced record for record: LibTorch writes that module."""
    class M(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            base = torch.randn(10, generator=g)
            self.w = torch.nn.Parameter(base[2:6])  # 4 of the storage's 10 elements

        def forward(self, x):
            return x * self.w

    paths = []
    for seed in (1, 2):
        paths.append(work / ("m%d.pt" % seed))
        torch.jit.save(torch.jit.script(M(seed)), str(paths[-1]))
    rc, libs, err = tm_loaded_libraries("simple_average", "-q", "-o", work / "out.pt", *paths, cwd=work)
    assert rc == 0, err[-2000:]
    assert any(lib.startswith("libtorchmerge_torch") for lib in libs), sorted(libs)
    want = (torch.jit.load(str(paths[0])).w.double() + torch.jit.load(str(paths[1])).w.double()) / 2
    assert torch.equal(torch.jit.load(str(work / "out.pt")).w, want.float())


def test_format_pt_with_torchscript_inputs_writes_state_dict(fx, work):
    out, _ = merge_ok(work, "simple_average", "--format", "pt",
                      *fx("ts_a.pt", "ts_b.pt", "ts_c.pt"))
    merged = ref.reference_merge(sds(fx, "ts_a.pt", "ts_b.pt", "ts_c.pt"))
    ref.assert_state_dict_matches(out, merged)


def test_format_torchscript_without_module_or_template_is_an_error(fx, work):
    res = tm("simple_average", "--format", "torchscript", "-o", work / "out.pt",
             *fx("sd_a.pt", "sd_b.pt"), cwd=work)
    assert res.rc in (1, 2), res.describe()
    assert "template" in res.stderr.lower(), res.describe()
    assert os.listdir(work) == []


# ---- key policies ----------------------------------------------------------------------------

def test_strict_keys_missing_key_is_an_error(fx, work):
    res = tm("simple_average", "-o", work / "out.pt", *fx("sd_a.pt", "missing_key.pt"), cwd=work)
    assert_error(res, make_fixtures.MISSING_KEY, "missing_key.pt")
    assert os.listdir(work) == []
    res = tm("simple_average", "--keys", "strict", "-o", work / "out.pt",
             *fx("sd_a.pt", "missing_key.pt"), cwd=work)
    assert_error(res, make_fixtures.MISSING_KEY, "missing_key.pt")


def test_strict_keys_extra_key_is_an_error(fx, work):
    res = tm("simple_average", "-o", work / "out.pt", *fx("sd_a.pt", "extra_key.pt"), cwd=work)
    assert_error(res, make_fixtures.EXTRA_KEY, "extra_key.pt")
    assert os.listdir(work) == []


def test_intersection_keeps_only_keys_present_in_every_input(fx, work):
    out, _ = merge_ok(work, "simple_average", "--keys", "intersection",
                      *fx("sd_a.pt", "missing_key.pt", "sd_b.pt"))
    assert make_fixtures.MISSING_KEY not in out
    merged = ref.reference_merge(sds(fx, "sd_a.pt", "missing_key.pt", "sd_b.pt"),
                                 keys="intersection")
    assert merged.order == [k for k in SD_KEYS if k != make_fixtures.MISSING_KEY]
    ref.assert_state_dict_matches(out, merged)


def test_union_keeps_extra_key_with_its_own_value(fx, work):
    out, _ = merge_ok(work, "simple_average", "--keys", "union",
                      *fx("sd_a.pt", "extra_key.pt", "sd_b.pt"))
    merged = ref.reference_merge(sds(fx, "sd_a.pt", "extra_key.pt", "sd_b.pt"), keys="union")
    assert merged.order == SD_KEYS + [make_fixtures.EXTRA_KEY]
    ref.assert_state_dict_matches(out, merged)
    extra = ref.load_state_dict(fx("extra_key.pt"))[make_fixtures.EXTRA_KEY]
    assert torch.equal(out[make_fixtures.EXTRA_KEY], extra)


def test_union_averages_a_key_over_the_inputs_that_have_it(fx, work):
    out, _ = merge_ok(work, "simple_average", "--keys", "union",
                      *fx("sd_a.pt", "missing_key.pt", "sd_b.pt"))
    merged = ref.reference_merge(sds(fx, "sd_a.pt", "missing_key.pt", "sd_b.pt"), keys="union")
    assert merged.order == SD_KEYS
    ref.assert_state_dict_matches(out, merged)
    pair = ref.reference_merge(sds(fx, "sd_a.pt", "sd_b.pt"))
    k = make_fixtures.MISSING_KEY
    ref.assert_close_ulp(out[k], pair.expected[k], torch.float32, magnitude=pair.magnitude[k], name=k)


# ---- failures leave no trace -----------------------------------------------------------------

def test_shape_mismatch_error_names_key_files_and_shapes(fx, work):
    res = tm("simple_average", "-o", work / "out.pt", *fx("sd_a.pt", "shape_mismatch.pt"),
             cwd=work)
    line = assert_error(res, "fc.weight", "sd_a.pt", "shape_mismatch.pt")
    assert re.search(shape_re([5, 4]), line), res.describe()
    assert re.search(shape_re([7, 4]), line), res.describe()
    assert os.listdir(work) == [], "no output and no temporary file may be left"


def test_failed_merge_leaves_existing_output_untouched(fx, work):
    out = work / "out.pt"
    previous = b"previous output, not to be touched\n"
    out.write_bytes(previous)
    res = tm("simple_average", "-o", out, *fx("sd_a.pt", "shape_mismatch.pt"), cwd=work)
    assert_error(res, "fc.weight")
    assert out.read_bytes() == previous
    assert os.listdir(work) == ["out.pt"]


def test_successful_merge_replaces_existing_output(fx, work):
    (work / "out.pt").write_bytes(b"stale\n")
    out, _ = merge_ok(work, "simple_average", *fx("plain1_a.pt", "plain1_b.pt"))
    assert list(out) == ["weight"]


def test_output_goes_to_its_own_folder_not_the_working_directory(fx, work):
    cwd = work / "cwd"
    dest = work / "dest"
    cwd.mkdir()
    dest.mkdir()
    res = tm("simple_average", "-o", dest / "merged.pt", *fx("plain1_a.pt", "plain1_b.pt"),
             cwd=cwd)
    assert_ok(res)
    assert os.listdir(cwd) == []
    assert os.listdir(dest) == ["merged.pt"]
    load_pt(dest / "merged.pt")


def test_output_in_missing_folder_is_an_error(fx, work):
    res = tm("simple_average", "-o", work / "no_such_dir" / "out.pt",
             *fx("plain1_a.pt", "plain1_b.pt"), cwd=work)
    assert_error(res, "out.pt")
    assert os.listdir(work) == []


BROKEN_INPUTS = ["truncated.pt", "badmagic.pt", "empty.pt", "does_not_exist.pt", "a_directory.pt"]


def broken_path(fx, work, name) -> Path:
    if name == "does_not_exist.pt":
        return work / name
    if name == "a_directory.pt":
        (work / name).mkdir()
        return work / name
    return fx(name)


@pytest.mark.parametrize("name", BROKEN_INPUTS)
def test_unreadable_input_is_a_one_line_error_naming_it(fx, work, name):
    bad = broken_path(fx, work, name)
    before = sorted(os.listdir(work))
    res = tm("simple_average", "-o", work / "out.pt", fx("sd_a.pt"), bad, cwd=work)
    assert_error(res, name)
    assert sorted(os.listdir(work)) == before


@pytest.mark.parametrize("name", BROKEN_INPUTS)
def test_inspect_unreadable_file_is_a_one_line_error_naming_it(fx, work, name):
    bad = broken_path(fx, work, name)
    res = tm("inspect", bad, cwd=work)
    assert_error(res, name)
    assert res.stdout == "", res.describe()


# ---- hostile pickles -------------------------------------------------------------------------

def test_evil_fixtures_really_run_code_when_unpickled(fx, tmp_path):
    """Guards the refusal tests below against a harmless fixture."""
    for build in (make_fixtures.evil_pickle_os_system, make_fixtures.evil_pickle_eval):
        marker = tmp_path / ("proof_" + build.__name__)
        pickle.loads(build(str(marker)))
        assert marker.exists()
    with zipfile.ZipFile(fx("evil.pt")) as zf:
        data = zf.read("evil/data.pkl")
    assert data == make_fixtures.evil_pickle_os_system(str(fx.marker))
    with zipfile.ZipFile(fx("evil_eval.pt")) as zf:
        data = zf.read("evil_eval/data.pkl")
    assert data == make_fixtures.evil_pickle_eval(str(fx.marker))
    assert not fx.marker.exists()


REFUSAL = re.compile(r"unsafe|refus|not allowed|disallowed|forbidden|global|os\.system|"
                     r"builtins\.eval|\bsystem\b|\beval\b", re.I)


@pytest.mark.parametrize("name", ["evil.pt", "evil_eval.pt"])
def test_malicious_pickle_is_refused_and_never_executed(fx, work, name):
    res = tm("simple_average", "-o", work / "out.pt", *fx(name, "sd_a.pt"), cwd=work)
    line = assert_error(res, name)
    assert REFUSAL.search(line), res.describe()
    assert not fx.marker.exists(), "the pickle was executed"
    assert os.listdir(work) == []

    res = tm("inspect", fx(name), cwd=work)
    assert_error(res, name)
    assert not fx.marker.exists(), "the pickle was executed by inspect"

    res = tm("simple_average", "-o", work / "out.pt", *fx("sd_a.pt", name), cwd=work)
    assert_error(res, name)
    assert not fx.marker.exists()
    assert os.listdir(work) == []


# ---- inspect ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd_a.pt", "dtype_a.pt", "views_a.pt"])
def test_inspect_prints_each_tensor_name_dtype_and_shape(fx, work, name):
    res = tm("inspect", fx(name), cwd=work)
    assert_ok(res)
    sd = ref.load_state_dict(fx(name))
    lines = res.stdout.splitlines()
    for k, t in sd.items():
        mine = [l for l in lines if re.search(name_re(k), l)]
        assert mine, "%r not listed\n%s" % (k, res.describe())
        dtype = ref.NAME_BY_DTYPE[t.dtype]
        assert any(re.search(name_re(dtype), l) and re.search(shape_re(t.shape), l)
                   for l in mine), "%r: no line with %s %s\n%s" % (k, dtype, list(t.shape),
                                                                 res.describe())


def _numbers(obj):
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _numbers(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in _numbers(v)]
    return []


@pytest.mark.parametrize("name,fmt", [("sd_a.pt", "pt"), ("dtype_a.pt", "pt"),
                                      ("views_a.pt", "pt"), ("ts_a.pt", "torchscript")])
def test_inspect_json_lists_tensors_and_totals(fx, work, name, fmt):
    res = tm("inspect", fx(name), "--json", cwd=work)
    assert_ok(res)
    doc = json.loads(res.stdout)
    assert doc["format"] == fmt
    sd = ref.load_state_dict(fx(name))
    tensors = doc["tensors"]
    assert [t["name"] for t in tensors] == list(sd)
    for t in tensors:
        x = sd[t["name"]]
        assert t["dtype"] == ref.NAME_BY_DTYPE[x.dtype], t
        assert t["shape"] == list(x.shape), t
        assert t["nbytes"] == x.numel() * x.element_size(), t
    totals = {k: v for k, v in doc.items() if "total" in k.lower()}
    assert totals, "no totals in %s" % sorted(doc)
    total_bytes = sum(t["nbytes"] for t in tensors)
    assert total_bytes in _numbers(totals) or (total_bytes == 0), (totals, total_bytes)


# ---- options and housekeeping ----------------------------------------------------------------

def test_profile_reports_load_merge_and_save(fx, work):
    out, res = merge_ok(work, "simple_average", "--profile", *fx("sd_a.pt", "sd_b.pt"))
    text = (res.stdout + "\n" + res.stderr).lower().splitlines()
    for phase in ("load", "merge", "save"):
        assert any(re.search(r"\b" + phase, l) for l in text), "%s\n%s" % (phase, res.describe())
    ref.assert_state_dict_matches(out, ref.reference_merge(sds(fx, "sd_a.pt", "sd_b.pt")))


@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_quiet_suppresses_warnings(fx, work, flag):
    out, res = merge_ok(work, "simple_average", flag, *fx("sd_a.pt", "sd_b.pt", "sd_c.pt"))
    assert res.warnings == [] and "warning" not in res.stderr.lower(), res.describe()
    assert int(out["bn.num_batches_tracked"]) == 1
    ref.assert_state_dict_matches(out, ref.reference_merge(sds(fx, "sd_a.pt", "sd_b.pt", "sd_c.pt")))


def test_help_exits_zero_and_lists_commands(work):
    res = tm("--help", cwd=work)
    assert res.rc == 0, res.describe()
    for word in ("simple_average", "weighted_average", "inspect"):
        assert word in res.stdout, res.describe()


def test_version_exits_zero_and_prints_version(work):
    res = tm("--version", cwd=work)
    assert res.rc == 0, res.describe()
    assert version_string() in res.stdout, res.describe()


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["simple_average", "--no-such-option", "-o", "out.pt", "A", "B"],
    ["simple_average", "-o", "out.pt"],
    ["simple_average", "A", "B"],
    ["simple_average", "--keys", "sometimes", "-o", "out.pt", "A", "B"],
    ["simple_average", "--format", "onnx", "-o", "out.pt", "A", "B"],
], ids=["nothing", "unknown-command", "unknown-option", "no-inputs", "no-output",
        "bad-keys", "bad-format"])
def test_usage_errors_exit_2(fx, work, argv):
    argv = [str(fx("plain1_a.pt")) if a == "A" else str(fx("plain1_b.pt")) if a == "B" else a
            for a in argv]
    res = tm(*argv, cwd=work)
    assert res.rc == 2, res.describe()
    assert res.stderr.strip(), res.describe()
    assert os.listdir(work) == []


def test_zz_inputs_are_never_modified(fx):
    """Runs last (file order): no test may have changed, added or removed an input file."""
    now = {p.name: sha256(p) for p in sorted(fx.dir.iterdir())}
    assert now == fx.hashes
    assert not fx.marker.exists()
