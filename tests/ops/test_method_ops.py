"""The merge-method ops (torch.ops.torchmerge.merge, task_arithmetic, ties, dare, slerp,
model_stock) on tensors in memory, against

  * independent float64 references written from the formulas (tests/python/test_methods.py's,
    and the ties / model_stock ones here), to within 1 ulp of the output dtype;
  * the CLI's file merge of the same tensors, bit for bit (the ops run the library's method code
    through tm_merge_tensors, so they must give the engine's bytes);

plus gradcheck of task_arithmetic's analytic backward, TorchScript, and the one-line errors.

Methods this build's table does not have yet (ties, dare_ties, model_stock while they are being
written) are skipped with the reason; they run once the method is in the table.

Run by ctest (ops_pytest) with TORCHMERGE_OPS_LIB and TORCHMERGE_BIN; by hand:
    TORCHMERGE_OPS_LIB=build/libtorchmerge_ops.so TORCHMERGE_BIN=build/torchmerge \
        /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/ops/test_method_ops.py
"""
import ctypes
import itertools
import math
import os
import sys
from typing import List, Optional

import pytest
import torch
from torch import Tensor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LIB = os.environ.get("TORCHMERGE_OPS_LIB") or os.path.join(REPO, "build", "libtorchmerge_ops.so")
torch.ops.load_library(LIB)
tm_ops = torch.ops.torchmerge

sys.path.insert(0, os.path.join(REPO, "tests", "python"))
import reference as ref  # noqa: E402
import test_methods as cli_refs  # noqa: E402  (the CLI tests' float64 references and mask generator)
from cli_runner import assert_ok, tm as cli  # noqa: E402

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# ---- the method table, through the C API (libtorchmerge.so, loaded with the ops library) ------

CAPI = ctypes.CDLL(os.path.join(os.path.dirname(LIB), "libtorchmerge.so"))
CAPI.tm_method_find.restype = ctypes.c_int64
CAPI.tm_method_find.argtypes = [ctypes.c_char_p]


class ParamInfo(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("name", ctypes.c_char_p),
                ("aliases", ctypes.POINTER(ctypes.c_char_p)), ("kind", ctypes.c_int),
                ("per_input", ctypes.c_int), ("exactly_per_input", ctypes.c_int), ("required", ctypes.c_int),
                ("default_value", ctypes.c_char_p), ("min", ctypes.c_double), ("max", ctypes.c_double),
                ("min_exclusive", ctypes.c_int), ("max_exclusive", ctypes.c_int),
                ("choices", ctypes.c_char_p), ("help", ctypes.c_char_p)]


class MethodInfo(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("name", ctypes.c_char_p),
                ("aliases", ctypes.POINTER(ctypes.c_char_p)), ("summary", ctypes.c_char_p),
                ("needs_base", ctypes.c_int), ("min_inputs", ctypes.c_size_t), ("max_inputs", ctypes.c_size_t),
                ("n_params", ctypes.c_size_t)]


def has_method(name: str) -> bool:
    return CAPI.tm_method_find(name.encode()) >= 0


def method_defaults(name: str) -> dict:
    """{parameter: default text} of a method, from the table (tm_method_get / tm_method_param)."""
    i = CAPI.tm_method_find(name.encode())
    info = MethodInfo(struct_size=ctypes.sizeof(MethodInfo))
    assert CAPI.tm_method_get(ctypes.c_size_t(i), ctypes.byref(info)) == 0
    out = {}
    for j in range(info.n_params):
        p = ParamInfo(struct_size=ctypes.sizeof(ParamInfo))
        assert CAPI.tm_method_param(ctypes.c_size_t(i), ctypes.c_size_t(j), ctypes.byref(p)) == 0
        out[p.name.decode()] = None if p.required else p.default_value.decode()
    return out


def needs(method: str):
    return pytest.mark.skipif(not has_method(method),
                              reason="method '%s' is not in this build's method table yet "
                                     "(written on another branch; this test runs once it is merged)" % method)


# ---- tensors and comparison -------------------------------------------------------------------

def rand(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def finetunes(shape, n, dtype=torch.float32, seed=0, spread=0.05):
    """A base and n inputs near it (task vectors of size ~spread)."""
    b = rand(shape, seed, torch.float64, 3.0)
    xs = [(b + rand(shape, seed + 1 + i, torch.float64, spread)).to(dtype) for i in range(n)]
    return b.to(dtype), xs


SHAPES = [(), (7,), (5, 9), (3, 4, 5)]


def close(out, expected64, dtype, name="tensor"):
    """Within 1 ulp of dtype of the float64 reference (a few float64 ulps for float64 outputs,
    where the engine's fused sum and the reference's formula round differently)."""
    ref.assert_close_ulp(out, expected64, dtype, ulps=ref.default_ulps(dtype), magnitude=None, name=name)


def sd1(name, t):
    return {name: t}


def save(path, sd):
    torch.save({k: v.contiguous() for k, v in sd.items()}, str(path))


def cli_merge(tmp_path, method, base_sd, input_sds, *args):
    """The CLI's file merge of {name: tensor} models with --base: the output state dict."""
    paths = []
    for i, sd in enumerate([base_sd] + list(input_sds)):
        paths.append(tmp_path / ("in%d.pt" % i))
        save(paths[-1], sd)
    out = tmp_path / "out.pt"
    assert_ok(cli(method, "-q", "--base", paths[0], *args, "-o", out, *paths[1:], cwd=tmp_path))
    return torch.load(str(out), map_location="cpu", weights_only=True)


MIXED = {"w": ((5, 9), torch.float32), "b": ((7,), torch.float16), "s": ((), torch.float32),
         "e": ((4, 6), torch.bfloat16), "d": ((3, 2, 2), torch.float64)}


def mixed_models(n, seed=0):
    """A base and n inputs, each {name: tensor} with MIXED's shapes and dtypes."""
    base, inputs = {}, [dict() for _ in range(n)]
    for k, (name, (shape, dtype)) in enumerate(MIXED.items()):
        b, xs = finetunes(shape, n, dtype, seed + 10 * k)
        base[name] = b
        for i in range(n):
            inputs[i][name] = xs[i]
    return base, inputs


# ---- schemas ------------------------------------------------------------------------------------

def test_schemas():
    schemas = {str(getattr(getattr(tm_ops, name), o)._schema)
               for name in ("merge", "task_arithmetic", "ties", "dare", "slerp", "model_stock")
               for o in getattr(tm_ops, name).overloads()}
    assert schemas == {
        'torchmerge::merge(str method, Tensor[] tensors, Tensor? base=None, Dict(str, float[])? params=None, '
        'Dict(str, str)? text_params=None, str name="", ScalarType? dtype=None) -> Tensor',
        'torchmerge::task_arithmetic(Tensor base, Tensor[] tensors, float[]? weights=None, float lambda_=1., '
        'bool normalize=False, ScalarType? dtype=None) -> Tensor',
        'torchmerge::task_arithmetic.tensor_weights(Tensor base, Tensor[] tensors, Tensor weights, Tensor lambda_, '
        'bool normalize=False, ScalarType? dtype=None) -> Tensor',
        'torchmerge::ties(Tensor base, Tensor[] tensors, float[1]? density=None, float[]? weights=None, '
        'float lambda_=1., str majority_sign="sum", bool normalize=True, str trim_scope="tensor", '
        'ScalarType? dtype=None) -> Tensor',
        'torchmerge::dare(Tensor base, Tensor[] tensors, float[1] density, float[]? weights=None, float lambda_=1., '
        'str rescale="l1", int seed=0, str name="", str consensus="linear", bool? normalize=None, '
        'str? majority_sign=None, ScalarType? dtype=None) -> Tensor',
        'torchmerge::slerp(Tensor base, Tensor other, float t, ScalarType? dtype=None) -> Tensor',
        'torchmerge::model_stock(Tensor base, Tensor[] tensors, bool filter_wise=False, '
        'ScalarType? dtype=None) -> Tensor',
    }


def schema_defaults(op) -> dict:
    return {a.name: a.default_value for a in op._schema.arguments if a.has_default_value()}


def as_number(text):
    return {"true": True, "false": False}.get(text, text if not text.replace(".", "").replace("-", "").isdigit()
                                              else float(text))


@pytest.mark.parametrize("op,method,pairs", [
    ("task_arithmetic", "task_arithmetic", {"lambda_": "lambda", "normalize": "normalize"}),
    ("dare", "dare_linear", {"lambda_": "lambda", "rescale": "rescale", "seed": "seed"}),
    ("ties", "ties", {"lambda_": "lambda", "majority_sign": "majority_sign", "normalize": "normalize",
                      "trim_scope": "trim_scope"}),
    ("model_stock", "model_stock", {"filter_wise": "filter_wise"}),
])
def test_schema_defaults_are_the_method_tables(op, method, pairs):
    """A default written in a schema must be the method's own default (no second, diverging copy)."""
    if not has_method(method):
        pytest.skip("method '%s' is not in this build's method table yet" % method)
    table = method_defaults(method)
    mine = schema_defaults(getattr(tm_ops, op).default)
    for arg, param in pairs.items():
        assert param in table, "%s has no parameter %s" % (method, param)
        assert as_number(table[param]) == mine[arg], (arg, table[param], mine[arg])


# ---- task_arithmetic ------------------------------------------------------------------------------

def ta_ref(b, xs, weights, lam, normalize):
    name = "t"
    return cli_refs.task_arithmetic_ref(sd1(name, b), [sd1(name, x) for x in xs], weights, lam, normalize)[name]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weights,lam,normalize", [(None, 1.0, False), ([1.0, 2.0, 3.0], 0.3, False),
                                                   ([0.5, -0.25, 1.0], 0.7, True), ([2.0, 2.0, 2.0], -0.5, False)])
def test_task_arithmetic_matches_the_float64_reference(dtype, shape, weights, lam, normalize):
    b, xs = finetunes(shape, 3, dtype, seed=len(shape))
    out = tm_ops.task_arithmetic(b, xs, weights, lam, normalize)
    close(out, ta_ref(b, xs, weights or [1, 1, 1], lam, normalize), dtype)
    # The learned-coefficient overload computes the same bits.
    w = torch.tensor(weights or [1.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.equal(tm_ops.task_arithmetic.tensor_weights(b, xs, w, torch.tensor(lam, dtype=torch.float64), normalize), out)


@pytest.mark.parametrize("dtype_arg", [None, "float16", "bfloat16", "float32"])
def test_task_arithmetic_is_bit_identical_to_the_file_merge(tmp_path, dtype_arg):
    base, inputs = mixed_models(3)
    args = ["--weights", "1,-0.5,2", "--lambda", "0.35"] + (["--dtype", dtype_arg] if dtype_arg else [])
    merged = cli_merge(tmp_path, "task_arithmetic", base, inputs, *args)
    dtype = ref.DTYPE_BY_NAME[dtype_arg] if dtype_arg else None
    for k in base:
        out = tm_ops.task_arithmetic(base[k], [sd[k] for sd in inputs], [1.0, -0.5, 2.0], 0.35, dtype=dtype)
        assert out.dtype == merged[k].dtype and torch.equal(out, merged[k]), k


def test_task_arithmetic_output_dtype_is_the_first_inputs_not_the_bases():
    b = rand((4,), 0, torch.float64)
    xs = [rand((4,), 1, torch.bfloat16), rand((4,), 2, torch.float32)]
    out = tm_ops.task_arithmetic(b, xs, lambda_=0.5)
    close(out, ta_ref(b, xs, [1, 1], 0.5, False), torch.bfloat16)
    out = tm_ops.task_arithmetic(b, xs, lambda_=0.5, dtype=torch.float16)
    close(out, ta_ref(b, xs, [1, 1], 0.5, False), torch.float16)


def test_task_arithmetic_reads_strided_and_expanded_tensors_in_place():
    b0, xs0 = finetunes((6, 8), 2, torch.float32, seed=5)
    b = b0.t()[::2]  # non-contiguous
    xs = [xs0[0].t()[::2], xs0[1].t()[1::2]]  # the second with a storage offset
    e = rand((1, 6), 9).expand(4, 6)  # stride 0
    out = tm_ops.task_arithmetic(b, xs + [e], [1.0, 2.0, 0.5], 0.4)
    expected = ta_ref(b.contiguous(), [x.contiguous() for x in xs + [e]], [1.0, 2.0, 0.5], 0.4, False)
    close(out, expected, torch.float32)
    assert out.is_contiguous()


def test_task_arithmetic_zero_dim_and_empty():
    b, x = torch.tensor(1.5), torch.tensor(2.5)
    assert tm_ops.task_arithmetic(b, [x], lambda_=0.5).item() == 2.0
    out = tm_ops.task_arithmetic(torch.empty(0, 3), [torch.empty(0, 3)])
    assert out.shape == (0, 3) and out.dtype == torch.float32


def test_task_arithmetic_results_never_alias_inputs():
    b, xs = finetunes((5,), 1)
    out = tm_ops.task_arithmetic(b, xs, lambda_=0.0)
    assert torch.equal(out, b) and out.data_ptr() != b.data_ptr()


# ---- task_arithmetic: autograd ----------------------------------------------------------------

def leaves(shape=(3, 4), n=3, seed=0):
    b, xs = finetunes(shape, n, torch.float64, seed, spread=1.0)
    return b.requires_grad_(), [x.requires_grad_() for x in xs]


@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_task_arithmetic_in_weights_lambda_base_and_tensors(normalize):
    b, xs = leaves()
    w = torch.tensor([0.7, -0.3, 1.2], dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.45, dtype=torch.float64, requires_grad=True)

    def f(w, lam, b, *xs):
        return tm_ops.task_arithmetic(b, list(xs), w, lam, normalize)

    assert torch.autograd.gradcheck(f, [w, lam, b, *xs])
    assert torch.autograd.gradgradcheck(f, [w, lam, b, *xs])


@pytest.mark.parametrize("shape", [(), (5,)], ids=str)
def test_gradcheck_task_arithmetic_float_weights_in_base_and_tensors(shape):
    b, xs = leaves(shape, 2, seed=3)
    assert torch.autograd.gradcheck(lambda b, *xs: tm_ops.task_arithmetic(b, list(xs), [2.0, -1.0], 0.3, True),
                                    [b, *xs])


def test_gradients_equal_autograd_through_the_formula_and_keep_each_inputs_dtype():
    """The analytic backward against PyTorch's autograd of b + λ Σ (wᵢ/Σw)(θᵢ − b), float32 and
    bfloat16 leaves (gradients come back in each leaf's dtype), λ and w learned."""
    b = rand((4, 5), 0, torch.float32).requires_grad_()
    xs = [rand((4, 5), 1, torch.bfloat16).requires_grad_(), rand((4, 5), 2, torch.float32).requires_grad_()]
    w = torch.tensor([0.6, 1.4], requires_grad=True)
    lam = torch.tensor([0.8], requires_grad=True)  # one element, any shape
    g = rand((4, 5), 3, torch.float32)
    out = tm_ops.task_arithmetic(b, xs, w, lam, normalize=True)
    assert out.dtype == torch.bfloat16  # xs[0]'s, so autograd hands the backward g in bfloat16
    out.backward(g)
    g = g.to(torch.bfloat16)
    got = [t.grad for t in (b, *xs, w, lam)]
    assert [x.dtype for x in got] == [torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float32]
    assert got[4].shape == (1,)
    leaves64 = [t.detach().double().requires_grad_() for t in (b, *xs, w, lam)]
    b64, x0, x1, w64, l64 = leaves64
    c = w64 / w64.sum()
    out = b64 + l64 * (c[0] * (x0 - b64) + c[1] * (x1 - b64))
    out.backward(g.double())
    for mine, theirs in zip(got, leaves64):
        assert torch.allclose(mine.double(), theirs.grad.to(mine.dtype).double(), rtol=1e-2 if mine.dtype ==
                              torch.bfloat16 else 1e-5, atol=1e-6)


def test_learning_lambda_adamerging_style():
    """AdaMerging's idea on a toy: learn per-task coefficients (weights) and λ by gradient
    descent through task_arithmetic, minimising a loss of the merged model."""
    g = torch.Generator().manual_seed(0)
    base_w = torch.randn(3, 8, generator=g)
    tasks = [base_w + torch.randn(3, 8, generator=g) for _ in range(2)]
    x = torch.randn(64, 8, generator=g)
    target = base_w + 0.6 * (tasks[0] - base_w) + 0.2 * (tasks[1] - base_w)  # the best merge
    y = x @ target.t()
    weights = torch.ones(2, requires_grad=True)
    lam = torch.tensor(0.3, requires_grad=True)
    opt = torch.optim.Adam([weights, lam], lr=0.05)
    losses = []
    for _ in range(150):
        merged = tm_ops.task_arithmetic(base_w, tasks, weights, lam)
        loss = torch.nn.functional.mse_loss(x @ merged.t(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0], losses[::30]
    coeff = (lam * weights).detach()
    assert torch.allclose(coeff, torch.tensor([0.6, 0.2]), atol=0.05), coeff


def test_no_grad_and_inference_mode():
    b, xs = leaves()
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        assert not tm_ops.task_arithmetic(b, xs, w, torch.tensor(1.0)).requires_grad
    with torch.inference_mode():
        assert torch.equal(tm_ops.task_arithmetic(b, xs), tm_ops.task_arithmetic(b.detach(), [x.detach() for x in xs]))


# ---- dare ---------------------------------------------------------------------------------------

def dare_linear_ref(name, b, xs, weights, lam, densities, rescale, seed, normalize=False):
    return cli_refs.dare_ref(sd1(name, b), [sd1(name, x) for x in xs], weights, lam, densities, rescale, seed,
                             normalize)[name]


@pytest.mark.parametrize("rescale", ["l1", "inverse", "none"])
@pytest.mark.parametrize("density,seed,dtype,shape", [(0.5, 0, torch.float32, (5, 9)),
                                                      ([0.2, 0.6, 0.9], 7, torch.bfloat16, (33,)),
                                                      (0.3, 123456789, torch.float16, (3, 4, 5)),
                                                      (0.5, 1, torch.float32, ())])
def test_dare_linear_matches_the_float64_reference(rescale, density, seed, dtype, shape):
    b, xs = finetunes(shape, 3, dtype, seed=3)
    name = "layers.0.weight"
    out = tm_ops.dare(b, xs, density, [1.0, 2.0, 0.5], 0.9, rescale, seed, name)
    dens = density if isinstance(density, list) else [density] * 3
    close(out, dare_linear_ref(name, b, xs, [1.0, 2.0, 0.5], 0.9, dens, rescale, seed), dtype)


def test_dare_masks_are_keyed_by_seed_and_name():
    b, xs = finetunes((40,), 2, torch.float64)
    a = tm_ops.dare(b, xs, 0.5, seed=1, name="x")
    assert torch.equal(a, tm_ops.dare(b, xs, 0.5, seed=1, name="x"))
    assert not torch.equal(a, tm_ops.dare(b, xs, 0.5, seed=2, name="x"))
    assert not torch.equal(a, tm_ops.dare(b, xs, 0.5, seed=1, name="y"))


def test_dare_is_bit_identical_to_the_file_merge(tmp_path):
    base, inputs = mixed_models(3, seed=40)
    merged = cli_merge(tmp_path, "dare_linear", base, inputs, "--density", "0.3,0.5,0.8", "--rescale", "inverse",
                       "--seed", "11", "--weights", "1,2,-1", "--lambda", "0.6")
    for k in base:
        out = tm_ops.dare(base[k], [sd[k] for sd in inputs], [0.3, 0.5, 0.8], [1.0, 2.0, -1.0], 0.6, "inverse", 11,
                          name=k)
        assert torch.equal(out, merged[k]), k


def test_dare_density_one_is_task_arithmetic():
    b, xs = finetunes((6, 7), 2, torch.float32)
    for rescale in ("l1", "inverse", "none"):
        assert torch.equal(tm_ops.dare(b, xs, 1.0, [1.0, 3.0], 0.6, rescale),
                           tm_ops.task_arithmetic(b, xs, [1.0, 3.0], 0.6))


@needs("dare_ties")
def test_dare_ties_is_the_dare_ties_method():
    b, xs = finetunes((6, 7), 3, torch.float32)
    out = tm_ops.dare(b, xs, 0.5, [1.0, 2.0, 1.0], 0.8, "inverse", 3, "w", consensus="ties")
    same = tm_ops.merge("dare_ties", xs, b, {"density": [0.5], "weights": [1.0, 2.0, 1.0], "lambda": [0.8],
                                             "seed": [3.0]}, {"rescale": "inverse"}, "w")
    assert torch.equal(out, same)
    # density 1: nothing dropped, so dare_ties is TIES' sign election over whole task vectors.
    if has_method("ties"):
        assert torch.equal(tm_ops.dare(b, xs, 1.0, consensus="ties", rescale="none", normalize=True),
                           tm_ops.ties(b, xs, 1.0, normalize=True))


@needs("dare_ties")
def test_dare_ties_is_bit_identical_to_the_file_merge(tmp_path):
    base, inputs = mixed_models(2, seed=70)
    merged = cli_merge(tmp_path, "dare_ties", base, inputs, "--density", "0.6", "--seed", "5")
    for k in base:
        assert torch.equal(tm_ops.dare(base[k], [sd[k] for sd in inputs], 0.6, seed=5, name=k, consensus="ties"),
                           merged[k]), k


# ---- slerp --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("parallel", [False, True], ids=["spherical", "parallel"])
def test_slerp_matches_the_float64_reference(dtype, t, parallel):
    v0 = rand((6, 5), 1, dtype)
    v1 = (2 * v0.double()).to(dtype) if parallel else rand((6, 5), 2, dtype)
    out = tm_ops.slerp(v0, v1, t)
    close(out, cli_refs.slerp_ref(sd1("t", v0), sd1("t", v1), t)["t"], dtype)
    if t in (0.0, 1.0):
        close(out, (v0 if t == 0.0 else v1).double(), dtype)


def test_slerp_zero_dim_and_other_dtype():
    out = tm_ops.slerp(torch.tensor(1.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float16), 0.25)
    assert out.dtype == torch.float16 and out.item() == 1.5  # 0-d: parallel, the lerp


def test_slerp_is_bit_identical_to_the_file_merge(tmp_path):
    base, inputs = mixed_models(1, seed=90)
    merged = cli_merge(tmp_path, "slerp", base, inputs, "--t", "0.35")
    for k in base:
        assert torch.equal(tm_ops.slerp(base[k], inputs[0][k], 0.35), merged[k]), k


# ---- ties (runs once the method is in the table) -----------------------------------------------

def ties_ref(b, xs, density, weights, lam, majority_sign="sum", normalize=True):
    """The issue's TIES on one tensor, trim_scope tensor: per input keep the k = ⌊density·numel⌋
    largest |δᵢ| (equal magnitudes: the lower flat index first), elect the sign of Σ wᵢδᵢ over
    the kept entries (count: of Σ sign(wᵢδᵢ)), zero electing +; sum the kept weighted entries
    wᵢδᵢ whose sign is the elected one, ÷ Σ of their wᵢ with normalize (0 counts as 1); × λ; + b."""
    b64 = b.double().flatten()
    n = b64.numel()
    terms, ws = [], []
    for x, d, w in zip(xs, density, weights):
        delta = x.double().flatten() - b64
        k = math.floor(d * n)
        order = sorted(range(n), key=lambda e: (-abs(delta[e].item()), e))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[:k]] = True
        terms.append(torch.where(keep, w * delta, torch.zeros_like(delta)))
        ws.append(w)
    stacked = torch.stack(terms)
    votes = stacked.sum(0) if majority_sign == "sum" else torch.sign(stacked).sum(0)
    elected = torch.where(votes < 0, -1.0, 1.0).double()
    agree = torch.sign(stacked) == elected
    total = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(0)
    if normalize:
        div = (agree.double() * torch.tensor(ws, dtype=torch.float64)[:, None]).sum(0)
        total = total / torch.where(div == 0, torch.ones_like(div), div)
    return (b64 + lam * total).reshape(b.shape)


@needs("ties")
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("density,majority_sign,normalize", [(0.5, "sum", True), (0.3, "count", True),
                                                             (0.8, "sum", False), (1.0, "sum", True)])
def test_ties_matches_the_float64_reference(dtype, density, majority_sign, normalize):
    b, xs = finetunes((7, 9), 3, dtype, seed=8)
    out = tm_ops.ties(b, xs, density, [1.0, 0.5, 2.0], 0.9, majority_sign, normalize)
    close(out, ties_ref(b, xs, [density] * 3, [1.0, 0.5, 2.0], 0.9, majority_sign, normalize), dtype)


@needs("ties")
def test_ties_magnitude_ties_at_the_threshold_keep_the_lower_index():
    b = torch.zeros(6, dtype=torch.float64)
    x = torch.tensor([1.0, -2.0, 2.0, 2.0, -1.0, 0.5], dtype=torch.float64)  # |2| three times, k = 2
    out = tm_ops.ties(b, [x], 2 / 6, normalize=False)
    assert out.tolist() == [0.0, -2.0, 2.0, 0.0, 0.0, 0.0]
    close(out, ties_ref(b, [x], [2 / 6], [1.0], 1.0, "sum", False), torch.float64)


@needs("ties")
def test_ties_is_bit_identical_to_the_file_merge(tmp_path):
    base, inputs = mixed_models(3, seed=120)
    merged = cli_merge(tmp_path, "ties", base, inputs, "--density", "0.4", "--weights", "1,2,1", "--lambda", "0.7")
    for k in base:
        assert torch.equal(tm_ops.ties(base[k], [sd[k] for sd in inputs], 0.4, [1.0, 2.0, 1.0], 0.7), merged[k]), k


# ---- model_stock (runs once the method is in the table) ----------------------------------------

def model_stock_ref(b, xs, filter_wise=False):
    """t = N·cosθ / (1 + (N − 1)·cosθ), cosθ the mean pairwise cosine of the task vectors (per
    row with filter_wise); t·mean(xᵢ) + (1 − t)·b."""
    b64 = b.double()
    rows = b64.reshape(b64.shape[0], -1) if filter_wise else b64.reshape(1, -1)
    ds = [x.double().reshape(rows.shape) - rows for x in xs]
    n = len(xs)
    cos = torch.stack([torch.nn.functional.cosine_similarity(ds[i], ds[j], dim=1, eps=0)
                       for i, j in itertools.combinations(range(n), 2)]).mean(0)
    t = (n * cos / (1 + (n - 1) * cos))[:, None]
    mean = sum(x.double().reshape(rows.shape) for x in xs) / n
    return (t * mean + (1 - t) * rows).reshape(b.shape)


@needs("model_stock")
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_the_float64_reference(dtype, filter_wise):
    b, xs = finetunes((6, 10), 3, dtype, seed=20, spread=0.5)
    close(tm_ops.model_stock(b, xs, filter_wise), model_stock_ref(b, xs, filter_wise), dtype)


@needs("model_stock")
def test_model_stock_of_identical_inputs_gives_them_back():
    b, xs = finetunes((5, 5), 1, torch.float32)
    assert torch.equal(tm_ops.model_stock(b, [xs[0], xs[0].clone()]), xs[0])


@needs("model_stock")
def test_model_stock_is_bit_identical_to_the_file_merge(tmp_path):
    base, inputs = mixed_models(3, seed=150)
    merged = cli_merge(tmp_path, "model_stock", base, inputs)
    for k in base:
        assert torch.equal(tm_ops.model_stock(base[k], [sd[k] for sd in inputs]), merged[k]), k


# ---- the generic merge op ------------------------------------------------------------------------

def test_merge_runs_any_method_by_name_with_numbers_or_text():
    b, xs = finetunes((4, 6), 2, torch.float32)
    ta = tm_ops.task_arithmetic(b, xs, [1.0, 3.0], 0.5, True)
    assert torch.equal(tm_ops.merge("task_arithmetic", xs, b, {"weights": [1.0, 3.0], "lambda": [0.5],
                                                              "normalize": [1.0]}), ta)
    assert torch.equal(tm_ops.merge("task_arithmetic", xs, b, None, {"weights": "1,3", "lambda": "0.5",
                                                                     "normalize": "true"}), ta)
    # FusionBench's name for λ, mergekit's alias of a method.
    avg = tm_ops.merge("linear", xs, text_params={"weights": "1,3"})
    close(avg, 0.25 * xs[0].double() + 0.75 * xs[1].double(), torch.float32)
    dare = tm_ops.dare(b, xs, [0.4, 0.7], seed=4, name="n", rescale="none")
    assert torch.equal(tm_ops.merge("dare_linear", xs, b, {"density": [0.4, 0.7], "seed": [4]},
                                    {"rescale": "none"}, name="n"), dare)
    assert torch.equal(tm_ops.merge("slerp", [xs[0]], b, {"t": [0.2]}), tm_ops.slerp(b, xs[0], 0.2))
    out = tm_ops.merge("simple_average", xs, dtype=torch.bfloat16)
    close(out, 0.5 * xs[0].double() + 0.5 * xs[1].double(), torch.bfloat16)


# ---- errors: one-line RuntimeErrors naming the op and the argument --------------------------------

A = torch.zeros(3, 4)
B = torch.zeros(4, 4)
I = torch.zeros(3, 4, dtype=torch.int64)
M = torch.zeros(3, 4, device="meta")
C = torch.zeros(3, 4, dtype=torch.complex64)

ERRORS = {
    "empty list": (lambda: tm_ops.task_arithmetic(A, []), ["task_arithmetic: expected at least one tensor"]),
    "shape": (lambda: tm_ops.task_arithmetic(A, [A, B]), ["task_arithmetic: tensors[1] has shape [4, 4]",
                                                          "tensors[0]'s shape [3, 4]"]),
    "base shape": (lambda: tm_ops.dare(B, [A], 0.5), ["dare: base has shape [4, 4]", "tensors[0]'s shape [3, 4]"]),
    "slerp shape": (lambda: tm_ops.slerp(A, B, 0.5), ["slerp: base has shape [3, 4]", "other's shape [4, 4]"]),
    "integer": (lambda: tm_ops.task_arithmetic(A, [A, I]), ["tensors[1] has dtype int64", "floating tensors"]),
    "integer base": (lambda: tm_ops.slerp(I, A, 0.5), ["slerp: base has dtype int64"]),
    "device": (lambda: tm_ops.dare(A, [M], 0.5), ["dare: tensors[0] is on device meta", "run on the CPU"]),
    "dtype": (lambda: tm_ops.task_arithmetic(A, [A], dtype=torch.int32), ["dtype int32 is not a floating dtype"]),
    "weight count": (lambda: tm_ops.task_arithmetic(A, [A, A], [1.0]), ["task_arithmetic: expected 2 weights"]),
    "zero sum": (lambda: tm_ops.task_arithmetic(A, [A, A], [1.0, -1.0], normalize=True),
                 ["task_arithmetic: ", "sum to 0"]),
    "weights not finite": (lambda: tm_ops.task_arithmetic(A, [A], [float("inf")]), ["weights: inf is not a finite"]),
    "tensor weights shape": (lambda: tm_ops.task_arithmetic(A, [A, A], torch.ones(3), torch.tensor(1.0)),
                             ["weights must be a 1-D tensor with one weight per input (2), got shape [3]"]),
    "tensor lambda shape": (lambda: tm_ops.task_arithmetic(A, [A], torch.ones(1), torch.ones(2)),
                            ["lambda_ must be a tensor of one element, got shape [2]"]),
    "tensor weights dtype": (lambda: tm_ops.task_arithmetic(A, [A], torch.ones(1, dtype=torch.int64),
                                                            torch.tensor(1.0)), ["weights must be a floating"]),
    "density range": (lambda: tm_ops.dare(A, [A], 1.5), ["dare: density: 1.5 is outside (0, 1]"]),
    "density count": (lambda: tm_ops.dare(A, [A, A, A], [0.5, 0.5]), ["expected 3 density (one per input), got 2"]),
    "rescale": (lambda: tm_ops.dare(A, [A], 0.5, rescale="l2"), ["dare: rescale: expected one of l1|inverse|none"]),
    "seed": (lambda: tm_ops.dare(A, [A], 0.5, seed=-1), ["dare: seed: -1 is outside"]),
    "consensus": (lambda: tm_ops.dare(A, [A], 0.5, consensus="mean"), ["dare: consensus must be 'linear' or 'ties'"]),
    "majority_sign on linear": (lambda: tm_ops.dare(A, [A], 0.5, majority_sign="sum"),
                                ["majority_sign applies to consensus='ties' only"]),
    "slerp t": (lambda: tm_ops.slerp(A, A, 1.5), ["slerp: t: 1.5 is outside [0, 1]"]),
    "unknown method": (lambda: tm_ops.merge("ties_merging_v9", [A]), ["merge: this torchmerge library has no "
                                                                      "merge method 'ties_merging_v9'"]),
    "unknown parameter": (lambda: tm_ops.merge("task_arithmetic", [A], A, {"lamda": [1.0]}),
                          ["merge: task_arithmetic has no parameter 'lamda'"]),
    "given twice": (lambda: tm_ops.merge("task_arithmetic", [A], A, {"lambda": [1.0]}, {"lambda": "2"}),
                    ["merge: lambda: given twice"]),
    "missing base": (lambda: tm_ops.merge("task_arithmetic", [A]), ["merge: task_arithmetic needs a base model"]),
    "too many inputs": (lambda: tm_ops.merge("slerp", [A, A], A, {"t": [0.5]}), ["merge: slerp merges at most 1 input"]),
    "missing required": (lambda: tm_ops.merge("slerp", [A], A), ["merge: slerp needs t"]),
    "bad bool": (lambda: tm_ops.merge("task_arithmetic", [A], A, None, {"normalize": "maybe"}),
                 ["normalize: expected true or false, got 'maybe'"]),
    # The library names the tensor when the caller named it (and only then).
    "named tensor": (lambda: tm_ops.merge("dare_linear", [C], C, {"density": [0.5]}, name="fc.weight"),
                     ["merge: tensor 'fc.weight': dare_linear does not merge complex tensors"]),
    "unnamed tensor": (lambda: tm_ops.dare(C, [C], 0.5), ["dare: dare_linear does not merge complex tensors"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_arguments_raise_one_line_runtime_errors(case):
    fn, substrings = ERRORS[case]
    with pytest.raises(RuntimeError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert "tensor ''" not in message, message
    for s in substrings:
        assert s in message, f"{s!r} not in {message!r}"


@needs("ties")
def test_ties_errors():
    with pytest.raises(RuntimeError, match=r"^ties: majority_sign: expected one of"):
        tm_ops.ties(A, [A], 0.5, majority_sign="median")


def test_method_ops_other_than_task_arithmetic_are_not_differentiable():
    b, xs = leaves()
    assert not tm_ops.dare(b, xs, 0.5).requires_grad
    assert not tm_ops.slerp(b, xs[0], 0.5).requires_grad
    assert not tm_ops.merge("task_arithmetic", xs, b).requires_grad


# ---- TorchScript -------------------------------------------------------------------------------

@torch.jit.script
def scripted_merges(b: Tensor, xs: List[Tensor], w: Tensor, lam: Tensor, seed: int,
                    dtype: Optional[torch.dtype]) -> List[Tensor]:
    ta = torch.ops.torchmerge.task_arithmetic(b, xs, [1.0, 2.0], lambda_=0.5, dtype=dtype)
    learned = torch.ops.torchmerge.task_arithmetic(b, xs, w, lam, normalize=True)
    dare = torch.ops.torchmerge.dare(b, xs, 0.5, seed=seed, name="w", rescale="inverse")
    sl = torch.ops.torchmerge.slerp(b, xs[0], 0.3)
    gen = torch.ops.torchmerge.merge("dare_linear", xs, b, {"density": [0.5], "seed": [float(seed)]},
                                     {"rescale": "inverse"}, "w")
    return [ta, learned, dare, sl, gen]


def test_ops_inside_torch_jit_script_functions():
    b, xs = finetunes((4, 5), 2)
    w, lam = torch.tensor([1.0, 3.0]), torch.tensor(0.7)
    got = scripted_merges(b, xs, w, lam, 9, torch.float16)
    eager = [tm_ops.task_arithmetic(b, xs, [1.0, 2.0], 0.5, dtype=torch.float16),
             tm_ops.task_arithmetic(b, xs, w, lam, True),
             tm_ops.dare(b, xs, 0.5, seed=9, name="w", rescale="inverse"),
             tm_ops.slerp(b, xs[0], 0.3)]
    for g, e in zip(got, eager):
        assert g.dtype == e.dtype and torch.equal(g, e)
    assert torch.equal(got[4], got[2])
    assert "torchmerge::task_arithmetic" in str(scripted_merges.graph)


def test_scripted_learned_task_arithmetic_propagates_gradients():
    @torch.jit.script
    def merged(b: Tensor, xs: List[Tensor], w: Tensor, lam: Tensor) -> Tensor:
        return torch.ops.torchmerge.task_arithmetic(b, xs, w, lam)

    b, xs = leaves((3,), 2)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    merged(b, xs, w, lam).sum().backward()
    deltas = [(x - b).detach().sum() for x in xs]
    assert torch.allclose(w.grad, 0.5 * torch.stack(deltas))
    assert torch.allclose(lam.grad, deltas[0] + 2 * deltas[1])
