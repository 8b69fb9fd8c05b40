"""Builders of hostile and broken checkpoints, byte by byte (nothing here unpickles anything).

Used by test_hostile.py. Every builder returns bytes; the pickles are hand-assembled from
opcodes so that they can say things no well-behaved writer would (negative shapes, memo
indexes never defined, one million nested lists, globals that run code).
"""
import io
import json
import shlex
import struct
import zipfile
import zlib

# ---- pickle opcodes ---------------------------------------------------------------------------

PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"
MARK, STOP, TUPLE, DICT, SETITEMS, REDUCE, BUILD = b"(", b".", b"t", b"d", b"u", b"R", b"b"
EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, APPEND, APPENDS = b"}", b"]", b")", b"a", b"e"
NONE, NEWTRUE, NEWFALSE, BINPERSID = b"N", b"\x88", b"\x89", b"Q"
TUPLE1, TUPLE2, TUPLE3 = b"\x85", b"\x86", b"\x87"
NEWOBJ, NEWOBJ_EX, STACK_GLOBAL, MEMOIZE = b"\x81", b"\x92", b"\x93", b"\x94"
INST, OBJ = b"i", b"o"


def s(text: str) -> bytes:
    """BINUNICODE"""
    b = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def short_s(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)"""
    b = text.encode("utf-8")
    assert len(b) < 256
    return b"\x8c" + bytes([len(b)]) + b


def i(x: int) -> bytes:
    if 0 <= x < 256:
        return b"K" + bytes([x])
    if 0 <= x < 65536:
        return b"M" + struct.pack("<H", x)
    if -2 ** 31 <= x < 2 ** 31:
        return b"J" + struct.pack("<i", x)
    n = (x.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + x.to_bytes(n, "little", signed=True)


def g(module: str, name: str) -> bytes:
    """GLOBAL"""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def put(n: int) -> bytes:
    return b"q" + bytes([n]) if n < 256 else b"r" + struct.pack("<I", n)


def get(n: int) -> bytes:
    return b"h" + bytes([n]) if n < 256 else b"j" + struct.pack("<I", n)


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    """A persistent id as torch.save writes it, loaded: ('storage', torch.<kind>, key, 'cpu', numel)."""
    return tup(s("storage"), g("torch", kind), s(key), s("cpu"), i(numel)) + BINPERSID


def tensor(key: str, numel: int, offset: int, size, stride, kind: str = "FloatStorage",
           fn: str = "_rebuild_tensor_v2") -> bytes:
    return (g("torch._utils", fn) + MARK + storage(key, numel, kind) + i(offset)
            + tup(*map(i, size)) + tup(*map(i, stride)) + NEWFALSE
            + g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE)


def state_dict(entries) -> bytes:
    """A protocol-2 pickle of {name: value_opcodes} (an empty dict, then SETITEMS)."""
    body = b"".join(s(k) + v for k, v in entries)
    return PROTO2 + EMPTY_DICT + (MARK + body + SETITEMS if entries else b"") + STOP


# ---- containers -------------------------------------------------------------------------------

def torch_zip(data_pkl: bytes, records=None, prefix="archive", pkl_compress=zipfile.ZIP_STORED,
              extra=()) -> bytes:
    """A zip laid out like torch.save's: PREFIX/data.pkl, PREFIX/data/KEY, PREFIX/version."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        def add(name, data, comp=zipfile.ZIP_STORED):
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = comp
            zf.writestr(zi, data)
        add(prefix + "/data.pkl", data_pkl, pkl_compress)
        for key, data in (records or {}).items():
            add(prefix + "/data/" + key, data)
        add(prefix + "/version", b"3\n")
        for name, data in extra:
            add(name, data)
    return buf.getvalue()


def floats(n: int) -> bytes:
    return struct.pack("<%df" % n, *[float(k) for k in range(n)])


def legacy_pt(obj_pickle: bytes, keys, records, sys_info=None, magic=None, version=1001) -> bytes:
    """A legacy torch.save file: magic, protocol version, sys_info, the object pickle, the key
    list, then per key an int64 element count and the raw bytes (records: (count, bytes))."""
    magic_pk = magic if magic is not None else PROTO2 + i(0x1950a86a20f9469cfc6c) + STOP
    info = sys_info if sys_info is not None else (
        PROTO2 + EMPTY_DICT + MARK + s("protocol_version") + i(1001) + s("little_endian") + NEWTRUE
        + s("type_sizes") + EMPTY_DICT + SETITEMS + STOP)
    out = magic_pk + PROTO2 + i(version) + STOP + info + obj_pickle
    out += PROTO2 + EMPTY_LIST + (MARK + b"".join(s(k) for k in keys) + APPENDS if keys else b"") + STOP
    for count, data in records:
        out += struct.pack("<q", count) + data
    return out


def legacy_storage(key: str, numel: int, kind="FloatStorage") -> bytes:
    return tup(s("storage"), g("torch", kind), s(key), s("cpu"), i(numel), NONE) + BINPERSID


def legacy_tensor(key, numel, offset, size, stride, kind="FloatStorage") -> bytes:
    return (g("torch._utils", "_rebuild_tensor_v2") + MARK + legacy_storage(key, numel, kind)
            + i(offset) + tup(*map(i, size)) + tup(*map(i, stride)) + NEWFALSE
            + g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE)


def safetensors(header, data: bytes, raw_header: bytes = None, length: int = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


# ---- raw zip records (for directories that zipfile would never write) ------------------------

def local_header(name: bytes, data: bytes, method=0, comp=None, size=None, crc=None) -> bytes:
    comp = len(data) if comp is None else comp
    size = len(data) if size is None else size
    crc = zlib.crc32(data) if crc is None else crc
    return struct.pack("<IHHHHHIIIHH", 0x04034b50, 20, 0, method, 0, 0, crc, comp, size,
                       len(name), 0) + name


def central_header(name: bytes, offset: int, data_len: int, size: int, method=0, crc=0,
                   comp=None) -> bytes:
    comp = data_len if comp is None else comp
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014b50, 20, 20, 0, method, 0, 0, crc, comp,
                       size, len(name), 0, 0, 0, 0, 0, offset) + name


def eocd(count: int, cd_size: int, cd_offset: int, comment=b"") -> bytes:
    return struct.pack("<IHHHHIIH", 0x06054b50, 0, 0, count, count, cd_size, cd_offset,
                       len(comment)) + comment


def raw_zip(members, cd_offset_delta=0, count=None, local_offsets=None, comp_sizes=None) -> bytes:
    """members: [(name, data, method, declared_size)] (declared_size -1: len(data)); the
    directory is derived from them, then the given fields are falsified: the directory's
    offset moved by cd_offset_delta, its entry count, each member's local header offset and
    compressed size."""
    out, cds = b"", []
    for k, (name, data, method, size) in enumerate(members):
        off = len(out)
        crc = zlib.crc32(data)
        real_size = size if size >= 0 else len(data)
        out += local_header(name, data, method, size=real_size, crc=crc) + data
        loc = local_offsets[k] if local_offsets else off
        comp = comp_sizes[k] if comp_sizes else len(data)
        cds.append(central_header(name, loc, len(data), real_size, method, crc, comp))
    cd = b"".join(cds)
    return out + cd + eocd(len(members) if count is None else count, len(cd), len(out) + cd_offset_delta)


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def deflate_zeros(n: int) -> bytes:
    """Raw deflate of n zero bytes, produced in chunks (never holds n bytes)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    out = []
    while n > 0:
        out.append(c.compress(chunk[:min(n, len(chunk))]))
        n -= len(chunk)
    out.append(c.flush())
    return b"".join(out)


def crc_zeros(n: int) -> int:
    crc, chunk = 0, bytes(1 << 20)
    while n > 0:
        crc = zlib.crc32(chunk[:min(n, len(chunk))], crc)
        n -= len(chunk)
    return crc


# ---- code-running pickles ----------------------------------------------------------------------

def touch(marker: str) -> str:
    return "touch " + shlex.quote(marker)


def evil_pickles(marker: str):
    """(name, global named in the refusal, pickle, runs) for every way a pickle can reach a
    global that runs code. runs: given to pickle.loads the pickle really creates marker (the
    others are refused the same way but would only build an object)."""
    cmd = touch(marker)
    argv = [s("touch"), s(marker)]
    lst = EMPTY_LIST + MARK + b"".join(argv) + APPENDS
    code = "__import__('os').system(%r)" % cmd
    yield "global_reduce_os_system", "os.system", PROTO2 + g("os", "system") + s(cmd) + TUPLE1 + REDUCE + STOP, True
    yield "global_reduce_posix_system", "posix.system", PROTO2 + g("posix", "system") + s(cmd) + TUPLE1 + REDUCE + STOP, True
    yield "stack_global_eval", "builtins.eval", (PROTO4 + short_s("builtins") + short_s("eval") + STACK_GLOBAL
                                                 + s(code) + TUPLE1 + REDUCE + STOP), True
    yield "stack_global_exec", "builtins.exec", (PROTO4 + short_s("builtins") + short_s("exec") + STACK_GLOBAL
                                                 + s(code) + TUPLE1 + REDUCE + STOP), True
    yield "global_py2_builtin_eval", "builtins.eval", PROTO2 + g("__builtin__", "eval") + s(code) + TUPLE1 + REDUCE + STOP, True
    yield "global_reduce_popen", "subprocess.Popen", PROTO2 + g("subprocess", "Popen") + lst + TUPLE1 + REDUCE + STOP, True
    yield "global_check_call", "subprocess.check_call", PROTO2 + g("subprocess", "check_call") + lst + TUPLE1 + REDUCE + STOP, True
    yield "inst_popen", "subprocess.Popen", (b"(" + b"(lp0\nVtouch\np1\naV" + marker.encode() + b"\np2\na"
                                             + b"isubprocess\nPopen\np3\n."), True
    yield "inst_os_system", "os.system", b"(V" + cmd.encode() + b"\nios\nsystem\n.", True
    yield "obj_popen", "subprocess.Popen", PROTO2 + MARK + g("subprocess", "Popen") + lst + OBJ + STOP, True
    yield "obj_os_system", "os.system", PROTO2 + MARK + g("os", "system") + s(cmd) + OBJ + STOP, True
    # NEWOBJ only calls cls.__new__: a functools.partial built that way, then called by REDUCE.
    yield "newobj_partial_system", "os.system", (PROTO2 + g("functools", "partial") + g("os", "system") + s(cmd)
                                                 + TUPLE2 + NEWOBJ + EMPTY_TUPLE + REDUCE + STOP), True
    yield "newobj_ex_partial_popen", "subprocess.Popen", (PROTO4 + short_s("functools") + short_s("partial")
                                                          + STACK_GLOBAL + short_s("subprocess") + short_s("Popen")
                                                          + STACK_GLOBAL + lst + TUPLE2 + EMPTY_DICT + NEWOBJ_EX
                                                          + EMPTY_TUPLE + REDUCE + STOP), True
    yield "newobj_popen_class", "subprocess.Popen", PROTO2 + g("subprocess", "Popen") + lst + TUPLE1 + NEWOBJ + STOP, False
    yield "getattr_import", "builtins.getattr", (PROTO2 + g("builtins", "getattr") + MARK + g("builtins", "__import__")
                                                 + s("os") + TUPLE1 + REDUCE + s("system") + TUPLE + REDUCE
                                                 + s(cmd) + TUPLE1 + REDUCE + STOP), True
    yield "reduce_in_state_dict", "os.system", (PROTO2 + EMPTY_DICT + s("weight") + g("os", "system")
                                                + s(cmd) + TUPLE1 + REDUCE + b"s" + STOP), True
    yield "build_state_system", "os.system", (PROTO2 + g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
                                              + g("os", "system") + s(cmd) + TUPLE1 + REDUCE + BUILD + STOP), True
