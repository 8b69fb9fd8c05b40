/* TM_INTERNAL marks the internal functions libtorchmerge.so exports for its LibTorch half.
 *
 * libtorchmerge_torch.so links libtorchmerge.so instead of carrying its own copy of the format
 * code, so the process has one error convention, one set of writers and one table of
 * temporary files (the one tm_remove_temporary_outputs() empties when a signal arrives).
 * The core is built with -fvisibility=hidden; only the public API (TM_API, include/torchmerge.h)
 * and the functions marked here are visible. These are NOT part of the public API: they are
 * not declared in torchmerge.h, carry no stability promise, and may change in any release
 * together with libtorchmerge_torch.so (the bridge ABI check catches a mismatched pair).
 * Mark a function here only when csrc/torch/ calls it (the torch half links with
 * -Wl,--no-undefined, so a missing mark fails its build). C11. */
#ifndef TM_CORE_INTERNAL_EXPORT_H
#define TM_CORE_INTERNAL_EXPORT_H

#if defined(__GNUC__)
#define TM_INTERNAL __attribute__((visibility("default")))
#else
#define TM_INTERNAL
#endif

#endif
