/* Safe unpickler, calling globals: what REDUCE, NEWOBJ(_EX), INST and OBJ build for each
 * recognised global (builtins containers, OrderedDict, bytes and _codecs.encode, copyreg's
 * object creation, torch.Size, _rebuild_from_type_v2), handing the tensor rebuild functions
 * to pickle_tensors.c; any other allowed global becomes an inert placeholder object holding
 * its arguments. Nothing is ever executed. */
#define _POSIX_C_SOURCE 200809L

#include "formats/pickle_internal.h"

#include <string.h>

/* ---- Text to bytes ---------------------------------------------------------------------- */

/* UTF-8 text to Latin-1 bytes: inverse of how Python 2-compatible pickles store bytes. */
static tm_status latin1_encode(parser *p, const tm_pk_value *s, tm_pk_value **out) {
    const unsigned char *in = (const unsigned char *)s->u.str.data;
    size_t len = s->u.str.len;
    char *o = pk_alloc(p, len + 1);
    if (!o) return pk_nomem(p);
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        unsigned c = in[i];
        if (c < 0x80) {
            o[n++] = (char)c;
            i++;
        } else if ((c & 0xe0) == 0xc0 && i + 1 < len && (in[i + 1] & 0xc0) == 0x80) {
            unsigned cp = ((c & 0x1f) << 6) | (in[i + 1] & 0x3f);
            if (cp < 0x80 || cp > 0xff)
                return pk_err(p, TM_ERROR_FORMAT, "_codecs.encode: text is not Latin-1");
            o[n++] = (char)cp;
            i += 2;
        } else {
            return pk_err(p, TM_ERROR_FORMAT, "_codecs.encode: text is not Latin-1");
        }
    }
    o[n] = 0;
    TRY(pk_new_value(p, TM_PK_BYTES, out));
    (*out)->u.str.data = o;
    (*out)->u.str.len = n;
    return TM_OK;
}

/* bytes via _codecs.encode(text, encoding) */
static tm_status encode_text(parser *p, const tm_pk_value *text, const tm_pk_value *enc,
                             tm_pk_value **out) {
    if (text->kind != TM_PK_STRING)
        return pk_err(p, TM_ERROR_FORMAT, "_codecs.encode of a %s", tm_pk_kind_name(text->kind));
    if (!enc || str_is(enc, "utf-8") || str_is(enc, "utf8") || str_is(enc, "UTF-8"))
        return pk_new_str(p, TM_PK_BYTES, text->u.str.data, text->u.str.len, out);
    if (str_is(enc, "latin1") || str_is(enc, "latin-1") || str_is(enc, "iso-8859-1") ||
        str_is(enc, "iso8859-1") || str_is(enc, "l1"))
        return latin1_encode(p, text, out);
    if (enc->kind == TM_PK_STRING)
        return pk_err(p, TM_ERROR_UNSUPPORTED, "_codecs.encode with encoding '%.64s'",
                      enc->u.str.data);
    return pk_err(p, TM_ERROR_FORMAT, "_codecs.encode with a %s encoding",
                  tm_pk_kind_name(enc->kind));
}

/* ---- Calling globals ---------------------------------------------------------------------- */

static tm_status new_object(parser *p, const tm_pk_value *cls, tm_pk_value *args,
                            tm_pk_value **out) {
    tm_pk_value *o = NULL;
    TRY(pk_new_value(p, TM_PK_OBJECT, &o));
    o->u.object.module = cls->u.global.module;
    o->u.object.name = cls->u.global.name;
    o->u.object.args = args ? args : p->empty_tuple_v;
    *out = o;
    return TM_OK;
}

/* dict(), dict(pairs), OrderedDict([[k, v], ...]), dict(other_dict) */
static tm_status dict_from_args(parser *p, const char *fn, const tm_pk_value *args,
                                tm_pk_value **out) {
    tm_pk_value *d = NULL;
    TRY(pk_new_value(p, TM_PK_DICT, &d));
    if (args->u.seq.n > 1)
        return pk_err(p, TM_ERROR_FORMAT, "%s called with %zu arguments", fn, args->u.seq.n);
    if (args->u.seq.n == 1) {
        const tm_pk_value *src = args->u.seq.items[0];
        if (src->kind == TM_PK_DICT) {
            for (size_t i = 0; i < src->u.dict.n; i++)
                TRY(pk_dict_set(p, d, src->u.dict.keys[i], src->u.dict.values[i]));
        } else if (is_seq(src)) {
            for (size_t i = 0; i < src->u.seq.n; i++) {
                const tm_pk_value *pair = src->u.seq.items[i];
                if (!is_seq(pair) || pair->u.seq.n != 2)
                    return pk_err(p, TM_ERROR_FORMAT, "%s: item %zu is not a key/value pair",
                                  fn, i);
                TRY(pk_dict_set(p, d, pair->u.seq.items[0], pair->u.seq.items[1]));
            }
        } else {
            return pk_err(p, TM_ERROR_FORMAT, "%s of a %s", fn, tm_pk_kind_name(src->kind));
        }
    }
    *out = d;
    return TM_OK;
}

/* set(), set(iterable), list(...), tuple(...) */
static tm_status seq_from_args(parser *p, const char *fn, tm_pk_kind kind,
                               const tm_pk_value *args, tm_pk_value **out) {
    if (args->u.seq.n == 0) return pk_new_seq(p, kind, NULL, 0, out);
    if (args->u.seq.n > 1)
        return pk_err(p, TM_ERROR_FORMAT, "%s called with %zu arguments", fn, args->u.seq.n);
    const tm_pk_value *src = args->u.seq.items[0];
    if (src->kind == TM_PK_DICT)
        return pk_new_seq(p, kind, src->u.dict.keys, src->u.dict.n, out);
    if (!is_seq(src) && src->kind != TM_PK_SET)
        return pk_err(p, TM_ERROR_FORMAT, "%s of a %s", fn, tm_pk_kind_name(src->kind));
    if (kind == TM_PK_TUPLE && src->kind == TM_PK_TUPLE) {
        *out = (tm_pk_value *)src; /* tuple(t) is t */
        return TM_OK;
    }
    return pk_new_seq(p, kind, src->u.seq.items, src->u.seq.n, out);
}

static tm_status bytes_from_args(parser *p, const char *fn, const tm_pk_value *args,
                                 tm_pk_value **out) {
    size_t n = args->u.seq.n;
    if (n == 0) return pk_new_str(p, TM_PK_BYTES, "", 0, out);
    const tm_pk_value *a = args->u.seq.items[0];
    if (n == 1 && a->kind == TM_PK_BYTES) {
        *out = (tm_pk_value *)a;
        return TM_OK;
    }
    if (n == 2 && a->kind == TM_PK_STRING) return encode_text(p, a, args->u.seq.items[1], out);
    return pk_err(p, TM_ERROR_FORMAT, "%s called with unsupported arguments", fn);
}

static int is_class_special(int sp) {
    return sp == SP_NONE || sp == SP_ODICT || sp == SP_DICT || sp == SP_LIST ||
           sp == SP_TUPLE || sp == SP_SET || sp == SP_FROZENSET || sp == SP_BYTES ||
           sp == SP_BYTEARRAY || sp == SP_STORAGE_TYPE || sp == SP_UNTYPED_STORAGE ||
           sp == SP_TORCH_SIZE || sp == SP_PARAMETER_CLASS || sp == SP_DTYPE;
}

/* cls.__new__(cls, *args): NEWOBJ, NEWOBJ_EX, copyreg._reconstructor / __newobj__. */
tm_status pk_instantiate(parser *p, const tm_pk_value *cls, tm_pk_value *args,
                         tm_pk_value **out) {
    if (cls->kind != TM_PK_GLOBAL)
        return pk_err(p, TM_ERROR_FORMAT, "cannot instantiate a %s", tm_pk_kind_name(cls->kind));
    int sp = NODE(cls)->special;
    switch (sp) {
    case SP_ODICT:
    case SP_DICT: return pk_new_value(p, TM_PK_DICT, out);
    case SP_LIST: return pk_new_seq(p, TM_PK_LIST, NULL, 0, out);
    case SP_SET:
    case SP_FROZENSET: return pk_new_seq(p, TM_PK_SET, NULL, 0, out);
    case SP_TUPLE:
        return seq_from_args(p, cls->u.global.name, TM_PK_TUPLE, args, out);
    case SP_BYTES:
    case SP_BYTEARRAY:
        return bytes_from_args(p, cls->u.global.name, args, out);
    default:
        if (!is_class_special(sp))
            return pk_err(p, TM_ERROR_FORMAT, "cannot instantiate function %.100s.%.100s",
                          cls->u.global.module, cls->u.global.name);
        return new_object(p, cls, args, out);
    }
}

/* The types dill's _load_type(name) hands out that build code, functions, modules or frames:
 * the first step of running code from a pickle (CodeType(...) then FunctionType(code, …)). The
 * others (NoneType, int, BuiltinMethodType, …) only name a class. */
static int dill_type_unsafe(const char *name) {
    static const char *const unsafe[] = {
        "CodeType", "FunctionType", "LambdaType", "MethodType", "ModuleType", "CellType",
        "FrameType", "TracebackType", "GeneratorType", "CoroutineType", "AsyncGeneratorType",
        "MethodWrapperType", "WrapperDescriptorType", "MethodDescriptorType",
        "ClassMethodDescriptorType", "GetSetDescriptorType", "MemberDescriptorType",
        "PartialType", "SuperType", "InstanceType", "ClassType", "FileType", "TextWrapperType",
        "BufferedReaderType", "BufferedWriterType", "BufferedRandomType", "FileIOType",
        "SocketType", "PyTextWrapperType", "PyBufferedReaderType", "PyBufferedWriterType",
        "PyBufferedRandomType", "PyFileIOType", "InputType", "OutputType",
    };
    for (size_t i = 0; i < sizeof unsafe / sizeof unsafe[0]; i++)
        if (strcmp(name, unsafe[i]) == 0) return 1;
    return 0;
}

/* func(*args): REDUCE, INST, OBJ. */
tm_status pk_call(parser *p, const tm_pk_value *fn, tm_pk_value *args, tm_pk_value **out) {
    if (fn->kind != TM_PK_GLOBAL)
        return pk_err(p, TM_ERROR_FORMAT, "calling a %s (not a global)", tm_pk_kind_name(fn->kind));
    if (args->kind != TM_PK_TUPLE)
        return pk_err(p, TM_ERROR_FORMAT, "arguments are a %s, not a tuple",
                      tm_pk_kind_name(args->kind));
    const char *name = fn->u.global.name;
    tm_pk_value *const *a = args->u.seq.items;
    size_t n = args->u.seq.n;
    switch ((special)NODE(fn)->special) {
    case SP_ODICT:
    case SP_DICT: return dict_from_args(p, name, args, out);
    case SP_LIST: return seq_from_args(p, name, TM_PK_LIST, args, out);
    case SP_TUPLE: return seq_from_args(p, name, TM_PK_TUPLE, args, out);
    case SP_SET:
    case SP_FROZENSET: return seq_from_args(p, name, TM_PK_SET, args, out);
    case SP_BYTES:
    case SP_BYTEARRAY: return bytes_from_args(p, name, args, out);
    case SP_ENCODE:
        if (n < 1 || n > 3) break;
        return encode_text(p, a[0], n >= 2 ? a[1] : NULL, out);
    case SP_RECONSTRUCTOR:
        /* _reconstructor(cls, base, state): state is for base.__init__; only cls matters. */
        if (n != 3) break;
        return pk_instantiate(p, a[0], p->empty_tuple_v, out);
    case SP_NEWOBJ_FN: {
        if (n < 1) break;
        tm_pk_value *rest = NULL;
        TRY(pk_new_seq(p, TM_PK_TUPLE, a + 1, n - 1, &rest));
        return pk_instantiate(p, a[0], rest, out);
    }
    case SP_NEWOBJ_EX_FN:
        if (n != 3 || a[1]->kind != TM_PK_TUPLE) break;
        return pk_instantiate(p, a[0], a[1], out);
    case SP_FIRST_ARG:
        if (n < 1) break;
        *out = a[0];
        return TM_OK;
    case SP_TORCH_SIZE:
        if (n != 1) break;
        return seq_from_args(p, name, TM_PK_TUPLE, args, out);
    case SP_REBUILD_V1:
    case SP_REBUILD_V2:
    case SP_REBUILD_V3:
    case SP_REBUILD_PARAM:
    case SP_REBUILD_PARAM_STATE:
    case SP_REBUILD_QTENSOR: return pk_tensor_call(p, fn, args, out);
    case SP_DILL_LOAD_TYPE:
        if (n != 1 || a[0]->kind != TM_PK_STRING) break;
        if (dill_type_unsafe(a[0]->u.str.data))
            return pk_err(p, TM_ERROR_UNSAFE, "refusing %.100s.%.100s('%.100s')", fn->u.global.module,
                          name, a[0]->u.str.data);
        return new_object(p, fn, args, out);
    case SP_FROM_TYPE_V2: {
        /* (func, new_type, args, state): a tensor subclass or a tensor with Python attributes;
         * the attributes are dropped, a Parameter new_type is kept as is_parameter. */
        if (n != 4) break;
        const tm_pk_value *f = a[0], *ty = a[1], *fa = a[2];
        if (f->kind != TM_PK_GLOBAL || fa->kind != TM_PK_TUPLE) break;
        int fsp = NODE(f)->special;
        if (fsp != SP_REBUILD_V1 && fsp != SP_REBUILD_V2 && fsp != SP_REBUILD_V3 &&
            fsp != SP_REBUILD_PARAM && fsp != SP_REBUILD_PARAM_STATE)
            return new_object(p, fn, args, out);
        TRY(pk_tensor_call(p, f, fa, out));
        if (ty->kind == TM_PK_GLOBAL && NODE(ty)->special == SP_PARAMETER_CLASS &&
            !(*out)->u.tensor.is_parameter)
            return pk_as_parameter(p, *out, NULL, out);
        return TM_OK;
    }
    default: return new_object(p, fn, args, out);
    }
    return pk_err(p, TM_ERROR_FORMAT, "%.100s.%.100s called with unsupported arguments (%zu)",
                  fn->u.global.module, name, n);
}
