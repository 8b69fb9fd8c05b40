#!/usr/bin/env bash
# Builds the libFuzzer targets with clang in build-fuzz/ and runs each for a fixed time.
#
#   bash fuzz/run.sh [TARGET...]         (default: every target)
#
# Environment:
#   FUZZ_SECONDS  seconds per target (default 60)
#   FUZZ_JOBS     targets run at the same time (default: the number of CPUs)
#   FUZZ_BUILD    build folder (default build-fuzz)
#   CC / CXX      compilers (default clang-14 / clang++-14, else clang / clang++)
#
# Seeds come from fuzz/make_seeds.py (the test fixtures and /work/shared/realworld when
# present); new inputs found are kept in $FUZZ_BUILD/corpus/TARGET between runs. Any crash,
# leak, sanitizer report, timeout (-timeout, 10 s per input) or out-of-memory
# (-rss_limit_mb=2048) fails the run (exit 1); the input is saved as
# $FUZZ_BUILD/artifacts/TARGET-crash-* (add it to tests/hostile/TARGET/ once fixed). Prints the
# executions per target from libFuzzer's final stats.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
JOBS=${FUZZ_JOBS:-$(nproc)}
BUILD=${FUZZ_BUILD:-build-fuzz}
ALL_TARGETS=(zip pickle legacy_pt safetensors checkpoint)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")

declare -A MAX_LEN=([zip]=65536 [pickle]=65536 [legacy_pt]=65536 [safetensors]=16384 [checkpoint]=65536)
declare -A DICTS=([zip]="zip" [pickle]="pickle" [legacy_pt]="pickle" [safetensors]="safetensors"
                  [checkpoint]="zip pickle safetensors")

pick() { for c in "$@"; do command -v "$c" >/dev/null 2>&1 && { echo "$c"; return; }; done; }
CC=${CC:-$(pick clang-14 clang)}
CXX=${CXX:-$(pick clang++-14 clang++)}
if [ -z "$CC" ] || [ -z "$CXX" ]; then
  echo "fuzz/run.sh: clang not found (apt-get install clang libclang-rt-14-dev)" >&2
  exit 1
fi

t0=$(date +%s)
echo "== build ($CC) in $BUILD/"
CC=$CC CXX=$CXX cmake -S . -B "$BUILD" -DTORCHMERGE_FUZZ=ON -DTORCHMERGE_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$BUILD.configure.log" 2>&1 ||
  { cat "$BUILD.configure.log" >&2; exit 1; }
rm -f "$BUILD.configure.log"
cmake --build "$BUILD" -j"$(nproc)" --target fuzz_all >/dev/null

echo "== seeds"
/usr/bin/python3 fuzz/make_seeds.py "$BUILD/seeds"

ART=$BUILD/artifacts
LOGS=$BUILD/logs
mkdir -p "$ART" "$LOGS"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

run_target() {
  local t=$1
  local dict=$BUILD/$t.dict
  : >"$dict"
  for d in ${DICTS[$t]}; do cat "fuzz/dict/$d.dict" >>"$dict"; done
  mkdir -p "$BUILD/corpus/$t"
  rm -f "$ART/$t-"*
  "$BUILD/fuzz/fuzz_$t" "$BUILD/corpus/$t" "$BUILD/seeds/$t" \
    -max_total_time="$SECONDS_PER_TARGET" -max_len="${MAX_LEN[$t]}" -timeout=10 \
    -rss_limit_mb=2048 -malloc_limit_mb=2048 -detect_leaks=1 -print_final_stats=1 \
    -dict="$dict" -artifact_prefix="$ART/$t-" >"$LOGS/$t.log" 2>&1
}

echo "== fuzzing ${TARGETS[*]}: ${SECONDS_PER_TARGET}s each, $JOBS at a time"
declare -A PIDS RC
running=0
for t in "${TARGETS[@]}"; do
  [ -n "${MAX_LEN[$t]:-}" ] || { echo "fuzz/run.sh: unknown target '$t'" >&2; exit 2; }
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_target "$t" &
  PIDS[$t]=$!
  running=$((running + 1))
done
for t in "${TARGETS[@]}"; do
  if wait "${PIDS[$t]}"; then RC[$t]=0; else RC[$t]=$?; fi
done

fail=0
printf '\n%-12s %12s %8s %8s  %s\n' target executions corpus rss_mb result
for t in "${TARGETS[@]}"; do
  log=$LOGS/$t.log
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  corpus=$(find "$BUILD/corpus/$t" -type f | wc -l)
  result=ok
  if [ "${RC[$t]}" -ne 0 ] || ls "$ART/$t-"* >/dev/null 2>&1 ||
     grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:' "$log"; then
    result="FAILED (exit ${RC[$t]}; log $log)"
    fail=1
  fi
  printf '%-12s %12s %8s %8s  %s\n' "$t" "${execs:-?}" "$corpus" "${rss:-?}" "$result"
done
if [ "$fail" -ne 0 ]; then
  echo
  for t in "${TARGETS[@]}"; do
    [ "${RC[$t]}" -ne 0 ] || continue
    echo "---- $t: the report"
    grep -aE -A25 'ERROR: |runtime error:|^fuzz: ' "$LOGS/$t.log" | head -60
    ls "$ART/$t-"* 2>/dev/null | sed 's/^/input: /'
  done
fi
echo "fuzz/run.sh: $(( $(date +%s) - t0 ))s in all"
exit $fail
