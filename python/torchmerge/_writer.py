"""torchmerge.save: a state dict of tensors to safetensors, a sharded Hugging Face folder or .pt.

The library has no public call that writes tensors held by the caller (tm_state_dict_save needs
LibTorch's ATen tensors, i.e. a second LibTorch in a Python process that already has one). So:
- .safetensors is written here (the format is a JSON header and the raw bytes; written to a
  temporary file beside the output and renamed, as the library's writers do);
- .pt and folders go through the library's own writers: the state dict is written as a temporary
  safetensors file beside the output, which tm_merge_files turns into the output as the merge of
  one input (simple_average: each floating value times exactly 1 in float64, rounded back to its
  own dtype — the same value; other tensors are copied byte for byte), then the temporary file
  is removed. The .pt is what torchmerge merges write: torch.load(weights_only=True) reads it.
"""
import json
import os
import tempfile

import torch

from ._lib import TorchmergeError

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.complex64: "C64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _check_tensors(state_dict):
    items = list(state_dict.items())
    for name, t in items:
        if not isinstance(name, str):
            raise TorchmergeError("state dict key %r: keys must be strings" % (name,), "TM_ERROR_INVALID_ARGUMENT")
        if not isinstance(t, torch.Tensor):
            raise TorchmergeError("tensor '%s': not a tensor (%s)" % (name, type(t).__name__),
                                  "TM_ERROR_INVALID_ARGUMENT")
        if t.is_quantized or t.dtype not in _ST_DTYPES:
            raise TorchmergeError("tensor '%s': dtype %s cannot be saved (safetensors has no such dtype)"
                                  % (name, t.dtype), "TM_ERROR_UNSUPPORTED")
        if t.layout != torch.strided:
            raise TorchmergeError("tensor '%s': only dense tensors can be saved, not %s" % (name, t.layout),
                                  "TM_ERROR_UNSUPPORTED")
    return items


def _write_safetensors(items, path, metadata):
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for _, t in items:
                if t.numel():
                    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                    f.write(memoryview(flat.numpy()))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _is_folder(path):
    return os.path.isdir(path) or str(path).endswith("/")


def save(state_dict, path, format=None, metadata=None, max_shard_size=None):
    """Writes state_dict (name → tensor) to path.

    format: "safetensors", "pt" or None (from path: *.safetensors → safetensors; an existing
    folder or a path ending in '/' → a sharded Hugging Face folder of safetensors shards with
    model.safetensors.index.json, max_shard_size bytes per shard at most, e.g. "2GB"; else pt).
    metadata: str → str recorded in a safetensors file's __metadata__ (safetensors files only).
    Tensors are written contiguous; storages shared between keys are written once per key.
    """
    path = os.fspath(path)
    if format not in (None, "pt", "safetensors"):
        raise TorchmergeError("format: expected pt or safetensors, got '%s'" % format, "TM_ERROR_INVALID_ARGUMENT")
    folder = _is_folder(path)
    if format is None:
        format = "safetensors" if folder or path.endswith(".safetensors") else "pt"
    if folder and format == "pt":
        raise TorchmergeError("%s: a folder output is written as safetensors shards, not pt" % path,
                              "TM_ERROR_INVALID_ARGUMENT")
    if metadata and (format != "safetensors" or folder):
        raise TorchmergeError("%s: metadata is recorded in safetensors files only" % path,
                              "TM_ERROR_INVALID_ARGUMENT")
    items = _check_tensors(state_dict)
    if format == "safetensors" and not folder:
        _write_safetensors(items, path, metadata)
        return
    from ._merge import merge  # the library's writers (see the module docstring)
    parent = os.path.dirname(os.path.abspath(path.rstrip("/") or path))
    fd, tmp = tempfile.mkstemp(prefix=".torchmerge-save.", suffix=".safetensors", dir=parent)
    os.close(fd)
    try:
        _write_safetensors(items, tmp, None)
        merge([tmp], path, method="simple_average", format=format, max_shard_size=max_shard_size, progress=False,
              quiet=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
