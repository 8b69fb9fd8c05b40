#!/usr/bin/env bash
# Builds torchmerge (Release) and prints the benchmark table. Needs ~6 GB of free disk in
# $BENCH_WORK (default /tmp/torchmerge-bench) and a few minutes. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/install-deps
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target torchmerge_cli torchmerge_torch >/dev/null
/usr/bin/python3 bench/bench.py --work "${BENCH_WORK:-/tmp/torchmerge-bench}" "$@"
/usr/bin/python3 bench/bench_distributed.py --work "${BENCH_WORK:-/tmp/torchmerge-bench}/distributed"
