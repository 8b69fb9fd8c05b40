"""Reference implementation of torchmerge's merge semantics, in PyTorch, for the CLI tests.

Inputs are trusted fixtures, so they are loaded with torch.load(weights_only=False) (some hold
argparse.Namespace objects) or torch.jit.load for TorchScript modules. The expected merge is
computed in float64 (complex128) and compared with the CLI's output to within an ulp bound:

  * float32 / float16 / bfloat16 outputs: within 1 ulp (of the output dtype) of the float64
    reference, i.e. one correctly rounded float64 accumulation (double rounding allowed);
  * float64 outputs: within 4 ulp;
  * complex: real and imaginary parts separately, with the component dtype;
  * non-floating (integer, bool): exactly equal to the first input's tensor.

Because no float64 accumulator can be exact when the weighted terms cancel, the bound also
admits a few float64 ulps of the magnitude sum(|w_i * x_i|) of the terms; for float32 and
narrower outputs that slack is ~2**-29 ulp and changes nothing in practice.
"""
import collections
import os
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES_SRC = os.path.join(os.path.dirname(HERE), "fixtures")
if FIXTURES_SRC not in sys.path:
    sys.path.insert(0, FIXTURES_SRC)

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)

# (significand bits including the implicit one, minimum normal exponent)
_FLOAT_FORMAT = {
    torch.float64: (53, -1022),
    torch.float32: (24, -126),
    torch.float16: (11, -14),
    torch.bfloat16: (8, -126),
}
_COMPLEX_PART = {torch.complex64: torch.float32, torch.complex128: torch.float64}

DTYPE_BY_NAME = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "complex64": torch.complex64, "complex128": torch.complex128,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
NAME_BY_DTYPE = {v: k for k, v in DTYPE_BY_NAME.items()}


def is_averaged(dtype: torch.dtype) -> bool:
    """The dtypes torchmerge averages (the others are taken from the first input)."""
    return dtype in FLOAT_DTYPES or dtype in COMPLEX_DTYPES


# ---- loading ---------------------------------------------------------------------------------

def is_torchscript_file(path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def load_raw(path):
    """The object stored in path: a torch.jit module for TorchScript files, else torch.load."""
    if is_torchscript_file(path):
        return torch.jit.load(str(path), map_location="cpu")
    return torch.load(str(path), map_location="cpu", weights_only=False)


def is_flat_state_dict(obj) -> bool:
    """A dict (or OrderedDict) whose keys are strings and whose values are all tensors."""
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def find_state_dict_candidates(obj, prefix: str = "") -> List[str]:
    """Dotted keys of every flat state dict nested inside obj (not obj itself)."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                continue
            name = prefix + k
            if is_flat_state_dict(v):
                found.append(name)
            elif isinstance(v, dict):
                found.extend(find_state_dict_candidates(v, name + "."))
    return found


def extract_state_dict(obj, key: Optional[str] = None) -> "collections.OrderedDict[str, torch.Tensor]":
    """The state dict torchmerge uses for a loaded object, by the CLI's rules:
    a TorchScript module -> its state_dict(); a flat dict of tensors -> itself (key ignored);
    else the entry named by key (dots descend), or the unique nested flat state dict."""
    if isinstance(obj, torch.jit.ScriptModule):
        return collections.OrderedDict(obj.state_dict())
    if is_flat_state_dict(obj):
        return collections.OrderedDict(obj)
    if key is not None:
        cur = obj
        for part in key.split("."):
            cur = cur[part]
        assert is_flat_state_dict(cur), "key %r is not a state dict" % key
        return collections.OrderedDict(cur)
    candidates = find_state_dict_candidates(obj)
    assert len(candidates) == 1, "expected one nested state dict, found %r" % candidates
    return extract_state_dict(obj, candidates[0])


def load_state_dict(path, key: Optional[str] = None):
    return extract_state_dict(load_raw(path), key)


def load_state_dicts(paths: Sequence, key: Optional[str] = None):
    return [load_state_dict(p, key) for p in paths]


# ---- the reference merge ---------------------------------------------------------------------

@dataclass
class Merged:
    """Expected merge result. expected[k] is float64/complex128 for averaged tensors (before
    the final rounding) and the first input's tensor for the others; dtypes[k] is the dtype
    the output must have; magnitude[k] = sum |w_i x_i| (per component for complex)."""
    order: List[str]
    expected: Dict[str, torch.Tensor] = field(default_factory=dict)
    dtypes: Dict[str, torch.dtype] = field(default_factory=dict)
    magnitude: Dict[str, torch.Tensor] = field(default_factory=dict)


def merge_keys(sds, policy: str) -> List[str]:
    first = list(sds[0].keys())
    if policy == "strict":
        for sd in sds[1:]:
            assert set(sd.keys()) == set(first), "inputs do not have the same keys"
        return first
    if policy == "intersection":
        return [k for k in first if all(k in sd for sd in sds[1:])]
    if policy == "union":
        order = list(first)
        seen = set(order)
        for sd in sds[1:]:
            for k in sd:
                if k not in seen:
                    order.append(k)
                    seen.add(k)
        return order
    raise ValueError(policy)


def reference_merge(sds, weights: Optional[Sequence[float]] = None, normalize: bool = True,
                    keys: str = "strict", dtype: Optional[torch.dtype] = None) -> Merged:
    """theta[k] = sum_i w_i * theta_i[k] over the inputs that have k, in float64.

    weights None: uniform. normalize: weights divided by their sum (for union, by the sum over
    the inputs that have the key). dtype: output dtype of floating tensors (None: the first
    input's dtype)."""
    n = len(sds)
    if weights is None:
        weights = [1.0] * n
        normalize = True
    assert len(weights) == n
    merged = Merged(order=merge_keys(sds, keys))
    for k in merged.order:
        have = [i for i in range(n) if k in sds[i]]
        first = sds[have[0]][k]
        ws = [float(weights[i]) for i in have]
        if normalize:
            total = sum(ws)
            ws = [w / total for w in ws]
        if not is_averaged(first.dtype):
            merged.expected[k] = first.detach().clone()
            merged.dtypes[k] = first.dtype
            continue
        acc_dtype = torch.complex128 if first.dtype.is_complex else torch.float64
        acc = torch.zeros(first.shape, dtype=acc_dtype)
        mag = torch.zeros(first.shape, dtype=acc_dtype)
        for w, i in zip(ws, have):
            t = sds[i][k].detach().to(acc_dtype)
            assert t.shape == first.shape, "shape mismatch for %r" % k
            acc += w * t
            if t.is_complex():
                mag += torch.complex(torch.abs(w * t.real), torch.abs(w * t.imag))
            else:
                mag += torch.abs(w * t)
        merged.expected[k] = acc
        merged.magnitude[k] = mag
        merged.dtypes[k] = dtype if dtype is not None else first.dtype
    return merged


def expected_tensor(merged: Merged, k: str) -> torch.Tensor:
    """The expected value rounded to the output dtype (for places that need a plain tensor,
    e.g. loading into an nn.Module)."""
    return merged.expected[k].to(merged.dtypes[k])


def expected_state_dict(merged: Merged):
    return collections.OrderedDict((k, expected_tensor(merged, k)) for k in merged.order)


# ---- comparison ------------------------------------------------------------------------------

def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of dtype's representable numbers at |x| (x float64): 2**(e - p + 1) with
    e = max(floor(log2 |x|), emin); the subnormal spacing for tiny x and for 0."""
    p, emin = _FLOAT_FORMAT[dtype]
    ax = x.to(torch.float64).abs()
    _, e = torch.frexp(ax)  # ax = m * 2**e, 0.5 <= m < 1
    exp = (e.to(torch.float64) - 1).clamp(min=emin)
    exp = torch.where(ax == 0, torch.full_like(exp, emin), exp)
    exp = torch.where(torch.isfinite(ax), exp, torch.full_like(exp, emin))
    return torch.pow(torch.full_like(ax, 2.0), exp - (p - 1))


def default_ulps(dtype: torch.dtype) -> int:
    return 4 if dtype in (torch.float64, torch.complex128) else 1


def assert_close_ulp(actual: torch.Tensor, expected_f64: torch.Tensor, dtype: torch.dtype,
                     ulps: Optional[int] = None, magnitude: Optional[torch.Tensor] = None,
                     name: str = "tensor") -> None:
    """actual must have dtype `dtype` and expected's shape, and:
    floating: |actual - expected| <= ulps * ulp_dtype(expected) (+ 4 float64 ulps of
    magnitude, when given); complex: the same for the real and imaginary parts; other dtypes:
    exactly equal to expected (the first input's tensor)."""
    assert isinstance(actual, torch.Tensor), "%s: not a tensor but %r" % (name, type(actual))
    assert actual.dtype == dtype, "%s: dtype %s, expected %s" % (name, actual.dtype, dtype)
    assert tuple(actual.shape) == tuple(expected_f64.shape), \
        "%s: shape %s, expected %s" % (name, tuple(actual.shape), tuple(expected_f64.shape))
    if dtype in COMPLEX_DTYPES:
        part = _COMPLEX_PART[dtype]
        e = expected_f64.to(torch.complex128)
        m = None if magnitude is None else magnitude.to(torch.complex128)
        a = actual.detach()
        assert_close_ulp(a.real.contiguous(), e.real, part, ulps, None if m is None else m.real,
                         name + " (real part)")
        assert_close_ulp(a.imag.contiguous(), e.imag, part, ulps, None if m is None else m.imag,
                         name + " (imaginary part)")
        return
    if dtype not in FLOAT_DTYPES:
        assert torch.equal(actual.detach(), expected_f64.to(dtype)), \
            "%s: %s differs from the first input's %s" % (name, actual, expected_f64)
        return
    if ulps is None:
        ulps = default_ulps(dtype)
    a = actual.detach().to(torch.float64)
    e = expected_f64.detach().to(torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), "%s: NaN positions differ" % name
    inf = torch.isinf(e) | torch.isinf(a)
    assert torch.equal(a[inf], e[inf]), "%s: infinities differ" % name
    ok = ~(nan_e | inf)
    a, e = a[ok], e[ok]
    tol = ulps * ulp(e, dtype)
    if magnitude is not None:
        tol = tol + 4 * ulp(magnitude.detach().to(torch.float64)[ok], torch.float64)
    err = (a - e).abs()
    bad = err > tol
    if bad.any():
        idx = int(torch.nonzero(bad)[0])
        raise AssertionError(
            "%s: %d of %d elements off by more than %d ulp of %s; first: got %r, expected %r "
            "(error %.3g, allowed %.3g)" % (name, int(bad.sum()), e.numel(), ulps, dtype,
                                            float(a[idx]), float(e[idx]), float(err[idx]),
                                            float(tol[idx])))


def assert_state_dict_matches(out, merged: Merged, check_order: bool = True) -> None:
    """out (name -> tensor) has exactly merged's keys (in order) and each value matches."""
    if check_order:
        assert list(out.keys()) == merged.order, \
            "keys %r, expected %r" % (list(out.keys()), merged.order)
    else:
        assert set(out.keys()) == set(merged.order)
    for k in merged.order:
        assert_close_ulp(out[k], merged.expected[k], merged.dtypes[k],
                         magnitude=merged.magnitude.get(k), name=repr(k))
