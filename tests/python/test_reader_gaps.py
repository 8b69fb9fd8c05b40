"""Reader gaps seen on real checkpoints (issue 15): quantized tensors (zip, legacy and TorchScript
archives) read, inspected and, with --dequantize, merged as their real values; numpy arrays
written through dill kept as inert placeholders; inspect of checkpoints holding several state
dicts, and of an empty one.

Every expected value comes from torch.load (the integers, scales, zero points, axis) and from a
float64 reference written from the formula scale·(q − zero_point), not from torchmerge."""
import ctypes
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import reference as ref
from cli_runner import BIN, ERROR_PREFIX, assert_error, assert_ok, tm  # noqa: F401

torch.manual_seed(15)

QDTYPES = {torch.qint8: "qint8", torch.quint8: "quint8", torch.qint32: "qint32"}
INT_REPR = {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.qint32: torch.int32}


def per_tensor(shape, scale, zp, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.quantize_per_tensor(torch.randn(shape, generator=g) * 3, scale, zp, dtype)


def per_channel(shape, scales, zps, axis, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.quantize_per_channel(torch.randn(shape, generator=g) * 3,
                                      torch.tensor(scales, dtype=torch.float64),
                                      torch.tensor(zps, dtype=torch.int64), axis, dtype)


def quantized_sd(seed):
    """Per-tensor and per-channel tensors of the three dtypes: small, 0-d, a transposed
    (non-contiguous) view, per-channel along axes 0 and 1, and a float tensor beside them."""
    s = seed * 10
    return {
        "pt.qint8": per_tensor((3, 4), 0.1 + 0.01 * seed, 3 - seed, torch.qint8, s + 1),
        "pt.quint8": per_tensor((5,), 0.25, 128 + seed, torch.quint8, s + 2),
        "pt.qint32": per_tensor((2, 3), 1e-3 * (seed + 1), -7 + seed, torch.qint32, s + 3),
        "pt.scalar": per_tensor((), 0.5, 1, torch.qint8, s + 4),
        "pt.transposed": per_tensor((4, 3), 0.2, 0, torch.qint8, s + 5).t(),
        "pc.qint8": per_channel((3, 5), [0.1, 0.2 + seed * 0.05, 0.3], [0, 1 + seed, -1], 0, torch.qint8, s + 6),
        "pc.quint8": per_channel((2, 3), [0.5, 0.25, 0.125 * (seed + 1)], [10, 20, 30 + seed], 1, torch.quint8, s + 7),
        "pc.qint32": per_channel((2, 2, 3), [1e-3, 2e-3], [0, seed], 0, torch.qint32, s + 8),
        "pc.float_qparams": float_qparams((3, 4), [0.1, 0.2, 0.05 * (seed + 1)], [0.5, -1.0, 2.0 + seed], s + 10),
        "float": torch.randn(4, generator=torch.Generator().manual_seed(s + 9)),
    }


def float_qparams(shape, scales, zps, seed):
    """per_channel_affine_float_qparams (embedding tables): float32 scales and real zero points."""
    g = torch.Generator().manual_seed(seed)
    return torch.quantize_per_channel(torch.rand(shape, generator=g) * 4, torch.tensor(scales),
                                      torch.tensor(zps), 0, torch.quint8)


class QModule(torch.nn.Module):
    """A scripted module with quantized buffers (TorchScript archives keep them as attributes)."""

    def __init__(self, sd):
        super().__init__()
        self.register_buffer("q", sd["pt.quint8"])
        self.register_buffer("c", sd["pc.qint8"])
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


@pytest.fixture(scope="session")
def qin(tmp_path_factory):
    d = tmp_path_factory.mktemp("format_inputs_quantized")
    files = {}
    for i in range(3):
        sd = quantized_sd(i)
        files["zip%d" % i] = d / ("q%d.pt" % i)
        torch.save(sd, files["zip%d" % i])
        files["legacy%d" % i] = d / ("q%d_legacy.pt" % i)
        torch.save(sd, files["legacy%d" % i], _use_new_zipfile_serialization=False)
        torch.manual_seed(i)
        files["ts%d" % i] = d / ("q%d_script.pt" % i)
        torch.jit.save(torch.jit.script(QModule(sd)), str(files["ts%d" % i]))
    return files


def torch_state_dict(path):
    if ref.is_torchscript_file(path):
        return dict(torch.jit.load(str(path)).state_dict())
    return torch.load(str(path))


def inspect_json(path, *args):
    r = tm("inspect", "--json", path, *args, cwd=Path(path).parent)
    assert r.rc == 0, r.describe()
    return json.loads(r.stdout)


# ---- the C API through ctypes: the integers themselves ---------------------------------------

class TensorInfo(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("name", ctypes.c_char_p), ("dtype", ctypes.c_int),
                ("ndim", ctypes.c_int32), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("stride", ctypes.POINTER(ctypes.c_int64)), ("storage_offset", ctypes.c_int64),
                ("storage_data", ctypes.c_void_p), ("storage_nbytes", ctypes.c_uint64),
                ("storage_id", ctypes.c_int64), ("numel", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                ("qscheme", ctypes.c_int), ("q_scale", ctypes.c_double), ("q_zero_point", ctypes.c_int64),
                ("q_axis", ctypes.c_int32), ("q_scales", ctypes.POINTER(ctypes.c_double)),
                ("q_zero_points", ctypes.POINTER(ctypes.c_double))]


def c_api():
    lib = ctypes.CDLL(str(BIN.parent / "libtorchmerge.so"))
    lib.tm_checkpoint_open.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.tm_checkpoint_n_tensors.argtypes = [ctypes.c_void_p]
    lib.tm_checkpoint_n_tensors.restype = ctypes.c_size_t
    lib.tm_checkpoint_tensor.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(TensorInfo)]
    lib.tm_checkpoint_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    lib.tm_checkpoint_free.argtypes = [ctypes.c_void_p]
    lib.tm_errmsg.restype = ctypes.c_char_p
    return lib


def read_with_c_api(path):
    """{name: (dtype, int repr tensor, qscheme, scale, zero_point, axis, scales, zero_points)}."""
    lib = c_api()
    ck = ctypes.c_void_p()
    assert lib.tm_checkpoint_open(str(path).encode(), None, ctypes.byref(ck)) == 0, lib.tm_errmsg()
    out = {}
    try:
        for i in range(lib.tm_checkpoint_n_tensors(ck)):
            info = TensorInfo()
            info.struct_size = ctypes.sizeof(TensorInfo)
            assert lib.tm_checkpoint_tensor(ck, i, ctypes.byref(info)) == 0, lib.tm_errmsg()
            buf = ctypes.create_string_buffer(max(int(info.nbytes), 1))
            assert lib.tm_checkpoint_read(ck, i, buf, len(buf)) == 0, lib.tm_errmsg()
            shape = [info.shape[d] for d in range(info.ndim)]
            n = shape[info.q_axis] if info.qscheme in (2, 3) else 0
            out[info.name.decode()] = dict(
                raw=buf.raw[:info.nbytes], shape=shape, qscheme=info.qscheme, scale=info.q_scale,
                zero_point=info.q_zero_point, axis=info.q_axis,
                scales=[info.q_scales[c] for c in range(n)],
                zero_points=[info.q_zero_points[c] for c in range(n)])
    finally:
        lib.tm_checkpoint_free(ck)
    return out


QSCHEMES = {torch.per_tensor_affine: 1, torch.per_channel_affine: 2, torch.per_channel_affine_float_qparams: 3}


@pytest.mark.parametrize("kind", ["zip0", "legacy1", "ts2"])
def test_quantized_tensors_read_as_torch_load_reads_them(qin, kind):
    path = qin[kind]
    expected = torch_state_dict(path)
    got = read_with_c_api(path)
    assert sorted(got) == sorted(expected)
    quantized = 0
    for name, t in expected.items():
        g = got[name]
        assert g["shape"] == list(t.shape), name
        if not t.is_quantized:
            assert g["qscheme"] == 0, name
            continue
        quantized += 1
        ints = t.int_repr().contiguous()
        assert g["raw"] == ints.numpy().tobytes(), "%s: the integers differ from torch.load's int_repr" % name
        assert g["qscheme"] == QSCHEMES[t.qscheme()], name
        if t.qscheme() == torch.per_tensor_affine:
            assert g["scale"] == t.q_scale() and g["zero_point"] == t.q_zero_point(), name
        else:
            assert g["axis"] == t.q_per_channel_axis(), name
            assert g["scales"] == t.q_per_channel_scales().tolist(), name
            assert g["zero_points"] == [float(z) for z in t.q_per_channel_zero_points().tolist()], name
    assert quantized == (2 if kind.startswith("ts") else 9)


@pytest.mark.parametrize("kind", ["zip0", "legacy0", "ts0"])
def test_inspect_lists_scheme_scale_and_zero_point(qin, kind):
    path = qin[kind]
    expected = torch_state_dict(path)
    listing = inspect_json(path)
    by_name = {t["name"]: t for t in listing["tensors"]}
    assert sorted(by_name) == sorted(expected)
    for name, t in expected.items():
        e = by_name[name]
        assert e["shape"] == list(t.shape)
        if not t.is_quantized:
            assert "quantization" not in e
            continue
        q = e["quantization"]
        assert e["dtype"] == QDTYPES[t.dtype]
        if t.qscheme() == torch.per_tensor_affine:
            assert q == {"scheme": "per_tensor_affine", "scale": t.q_scale(), "zero_point": t.q_zero_point()}
        else:
            assert q == {"scheme": str(t.qscheme()).replace("torch.", ""), "axis": t.q_per_channel_axis(),
                         "scales": t.q_per_channel_scales().tolist(),
                         "zero_points": t.q_per_channel_zero_points().tolist()}
    text = tm("inspect", path, cwd=path.parent)
    assert text.rc == 0, text.describe()
    line = [l for l in text.stdout.splitlines() if l.startswith("c ") or l.startswith("pc.qint8 ")][0]
    assert "per_channel_affine axis=0 channels=3" in line
    line = [l for l in text.stdout.splitlines() if l.startswith("q ") or l.startswith("pt.quint8 ")][0]
    assert "per_tensor_affine scale=0.25 zero_point=" in line


def real_values(t):
    """scale·(q − zero_point) in float64, from torch.load's integers and parameters."""
    q = t.int_repr().to(torch.float64)
    if t.qscheme() == torch.per_tensor_affine:
        return t.q_scale() * (q - t.q_zero_point())
    axis = t.q_per_channel_axis()
    shape = [1] * t.dim()
    shape[axis] = t.shape[axis]
    s = t.q_per_channel_scales().to(torch.float64).reshape(shape)
    z = t.q_per_channel_zero_points().to(torch.float64).reshape(shape)
    return s * (q - z)


def as_f64(t):
    return real_values(t) if t.is_quantized else t.to(torch.float64)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "ts"])
def test_merging_quantized_tensors_needs_dequantize(qin, tmp_path, fmt):
    r = tm("simple_average", "--format", "pt", "-o", tmp_path / "out.pt", qin[fmt + "0"], qin[fmt + "1"], cwd=tmp_path)
    assert r.rc != 0
    assert len(r.errors) == 1 and len(r.stderr_lines) == 1, r.describe()
    first = "q" if fmt == "ts" else "pt.qint8"
    assert ("tensor '%s': quantized" % first) in r.errors[0] and "--dequantize" in r.errors[0], r.describe()
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("fmt,args,weights", [
    ("zip", ["simple_average"], [1 / 3, 1 / 3, 1 / 3]),
    ("legacy", ["weighted_average", "--weights", "0.7,-0.2,0.5", "--no-normalize"], [0.7, -0.2, 0.5]),
    ("ts", ["weighted_average", "--weights", "2,1,1"], [0.5, 0.25, 0.25]),
])
def test_dequantized_merge_matches_float64_reference(qin, tmp_path, fmt, args, weights):
    inputs = [qin["%s%d" % (fmt, i)] for i in range(3)]
    out = tmp_path / "out.pt"
    r = tm(*args, "--dequantize", "--format", "pt", "-o", out, *inputs, cwd=tmp_path)
    assert r.rc == 0, r.describe()
    merged = torch.load(str(out))
    sds = [torch_state_dict(p) for p in inputs]
    assert list(merged) == list(sds[0])
    for name in merged:
        expected = sum(w * as_f64(sd[name]) for w, sd in zip(weights, sds))
        dtype = torch.float32 if sds[0][name].is_quantized else sds[0][name].dtype
        ref.assert_close_ulp(merged[name], expected, dtype, name=name)


def test_dequantized_merge_honours_dtype_and_the_recipe_key(qin, tmp_path):
    inputs = [qin["zip0"], qin["zip1"]]
    out = tmp_path / "half.pt"
    r = tm("simple_average", "--dequantize", "--dtype", "float64", "-o", out, *inputs, cwd=tmp_path)
    assert r.rc == 0, r.describe()
    merged = torch.load(str(out))
    sds = [torch.load(str(p)) for p in inputs]
    for name in merged:
        ref.assert_close_ulp(merged[name], (as_f64(sds[0][name]) + as_f64(sds[1][name])) / 2, torch.float64,
                             name=name)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: simple_average\nmodels: [%s, %s]\noutput: %s\ndequantize: true\n"
                      % (inputs[0], inputs[1], tmp_path / "r.pt"))
    r = tm("run", recipe, cwd=tmp_path)
    assert r.rc == 0, r.describe()
    merged = torch.load(str(tmp_path / "r.pt"))
    for name in merged:
        dtype = torch.float32 if sds[0][name].is_quantized else sds[0][name].dtype
        ref.assert_close_ulp(merged[name], (as_f64(sds[0][name]) + as_f64(sds[1][name])) / 2, dtype, name=name)
    recipe.write_text("method: simple_average\nmodels: [%s, %s]\noutput: %s\ndequantize: maybe\n"
                      % (inputs[0], inputs[1], tmp_path / "r2.pt"))
    r = tm("run", recipe, cwd=tmp_path)
    assert r.rc != 0 and "dequantize: expected true or false" in r.stderr, r.describe()
    recipe.write_text("method: simple_average\nmodels: [%s, %s]\noutput: %s\n" % (inputs[0], inputs[1], tmp_path / "r3.pt"))
    r = tm("run", recipe, cwd=tmp_path)
    assert r.rc != 0 and "--dequantize" in r.stderr, r.describe()


# ---- dill -------------------------------------------------------------------------------------

def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_unicode(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def op_bytes(b):
    return b"C" + bytes([len(b)]) + b


def dill_array_ops(payload=None):
    """The opcodes dill writes for np.arange(6, dtype=float32).reshape(2, 3) (dill 0.3's
    save_numpy_array: _create_array(_reconstruct, (ndarray, (0,), b'b'), state, None)); payload
    replaces the callable (to check that nothing is ever called)."""
    f = payload or (op_global("numpy.core.multiarray", "_reconstruct"),
                    b"(" + op_global("numpy", "ndarray") + b"K\x00\x85" + op_bytes(b"b") + b"t")
    data = struct.pack("<6f", *range(6))
    dtype = (op_global("numpy", "dtype") + op_unicode("f4") + b"\x89\x88\x87R"
             + b"(K\x03" + op_unicode("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    state = b"(K\x01K\x02K\x03\x86" + dtype + b"\x89" + op_bytes(data) + b"t"
    return op_global("dill._dill", "_create_array") + b"(" + f[0] + f[1] + state + b"Nt" + b"R"


def dill_checkpoint_pickle(extra=b""):
    """{'model': {'w': tensor([1., 2.])}, 'obs_mean': <dill array>, 'none_type':
    _load_type('NoneType')} + extra (more SETITEMs) as a protocol-2 pickle."""
    tensor = (op_global("torch._utils", "_rebuild_tensor_v2") + b"("
              + b"(" + op_unicode("storage") + op_global("torch", "FloatStorage") + op_unicode("0")
              + op_unicode("cpu") + b"K\x02tQ" + b"K\x00K\x02\x85K\x01\x85\x89"
              + op_global("collections", "OrderedDict") + b")Rt" + b"R")
    return (b"\x80\x02}(" + op_unicode("model") + b"}" + op_unicode("w") + tensor + b"s"
            + op_unicode("obs_mean") + dill_array_ops()
            + op_unicode("none_type") + op_global("dill._dill", "_load_type") + op_unicode("NoneType") + b"\x85R"
            + extra + b"u.")


def write_zip_checkpoint(path, pkl, storage=struct.pack("<2f", 1.0, 2.0)):
    with zipfile.ZipFile(str(path), "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", storage)
        z.writestr("archive/version", "3\n")


def test_dill_numpy_arrays_are_inert_placeholders(tmp_path):
    path = tmp_path / "dill_by_hand.pt"
    write_zip_checkpoint(path, dill_checkpoint_pickle())
    loaded = torch.load(str(path)) if _has_dill() else None  # the file is what dill writes
    if loaded is not None:
        assert loaded["obs_mean"].tolist() == [[0, 1, 2], [3, 4, 5]] and loaded["none_type"] is type(None)
    listing = inspect_json(path)
    assert listing["key"] == "model"
    assert [(t["name"], t["dtype"], t["shape"]) for t in listing["tensors"]] == [("w", "float32", [2])]
    r = tm("simple_average", "-o", tmp_path / "out.pt", path, path, cwd=tmp_path)
    assert r.rc == 0, r.describe()
    assert torch.equal(torch.load(str(tmp_path / "out.pt"))["w"], torch.tensor([1.0, 2.0]))


def _has_dill():
    try:
        import dill  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _has_dill(), reason="dill is not installed (python3-dill)")
@pytest.mark.parametrize("legacy", [False, True])
def test_checkpoint_saved_with_dill_reads(tmp_path, legacy):
    import dill
    import numpy as np
    obj = {"model": {"w": torch.randn(3, 2), "b": torch.zeros(3)}, "obs_mean": np.arange(6.0).reshape(2, 3),
           "obs_type": type(None), "scalar": np.float64(2.5), "dtype": np.dtype("float32")}
    path = tmp_path / "dill.pt"
    torch.save(obj, str(path), pickle_module=dill, _use_new_zipfile_serialization=not legacy)
    assert b"_create_array" in path.read_bytes() and b"_load_type" in path.read_bytes()
    listing = inspect_json(path)
    assert listing["key"] == "model"
    assert [(t["name"], t["shape"]) for t in listing["tensors"]] == [("w", [3, 2]), ("b", [3])]


def test_dill_payloads_never_run(tmp_path):
    marker = tmp_path / "marker"
    # _create_array's callable is codecs.open(marker, "w"): dill.load would create the marker
    touch = (op_global("codecs", "open"), b"(" + op_unicode(str(marker)) + op_unicode("w") + b"t")
    pkl = dill_checkpoint_pickle(extra=op_unicode("evil") + dill_array_ops(payload=touch))
    path = tmp_path / "dill_touch.pt"
    write_zip_checkpoint(path, pkl)
    if _has_dill():  # guard: under a real unpickler the payload runs
        import dill
        with zipfile.ZipFile(str(path)) as z:
            data = z.read("archive/data.pkl")

        class U(dill.Unpickler):
            def persistent_load(self, pid):
                return torch.FloatStorage(2)
        import io
        with pytest.raises(Exception):
            U(io.BytesIO(data)).load()
        assert marker.exists(), "the payload does not run under dill: the test proves nothing"
        marker.unlink()
    r = tm("inspect", path, cwd=tmp_path)
    assert r.rc == 0, r.describe()
    assert not marker.exists(), "THE PAYLOAD RAN"
    # a type that builds code is refused, like dill's other helpers (_create_function, …)
    for name, pkl in [("code", op_global("dill._dill", "_load_type") + op_unicode("CodeType") + b"\x85R"),
                      ("function", op_global("dill._dill", "_create_function") + b")R")]:
        p = tmp_path / ("dill_%s.pt" % name)
        write_zip_checkpoint(p, b"\x80\x02}(" + op_unicode("x") + pkl + b"u.")
        r = tm("inspect", p, cwd=tmp_path)
        assert r.rc != 0 and len(r.errors) == 1 and "refusing" in r.errors[0], r.describe()
    assert not marker.exists()


# ---- several state dicts, and none ------------------------------------------------------------

def test_inspect_lists_each_state_dict_with_its_key(tmp_path):
    path = tmp_path / "actor_critic.pt"
    torch.save({"actor": {"pi.weight": torch.randn(2, 3), "pi.bias": torch.zeros(2)},
                "critic": {"v.weight": torch.randn(1, 3), "v.bias": torch.zeros(1), "v.scale": torch.ones(())},
                "optimizer": {"state": {}, "param_groups": []}, "step": 7}, str(path))
    r = tm("inspect", path, cwd=tmp_path)
    assert r.rc == 0, r.describe()
    assert "2 state dicts" in r.stdout
    lines = [l.split() for l in r.stdout.splitlines() if l.strip().startswith("--key")]
    assert lines == [["--key", "actor", "2", "tensors"], ["--key", "critic", "3", "tensors"]]
    listing = inspect_json(path)
    assert listing["state_dicts"] == [{"key": "actor", "n_tensors": 2}, {"key": "critic", "n_tensors": 3}]
    assert [t["name"] for t in inspect_json(path, "--key", "critic")["tensors"]] == ["v.weight", "v.bias", "v.scale"]
    r = tm("simple_average", "-o", tmp_path / "out.pt", path, path, cwd=tmp_path)
    assert r.rc != 0 and len(r.errors) == 1 and "pick one with --key" in r.errors[0], r.describe()
    r = tm("simple_average", "--key", "actor", "-o", tmp_path / "out.pt", path, path, cwd=tmp_path)
    assert r.rc == 0, r.describe()


def test_empty_checkpoint_inspects_as_zero_tensors(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({}, str(path))
    r = tm("inspect", path, cwd=tmp_path)
    assert r.rc == 0, r.describe()
    assert "0 tensors, 0 elements, 0 bytes" in r.stdout
    listing = inspect_json(path)
    assert listing["tensors"] == [] and listing["n_tensors"] == 0
    legacy = tmp_path / "empty_legacy.pt"
    torch.save({}, str(legacy), _use_new_zipfile_serialization=False)
    assert inspect_json(legacy)["n_tensors"] == 0
    r = tm("simple_average", "-o", tmp_path / "out.pt", path, path, cwd=tmp_path)
    assert r.rc != 0 and len(r.errors) == 1 and "no tensor name in common" in r.errors[0], r.describe()


# ---- LibTorch: tm_state_dict_load returns quantized tensors as torch.load does ---------------

STATE_DICT_PROBE = r'''
import ctypes, json, sys
sys.path.insert(0, sys.argv[3])
from test_reader_gaps import TensorInfo
lib = ctypes.CDLL(sys.argv[1])
sd = ctypes.c_void_p()
if lib.tm_state_dict_load(sys.argv[2].encode(), None, ctypes.byref(sd)) != 0:
    lib.tm_errmsg.restype = ctypes.c_char_p
    sys.exit(lib.tm_errmsg().decode())
lib.tm_state_dict_size.restype = ctypes.c_size_t
lib.tm_errmsg.restype = ctypes.c_char_p
out = {}
for i in range(lib.tm_state_dict_size(sd)):
    info = TensorInfo()
    info.struct_size = ctypes.sizeof(TensorInfo)
    st = lib.tm_state_dict_tensor(sd, ctypes.c_size_t(i), ctypes.byref(info))
    if st != 0:
        out["error %d" % i] = lib.tm_errmsg().decode()
        continue
    raw = ctypes.string_at(info.storage_data, info.nbytes)
    out[info.name.decode()] = dict(dtype=info.dtype, qscheme=info.qscheme, scale=info.q_scale,
                                   zero_point=info.q_zero_point, raw=raw.hex())
print(json.dumps(out))
'''


@pytest.mark.skipif(os.environ.get("TORCHMERGE_WITH_TORCH") == "0", reason="no libtorchmerge_torch.so")
def test_state_dict_load_returns_quantized_tensors(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "per_tensor.pt"
    sd = {"a": per_tensor((3, 4), 0.125, 3, torch.qint8, 1), "b": per_tensor((5,), 0.5, 130, torch.quint8, 2),
          "c": per_tensor((2, 3), 1e-3, -4, torch.qint32, 3).t(), "f": torch.randn(2)}
    torch.save(sd, str(path))
    # a process of its own: the library loads libtorchmerge_torch.so (its LibTorch half) itself
    p = subprocess.run([sys.executable, "-c", STATE_DICT_PROBE, str(BIN.parent / "libtorchmerge.so"), str(path),
                        str(Path(__file__).parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=120, env=dict(os.environ, TORCHMERGE_BIN=str(BIN)))
    assert p.returncode == 0, p.stderr.decode()
    got = json.loads(p.stdout)
    assert sorted(got) == sorted(sd)
    # per channel: loaded (LibTorch's own checks pass), described as not yet supported
    pc = tmp_path / "per_channel.pt"
    torch.save({"pc": per_channel((2, 3), [0.5, 0.25, 0.125], [1, 2, 3], 1, torch.qint8, 4),
                "fq": float_qparams((3, 2), [0.1, 0.2, 0.3], [0.5, -1.0, 2.0], 5)}, str(pc))
    p = subprocess.run([sys.executable, "-c", STATE_DICT_PROBE, str(BIN.parent / "libtorchmerge.so"), str(pc),
                        str(Path(__file__).parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    errors = json.loads(p.stdout)
    assert sorted(errors) == ["error 0", "error 1"]
    assert all("per-channel quantized tensors are not described yet" in e for e in errors.values()), errors
    for name, t in torch.load(str(path)).items():
        g = got[name]
        if not t.is_quantized:
            assert g["qscheme"] == 0 and bytes.fromhex(g["raw"]) == t.numpy().tobytes()
            continue
        assert g["dtype"] == {torch.qint8: 12, torch.quint8: 13, torch.qint32: 14}[t.dtype], name
        assert (g["qscheme"], g["scale"], g["zero_point"]) == (1, t.q_scale(), t.q_zero_point()), name
        assert bytes.fromhex(g["raw"]) == t.int_repr().contiguous().numpy().tobytes(), name


class QLinear(torch.nn.Module):
    """nn.quantized.Linear: its weight and bias live in a LinearPackedParamsBase custom class."""

    def __init__(self, seed, per_channel):
        super().__init__()
        import torch.ao.nn.quantized as nnq
        g = torch.Generator().manual_seed(seed)
        self.fc = nnq.Linear(3, 2)
        if per_channel:
            w = torch.quantize_per_channel(torch.randn(2, 3, generator=g), torch.tensor([0.1, 0.2], dtype=torch.float64),
                                           torch.tensor([0, 0]), 0, torch.qint8)
        else:
            w = torch.quantize_per_tensor(torch.randn(2, 3, generator=g), 0.05, 0, torch.qint8)
        self.fc.set_weight_bias(w, torch.randn(2, generator=g))

    def forward(self, x):
        return self.fc(x)


def test_scripted_quantized_linear_packed_weights(tmp_path):
    paths, eager = [], []
    for i, per_channel in enumerate([True, False]):  # schemes may differ between inputs
        m = QLinear(i, per_channel)
        paths.append(tmp_path / ("qlinear%d.pt" % i))
        torch.jit.save(torch.jit.script(m), str(paths[-1]))
        eager.append(m.state_dict()["fc._packed_params._packed_params"])
    got = read_with_c_api(paths[0])
    assert sorted(got) == ["fc._packed_params._packed_params.0", "fc._packed_params._packed_params.1"]
    w, b = eager[0]
    g = got["fc._packed_params._packed_params.0"]
    assert g["raw"] == w.int_repr().numpy().tobytes() and g["qscheme"] == 2
    assert g["scales"] == w.q_per_channel_scales().tolist() and g["axis"] == 0
    assert got["fc._packed_params._packed_params.1"]["raw"] == b.detach().numpy().tobytes()
    out = tmp_path / "out.pt"
    r = tm("simple_average", "--dequantize", "--format", "pt", "-o", out, *paths, cwd=tmp_path)
    assert r.rc == 0, r.describe()
    merged = torch.load(str(out))
    ref.assert_close_ulp(merged["fc._packed_params._packed_params.0"],
                         (real_values(eager[0][0]) + real_values(eager[1][0])) / 2, torch.float32)
    ref.assert_close_ulp(merged["fc._packed_params._packed_params.1"],
                         (eager[0][1].double() + eager[1][1].double()) / 2, torch.float32)


# ---- _rebuild_qtensor calls written by hand: older list parameters, and malformed ones --------

def op_int(i):
    return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)


def op_float(x):
    return b"G" + struct.pack(">d", x)


def op_tuple(*items):
    return b"(" + b"".join(items) + b"t"


def op_list(*items):
    return b"](" + b"".join(items) + b"e"


def qtensor_pickle(quantizer, storage="QInt8Storage", numel=4, n_args=7):
    pid = op_tuple(op_unicode("storage"), op_global("torch", storage), op_unicode("0"), op_unicode("cpu"),
                   op_int(numel)) + b"Q"
    args = [pid, op_int(0), op_tuple(op_int(4)), op_tuple(op_int(1)), quantizer, b"\x89",
            op_global("collections", "OrderedDict") + b")R"][:n_args]
    return (b"\x80\x02}(" + op_unicode("q") + op_global("torch._utils", "_rebuild_qtensor") + op_tuple(*args)
            + b"Ru.")


def per_channel_lists(scales, zps, axis=0):
    return op_tuple(op_global("torch", "per_channel_affine"), op_list(*[op_float(s) for s in scales]),
                    op_list(*[op_int(z) for z in zps]), op_int(axis))


def test_rebuild_qtensor_with_list_parameters(tmp_path):
    """torch before 1.6 wrote per-channel scales and zero points as lists."""
    path = tmp_path / "lists.pt"
    write_zip_checkpoint(path, qtensor_pickle(per_channel_lists([0.5, 0.25, 2.0, 1.0], [1, -2, 0, 3])),
                         storage=struct.pack("<4b", 5, -3, 7, 0))
    q = inspect_json(path)["tensors"][0]
    assert q["dtype"] == "qint8" and q["quantization"] == {
        "scheme": "per_channel_affine", "axis": 0, "scales": [0.5, 0.25, 2.0, 1.0], "zero_points": [1, -2, 0, 3]}
    out = tmp_path / "out.pt"
    r = tm("simple_average", "--dequantize", "-o", out, path, cwd=tmp_path)
    assert r.rc == 0, r.describe()
    assert torch.load(str(out))["q"].tolist() == [0.5 * (5 - 1), 0.25 * (-3 + 2), 2.0 * 7, 1.0 * (0 - 3)]


@pytest.mark.parametrize("case,pkl,needle", [
    ("axis", lambda: qtensor_pickle(per_channel_lists([0.1] * 4, [0] * 4, axis=1)), "axis 1 of a 1-d tensor"),
    ("length", lambda: qtensor_pickle(per_channel_lists([0.1] * 3, [0] * 4)), "per-channel scales must be"),
    ("scheme", lambda: qtensor_pickle(op_tuple(op_global("torch", "per_tensor_symmetric"), op_float(0.1), op_int(0))),
     "quantization scheme per_tensor_symmetric is not supported"),
    ("float storage", lambda: qtensor_pickle(op_tuple(op_global("torch", "per_tensor_affine"), op_float(0.1), op_int(0)),
                                             storage="FloatStorage"), "storage of float32, not of a quantized dtype"),
    ("per tensor arity", lambda: qtensor_pickle(op_tuple(op_global("torch", "per_tensor_affine"), op_float(0.1))),
     "per_tensor_affine wants (scheme, scale, zero_point)"),
    ("arguments", lambda: qtensor_pickle(op_tuple(op_global("torch", "per_tensor_affine"), op_float(0.1), op_int(0)),
                                         n_args=6), "_rebuild_qtensor called with 6 arguments"),
    ("outside", lambda: qtensor_pickle(op_tuple(op_global("torch", "per_tensor_affine"), op_float(0.1), op_int(0)),
                                       numel=3), "outside its storage"),
])
def test_malformed_quantized_tensors_are_refused(tmp_path, case, pkl, needle):
    path = tmp_path / "bad.pt"
    write_zip_checkpoint(path, pkl(), storage=bytes(4))
    r = tm("inspect", path, cwd=tmp_path)
    assert r.rc == 1 and len(r.stderr_lines) == 1 and needle in r.errors[0], r.describe()
