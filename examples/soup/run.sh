#!/usr/bin/env bash
# A real model soup, end to end, on the shipped ingredients (examples/soup/data, made by
# make_ingredients.py: six fine-tunes of one pre-trained MLP on scikit-learn's digits).
#
#   bash examples/soup/run.sh        (after cmake --build build; about 10 seconds)
#
# 1. Each ingredient (state dicts, a TorchScript module, a safetensors file) is written as a
#    TorchScript module: a one-input simple_average into the template module (an exact copy).
# 2. uniform soup:  simple_average of all six, into the template (TorchScript).
# 3. weighted soup: weighted_average, weights proportional to each ingredient's accuracy on the
#    validation split (soup_evaluate --scores prints them).
# 4. greedy soup:   torchmerge greedy_soup, scored on the validation split.
# 5. soup_evaluate (LibTorch only, no torchmerge) runs everything on the held-out test split,
#    prints the table and writes $OUT/soup_chart.svg (and soup_chart.png when rsvg-convert or
#    ImageMagick's convert is installed).
# Environment: BUILD (default build), OUT (default examples/soup/out); relative to the repo root.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
OUT=${OUT:-examples/soup/out}
tm=$BUILD/torchmerge
ev=$BUILD/examples/soup/soup_evaluate
for f in "$tm" "$BUILD/libtorchmerge_torch.so" "$ev"; do
  if [ ! -e "$f" ]; then
    echo "run.sh: $f is missing; build first: cmake --build $BUILD --target torchmerge_cli torchmerge_torch soup_evaluate" >&2
    exit 1
  fi
done
data=examples/soup/data
mkdir -p "$OUT"
names=(ingredient_1.pt ingredient_2.pt ingredient_3.pt ingredient_4.pt ingredient_5_scripted.pt ingredient_6.safetensors)
inputs=("${names[@]/#/$data/}")
template=(--template "$data/template.pt")
show() { printf '+ %s\n' "$*"; "$@"; }

echo "== 1. the ingredients as TorchScript modules"
scripted=()
for i in "${!inputs[@]}"; do
  scripted+=("$OUT/ingredient_$((i + 1)).pt")
  "$tm" simple_average -q "${template[@]}" -o "${scripted[i]}" "${inputs[i]}"
done
echo "== 2. uniform soup"
show "$tm" simple_average "${template[@]}" -o "$OUT/uniform_soup.pt" "${inputs[@]}"
echo "== 3. weighted soup (weights: validation accuracy of each ingredient)"
weights=$("$ev" --eval "$data/val_eval.pt" --scores "${scripted[@]}")
show "$tm" weighted_average --weights "$weights" "${template[@]}" -o "$OUT/weighted_soup.pt" "${inputs[@]}"
echo "== 4. greedy soup (validation split)"
show "$tm" greedy_soup --eval "$data/val_eval.pt" "${template[@]}" -o "$OUT/greedy_soup.pt" "${inputs[@]}"
echo "== 5. held-out test split (soup_evaluate: LibTorch only)"
labels=()
for i in "${!scripted[@]}"; do labels+=("ingredient $((i + 1))=${scripted[i]}"); done
"$ev" --eval "$data/test_eval.pt" --svg "$OUT/soup_chart.svg" "${labels[@]}" \
  --soup "uniform soup=$OUT/uniform_soup.pt" --soup "weighted soup=$OUT/weighted_soup.pt" \
  --soup "greedy soup=$OUT/greedy_soup.pt"
. examples/common/png.sh
png_copy "$OUT/soup_chart.svg"
