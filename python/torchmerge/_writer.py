"""torchmerge.save: a state dict of tensors to safetensors, a sharded Hugging Face folder or .pt.

The library has no public call that writes tensors held by the caller (tm_state_dict_save needs
LibTorch's ATen tensors, i.e. a second LibTorch in a Python process that already has one). So:
- safetensors files and folders are written here (the format is a JSON header and the raw bytes;
  a folder holds model.safetensors, or model-0000i-of-0000n.safetensors shards with
  model.safetensors.index.json, packed in order as the library's folder writer packs them).
  Files go to a temporary name beside the output and are renamed, as the library's writers do.
  Writing folders here rather than through tm_merge_files keeps the caller's metadata and does
  not record a merge that never happened (torchmerge_method, torchmerge_inputs).
- .pt goes through the library's own writer: the state dict is written as a temporary
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


def _byte_size(value):
    if value is None:
        return 5 << 30  # the library's default (tm_merge_options.max_shard_size 0)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    import ctypes
    from ._lib import check, lib
    size = ctypes.c_uint64()
    try:
        check(lib.tm_byte_size_parse(str(value).encode(), ctypes.byref(size)))
    except TorchmergeError as err:
        raise TorchmergeError("max_shard_size: %s" % err, err.status) from None
    return size.value


def _write_folder(items, folder, metadata, max_shard_size):
    """Shards in order, a new one when the next tensor would pass max_shard_size (a larger tensor
    gets a shard of its own), into a temporary folder beside folder, then moved in."""
    limit = _byte_size(max_shard_size)
    shards, cur = [], 0
    for name, t in items:
        n = t.numel() * t.element_size()
        if not shards or (cur > 0 and cur + n > limit):
            shards.append([])
            cur = 0
        shards[-1].append((name, t))
        cur += n
    if not shards:
        shards = [[]]
    folder = folder.rstrip("/") or folder
    parent = os.path.dirname(os.path.abspath(folder))
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".", dir=parent)
    try:
        names = (["model.safetensors"] if len(shards) == 1 else
                 ["model-%05d-of-%05d.safetensors" % (i + 1, len(shards)) for i in range(len(shards))])
        meta = dict(metadata or {})
        meta.setdefault("format", "pt")  # what transformers expects of a torch checkpoint's shards
        for shard, name in zip(shards, names):
            _write_safetensors(shard, os.path.join(tmp, name), meta)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for _, t in items)},
                     "weight_map": {k: name for shard, name in zip(shards, names) for k, _ in shard}}
            names.append("model.safetensors.index.json")
            with open(os.path.join(tmp, names[-1]), "w") as f:
                json.dump(index, f, indent=2)
        if not os.path.isdir(folder):
            os.rename(tmp, folder)
            return
        # An existing folder keeps its other files (config, tokenizer); earlier weights go.
        for old in os.listdir(folder):
            if old not in names and (old == "model.safetensors" or old == "model.safetensors.index.json"
                                     or (old.startswith("model-") and old.endswith(".safetensors"))):
                os.unlink(os.path.join(folder, old))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        os.rmdir(tmp)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(state_dict, path, format=None, metadata=None, max_shard_size=None):
    """Writes state_dict (name → tensor) to path.

    format: "safetensors", "pt" or None (from path: *.safetensors → safetensors; an existing
    folder or a str path ending in '/' → a Hugging Face folder: model.safetensors, or shards of
    at most max_shard_size bytes ("2GB", "500MiB" or an int; default 5GiB) with
    model.safetensors.index.json; else pt). metadata: str → str recorded in safetensors
    __metadata__ (each shard's, for a folder). Tensors are written contiguous; a storage shared
    by several keys is written once per key.
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
    if metadata and format != "safetensors":
        raise TorchmergeError("%s: metadata is recorded in safetensors outputs only" % path,
                              "TM_ERROR_INVALID_ARGUMENT")
    items = _check_tensors(state_dict)
    if folder:
        _write_folder(items, path, metadata, max_shard_size)
        return
    if format == "safetensors":
        _write_safetensors(items, path, metadata)
        return
    from ._merge import merge  # the library's .pt writer (see the module docstring)
    fd, tmp = tempfile.mkstemp(prefix=".torchmerge-save.", suffix=".safetensors",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        _write_safetensors(items, tmp, None)
        merge([tmp], path, method="simple_average", format="pt", progress=False, quiet=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
