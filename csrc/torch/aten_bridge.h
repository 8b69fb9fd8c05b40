// The seam between our C tensor descriptions and ATen: dtype mapping, zero-copy views over
// mapped bytes, and the guard that keeps C++ exceptions from crossing the C ABI. C++17.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "core/error.h"
#include "torchmerge.h"

namespace torchmerge {

at::ScalarType to_scalar_type(tm_dtype dtype);
// Returns false for ScalarTypes we do not write (quantized, etc.).
bool from_scalar_type(at::ScalarType st, tm_dtype *out);

// A strided view over info's bytes without copying. The bytes must outlive the tensor; ATen
// never writes through it (callers only read).
at::Tensor view_of(const tm_tensor_info &info);

// Thrown by our own code with a status and a complete one-line message.
struct Failure {
    tm_status status;
    std::string message;
};
[[noreturn]] void fail(tm_status status, std::string message);

std::string shape_string(const at::IntArrayRef &shape);
std::string shape_string(int32_t ndim, const int64_t *shape);

// Runs body, converting every exception into *err and its status. Every function the bridge
// table exposes to the C core goes through this: exceptions never cross the C ABI.
template <typename F>
tm_status guarded(tm_error *errp, F &&body) {
    tm_error local{};
    tm_error &err = errp ? *errp : local;
    try {
        body();
        return TM_OK;
    } catch (const Failure &f) {
        tm_error_set(&err, f.status, "%s", f.message.c_str());
    } catch (const c10::Error &e) {
        tm_error_set(&err, TM_ERROR_INTERNAL, "%s", e.what_without_backtrace());
    } catch (const std::bad_alloc &) {
        tm_error_set(&err, TM_ERROR_NOMEM, "out of memory");
    } catch (const std::exception &e) {
        tm_error_set(&err, TM_ERROR_INTERNAL, "%s", e.what());
    } catch (...) {
        tm_error_set(&err, TM_ERROR_INTERNAL, "unknown C++ exception");
    }
    // Messages from LibTorch can span lines; ours are one line.
    for (char *p = err.msg; *p; p++)
        if (*p == '\n') *p = ' ';
    return err.status;
}

// Throws Failure if st != TM_OK, carrying err's message.
inline void check(tm_status st, const tm_error &err) {
    if (st != TM_OK) fail(st, err.msg);
}

}  // namespace torchmerge
