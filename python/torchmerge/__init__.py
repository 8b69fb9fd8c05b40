"""torchmerge from Python: a safe, zero-copy checkpoint reader, and the merge engine.

    import torchmerge
    sd = torchmerge.load("model.ckpt")                      # no pickle code runs; mmapped
    torchmerge.merge(["a.pt", "b.pt"], "soup.safetensors", method="ties",
                     base="base.pt", density=0.2, lambda_=1.0)
    soup = torchmerge.merge_state_dicts([sd_a, sd_b], weights=[0.3, 0.7])

How it reaches the library: ctypes over the C API of libtorchmerge.so (include/torchmerge.h),
not the PyTorch operator library (libtorchmerge_ops.so). Why:
- The reader is only in the C API: tm_checkpoint_* hands out each tensor's dtype, shape, strides,
  storage offset, storage identity and a pointer into the mapped file, which load() needs to
  return zero-copy views with torch.load's layout and shared storages; the ops take tensors
  that are already in memory. merge(), run_recipe() and inspect() are C calls too.
- libtorchmerge.so does not link LibTorch, while libtorchmerge_ops.so is a C++ extension built
  against one LibTorch: loading it into a Python whose torch is another version (any pip wheel)
  fails or crashes. Over the C API the package works with whichever torch the user has.
- merge_state_dicts() calls tm_merge_tensors, the function the ops' merge kernels call, so the
  results are the same bits as torch.ops.torchmerge.merge and as a file merge of each tensor.
The ops library stays the route for TorchScript and autograd (torch.ops.torchmerge.*).

The library is found through $TORCHMERGE_LIB_DIR, else the folder recorded in _paths.py
(written by the build into build/python/torchmerge, and by `cmake --install`), else the dynamic
loader's search path. `python3 -m torchmerge ...` runs the torchmerge program.
"""
from ._lib import TorchmergeError, find_cli, lib as _cdll
from ._merge import (GreedySoupReport, GreedyStep, Method, MethodParameter, TorchmergeWarning, greedy_soup, merge,
                     merge_state_dicts, methods, run_recipe)
from ._reader import Inspection, TensorEntry, inspect, load
from ._writer import save

__version__ = _cdll.tm_version().decode()
__all__ = ["load", "save", "inspect", "merge", "merge_state_dicts", "run_recipe", "greedy_soup", "methods",
           "find_cli", "TorchmergeError", "TorchmergeWarning", "Inspection", "TensorEntry", "Method",
           "MethodParameter", "GreedySoupReport", "GreedyStep"]
