#!/usr/bin/env bash
# The C library and the CLI configure and build without LibTorch (-DTORCHMERGE_WITH_TORCH=OFF)
# and merge .pt and safetensors files; rebuilding a TorchScript module (--dtype) then fails
# with one line naming the missing part and how to build it, leaving no file behind.
# usage: build_without_torch.sh SOURCE_DIR WORK_DIR FIXTURES
set -euo pipefail
src=$1 work=$2 fixtures=$3
rm -rf "$work"
mkdir -p "$work/out"
# No tests, no LibTorch: a C-only build, fast enough for every test run.
cmake -S "$src" -B "$work/build" -DTORCHMERGE_WITH_TORCH=OFF -DTORCHMERGE_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$work/configure.log" 2>&1 || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/build" -j2 --target torchmerge_cli >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }

fail() { echo "build_without_torch: $*"; exit 1; }
tm=$work/build/torchmerge
[[ ! -e $work/build/libtorchmerge_torch.so ]] || fail "libtorchmerge_torch.so was built with TORCHMERGE_WITH_TORCH=OFF"
! ldd "$tm" | grep -qE 'libtorch(_cpu)?\.so|libc10' || fail "the CLI links LibTorch"

out=$work/out
"$tm" simple_average -q -o "$out/avg.pt" "$fixtures/sd_a.pt" "$fixtures/sd_b.pt"
"$tm" weighted_average -q --weights 1,3 -o "$out/a.safetensors" "$fixtures/sd_a.pt" "$fixtures/sd_b.pt"
"$tm" simple_average -q -o "$out/b.safetensors" "$fixtures/sd_b.pt" "$fixtures/sd_c.pt"
"$tm" simple_average -q -o "$out/st.pt" "$out/a.safetensors" "$out/b.safetensors"
# A TorchScript output that keeps the module's layout is rewritten in C, without LibTorch.
"$tm" simple_average -q -o "$out/ts.pt" "$fixtures/ts_a.pt" "$fixtures/ts_b.pt"
for f in avg.pt a.safetensors st.pt ts.pt; do
  "$tm" inspect "$out/$f" >/dev/null || fail "inspect $f failed"
done

# Rebuilding a module (dtype change) needs libtorchmerge_torch.so.
set +e
msg=$("$tm" simple_average -q --dtype float16 -o "$out/ts16.pt" "$fixtures/ts_a.pt" "$fixtures/ts_b.pt" 2>&1)
rc=$?
set -e
echo "torchscript --dtype without LibTorch: exit $rc: $msg"
[[ $rc == 1 ]] || fail "expected exit status 1, got $rc"
[[ $(wc -l <<<"$msg") == 1 ]] || fail "the error is not one line"
[[ $msg == *"libtorchmerge_torch.so"* && $msg == *"-DTORCHMERGE_WITH_TORCH=ON"* ]] ||
  fail "the error does not name libtorchmerge_torch.so and -DTORCHMERGE_WITH_TORCH=ON"
[[ -z $(ls -A "$out" | grep -v '^\(avg.pt\|a.safetensors\|b.safetensors\|st.pt\|ts.pt\)$') ]] ||
  fail "files left behind: $(ls -A "$out")"
echo "build_without_torch: ok"
