"""torchmerge.merge, merge_state_dicts, run_recipe and methods: the library's merge engine.

merge() is tm_merge_files with every option of the command line; run_recipe() is
tm_merge_recipe; merge_state_dicts() merges tensors held in memory one by one through
tm_merge_tensors (the same code and bits as a file merge of that tensor). Method parameters are
given by the method table's names (methods() lists them; `lambda_` stands for `lambda`, which
Python keywords cannot be): numbers, lists of numbers (one per input), bools, or text as on the
command line ("sum", "0.2,0.8").
"""
import ctypes
import dataclasses
import os
import sys
import warnings as _warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._lib import (DTYPE_NAMES, FORMATS, KEY_POLICIES, PARAM_KINDS, P, PROGRESS_FN, WARNING_FN, GreedyReport,
                   MergeOptions, MethodInfo, MethodParamInfo, Param, Profile, TensorData, TorchmergeError, check,
                   encode, lib, new)

_MERGEABLE_OUT = ("float32", "float16", "bfloat16", "float64")


class TorchmergeWarning(UserWarning):
    """A one-line warning of the library (e.g. non-floating tensors that differ between inputs)."""


@dataclasses.dataclass(frozen=True)
class MethodParameter:
    name: str
    aliases: Tuple[str, ...]
    kind: str            # "number", "integer", "bool" or "choice"
    per_input: bool
    required: bool
    default: str         # as text ("1", "true"); "" when required
    min: float
    max: float
    choices: Tuple[str, ...]
    help: str


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    aliases: Tuple[str, ...]
    summary: str
    needs_base: bool
    min_inputs: int
    max_inputs: int      # 0: no limit
    params: Tuple[MethodParameter, ...]


def _strings(arr):
    out, i = [], 0
    while arr and arr[i]:
        out.append(arr[i].decode())
        i += 1
    return tuple(out)


def methods() -> List[Method]:
    """Every merge method of the library's table with its parameters."""
    out = []
    for i in range(lib.tm_method_count()):
        m = new(MethodInfo)
        check(lib.tm_method_get(i, ctypes.byref(m)))
        params = []
        for j in range(m.n_params):
            p = new(MethodParamInfo)
            check(lib.tm_method_param(i, j, ctypes.byref(p)))
            params.append(MethodParameter(p.name.decode(), _strings(p.aliases), PARAM_KINDS[p.kind], bool(p.per_input),
                                          bool(p.required), (p.default_value or b"").decode(), p.min, p.max,
                                          tuple(c for c in (p.choices or b"").decode().split("|") if c),
                                          (p.help or b"").decode()))
        out.append(Method(m.name.decode(), _strings(m.aliases), m.summary.decode(), bool(m.needs_base),
                          m.min_inputs, m.max_inputs, tuple(params)))
    return out


def _dtype_index(dtype, what="dtype"):
    name = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)
    aliases = {"float": "float32", "fp32": "float32", "f32": "float32", "half": "float16", "fp16": "float16",
               "f16": "float16", "bf16": "bfloat16", "double": "float64", "fp64": "float64", "f64": "float64"}
    name = aliases.get(name, name)
    if name not in _MERGEABLE_OUT:
        raise TorchmergeError("%s: expected float32, float16, bfloat16 or float64, got '%s'" % (what, dtype),
                              "TM_ERROR_INVALID_ARGUMENT")
    return DTYPE_NAMES.index(name)


def _param_value(name, value):
    """A tm_param for a Python value (kept alive by the returned tuple)."""
    if isinstance(value, bool):
        return Param(name.encode(), b"true" if value else b"false", None, 0), None
    if isinstance(value, str):
        return Param(name.encode(), value.encode(), None, 0), None
    if isinstance(value, torch.Tensor):
        value = value.detach().double().reshape(-1).tolist()
    if isinstance(value, (int, float)):
        value = [value]
    try:
        nums = [float(v) for v in value]
    except (TypeError, ValueError):
        raise TorchmergeError("%s: expected a number, a list of numbers, a bool or text, got %r" % (name, value),
                              "TM_ERROR_INVALID_ARGUMENT") from None
    arr = (ctypes.c_double * max(len(nums), 1))(*nums)
    return Param(name.encode(), None, ctypes.cast(arr, P(ctypes.c_double)), len(nums)), arr


class _Options:
    """A tm_merge_options and everything its pointers point to (kept alive as long as it is)."""

    def __init__(self, method=None, params=None, progress=False, quiet=False, profile=False):
        self.o = o = new(MergeOptions)
        self.keep = []
        if method is not None:
            o.method = method.encode()
        plist = []
        for name, value in (params or {}).items():
            if value is None:
                continue
            p, arr = _param_value("lambda" if name == "lambda_" else name, value)
            plist.append(p)
            self.keep.append(arr)
        if plist:
            self.params = (Param * len(plist))(*plist)
            o.params, o.n_params = ctypes.cast(self.params, P(Param)), len(plist)
        if callable(progress):
            user = progress
            self.progress = PROGRESS_FN(lambda _u, done, total: _call_quietly(user, done, total))
        elif progress and not quiet and sys.stderr.isatty():
            self.progress = PROGRESS_FN(_progress_bar)
        else:
            self.progress = None
        if self.progress:
            o.progress = self.progress
        if not quiet:
            self.warning = WARNING_FN(lambda _u, msg: _warnings.warn(msg.decode("utf-8", "replace"),
                                                                    TorchmergeWarning, stacklevel=3))
            o.warning = self.warning
        self.profile = new(Profile) if profile else None
        if profile:
            o.profile = ctypes.pointer(self.profile)

    def set_str(self, field, value):
        if value is not None:
            b = encode(os.fspath(value)) if not isinstance(value, str) else value.encode()
            self.keep.append(b)
            setattr(self.o, field, b)

    def profile_dict(self):
        if self.profile is None:
            return None
        p = self.profile
        return {"load_seconds": p.load_seconds, "merge_seconds": p.merge_seconds, "save_seconds": p.save_seconds,
                "load_calls": p.load_calls, "merge_calls": p.merge_calls, "save_calls": p.save_calls}


def _call_quietly(fn, *args):
    try:
        fn(*args)
    except Exception as err:  # an exception cannot cross the C library: report it instead
        _warnings.warn("progress callback failed: %r" % (err,), TorchmergeWarning)


def _progress_bar(_user, done, total):
    width = 30
    filled = width * done // total if total else width
    sys.stderr.write("\r[%s%s] %d/%d tensors" % ("#" * filled, " " * (width - filled), done, total))
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _path(p):
    return os.fspath(p)


def _output_options(opts, format, keys, dtype, key, template):
    """The options merge() and greedy_soup() share, validated as the command line does."""
    o = opts.o
    if format not in FORMATS:
        raise TorchmergeError("format: expected pt, torchscript or safetensors, got '%s'" % format,
                              "TM_ERROR_INVALID_ARGUMENT")
    o.format = FORMATS[format]
    if keys not in KEY_POLICIES:
        raise TorchmergeError("keys: expected strict, intersection or union, got '%s'" % keys,
                              "TM_ERROR_INVALID_ARGUMENT")
    o.keys = KEY_POLICIES[keys]
    if dtype is not None:
        o.has_dtype, o.dtype = 1, _dtype_index(dtype)
    opts.set_str("key", key)
    opts.set_str("template_path", None if template is None else _path(template))


def _paths(inputs):
    if isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]
    paths = [encode(_path(p)) for p in inputs]
    return paths, (ctypes.c_char_p * max(len(paths), 1))(*paths)


def merge(inputs: Sequence, output, method: str = "simple_average", base=None, weights=None, dtype=None,
          keys: str = "strict", progress=True, *, key: Optional[str] = None, format: Optional[str] = None,
          template=None, max_shard_size=None, masks_out=None, dequantize: bool = False, quiet: bool = False,
          profile: bool = False, **params):
    """Merges the input checkpoints into output, tensor by tensor, as `torchmerge METHOD` does.

    inputs: paths (any format torchmerge reads). method: any method of the table or an alias
    (methods()). base: the base model, for the methods on task vectors. weights and **params: the
    method's parameters by their table names (density=0.5, lambda_=0.3, majority_sign="sum", ...).
    dtype: write floating tensors as float32/float16/bfloat16/float64 (torch.dtype or name).
    keys: "strict", "intersection" or "union". key: the state dict inside nested checkpoints.
    format: "pt", "torchscript" or "safetensors" (None: from output; a folder → sharded
    safetensors). template: a TorchScript module to fill. max_shard_size: bytes per shard of a
    folder output (int or "2GB"). masks_out: a safetensors file for the keep-masks of the methods
    that drop elements. dequantize: merge quantized tensors as their real values. progress: True
    (a bar on a terminal's stderr), False, or a callable(done, total). quiet: no warnings (else
    each is a TorchmergeWarning) and no bar. Errors raise TorchmergeError with the library's
    one-line message; output is then left untouched. Returns the time spent per phase (a dict)
    when profile is True, else None.
    """
    if weights is not None:
        params = dict(params, weights=weights)
    opts = _Options(method, params, progress, quiet, profile)
    _output_options(opts, format, keys, dtype, key, template)
    o = opts.o
    if max_shard_size is not None:
        size = ctypes.c_uint64()
        try:
            check(lib.tm_byte_size_parse(str(max_shard_size).encode(), ctypes.byref(size)))
        except TorchmergeError as err:
            raise TorchmergeError("max_shard_size: %s" % err, err.status) from None
        o.max_shard_size = size.value
    for field, value in (("base", base), ("masks_out", masks_out)):
        opts.set_str(field, None if value is None else _path(value))
    o.dequantize = int(bool(dequantize))
    paths, arr = _paths(inputs)
    check(lib.tm_merge_files(arr, len(paths), encode(_path(output)), ctypes.byref(o)))
    return opts.profile_dict()


@dataclasses.dataclass(frozen=True)
class GreedyStep:
    """One input as greedy soup tried it: its score alone, the score of the soup with it, kept."""
    input: str
    score: float
    soup_score: float
    kept: bool


@dataclasses.dataclass(frozen=True)
class GreedySoupReport:
    tried: Tuple[GreedyStep, ...]  # in the order tried: best alone first
    n_kept: int
    final_score: float


def greedy_soup(inputs: Sequence, output, eval_module, *, template=None, format: Optional[str] = None, dtype=None,
                keys: str = "strict", key: Optional[str] = None, progress=True,
                quiet: bool = False) -> GreedySoupReport:
    """Greedy soup (Wortsman et al. 2022) as `torchmerge greedy_soup`: scores each input alone
    with eval_module (a TorchScript module with a Tensor attribute `inputs` and forward(outputs)
    returning a 0-dim score, higher is better), then adds inputs best first while the uniform
    soup's score strictly improves, and writes that soup to output. template: the TorchScript
    module that receives each candidate's weights (default: the first input that is one).
    Needs libtorchmerge_torch.so (LibTorch)."""
    opts = _Options(None, None, progress, quiet)
    _output_options(opts, format, keys, dtype, key, template)
    paths, arr = _paths(inputs)
    report = new(GreedyReport)
    check(lib.tm_greedy_soup(arr, len(paths), encode(_path(output)), encode(_path(eval_module)),
                             ctypes.byref(opts.o), ctypes.byref(report)))
    try:
        tried = tuple(GreedyStep(os.fsdecode(paths[t.input]), t.score, t.soup_score, bool(t.kept))
                      for t in (report.tried[i] for i in range(report.n)))
        return GreedySoupReport(tried, report.n_kept, report.final_score)
    finally:
        lib.tm_greedy_report_free(ctypes.byref(report))


def run_recipe(recipe, overrides: Sequence[str] = (), *, text: bool = False, progress=True, quiet: bool = False,
               profile: bool = False):
    """Runs a merge recipe (docs/recipes.md): a YAML file, or YAML text when text=True.
    overrides: Hydra-style "key.path=value" strings applied in order ("method.weights=[0.2,0.8]",
    "output=soup.safetensors"). Errors raise TorchmergeError naming the recipe, line and column."""
    if isinstance(overrides, str):
        overrides = [overrides]
    opts = _Options(None, None, progress, quiet, profile)
    ov = [s.encode() for s in overrides]
    arr = (ctypes.c_char_p * max(len(ov), 1))(*ov)
    src = recipe.encode() if text else encode(_path(recipe))
    check(lib.tm_merge_recipe(src, 0 if text else 1, arr, len(ov), ctypes.byref(opts.o)))
    return opts.profile_dict()


# ---- in memory ---------------------------------------------------------------------------------

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)


def _tensor_data(t, name, label):
    if t.device.type != "cpu" or t.layout != torch.strided:
        raise TorchmergeError("tensor '%s': %s is a %s %s tensor; merge_state_dicts takes dense CPU tensors"
                              % (name, label, t.device.type, t.layout), "TM_ERROR_UNSUPPORTED")
    d = new(TensorData)
    d.dtype = DTYPE_NAMES.index(str(t.dtype).replace("torch.", ""))
    d.ndim = t.dim()
    shape = (ctypes.c_int64 * max(t.dim(), 1))(*t.shape)
    stride = (ctypes.c_int64 * max(t.dim(), 1))(*t.stride())
    d.shape, d.stride = ctypes.cast(shape, P(ctypes.c_int64)), ctypes.cast(stride, P(ctypes.c_int64))
    d.data = t.data_ptr()
    return d, (shape, stride, t)


def _select(value, present, n):
    """A per-input parameter's values for the inputs that have a tensor (keys='union')."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and len(value) == n and len(present) != n:
        return [value[i] for i in present]
    return value


def merge_state_dicts(state_dicts: Sequence[Dict[str, torch.Tensor]], method: str = "simple_average", base=None,
                      weights=None, dtype=None, keys: str = "strict", **params) -> Dict[str, torch.Tensor]:
    """Merges state dicts held in memory, key by key, with the library's method code
    (tm_merge_tensors): the same float64 arithmetic and rounding as merge() of files, so the same
    bits for each tensor (model-wide passes, as TIES' trim_scope="global", see one tensor at a
    time). Floating tensors are merged and written as dtype (default: the first input's);
    other tensors are taken from base when given, else from the first input that has them.
    keys: "strict" (the same keys everywhere), "intersection" or "union". base: a state dict."""
    sds = list(state_dicts)
    if not sds:
        raise TorchmergeError("state_dicts: expected at least one state dict", "TM_ERROR_INVALID_ARGUMENT")
    if keys not in KEY_POLICIES:
        raise TorchmergeError("keys: expected strict, intersection or union, got '%s'" % keys,
                              "TM_ERROR_INVALID_ARGUMENT")
    if weights is not None:
        params = dict(params, weights=weights)
    out_index = _dtype_index(dtype) if dtype is not None else None
    names = list(sds[0].keys())
    for i, sd in enumerate(sds[1:], 1):
        names += [k for k in sd.keys() if k not in sds[0] and k not in names]
    if keys == "strict":
        for i, sd in enumerate(sds):
            missing = [k for k in names if k not in sd]
            if missing:
                raise TorchmergeError("state_dicts[%d]: lacks %s (keys='strict'; use keys='intersection' or 'union')"
                                      % (i, ", ".join("'%s'" % k for k in missing[:5])), "TM_ERROR_MISMATCH")
    elif keys == "intersection":
        names = [k for k in names if all(k in sd for sd in sds)]
    out = {}
    for name in names:
        present = [i for i, sd in enumerate(sds) if name in sd]
        ts = [sds[i][name] for i in present]
        first = ts[0]
        if first.is_quantized:
            raise TorchmergeError("tensor '%s': quantized tensors cannot be merged in memory (dequantize them first)"
                                  % name, "TM_ERROR_UNSUPPORTED")
        if first.dtype not in _FLOATING:
            out[name] = (base[name] if base is not None and name in base else first).clone()
            continue
        for i, t in zip(present, ts):
            if t.shape != first.shape:
                raise TorchmergeError("tensor '%s': shape %s in state_dicts[%d] differs from %s in state_dicts[%d]"
                                      % (name, list(t.shape), i, list(first.shape), present[0]), "TM_ERROR_MISMATCH")
        per = {k: _select(v, present, len(sds)) for k, v in params.items()}
        opts = _Options(method, per)
        datas, keep = [], []
        for i, t in zip(present, ts):
            d, k = _tensor_data(t, name, "state_dicts[%d]" % i)
            datas.append(d)
            keep.append(k)
        arr = (TensorData * len(datas))(*datas)
        bptr = None
        if base is not None:
            if name not in base:
                raise TorchmergeError("tensor '%s': the base state dict lacks it" % name, "TM_ERROR_MISMATCH")
            bd, bk = _tensor_data(base[name], name, "base")
            keep.append(bk)
            bptr = ctypes.byref(bd)
        odt = out_index if out_index is not None else DTYPE_NAMES.index(str(first.dtype).replace("torch.", ""))
        result = torch.empty(first.shape, dtype=getattr(torch, DTYPE_NAMES[odt]))
        check(lib.tm_merge_tensors(arr, len(datas), bptr, name.encode(), ctypes.byref(opts.o), odt,
                                   result.data_ptr() if result.numel() else None))
        out[name] = result
    return out
