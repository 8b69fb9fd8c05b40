"""libtorchmerge.so through ctypes: finding it, the C structs of include/torchmerge.h, and errors.

Every struct below mirrors the header field for field (same order, same C types), so ctypes
lays it out as the C compiler does; struct_size is always set to ctypes.sizeof of our copy, so
the library reads and writes exactly the fields we know (the header's growing-struct rule).
"""
import ctypes
import os
import shutil

__all__ = ["TorchmergeError", "lib", "check", "find_cli"]

SONAME = "libtorchmerge.so"


class TorchmergeError(RuntimeError):
    """A failure reported by libtorchmerge: the one-line message of tm_errmsg() (naming the file
    and, where one is involved, the tensor or the parameter). status is the tm_status name
    ("TM_ERROR_MISMATCH", ...)."""

    def __init__(self, message, status="TM_ERROR_INTERNAL"):
        super().__init__(message)
        self.status = status


# ---- C types ------------------------------------------------------------------------------

c_size_t, c_int, c_int32, c_int64, c_uint64, c_double = (ctypes.c_size_t, ctypes.c_int, ctypes.c_int32,
                                                          ctypes.c_int64, ctypes.c_uint64, ctypes.c_double)
c_char_p, c_void_p = ctypes.c_char_p, ctypes.c_void_p
P = ctypes.POINTER


class TensorInfo(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("name", c_char_p), ("dtype", c_int), ("ndim", c_int32),
                ("shape", P(c_int64)), ("stride", P(c_int64)), ("storage_offset", c_int64),
                ("storage_data", c_void_p), ("storage_nbytes", c_uint64), ("storage_id", c_int64),
                ("numel", c_uint64), ("nbytes", c_uint64), ("qscheme", c_int), ("q_scale", c_double),
                ("q_zero_point", c_int64), ("q_axis", c_int32), ("q_scales", P(c_double)),
                ("q_zero_points", P(c_double))]


class OpenOptions(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("key", c_char_p)]


class KeyList(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("n", c_size_t), ("keys", P(c_char_p))]


class Profile(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("load_seconds", c_double), ("merge_seconds", c_double),
                ("save_seconds", c_double), ("load_calls", c_uint64), ("merge_calls", c_uint64),
                ("save_calls", c_uint64)]


class MethodParamInfo(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("name", c_char_p), ("aliases", P(c_char_p)), ("kind", c_int),
                ("per_input", c_int), ("exactly_per_input", c_int), ("required", c_int),
                ("default_value", c_char_p), ("min", c_double), ("max", c_double), ("min_exclusive", c_int),
                ("max_exclusive", c_int), ("choices", c_char_p), ("help", c_char_p)]


class MethodInfo(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("name", c_char_p), ("aliases", P(c_char_p)), ("summary", c_char_p),
                ("needs_base", c_int), ("min_inputs", c_size_t), ("max_inputs", c_size_t), ("n_params", c_size_t)]


class Param(ctypes.Structure):
    _fields_ = [("name", c_char_p), ("text", c_char_p), ("numbers", P(c_double)), ("n_numbers", c_size_t)]


PROGRESS_FN = ctypes.CFUNCTYPE(None, c_void_p, c_size_t, c_size_t)
WARNING_FN = ctypes.CFUNCTYPE(None, c_void_p, c_char_p)
INCLUDE_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_char_p)
TENSOR_PARAM_FN = ctypes.CFUNCTYPE(None, c_void_p, c_char_p, c_char_p, c_size_t, P(c_double))


class MergeOptions(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("method", c_char_p), ("params", P(Param)), ("n_params", c_size_t),
                ("format", c_int), ("template_path", c_char_p), ("has_dtype", c_int), ("dtype", c_int),
                ("keys", c_int), ("key", c_char_p), ("progress", PROGRESS_FN), ("progress_user", c_void_p),
                ("warning", WARNING_FN), ("warning_user", c_void_p), ("profile", P(Profile)),
                ("max_shard_size", c_uint64), ("recipe_text", c_char_p), ("include_tensor", INCLUDE_FN),
                ("tensor_param", TENSOR_PARAM_FN), ("rules_user", c_void_p), ("base", c_char_p),
                ("masks_out", c_char_p), ("dequantize", c_int)]


class GreedyIngredient(ctypes.Structure):
    _fields_ = [("input", c_size_t), ("score", c_double), ("soup_score", c_double), ("kept", c_int)]


class GreedyReport(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("n", c_size_t), ("tried", P(GreedyIngredient)), ("n_kept", c_size_t),
                ("final_score", c_double)]


class TensorData(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("dtype", c_int), ("ndim", c_int32), ("shape", P(c_int64)),
                ("stride", P(c_int64)), ("data", c_void_p)]


def new(struct):
    """A zeroed struct with struct_size set (what the *_init functions do)."""
    s = struct()
    s.struct_size = ctypes.sizeof(struct)
    return s


# tm_dtype, in the header's order (TM_DTYPE_LIST).
DTYPE_NAMES = ["float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32", "int16",
               "int8", "uint8", "bool", "qint8", "quint8", "qint32"]
FORMATS = {None: 0, "auto": 0, "pt": 1, "torchscript": 2, "safetensors": 3}
KEY_POLICIES = {"strict": 0, "intersection": 1, "union": 2}
QSCHEMES = [None, "per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams"]
PARAM_KINDS = ["number", "integer", "bool", "choice"]

# ---- finding and loading the library --------------------------------------------------------


def _generated_paths():
    """(lib_dir, bin_dir) recorded in _paths.py by the build (build tree) or by cmake --install."""
    try:
        from . import _paths  # written by CMake; absent in the source tree
    except ImportError:
        return None, None
    return getattr(_paths, "LIB_DIR", None), getattr(_paths, "BIN_DIR", None)


def library_dirs():
    """Where libtorchmerge.so is looked for, in order: $TORCHMERGE_LIB_DIR, then the folder
    _paths.py records (the build tree, or the install prefix's lib folder)."""
    dirs = []
    if os.environ.get("TORCHMERGE_LIB_DIR"):
        dirs.append(os.environ["TORCHMERGE_LIB_DIR"])
    lib_dir, _ = _generated_paths()
    if lib_dir:
        dirs.append(lib_dir)
    return dirs


def _load():
    tried = []
    for d in library_dirs():
        path = os.path.join(d, SONAME)
        if os.path.exists(path):
            return ctypes.CDLL(path)
        tried.append(path)
    try:  # installed in a folder the dynamic loader searches (ldconfig, LD_LIBRARY_PATH)
        return ctypes.CDLL(SONAME)
    except OSError:
        tried.append(SONAME + " on the loader's path")
    raise ImportError("torchmerge: cannot find %s (tried %s); set TORCHMERGE_LIB_DIR to the folder that holds it"
                      % (SONAME, ", ".join(tried)))


def _declare(L):
    sig = {
        "tm_errmsg": (c_char_p, []),
        "tm_status_name": (c_char_p, [c_int]),
        "tm_version": (c_char_p, []),
        "tm_checkpoint_open": (c_int, [c_char_p, P(OpenOptions), P(c_void_p)]),
        "tm_checkpoint_free": (None, [c_void_p]),
        "tm_checkpoint_format": (c_char_p, [c_void_p]),
        "tm_checkpoint_path": (c_char_p, [c_void_p]),
        "tm_checkpoint_key": (c_char_p, [c_void_p]),
        "tm_checkpoint_n_tensors": (c_size_t, [c_void_p]),
        "tm_checkpoint_tensor": (c_int, [c_void_p, c_size_t, P(TensorInfo)]),
        "tm_checkpoint_metadata": (c_char_p, [c_void_p, c_char_p]),
        "tm_checkpoint_read": (c_int, [c_void_p, c_size_t, c_void_p, c_size_t]),
        "tm_checkpoint_list_keys": (c_int, [c_char_p, P(KeyList)]),
        "tm_key_list_free": (None, [P(KeyList)]),
        "tm_method_count": (c_size_t, []),
        "tm_method_get": (c_int, [c_size_t, P(MethodInfo)]),
        "tm_method_find": (c_int64, [c_char_p]),
        "tm_method_param": (c_int, [c_size_t, c_size_t, P(MethodParamInfo)]),
        "tm_byte_size_parse": (c_int, [c_char_p, P(c_uint64)]),
        "tm_merge_files": (c_int, [P(c_char_p), c_size_t, c_char_p, P(MergeOptions)]),
        "tm_merge_tensors": (c_int, [P(TensorData), c_size_t, P(TensorData), c_char_p, P(MergeOptions), c_int,
                                     c_void_p]),
        "tm_merge_recipe": (c_int, [c_char_p, c_int, P(c_char_p), c_size_t, P(MergeOptions)]),
        "tm_greedy_soup": (c_int, [P(c_char_p), c_size_t, c_char_p, c_char_p, P(MergeOptions), P(GreedyReport)]),
        "tm_greedy_report_free": (None, [P(GreedyReport)]),
    }
    for name, (res, args) in sig.items():
        f = getattr(L, name)
        f.restype, f.argtypes = res, args
    return L


lib = _declare(_load())


def check(status):
    """Raises TorchmergeError with tm_errmsg() when status is not TM_OK."""
    if status != 0:
        msg = (lib.tm_errmsg() or b"").decode("utf-8", "replace")
        name = (lib.tm_status_name(status) or b"?").decode()
        raise TorchmergeError(msg or name, name)


def encode(path):
    return os.fsencode(path) if path is not None else None


def find_cli():
    """The torchmerge program: $TORCHMERGE_BIN, the one beside the library (build tree) or in
    the install prefix's bin folder, else the first on PATH."""
    candidates = []
    if os.environ.get("TORCHMERGE_BIN"):
        candidates.append(os.environ["TORCHMERGE_BIN"])
    lib_dir, bin_dir = _generated_paths()
    if bin_dir:
        candidates.append(os.path.join(bin_dir, "torchmerge"))
    for d in library_dirs():
        candidates += [os.path.join(d, "torchmerge"), os.path.join(d, os.pardir, "bin", "torchmerge")]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    found = shutil.which("torchmerge")
    if found:
        return found
    raise TorchmergeError("cannot find the torchmerge program (tried %s and PATH); set TORCHMERGE_BIN"
                          % ", ".join(candidates or ["nothing"]), "TM_ERROR_NOT_FOUND")
