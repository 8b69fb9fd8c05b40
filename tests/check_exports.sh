#!/usr/bin/env bash
# libtorchmerge.so exports exactly the public API (TM_API in include/torchmerge.h) and the
# internal functions its LibTorch half calls (TM_INTERNAL in csrc/, see
# csrc/core/internal_export.h): nothing more leaks out of the -fvisibility=hidden core, and
# nothing declared for export is missing.
# usage: check_exports.sh LIBTORCHMERGE_SO SOURCE_DIR
set -euo pipefail
lib=$1 src=$2

# The function a declaration line names: its first "tm_xxx(" (a return type has no "(").
declared() {  # MACRO FILE...
    local macro=$1; shift
    awk -v m="^$macro " '$0 ~ m && match($0, /tm_[a-z0-9_]+\(/) { print substr($0, RSTART, RLENGTH - 1) }' "$@"
}
internal_headers=$(grep -rlE '^TM_INTERNAL ' "$src/csrc" --include='*.h')
expected=$( { declared TM_API "$src/include/torchmerge.h"; declared TM_INTERNAL $internal_headers; } | sort -u)
exported=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRVWiu]$/ { sub(/@.*/, "", $3); print $3 }' | sort -u)

extra=$(comm -13 <(echo "$expected") <(echo "$exported"))
missing=$(comm -23 <(echo "$expected") <(echo "$exported"))
[[ -z $extra ]] || { echo "check_exports: exported but neither TM_API nor TM_INTERNAL:" $extra; exit 1; }
[[ -z $missing ]] || { echo "check_exports: declared for export but not exported:" $missing; exit 1; }
echo "check_exports: ok ($(wc -l <<<"$exported") symbols, $(declared TM_INTERNAL $internal_headers | wc -l) of them internal)"
