#!/usr/bin/env bash
# Fails when a file of csrc/ includes a header of a layer above its own, or of a sibling layer.
#
#   core ← formats ← checkpoint ← merge ← recipe / cli / ops
#                               ↖ torch (libtorchmerge_torch.so, beside merge)
#
# A folder of csrc/ may include its own headers, those of lower-ranked folders and the public
# include/torchmerge.h; folders of the same rank (merge and torch; recipe, cli and ops) do not
# include each other. A folder missing from the table fails too, so a new layer gets a rank
# here before it gets code. Only quoted includes are ours; <...> ones are system headers.
# usage: tools/check_layers.sh [CSRC_DIR]   (default: the csrc/ beside this script)
set -euo pipefail
csrc=${1:-$(cd "$(dirname "$0")/.." && pwd)/csrc}

declare -A rank=([core]=0 [formats]=1 [checkpoint]=2 [merge]=3 [torch]=3 [recipe]=4 [cli]=4 [ops]=4)

bad=0
while IFS= read -r hit; do
    file=${hit%%:*}                      # csrc/LAYER/...:LINE:#include "X"
    rest=${hit#*:}
    line=${rest%%:*}
    header=$(sed -E 's/^[^"]*"([^"]+)".*$/\1/' <<<"${rest#*:}")
    rel=${file#"$csrc"/}
    from=${rel%%/*}
    [[ $header == torchmerge.h ]] && continue
    if [[ $header != */* ]]; then
        echo "$rel:$line: includes \"$header\" without its folder (write \"$from/$header\")"
        bad=1; continue
    fi
    to=${header%%/*}
    for layer in "$from" "$to"; do
        if [[ -z ${rank[$layer]+x} ]]; then
            echo "$rel:$line: folder '$layer' has no layer in tools/check_layers.sh"
            bad=1; continue 2
        fi
    done
    [[ $from == "$to" ]] && continue
    if (( rank[$to] >= rank[$from] )); then
        echo "$rel:$line: $from (layer ${rank[$from]}) includes $header (layer ${rank[$to]}): dependencies must point down"
        bad=1
    fi
done < <(grep -rHnE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$csrc" --include='*.[ch]' --include='*.cpp' --include='*.hpp')

if (( bad )); then
    echo "check_layers: FAILED (the layers are listed at the top of tools/check_layers.sh)"
    exit 1
fi
echo "check_layers: ok ($(grep -rlE '#[[:space:]]*include' "$csrc" --include='*.[ch]' --include='*.cpp' --include='*.hpp' | wc -l) files)"
