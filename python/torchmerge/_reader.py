"""torchmerge.load and torchmerge.inspect: the library's reader (no pickle code ever runs) turned
into torch tensors.

Zero copy. libtorchmerge maps each file read-only (PROT_READ, MAP_PRIVATE) and hands out pointers
into that mapping. A tensor over those pages would crash the process on its first write, so
load() does not keep them: it finds where each storage lies in its file (the library's mapping
is listed in /proc/self/maps with its file offset) and maps the same file again from Python
copy-on-write (mmap.ACCESS_COPY, MAP_PRIVATE with write permission). The tensors are views of
that mapping: reading costs nothing until a page is touched, and a write changes this process's
copy of the page only, never the file (as torch.load(mmap=True) does). Storages the file does not
hold verbatim (TorchScript tensors rebuilt by LibTorch, anything not file-backed) are copied.
"""
import ctypes
import dataclasses
import json
import mmap as _mmap
import os
from typing import Dict, List, Optional, Tuple

import torch

from ._lib import (DTYPE_NAMES, QSCHEMES, KeyList, OpenOptions, TensorInfo, TorchmergeError, check, encode, lib,
                   new)

_TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
_INT_REPR = {"qint8": torch.int8, "quint8": torch.uint8, "qint32": torch.int32}
METADATA_KEYS = ("torchmerge_method", "torchmerge_weights", "torchmerge_inputs", "torchmerge_recipe")


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor as the file stores it. stride and storage_offset are in elements; tensors with
    the same storage_id share a storage. Quantized tensors (qint8, quint8, qint32) carry their
    scheme ("per_tensor_affine", "per_channel_affine", ...) and parameters; qscheme is None for
    the others."""
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    storage_offset: int
    storage_id: int
    storage_nbytes: int
    numel: int
    nbytes: int
    qscheme: Optional[str] = None
    q_scale: Optional[float] = None
    q_zero_point: Optional[int] = None
    q_axis: Optional[int] = None
    q_scales: Optional[Tuple[float, ...]] = None
    q_zero_points: Optional[Tuple[float, ...]] = None


@dataclasses.dataclass
class Inspection:
    """What torchmerge.inspect found: the tensors in file order, the file's metadata (safetensors
    __metadata__, and the torchmerge_* records of a merged output), and for a checkpoint holding
    several state dicts, state_dicts = [(key, number of tensors), ...] with tensors empty (pick one
    with key=)."""
    path: str
    format: str
    key: str
    tensors: List[TensorEntry]
    metadata: Dict[str, str]
    state_dicts: List[Tuple[str, int]] = dataclasses.field(default_factory=list)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


class _Checkpoint:
    """An open tm_checkpoint, freed on exit."""

    def __init__(self, path, key=None):
        opts = new(OpenOptions)
        opts.key = encode(key)
        self.handle = ctypes.c_void_p()
        check(lib.tm_checkpoint_open(encode(os.fspath(path)), ctypes.byref(opts), ctypes.byref(self.handle)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        lib.tm_checkpoint_free(self.handle)
        self.handle = None

    def text(self, fn):
        return (fn(self.handle) or b"").decode("utf-8", "replace")

    def infos(self):
        for i in range(lib.tm_checkpoint_n_tensors(self.handle)):
            info = new(TensorInfo)
            check(lib.tm_checkpoint_tensor(self.handle, i, ctypes.byref(info)))
            yield i, info


def _entry(info) -> TensorEntry:
    nd = info.ndim
    dtype_name = DTYPE_NAMES[info.dtype]
    e = dict(name=info.name.decode("utf-8", "surrogateescape"), dtype=_TORCH_DTYPES[dtype_name],
             shape=tuple(info.shape[i] for i in range(nd)), stride=tuple(info.stride[i] for i in range(nd)),
             storage_offset=info.storage_offset, storage_id=info.storage_id, storage_nbytes=info.storage_nbytes,
             numel=info.numel, nbytes=info.nbytes)
    scheme = QSCHEMES[info.qscheme] if 0 <= info.qscheme < len(QSCHEMES) else "?"
    if scheme == "per_tensor_affine":
        e.update(qscheme=scheme, q_scale=info.q_scale, q_zero_point=info.q_zero_point)
    elif scheme:
        n = e["shape"][info.q_axis]
        e.update(qscheme=scheme, q_axis=info.q_axis, q_scales=tuple(info.q_scales[i] for i in range(n)),
                 q_zero_points=tuple(info.q_zero_points[i] for i in range(n)))
    return TensorEntry(**e)


def _list_keys(path):
    keys = new(KeyList)
    check(lib.tm_checkpoint_list_keys(encode(os.fspath(path)), ctypes.byref(keys)))
    try:
        return [keys.keys[i].decode("utf-8", "surrogateescape") for i in range(keys.n)]
    finally:
        lib.tm_key_list_free(ctypes.byref(keys))


def _safetensors_metadata(path):
    """__metadata__ of a .safetensors file (the library exposes values by key only)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 100_000_000:
                return {}
            header = json.loads(f.read(n))
        meta = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in meta.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def inspect(path, key=None) -> Inspection:
    """The tensors of a checkpoint (any format load reads) without reading their data."""
    path = os.fspath(path)
    try:
        ck = _Checkpoint(path, key)
    except TorchmergeError as err:
        if err.status != "TM_ERROR_AMBIGUOUS" or key is not None:
            raise
        cands = []
        for k in _list_keys(path):
            with _Checkpoint(path, k) as c:
                cands.append((k, int(lib.tm_checkpoint_n_tensors(c.handle))))
                fmt = c.text(lib.tm_checkpoint_format)
        return Inspection(path, fmt, "", [], {}, cands)
    with ck:
        tensors = [_entry(info) for _, info in ck.infos()]
        meta = _safetensors_metadata(path) if os.path.isfile(path) and path.endswith(".safetensors") else {}
        for k in METADATA_KEYS:
            v = lib.tm_checkpoint_metadata(ck.handle, k.encode())
            if v is not None:
                meta.setdefault(k, v.decode("utf-8", "replace"))
        return Inspection(path, ck.text(lib.tm_checkpoint_format), ck.text(lib.tm_checkpoint_key), tensors, meta)


# ---- load --------------------------------------------------------------------------------------

def _file_mappings():
    """[(start, end, file offset, inode, path)] of this process's file mappings."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, int(parts[2], 16), int(parts[4]), parts[5].rstrip("\n")))
    return out


class _FileViews:
    """Copy-on-write mappings of the files the library mapped, one per file, shared by the
    tensors that view them (each tensor keeps its mapping alive through its storage)."""

    def __init__(self):
        self.maps = _file_mappings()
        self.files = {}

    def locate(self, ptr, nbytes):
        """(mmap, offset in the file) for nbytes at ptr inside a mapping of a file, or None."""
        found = self._locate(ptr, nbytes)
        if found is None:  # a shard the library mapped after we listed the mappings
            self.maps = _file_mappings()
            found = self._locate(ptr, nbytes)
        return found

    def _locate(self, ptr, nbytes):
        for start, end, off, inode, path in self.maps:
            if start <= ptr and ptr + nbytes <= end:
                key = (path, inode)
                if key not in self.files:
                    try:
                        with open(path, "rb") as f:
                            if os.fstat(f.fileno()).st_ino != inode:
                                return None  # replaced since the library opened it
                            self.files[key] = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY)
                    except (OSError, ValueError):
                        return None
                return self.files[key], ptr - start + off
        return None


def _storage_tensor(info, dtype, views, mmap):
    """A 1-D tensor over the whole storage of info, of dtype."""
    size = torch.tensor([], dtype=dtype).element_size()
    count = int(info.storage_nbytes) // size
    if count == 0:
        return torch.empty(0, dtype=dtype)
    if mmap and views is not None and info.storage_data:
        where = views.locate(info.storage_data, count * size)
        if where is not None:
            buf, offset = where
            return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    t = torch.empty(count, dtype=dtype)
    ctypes.memmove(t.data_ptr(), info.storage_data, count * size)
    return t


def _quantized(entry, ints):
    """A quantized tensor as torch.load returns it, from its integers (a strided view)."""
    if entry.qscheme == "per_tensor_affine":
        # already quantized: load() viewed a quantized copy of the whole storage (per-tensor
        # quantized tensors keep strides and shared storages that way)
        return ints
    if entry.qscheme in ("per_channel_affine", "per_channel_affine_float_qparams"):
        scales = torch.tensor(entry.q_scales, dtype=torch.float64)
        zp_dtype = torch.float32 if entry.qscheme.endswith("float_qparams") else torch.int64
        zps = torch.tensor(entry.q_zero_points, dtype=zp_dtype)
        if entry.qscheme.endswith("float_qparams"):
            scales = scales.float()
        # per-channel quantized tensors are always contiguous in PyTorch (no strided views)
        return torch._make_per_channel_quantized_tensor(ints.contiguous(), scales, zps, entry.q_axis)
    raise TorchmergeError("tensor '%s': quantization scheme %s cannot be loaded" % (entry.name, entry.qscheme),
                          "TM_ERROR_UNSUPPORTED")


def load(path, key=None, mmap=True) -> Dict[str, torch.Tensor]:
    """Reads every tensor of a checkpoint into a dict name → tensor, in file order.

    Any format torchmerge reads: torch.save zip and legacy files, TorchScript modules,
    safetensors files, Hugging Face folders (sharded or not). The file's pickle is read by the
    library's own parser: no code in it ever runs, and files torch.load(weights_only=True) refuses
    (Lightning checkpoints with numpy values, whole pickled modules, legacy files) load too.
    key: the state dict inside a nested checkpoint ("state_dict", "model.ema"; found automatically
    when unambiguous). mmap=True: tensors are copy-on-write views of the file (see the module
    docstring; writing changes only this process's copy); mmap=False: private copies.
    Shapes, strides, storage offsets and dtypes are the file's; tensors that share a storage in
    the file share one in the result. nn.Parameters come back as plain tensors. Quantized tensors
    are returned as torch.load returns them (copies; per-channel ones contiguous).
    """
    path = os.fspath(path)
    out = {}
    with _Checkpoint(path, key) as ck:
        views = _FileViews() if mmap else None
        bases = {}
        for _, info in ck.infos():
            entry = _entry(info)
            dname = DTYPE_NAMES[info.dtype]
            quant = dname in _INT_REPR
            dtype = _INT_REPR[dname] if quant else entry.dtype
            bkey = (entry.storage_id, dname, entry.q_scale, entry.q_zero_point)
            if bkey not in bases:
                base = _storage_tensor(info, dtype, views, mmap)
                if quant and entry.qscheme == "per_tensor_affine":
                    base = torch._make_per_tensor_quantized_tensor(base, entry.q_scale, entry.q_zero_point)
                bases[bkey] = base
            base = bases[bkey]
            t = base.as_strided(entry.shape, entry.stride, entry.storage_offset)
            if quant:
                t = _quantized(entry, t)
            out[entry.name] = t
    return out
