#!/usr/bin/env bash
# cmake --install into a scratch prefix, then build tests/consumer against it with
# find_package(torchmerge) and run it. usage: install_and_consume.sh BUILD_DIR WORK_DIR FIXTURES
set -euo pipefail
build=$1 work=$2 fixtures=$3
src=$(cd "$(dirname "$0")" && pwd)/consumer
rm -rf "$work"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
# TM_CONSUMER_FLAGS: extra compile and link flags (the sanitizer build passes -fsanitize=..., as
# a consumer of an instrumented library must link the sanitizer runtime itself).
cmake -S "$src" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_C_FLAGS="${TM_CONSUMER_FLAGS:-}" -DCMAKE_EXE_LINKER_FLAGS="${TM_CONSUMER_FLAGS:-}" >/dev/null
cmake --build "$work/build" >/dev/null
LD_LIBRARY_PATH="$work/prefix/lib:${LD_LIBRARY_PATH:-}" "$work/build/consumer" \
  "$fixtures/sd_a.pt" "$fixtures/sd_b.pt" "$work/merged.pt"
# The installed CLI loads the installed LibTorch half (dlopen beside libtorchmerge.so), which
# finds the installed libtorchmerge.so through its RUNPATH: a module rebuild (--dtype) works.
if [[ -e $work/prefix/lib/libtorchmerge_torch.so ]]; then
  "$work/prefix/bin/torchmerge" simple_average -q --dtype float16 -o "$work/merged_module.pt" \
    "$fixtures/ts_a.pt" "$fixtures/ts_b.pt"
  ! ldd "$work/prefix/lib/libtorchmerge_torch.so" | grep -q "libtorchmerge.so.* => not found" ||
    { echo "the installed libtorchmerge_torch.so cannot find libtorchmerge.so"; exit 1; }
fi
PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig" pkg-config --cflags --libs torchmerge >/dev/null 2>&1 ||
  { command -v pkg-config >/dev/null || exit 0; echo "pkg-config cannot find torchmerge"; exit 1; }
