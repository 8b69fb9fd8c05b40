/* Safe unpickler, the allowlist of globals: a global a pickle names is refused when it could
 * run code in a real unpickler (so a hostile file is reported as such instead of being read
 * half-way), understood when torch checkpoints need its meaning (OrderedDict, the tensor
 * rebuild functions, storage types, dtypes, copyreg, _codecs.encode, dill's data helpers), and
 * otherwise kept as an inert placeholder (so e.g. an argparse.Namespace or a numpy array beside
 * the tensors does not stop a load).
 * What a recognised global does when called is in pickle_calls.c and pickle_tensors.c. */
#define _POSIX_C_SOURCE 200809L

#include "formats/pickle_internal.h"

#include <string.h>

/* ---- Globals: what is refused, what is understood ------------------------------------ */

/* Modules a pickle can use to run code, start processes, touch files or the network, or load
 * further pickles/code. No checkpoint needs them; seeing one means the file was crafted to
 * attack a real unpickler, so it is refused even though we would never call it. Submodules
 * (os.path, importlib.util, …) are covered too. */
static const char *const denied_modules[] = {
    "os", "posix", "nt", "posixpath", "ntpath",   /* os.system, os.popen, os.exec*, … */
    "subprocess", "_posixsubprocess", "commands", "popen2", "pty", /* process spawning */
    "sys",                                         /* sys.modules, sys.settrace, … */
    "shutil", "tempfile", "io", "_io", "shelve",   /* file access (shelve also unpickles) */
    "socket", "ssl", "http", "urllib", "urllib2", "ftplib", "smtplib", "telnetlib",
    "webbrowser", "requests",                      /* network */
    "importlib", "imp", "pkgutil", "zipimport", "runpy", "site", /* importing arbitrary code */
    "pickle", "_pickle", "cPickle", "marshal", "dill", "cloudpickle", /* nested unpickling */
    "code", "codeop", "pdb", "bdb", "timeit", "trace", "profile", "cProfile", "doctest",
    "pydoc", /* evaluate source text */
    "types",                                       /* FunctionType/CodeType build code */
    "operator",                                    /* attrgetter/methodcaller act as getattr */
    "ctypes", "_ctypes",                           /* raw memory, foreign calls */
    "multiprocessing", "concurrent", "threading", "_thread", "asyncio", "signal",
    "platform",                                    /* platform.popen */
    "distutils", "setuptools", "pip", "ensurepip", "venv", /* run build/install commands */
    "torch.hub", "torch.serialization",            /* download code / load nested pickles */
    "numpy.testing",                               /* numpy.testing...runstring execs text */
};

/* Builtins a pickle may name: plain constructors of inert data. Everything else in builtins
 * (eval, exec, compile, open, getattr, setattr, __import__, globals, vars, input, …) either
 * runs code or reaches arbitrary attributes. The Python 2 aliases are what protocol 0–2 pickles
 * written by Python 2 name. */
static const char *const allowed_builtins[] = {
    "set", "frozenset", "slice", "bytearray", "complex", "range", "int", "float", "str",
    "bytes", "bool", "list", "dict", "tuple", "object",
    "xrange", "unicode", "long", "basestring", /* Python 2 spellings */
};

/* A name segment (module or dotted attribute path) naming one of these reaches code execution
 * even from an innocent module (protocol 4 resolves "mod.os.system"-style paths attribute by
 * attribute). Leading underscores are ignored ("_os" is how many modules import os). */
static const char *const denied_segments[] = {
    "eval", "exec", "execfile", "compile", "open", "getattr", "setattr", "delattr", "system",
    "popen", "spawn", "import_module", "globals", "locals", "vars", "builtins", "__builtin__",
    "breakpoint",
};

static int module_denied(const char *m) {
    for (size_t i = 0; i < sizeof denied_modules / sizeof denied_modules[0]; i++) {
        size_t n = strlen(denied_modules[i]);
        if (strncmp(m, denied_modules[i], n) == 0 && (m[n] == 0 || m[n] == '.')) return 1;
    }
    return 0;
}

static int segment_denied(const char *s, size_t n) {
    while (n && *s == '_') { s++; n--; }
    for (size_t i = 0; i < sizeof denied_segments / sizeof denied_segments[0]; i++) {
        const char *d = denied_segments[i];
        while (*d == '_') d++;
        if (strlen(d) == n && memcmp(s, d, n) == 0) return 1;
    }
    for (size_t i = 0; i < sizeof denied_modules / sizeof denied_modules[0]; i++)
        if (!strchr(denied_modules[i], '.') && strlen(denied_modules[i]) == n &&
            memcmp(s, denied_modules[i], n) == 0)
            return 1;
    return 0;
}

static int is_dunder(const char *s, size_t n) {
    return n >= 4 && s[0] == '_' && s[1] == '_' && s[n - 2] == '_' && s[n - 1] == '_';
}

/* dill (denied as a module: its loader rebuilds code objects and functions) also writes plain
 * data through helpers that some RL libraries' checkpoints are full of: numpy arrays through
 * _create_array(f, args, state, npdict), builtin types through _load_type(name) (whose name is
 * checked when it is called: pickle_calls.c), numpy dtype classes through _create_dtypemeta.
 * They stay inert placeholders like numpy's own globals. "dill.dill" is dill < 0.3's module. */
static int dill_allowed(const char *module, const char *name) {
    static const char *const names[] = {"_create_array", "_load_type", "_create_dtypemeta"};
    if (strcmp(module, "dill._dill") != 0 && strcmp(module, "dill.dill") != 0) return 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(name, names[i]) == 0) return 1;
    return 0;
}

/* Returns 1 when (module, name) must be refused. name is the attribute path after the module. */
static int global_unsafe(const char *module, const char *name) {
    if (dill_allowed(module, name)) return 0;
    if (module_denied(module)) return 1;
    if (strcmp(module, "builtins") == 0) {
        for (size_t i = 0; i < sizeof allowed_builtins / sizeof allowed_builtins[0]; i++)
            if (strcmp(name, allowed_builtins[i]) == 0) return 0;
        return 1;
    }
    if (strcmp(module, "copyreg") == 0 &&
        (strcmp(name, "__newobj__") == 0 || strcmp(name, "__newobj_ex__") == 0))
        return 0; /* what protocol-2 object creation is defined as; we only use its meaning */
    /* Dunder attributes (__globals__, __builtins__, __class__, __subclasses__, __reduce__, …)
     * are the classic way from an innocent object to arbitrary code. Module names are exempt:
     * TorchScript classes live in "__torch__", scripts' classes in "__main__". */
    const char *seg = name;
    for (;;) {
        const char *dot = strchr(seg, '.');
        size_t n = dot ? (size_t)(dot - seg) : strlen(seg);
        if (is_dunder(seg, n)) return 1;
        if (dot && segment_denied(seg, n)) return 1; /* "os.system" inside another module */
        if (!dot) break;
        seg = dot + 1;
    }
    /* Module paths are not checked segment by segment: a module must be importable as such
     * ("argparse._os" is not), and torch's own "torch.jit._pickle" would look like "pickle". */
    return 0;
}

static const struct { const char *name; tm_dtype dtype; } storage_types[] = {
    {"DoubleStorage", TM_FLOAT64},        {"FloatStorage", TM_FLOAT32},
    {"HalfStorage", TM_FLOAT16},          {"BFloat16Storage", TM_BFLOAT16},
    {"LongStorage", TM_INT64},            {"IntStorage", TM_INT32},
    {"ShortStorage", TM_INT16},           {"CharStorage", TM_INT8},
    {"ByteStorage", TM_UINT8},            {"BoolStorage", TM_BOOL},
    {"ComplexFloatStorage", TM_COMPLEX64}, {"ComplexDoubleStorage", TM_COMPLEX128},
    {"QInt8Storage", TM_QINT8},           {"QUInt8Storage", TM_QUINT8},
    {"QInt32Storage", TM_QINT32},
};

static const struct { const char *name; tm_dtype dtype; } dtype_globals[] = {
    {"float64", TM_FLOAT64}, {"float32", TM_FLOAT32},   {"float16", TM_FLOAT16},
    {"bfloat16", TM_BFLOAT16}, {"int64", TM_INT64},     {"int32", TM_INT32},
    {"int16", TM_INT16},     {"int8", TM_INT8},         {"uint8", TM_UINT8},
    {"bool", TM_BOOL},       {"complex64", TM_COMPLEX64}, {"complex128", TM_COMPLEX128},
    {"qint8", TM_QINT8},     {"quint8", TM_QUINT8},     {"qint32", TM_QINT32},
};

/* The globals with a meaning, by exact (module, name). Three families are matched by rule
 * instead (classify_global): storage types, torch.jit._pickle.build_*, and dtypes. */
static const struct { const char *module, *name; special sp; } meanings[] = {
    {"torch._utils", "_rebuild_tensor", SP_REBUILD_V1},
    {"torch._utils", "_rebuild_tensor_v2", SP_REBUILD_V2},
    {"torch._utils", "_rebuild_tensor_v3", SP_REBUILD_V3},
    {"torch._utils", "_rebuild_parameter", SP_REBUILD_PARAM},
    {"torch._utils", "_rebuild_parameter_with_state", SP_REBUILD_PARAM_STATE},
    {"torch._utils", "_rebuild_qtensor", SP_REBUILD_QTENSOR},
    {"torch._utils", "_rebuild_from_type_v2", SP_FROM_TYPE_V2},
    {"torch._tensor", "_rebuild_from_type_v2", SP_FROM_TYPE_V2},
    {"torch", "UntypedStorage", SP_UNTYPED_STORAGE},
    {"torch", "_UntypedStorage", SP_UNTYPED_STORAGE},
    {"torch.storage", "UntypedStorage", SP_UNTYPED_STORAGE},
    {"torch.storage", "_UntypedStorage", SP_UNTYPED_STORAGE},
    {"torch", "Size", SP_TORCH_SIZE},
    {"torch.nn.parameter", "Parameter", SP_PARAMETER_CLASS},
    {"torch.jit._pickle", "restore_type_tag", SP_FIRST_ARG},
    {"collections", "OrderedDict", SP_ODICT},
    {"_codecs", "encode", SP_ENCODE},
    {"copyreg", "_reconstructor", SP_RECONSTRUCTOR},
    {"copyreg", "__newobj__", SP_NEWOBJ_FN},
    {"copyreg", "__newobj_ex__", SP_NEWOBJ_EX_FN},
    {"builtins", "set", SP_SET},
    {"builtins", "frozenset", SP_FROZENSET},
    {"builtins", "bytes", SP_BYTES},
    {"builtins", "bytearray", SP_BYTEARRAY},
    {"builtins", "dict", SP_DICT},
    {"builtins", "list", SP_LIST},
    {"builtins", "tuple", SP_TUPLE},
    {"dill._dill", "_load_type", SP_DILL_LOAD_TYPE},
    {"dill.dill", "_load_type", SP_DILL_LOAD_TYPE},
};

static void classify_global(node *g, const char *m, const char *n) {
    int sp = SP_NONE;
    g->dtype = -1;
    for (size_t i = 0; i < sizeof meanings / sizeof meanings[0]; i++)
        if (strcmp(m, meanings[i].module) == 0 && strcmp(n, meanings[i].name) == 0) {
            sp = meanings[i].sp;
            break;
        }
    if (sp == SP_NONE && (strcmp(m, "torch") == 0 || strcmp(m, "torch.cuda") == 0))
        for (size_t i = 0; i < sizeof storage_types / sizeof storage_types[0]; i++)
            if (strcmp(n, storage_types[i].name) == 0) {
                sp = SP_STORAGE_TYPE;
                g->dtype = (int8_t)storage_types[i].dtype;
            }
    if (sp == SP_NONE && strcmp(m, "torch.jit._pickle") == 0 && strncmp(n, "build_", 6) == 0)
        sp = SP_FIRST_ARG;
    if (sp == SP_NONE && strcmp(m, "torch") == 0) {
        /* Any other torch.X may be a dtype (torch.qint8, torch.complex32, …): only its use as
         * a dtype decides, so mark it and keep the name for the message. */
        sp = SP_DTYPE;
        for (size_t i = 0; i < sizeof dtype_globals / sizeof dtype_globals[0]; i++)
            if (strcmp(n, dtype_globals[i].name) == 0) g->dtype = (int8_t)dtype_globals[i].dtype;
    }
    g->special = (uint8_t)sp;
}

/* GLOBAL / STACK_GLOBAL / INST: validates, refuses, classifies. */
tm_status pk_make_global(parser *p, const char *m, size_t mlen, const char *n, size_t nlen,
                         tm_pk_value **out) {
    if (!mlen || !nlen || memchr(m, 0, mlen) || memchr(n, 0, nlen))
        return pk_err(p, TM_ERROR_FORMAT, "invalid global name");
    /* Python 2 module names, as Python's unpickler maps them (fix_imports). */
    if (mlen == 11 && memcmp(m, "__builtin__", 11) == 0) { m = "builtins"; mlen = 8; }
    else if (mlen == 8 && memcmp(m, "copy_reg", 8) == 0) { m = "copyreg"; mlen = 7; }
    char *ms = NULL, *ns = NULL;
    TRY(pk_strdup(p, m, mlen, &ms));
    TRY(pk_strdup(p, n, nlen, &ns));
    if (global_unsafe(ms, ns))
        return pk_err(p, TM_ERROR_UNSAFE, "refusing global %.200s.%.200s", ms, ns);
    tm_pk_value *g = NULL;
    TRY(pk_new_value(p, TM_PK_GLOBAL, &g));
    g->u.global.module = ms;
    g->u.global.name = ns;
    classify_global(NODE(g), ms, ns);
    *out = g;
    return TM_OK;
}
