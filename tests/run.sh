#!/usr/bin/env bash
# Installs dependencies, builds torchmerge in build/ and runs every test (ctest: Catch2 unit
# tests, the C99 API test, LibTorch read-back tests, and the CLI tests under pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/install-deps
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)" "$@"
