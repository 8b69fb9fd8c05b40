"""torch.ops.torchmerge.* (libtorchmerge_ops.so) against plain PyTorch references in float64.

Run by ctest (ops_pytest) with TORCHMERGE_OPS_LIB naming the built library; by hand:
    TORCHMERGE_OPS_LIB=build/libtorchmerge_ops.so /usr/bin/python3 -m pytest -q tests/ops
"""
import os
import sys
import warnings
from typing import Dict, List, Optional

import pytest
import torch
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LIB = os.environ.get("TORCHMERGE_OPS_LIB") or os.path.join(REPO, "build", "libtorchmerge_ops.so")
torch.ops.load_library(LIB)
tm = torch.ops.torchmerge

sys.path.insert(0, os.path.join(REPO, "torchscript"))
import average_modules  # noqa: E402  (after the library is loaded: it scripts helpers on import)

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INTS = [torch.int64, torch.int32, torch.uint8, torch.bool]


# ---- references and helpers -------------------------------------------------------------------

def rand(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def randint(shape, seed, dtype):
    t = torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))
    return (t % 2).bool() if dtype == torch.bool else t.to(dtype)


def reference(tensors, weights=None, normalize=True):
    """Σ wᵢ xᵢ (/ Σ wᵢ) in float64 (complex128); the first tensor for non-floating dtypes."""
    first = tensors[0]
    if not (first.is_floating_point() or first.is_complex()):
        return first
    n = len(tensors)
    w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    if weights is not None and normalize:
        s = sum(w)
        w = [x / s for x in w]
    acc = torch.complex128 if first.is_complex() else torch.float64
    return sum(wi * t.to(acc) for wi, t in zip(w, tensors))


def magnitude(tensors, weights=None, normalize=True):
    """Σ |wᵢ xᵢ|: scale of the float64 accumulation error."""
    n = len(tensors)
    w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    if weights is not None and normalize:
        s = sum(w)
        w = [x / s for x in w]
    return sum(abs(wi) * t.double().abs() for wi, t in zip(w, tensors))


def assert_rounded_once(out, ref, dtype, mag=None):
    """out is ref (float64) rounded once to dtype: within eps(dtype)·|ref| (+ float64 slack)."""
    assert out.dtype == dtype, (out.dtype, dtype)
    assert out.shape == ref.shape
    fi = torch.finfo(dtype)
    err = (out.double() - ref).abs()
    bound = fi.eps * ref.abs() + fi.tiny
    if mag is not None:
        bound = bound + 8 * torch.finfo(torch.float64).eps * mag
    if dtype == torch.float64:
        bound = bound * 4
    worst = (err - bound).max().item()
    assert worst <= 0, f"{dtype}: error exceeds one rounding by {worst}"


def assert_same_state_dict(got, sds, weights=None, normalize=True):
    """got is Σ wᵢ sdsᵢ key by key (floating), or sds[0]'s tensor (others), in sds[0]'s order."""
    first = sds[0]
    assert list(got) == list(first), "key order of the first state dict"
    for k, v in got.items():
        if first[k].is_floating_point():
            ts = [sd[k] for sd in sds]
            assert_rounded_once(v, reference(ts, weights, normalize), first[k].dtype,
                                magnitude(ts, weights, normalize))
        else:
            assert v.dtype == first[k].dtype and torch.equal(v, first[k]), k


def make_model(seed: int, steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for _ in range(steps):
            model(torch.randn(16, 6, generator=gen))
    return model.eval()


# ---- schemas ------------------------------------------------------------------------------------

def test_schemas_are_written_out_with_argument_names_and_defaults():
    schemas = {str(op._schema) for name in ("simple_average", "weighted_average", "state_dict_add",
                                            "state_dict_mul", "state_dict_average", "merge_files")
               for op in (getattr(getattr(tm, name), o) for o in getattr(tm, name).overloads())}
    assert schemas == {
        "torchmerge::simple_average(Tensor[] tensors) -> Tensor",
        "torchmerge::weighted_average(Tensor[] tensors, float[] weights, bool normalize=True) -> Tensor",
        "torchmerge::weighted_average.tensor_weights(Tensor[] tensors, Tensor weights, bool normalize=True) -> Tensor",
        "torchmerge::state_dict_add(Dict(str, Tensor) a, Dict(str, Tensor) b, float alpha=1.) -> Dict(str, Tensor)",
        "torchmerge::state_dict_mul(Dict(str, Tensor) state_dict, float scalar) -> Dict(str, Tensor)",
        "torchmerge::state_dict_average(Dict(str, Tensor)[] state_dicts, float[]? weights=None) -> Dict(str, Tensor)",
        "torchmerge::merge_files(str[] inputs, str output, float[]? weights=None) -> ()",
    }


# ---- numerics against the float64 reference ----------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_simple_average_is_the_float64_mean_rounded_once(dtype, n):
    ts = [rand((7, 9), seed, dtype) for seed in range(n)]
    out = tm.simple_average(ts)
    assert_rounded_once(out, reference(ts), dtype, magnitude(ts))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_average_float_weights(dtype, normalize):
    ts = [rand((4, 5, 3), seed, dtype) for seed in range(3)]
    w = [0.5, 0.3, -0.2]
    out = tm.weighted_average(ts, w, normalize)
    assert_rounded_once(out, reference(ts, w, normalize), dtype, magnitude(ts, w, normalize))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_average_tensor_weights(dtype, normalize):
    ts = [rand((33,), seed, dtype) for seed in range(4)]
    w = [1.0, 2.0, 3.0, 4.0]
    ref = reference(ts, w, normalize)
    explicit = tm.weighted_average.tensor_weights(ts, torch.tensor(w), normalize)
    implicit = tm.weighted_average(ts, torch.tensor(w, dtype=torch.float64), normalize=normalize)
    for out in (explicit, implicit):
        assert_rounded_once(out, ref, dtype, magnitude(ts, w, normalize))


def test_float16_accumulation_is_float64():
    # 1 + 2**-11 is not a float16; summed in float16 the small terms would vanish.
    big = torch.ones(1, dtype=torch.float16)
    small = torch.full((1,), 2.0 ** -11, dtype=torch.float16)
    out = tm.weighted_average([big, small, small], [1.0, 1.0, 1.0], normalize=False)
    assert out.item() == 1.0 + 2.0 ** -10  # exact in float16; float16 accumulation gives 1.0


def test_mixed_floating_dtypes_round_to_the_first_inputs_dtype():
    ts = [rand((10,), 0, torch.bfloat16), rand((10,), 1, torch.float32), rand((10,), 2, torch.float64)]
    out = tm.simple_average(ts)
    assert_rounded_once(out, reference(ts), torch.bfloat16)


def test_complex_tensors_are_averaged_in_complex128():
    ts = [torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    out = tm.weighted_average(ts, [1.0, 2.0, 1.0])
    ref = reference(ts, [1.0, 2.0, 1.0])
    assert out.dtype == torch.complex64
    assert torch.allclose(out.to(torch.complex128), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", INTS)
def test_integer_and_bool_tensors_come_from_the_first_input(dtype):
    ts = [randint((3, 4), seed, dtype) for seed in range(3)]
    for out in (tm.simple_average(ts), tm.weighted_average(ts, [0.2, 0.3, 0.5]),
                tm.weighted_average(ts, torch.tensor([0.2, 0.3, 0.5]))):
        assert out.dtype == dtype and torch.equal(out, ts[0])
        assert out.data_ptr() != ts[0].data_ptr()  # a copy, not an alias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_results_never_alias_the_inputs(dtype):
    x = torch.arange(6).to(dtype)
    outs = [tm.simple_average([x]), tm.weighted_average([x], [1.0]),
            tm.weighted_average([x], torch.ones(1)), tm.state_dict_mul({"x": x}, 1.0)["x"],
            tm.state_dict_average([{"x": x}])["x"]]
    for out in outs:
        out.add_(1)
    assert torch.equal(x, torch.arange(6).to(dtype))


def test_zero_dim_and_empty_tensors():
    assert_rounded_once(tm.simple_average([torch.tensor(1.0), torch.tensor(2.0)]),
                        torch.tensor(1.5, dtype=torch.float64), torch.float32)
    out = tm.simple_average([torch.empty(0, 3), torch.empty(0, 3)])
    assert out.shape == (0, 3) and out.dtype == torch.float32


def test_non_contiguous_inputs():
    base = [rand((6, 8), s) for s in range(2)]
    ts = [b.t()[::2] for b in base]
    assert_rounded_once(tm.simple_average(ts), reference([t.contiguous() for t in ts]), torch.float32)


# ---- keyword arguments and defaults ------------------------------------------------------------

def test_keyword_arguments():
    ts = [rand((5,), s) for s in range(2)]
    out = tm.weighted_average(tensors=ts, weights=[1.0, 3.0], normalize=False)
    assert_rounded_once(out, reference(ts, [1.0, 3.0], normalize=False), torch.float32)
    out = tm.weighted_average(tensors=ts, weights=torch.tensor([1.0, 3.0]), normalize=False)
    assert_rounded_once(out, reference(ts, [1.0, 3.0], normalize=False), torch.float32)
    out = tm.simple_average(tensors=ts)
    assert_rounded_once(out, reference(ts), torch.float32)
    a, b = {"w": ts[0]}, {"w": ts[1]}
    assert_rounded_once(tm.state_dict_add(a=a, b=b, alpha=-2.0)["w"],
                        ts[0].double() - 2 * ts[1].double(), torch.float32)
    assert_rounded_once(tm.state_dict_mul(state_dict=a, scalar=0.5)["w"], ts[0].double() * 0.5, torch.float32)
    assert_rounded_once(tm.state_dict_average(state_dicts=[a, b], weights=[3.0, 1.0])["w"],
                        reference(ts, [3.0, 1.0]), torch.float32)


def test_defaults():
    ts = [rand((5,), s) for s in range(2)]
    # normalize=True by default: [1, 3] acts as [0.25, 0.75].
    assert_rounded_once(tm.weighted_average(ts, [1.0, 3.0]), reference(ts, [1.0, 3.0]), torch.float32)
    assert_rounded_once(tm.weighted_average(ts, torch.tensor([1.0, 3.0])), reference(ts, [1.0, 3.0]), torch.float32)
    # alpha=1.0
    assert_rounded_once(tm.state_dict_add({"w": ts[0]}, {"w": ts[1]})["w"],
                        ts[0].double() + ts[1].double(), torch.float32)
    # weights=None: uniform
    assert_rounded_once(tm.state_dict_average([{"w": ts[0]}, {"w": ts[1]}])["w"], reference(ts), torch.float32)


def test_weighted_average_accepts_integer_weight_lists():
    ts = [rand((5,), s) for s in range(2)]
    assert_rounded_once(tm.weighted_average(ts, [1, 3]), reference(ts, [1, 3]), torch.float32)


# ---- state dict ops ------------------------------------------------------------------------------

def mixed_state_dict(seed, dtype=torch.float32):
    return {
        "fc.weight": rand((4, 3), seed, dtype),
        "fc.bias": rand((4,), seed + 100, dtype),
        "bn.num_batches_tracked": torch.tensor(seed + 1),
        "mask": randint((5,), seed, torch.bool),
        "scale": rand((), seed + 200, torch.float64),
    }


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.3])
def test_state_dict_add(dtype, alpha):
    a, b = mixed_state_dict(1, dtype), mixed_state_dict(2, dtype)
    out = tm.state_dict_add(a, b, alpha)
    assert_same_state_dict(out, [a, b], [1.0, alpha], normalize=False)
    # Out of place: the inputs are untouched.
    assert torch.equal(a["fc.weight"], mixed_state_dict(1, dtype)["fc.weight"])


@pytest.mark.parametrize("dtype", FLOATS)
def test_state_dict_mul(dtype):
    sd = mixed_state_dict(3, dtype)
    out = tm.state_dict_mul(sd, -0.7)
    assert_same_state_dict(out, [sd], [-0.7], normalize=False)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("weights", [None, [0.5, 0.25, 0.25], [2.0, 1.0, 1.0]])
def test_state_dict_average(dtype, weights):
    sds = [mixed_state_dict(s, dtype) for s in range(3)]
    # Later dicts in another key order: the result follows the first dict.
    sds[1] = dict(reversed(list(sds[1].items())))
    out = tm.state_dict_average(sds, weights)
    assert_same_state_dict(out, sds, weights)
    assert int(out["bn.num_batches_tracked"]) == 1


def test_state_dict_ops_on_empty_dicts():
    assert tm.state_dict_average([{}, {}]) == {}
    assert tm.state_dict_add({}, {}) == {}
    assert tm.state_dict_mul({}, 2.0) == {}


def test_state_dict_average_of_model_state_dicts_loads_into_the_model():
    models = [make_model(seed, steps) for seed, steps in ((1, 2), (2, 3), (3, 4))]
    sds = [m.state_dict() for m in models]  # OrderedDicts
    soup = tm.state_dict_average(sds)
    assert_same_state_dict(soup, sds)
    assert int(soup["1.num_batches_tracked"]) == 2
    target = make_model(9, 0)
    target.load_state_dict(soup)  # strict: same keys, shapes, dtypes
    for k, v in target.state_dict().items():
        assert torch.equal(v, soup[k])
    with torch.no_grad():
        assert target(torch.randn(2, 6)).shape == (2, 3)


def test_state_dict_ops_propagate_gradients():
    a = {"w": rand((3,), 0, torch.float64).requires_grad_()}
    b = {"w": rand((3,), 1, torch.float64).requires_grad_()}
    out = tm.state_dict_average([a, b], [1.0, 3.0])
    out = tm.state_dict_add(out, tm.state_dict_mul(b, 2.0), 0.5)
    out["w"].sum().backward()
    assert torch.allclose(a["w"].grad, torch.full((3,), 0.25, dtype=torch.float64))
    assert torch.allclose(b["w"].grad, torch.full((3,), 0.75 + 1.0, dtype=torch.float64))


# ---- errors: RuntimeError naming the problem, never a crash -------------------------------------

A = torch.zeros(3, 4)
B = torch.zeros(4, 4)
I = torch.zeros(3, 4, dtype=torch.int64)
C = torch.zeros(3, 4, dtype=torch.complex64)
M = torch.zeros(3, 4, device="meta")

ERRORS = {
    "simple_average of nothing": (lambda: tm.simple_average([]), ["simple_average", "expected at least one tensor"]),
    "weighted_average of nothing": (lambda: tm.weighted_average([], []), ["expected at least one tensor"]),
    "tensor_weights of nothing": (lambda: tm.weighted_average([], torch.ones(0)), ["expected at least one tensor"]),
    "shapes": (lambda: tm.simple_average([A, B]), ["tensor 1 has shape [4, 4]", "tensor 0's shape [3, 4]"]),
    "shapes, weighted": (lambda: tm.weighted_average([A, A, B], [1.0, 1.0, 1.0]), ["tensor 2 has shape [4, 4]"]),
    "float vs int": (lambda: tm.simple_average([A, I]), ["tensor 1 has dtype int64", "cannot be averaged",
                                                         "tensor 0's dtype float32"]),
    "int vs float": (lambda: tm.weighted_average([I, A], [1.0, 1.0]), ["dtype float32", "cannot be averaged"]),
    "real vs complex": (lambda: tm.simple_average([A, C]), ["complex64", "cannot be averaged"]),
    "devices": (lambda: tm.simple_average([A, M]), ["tensor 1 is on device meta", "tensor 0 is on device cpu"]),
    "weight count": (lambda: tm.weighted_average([A, A], [1.0, 2.0, 3.0]), ["expected 2 weights", "got 3"]),
    "weight count, tensor": (lambda: tm.weighted_average([A, A], torch.ones(3)), ["expected 2 weights", "got 3"]),
    "weights sum to 0": (lambda: tm.weighted_average([A, A], [1.0, -1.0]), ["sum to 0", "normalize=False"]),
    "tensor weights sum to 0": (lambda: tm.weighted_average([A, A], torch.tensor([1.0, -1.0])),
                                ["sum to 0", "normalize=False"]),
    "weights not finite": (lambda: tm.weighted_average([A, A], [1.0, float("nan")]), ["weight 1 is not a finite"]),
    "tensor weights 2-D": (lambda: tm.weighted_average([A, A], torch.ones(1, 2)), ["1-D", "[1, 2]"]),
    "tensor weights int": (lambda: tm.weighted_average([A, A], torch.ones(2, dtype=torch.int64)),
                           ["weights must be a floating tensor", "int64"]),
    "tensor weights device": (lambda: tm.weighted_average([A, A], torch.ones(2, device="meta")),
                              ["weights is on device meta", "tensors are on device cpu"]),
    "add: keys": (lambda: tm.state_dict_add({"x": A, "y": A}, {"x": A, "z": A}),
                  ["state_dict_add", "different keys", "b lacks 'y'", "b has keys a lacks: 'z'"]),
    "add: shape": (lambda: tm.state_dict_add({"fc.weight": A}, {"fc.weight": B}),
                   ["b['fc.weight'] has shape [4, 4]", "a['fc.weight']'s shape [3, 4]"]),
    "add: dtype": (lambda: tm.state_dict_add({"n": I}, {"n": A}), ["b['n'] has dtype float32", "cannot be averaged"]),
    "add: device": (lambda: tm.state_dict_add({"w": A}, {"w": M}), ["b['w'] is on device meta"]),
    "average of nothing": (lambda: tm.state_dict_average([]), ["expected at least one state dict"]),
    "average: keys": (lambda: tm.state_dict_average([{"a": A, "b": A}, {"a": A}, {"a": A, "b": A, "c": A}]),
                      ["different keys", "state_dicts[1] lacks 'b'", "state_dicts[2] has keys state_dicts[0] lacks: 'c'"]),
    "average: shape": (lambda: tm.state_dict_average([{"w": A}, {"w": A}, {"w": B}]),
                       ["state_dicts[2]['w'] has shape [4, 4]", "state_dicts[0]['w']'s shape [3, 4]"]),
    "average: dtype": (lambda: tm.state_dict_average([{"w": A}, {"w": I}]), ["state_dicts[1]['w'] has dtype int64"]),
    "average: weight count": (lambda: tm.state_dict_average([{"w": A}, {"w": A}], [1.0]),
                              ["expected 2 weights", "got 1"]),
    "average: weights sum to 0": (lambda: tm.state_dict_average([{"w": A}, {"w": A}], [2.0, -2.0]), ["sum to 0"]),
    "merge_files: no inputs": (lambda: tm.merge_files([], "/nonexistent/out.pt"), ["merge_files", "no input files"]),
    "merge_files: missing input": (lambda: tm.merge_files(["/nonexistent/a.pt", "/nonexistent/b.pt"], "/tmp/x.pt"),
                                   ["merge_files", "/nonexistent/a.pt"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_arguments_raise_runtime_error(case):
    fn, substrings = ERRORS[case]
    with pytest.raises(RuntimeError) as info:
        fn()
    message = str(info.value)
    for s in substrings:
        assert s in message, f"{s!r} not in {message!r}"


def test_merge_files_errors_name_the_file(tmp_path):
    a, b, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "out.pt"
    torch.save({"w": torch.zeros(3)}, a)
    torch.save({"w": torch.zeros(4)}, b)
    with pytest.raises(RuntimeError, match=r"b\.pt: tensor 'w': shape \[4\] differs"):
        tm.merge_files([str(a), str(b)], str(out))
    torch.save({"w": torch.zeros(3)}, b)
    with pytest.raises(RuntimeError, match="expected 2 weights"):
        tm.merge_files([str(a), str(b)], str(out), [1.0])
    with pytest.raises(RuntimeError, match="replace an input"):
        tm.merge_files([str(a), str(b)], str(a))
    assert not out.exists()


# ---- autograd ------------------------------------------------------------------------------------

def leaves(n, shape=(3, 4), seed=0):
    return [rand(shape, seed + i, torch.float64).requires_grad_() for i in range(n)]


def test_gradcheck_simple_average():
    ts = leaves(3)
    assert torch.autograd.gradcheck(lambda *t: tm.simple_average(list(t)), ts)
    assert torch.autograd.gradgradcheck(lambda *t: tm.simple_average(list(t)), ts)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_weighted_average_wrt_tensors(normalize):
    ts = leaves(3, seed=10)
    assert torch.autograd.gradcheck(lambda *t: tm.weighted_average(list(t), [0.2, 0.5, 1.3], normalize), ts)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_tensor_weights_wrt_tensors_and_weights(normalize):
    ts = leaves(3, seed=20)
    w = torch.tensor([0.2, 0.5, 1.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w, *t: tm.weighted_average.tensor_weights(list(t), w, normalize), [w, *ts])
    assert torch.autograd.gradgradcheck(
        lambda w, *t: tm.weighted_average.tensor_weights(list(t), w, normalize), [w, *ts])


def test_overload_resolution_picks_tensor_weights_for_a_tensor():
    ts = leaves(2, seed=30)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    tm.weighted_average(ts, w).sum().backward()
    assert w.grad is not None
    # d/dw of Σ (w_i / Σw) x_i
    s = w.detach().sum()
    x = [t.detach().sum() for t in ts]
    expected = torch.stack([(x[0] - (w[0] * x[0] + w[1] * x[1]).detach() / s) / s,
                            (x[1] - (w[0] * x[0] + w[1] * x[1]).detach() / s) / s])
    assert torch.allclose(w.grad, expected)


def test_gradients_keep_the_input_dtype():
    ts = [rand((4,), s).requires_grad_() for s in range(2)]  # float32
    tm.weighted_average(ts, [1.0, 3.0]).sum().backward()
    assert ts[0].grad.dtype == torch.float32
    assert torch.allclose(ts[0].grad, torch.full((4,), 0.25))
    assert torch.allclose(ts[1].grad, torch.full((4,), 0.75))


def test_learned_soup_lowers_the_loss():
    """Learn the mixing coefficients of two "fine-tuned" linear models by SGD on softmax(logits),
    through weighted_average.tensor_weights."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    b1, b2 = torch.randn(3, generator=g), torch.randn(3, generator=g)
    x = torch.randn(64, 8, generator=g)
    y = x @ (0.8 * w1 + 0.2 * w2).t() + (0.8 * b1 + 0.2 * b2)  # the best soup is 0.8 / 0.2
    logits = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    losses = []
    for _ in range(30):
        mix = torch.softmax(logits, dim=0)
        w = tm.weighted_average([w1, w2], mix, normalize=False)
        b = tm.weighted_average.tensor_weights([b1, b2], mix, normalize=False)
        loss = torch.nn.functional.mse_loss(x @ w.t() + b, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.softmax(logits, 0)[0].item() > 0.6  # moved from 0.5 towards 0.8


# ---- device genericity ---------------------------------------------------------------------------

def test_kernels_read_no_tensor_memory_on_the_host():
    """On the meta device (shapes and dtypes, no data) the averages run unchanged: the kernels
    are plain ATen compositions, so a CUDA build of LibTorch runs them on the GPU as they are."""
    ts = [torch.empty(5, 6, device="meta", dtype=torch.float16) for _ in range(3)]
    for out in (tm.simple_average(ts), tm.weighted_average(ts, [1.0, 2.0, 3.0]),
                tm.weighted_average(ts, torch.ones(3, device="meta"), normalize=False),
                tm.state_dict_average([{"w": t} for t in ts])["w"]):
        assert out.device.type == "meta" and out.shape == (5, 6) and out.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA (Debian's LibTorch is CPU-only)")
def test_cuda():
    ts = [rand((100,), s).cuda() for s in range(3)]
    out = tm.weighted_average(ts, torch.tensor([1.0, 2.0, 3.0], device="cuda"))
    assert out.is_cuda
    assert_rounded_once(out.cpu(), reference([t.cpu() for t in ts], [1.0, 2.0, 3.0]), torch.float32)
    with pytest.raises(RuntimeError, match="on device"):
        tm.simple_average([ts[0], ts[1].cpu()])


# ---- TorchScript -----------------------------------------------------------------------------

@torch.jit.script
def scripted_all_ops(ts: List[Tensor], w: List[float], wt: Tensor,
                     sds: List[Dict[str, Tensor]]) -> List[Tensor]:
    avg = torch.ops.torchmerge.simple_average(ts)
    weighted = torch.ops.torchmerge.weighted_average(ts, w, normalize=False)
    learned = torch.ops.torchmerge.weighted_average(tensors=ts, weights=wt)
    sd = torch.ops.torchmerge.state_dict_average(sds)
    sd = torch.ops.torchmerge.state_dict_add(sd, torch.ops.torchmerge.state_dict_mul(sds[0], 2.0), alpha=0.5)
    return [avg, weighted, learned, sd["w"]]


def test_ops_inside_torch_jit_script_functions():
    ts = [rand((6,), s) for s in range(3)]
    sds = [{"w": t} for t in ts]
    wt = torch.tensor([1.0, 1.0, 2.0])
    got = scripted_all_ops(ts, [0.1, 0.2, 0.3], wt, sds)
    eager = [tm.simple_average(ts), tm.weighted_average(ts, [0.1, 0.2, 0.3], False),
             tm.weighted_average(ts, wt),
             tm.state_dict_add(tm.state_dict_average(sds), tm.state_dict_mul(sds[0], 2.0), 0.5)["w"]]
    for g, e in zip(got, eager):
        assert torch.equal(g, e)
    assert "torchmerge::weighted_average" in str(scripted_all_ops.graph)


def test_merge_files_is_not_dropped_by_torchscript(tmp_path):
    @torch.jit.script
    def merge(inputs: List[str], output: str, weights: Optional[List[float]]):
        torch.ops.torchmerge.merge_files(inputs, output, weights=weights)  # result unused

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.ones(2)}, a)
    torch.save({"w": torch.zeros(2)}, b)
    merge([str(a), str(b)], str(tmp_path / "out.pt"), [3.0, 1.0])
    assert torch.equal(torch.load(tmp_path / "out.pt")["w"], torch.full((2,), 0.75))


def test_torchscript_helpers_average_modules():
    models = [make_model(seed, seed) for seed in (1, 2, 3)]
    scripted = [torch.jit.script(m) for m in models]
    sds = [m.state_dict() for m in models]
    for mods in (models, scripted):
        merged = average_modules.average_parameters(mods, [1.0, 2.0, 1.0])
        assert_same_state_dict(merged, sds, [1.0, 2.0, 1.0])
    soup = average_modules.soup(scripted)
    assert isinstance(soup, torch.jit.ScriptModule)
    assert_same_state_dict(dict(soup.state_dict()), sds)
    t = average_modules.average_tensors([sds[0]["0.weight"], sds[1]["0.weight"]])
    assert_rounded_once(t, reference([sds[0]["0.weight"], sds[1]["0.weight"]]), torch.float32)
    base = make_model(0, 0).state_dict()
    ta = average_modules.task_arithmetic(base, sds, 0.3)
    for k in ("0.weight", "3.bias"):
        expected = base[k].double() + 0.3 * sum(sd[k].double() - base[k].double() for sd in sds)
        assert torch.allclose(ta[k].double(), expected, atol=1e-6)


def test_scripted_averager_saves_and_loads(tmp_path):
    path = tmp_path / "averager.pt"
    torch.jit.script(average_modules.Averager()).save(str(path))
    loaded = torch.jit.load(str(path))
    ts = [rand((4,), s) for s in range(2)]
    assert torch.equal(loaded(ts), tm.simple_average(ts))
    assert torch.equal(loaded.weighted(ts, [1.0, 3.0]), tm.weighted_average(ts, [1.0, 3.0]))
    sds = [{"w": t} for t in ts]
    assert torch.equal(loaded.average_state_dicts(sds, [1.0, 3.0])["w"], tm.weighted_average(ts, [1.0, 3.0]))


# ---- merge_files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [None, [1.0, 3.0]])
def test_merge_files_matches_the_reference(tmp_path, capfd, weights):
    sds = [mixed_state_dict(s) for s in range(2)]
    paths = [str(tmp_path / f"in{i}.pt") for i in range(2)]
    for sd, p in zip(sds, paths):
        torch.save(sd, p)
    out = tmp_path / "merged.pt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tm.merge_files(inputs=paths, output=str(out), weights=weights)
    # The library's warning goes through TORCH_WARN: a Python warning where PyTorch installs a
    # handler (TorchScript calls), else LibTorch's log on stderr (eager torch.ops calls in 1.13).
    text = capfd.readouterr().err + " ".join(str(w.message) for w in caught)
    assert "non-floating tensors differ" in text and "'bn.num_batches_tracked'" in text
    got = torch.load(out, weights_only=True)
    assert_same_state_dict(got, sds, weights)
    # The same as state_dict_average in memory.
    mem = tm.state_dict_average(sds, weights)
    for k in got:
        assert torch.equal(got[k], mem[k]), k


def test_merge_files_of_model_checkpoints_loads_into_the_model(tmp_path):
    models = [make_model(seed, 1) for seed in (1, 2)]  # same num_batches_tracked: no warning
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"m{i}.pt"))
        torch.save(m.state_dict(), paths[-1])
    tm.merge_files(paths, str(tmp_path / "soup.pt"))
    target = make_model(5, 0)
    target.load_state_dict(torch.load(tmp_path / "soup.pt"))
    assert_same_state_dict(target.state_dict(), [m.state_dict() for m in models])


def test_merge_files_of_torchscript_modules_writes_a_module(tmp_path):
    models = [make_model(seed, 1) for seed in (1, 2, 3)]
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"m{i}_scripted.pt"))
        torch.jit.script(m).save(paths[-1])
    out = tmp_path / "soup_scripted.pt"
    tm.merge_files(paths, str(out), [2.0, 1.0, 1.0])
    soup = torch.jit.load(str(out))
    assert_same_state_dict(dict(soup.state_dict()), [m.state_dict() for m in models], [2.0, 1.0, 1.0])
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference_model = make_model(0, 0)
        reference_model.load_state_dict(tm.state_dict_average([m.state_dict() for m in models], [2.0, 1.0, 1.0]))
        assert torch.allclose(soup(x), reference_model(x), atol=1e-6)
