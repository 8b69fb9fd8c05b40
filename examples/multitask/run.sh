#!/usr/bin/env bash
# Multi-task merging on real data, FusionBench's table at small scale (docs/multitask.md).
#
#   bash examples/multitask/run.sh        (after cmake --build build; well under two minutes)
#
# Eight fine-tunes of one pre-trained CNN backbone, one per task (Fashion-MNIST and
# scikit-learn's digits, tasks.py), shipped in examples/multitask/checkpoints/ in mixed formats
# (made by finetune.py), are merged by every method through `torchmerge run recipe.yaml`, with
# the base = the pre-trained backbone. Each task keeps its own head (heads are not merged).
#
# 1. make_eval.py builds each task's validation and test evaluation modules from Debian's data
#    (images, labels and the task's frozen head).
# 2. References: the pre-trained backbone and each task's own fine-tune.
# 3. Each method's hyper-parameters (the grid below, fixed before anything was measured) are
#    chosen by the average accuracy over the tasks' VALIDATION splits; ties go to the first
#    setting in grid order. The test splits are not looked at until step 4.
# 4. The chosen setting is merged again, timed (the CLI's --profile: load + merge + save) and
#    its peak memory measured (/usr/bin/time -f %M); multitask_evaluate (LibTorch only) scores
#    every model on every task's test split and writes the table ($OUT/table.md) and the chart
#    ($OUT/multitask_chart.svg, and .png when rsvg-convert or ImageMagick's convert exists).
#
# Environment (paths relative to the repo root):
#   BUILD    build folder (default build)
#   OUT      output folder (default examples/multitask/out)
#   TASKS    comma-separated subset of the tasks (default: all eight)
#   METHODS  space-separated subset of the methods (default: all, in the table's order)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
OUT=${OUT:-examples/multitask/out}
ALL_TASKS=fashion,fashion_group,fashion_inverted,fashion_rotated,digits,digits_inverted,digits_parity,digits_rotated
TASKS=${TASKS:-$ALL_TASKS}
METHODS=${METHODS:-simple_average weighted_average task_arithmetic ties dare_linear dare_ties breadcrumbs breadcrumbs_ties della della_linear model_stock slerp}
PYTHON=${PYTHON:-/usr/bin/python3}
here=examples/multitask
recipe=$here/recipe.yaml
tm=$BUILD/torchmerge
ev=$BUILD/examples/multitask/multitask_evaluate
for f in "$tm" "$ev"; do
  if [ ! -e "$f" ]; then
    echo "run.sh: $f is missing; build first: cmake --build $BUILD --target torchmerge_cli multitask_evaluate" >&2
    exit 1
  fi
done
command -v /usr/bin/time >/dev/null || { echo "run.sh: /usr/bin/time is missing (Debian package time)" >&2; exit 1; }
IFS=, read -r -a tasks <<<"$TASKS"
IFS=, read -r -a all_tasks <<<"$ALL_TASKS"
rm -rf "$OUT/grid"
mkdir -p "$OUT/grid" "$OUT/eval"

# ---- The grid, fixed before measuring ----------------------------------------------------
LAMBDAS="0.1 0.2 0.3 0.4 0.5 0.6 0.8 1.0 1.5 2.0"   # λ of every task-vector method
declare -A DENSITIES=(
  [ties]="0.1 0.2 0.3"                # TIES keeps the top 20 % (FusionBench's threshold 20)
  [dare_linear]="0.1 0.3 0.5"         # DARE drops 50-90 % at random (FusionBench's sparsity 0.5-0.9)
  [dare_ties]="0.1 0.3 0.5"
  [breadcrumbs]="0.1 0.5 0.9"         # after the top 1 % (gamma) of outliers
  [breadcrumbs_ties]="0.1 0.5 0.9"
  [della]="0.3 0.5 0.7"               # mean keep probability, ± epsilon 0.15
  [della_linear]="0.3 0.5 0.7"
)
SLERP_T="0.1 0.2 0.3 0.4 0.5 0.6 0.8 1.0"   # from the base to the task-arithmetic sum (λ = 1)

# ---- Merging through the recipe ----------------------------------------------------------
# The recipe lists all eight fine-tunes; a task subset drops the others from the model pool.
subset=()
for t in "${all_tasks[@]}"; do
  [[ ",$TASKS," == *",$t,"* ]] || subset+=("~models.$t")
done
merge() {  # merge OUTPUT OVERRIDE... (quiet)
  local out=$1; shift
  "$tm" run "$recipe" -q "${subset[@]}" "$@" output="$out"
}
only() {  # overrides keeping task $1 alone in the model pool
  for t in "${all_tasks[@]}"; do [ "$t" = "$1" ] || echo "~models.$t"; done
}
evaluate() {  # evaluate val|test ARGS...
  local part=$1; shift
  local args=()
  for t in "${tasks[@]}"; do args+=(--task "$t=$OUT/eval/${part}_$t.pt"); done
  "$ev" "${args[@]}" "$@"
}

echo "== 1. evaluation modules (tasks: ${tasks[*]})"
"$PYTHON" $here/make_eval.py "$OUT/eval" --tasks "$TASKS"

echo "== 2. references: the pre-trained backbone, each task's fine-tune"
individual=()
for t in "${tasks[@]}"; do
  "$tm" run "$recipe" -q $(only "$t") method.name=simple_average output="$OUT/individual_$t.pt"
  individual+=("$OUT/individual_$t.pt")
done
individual_list=$(IFS=,; echo "${individual[*]}")
refs=(--ref "pre-trained=$here/checkpoints/template.pt" --ref "individual fine-tunes=$individual_list")

# Each candidate: its method, its group (a density, or -), its grid value (λ, t, or -) and its
# overrides (a method may need other files first).
cand_methods=() cand_groups=() cand_values=() cand_args=()
add() { cand_methods+=("$1"); cand_groups+=("$2"); cand_values+=("$3"); cand_args+=("$4"); }
label() {  # the chosen setting of candidate $1, as the table shows it
  local g=${cand_groups[$1]} v=${cand_values[$1]} m=${cand_methods[$1]} s=""
  if [ "$m" = weighted_average ]; then echo "weights ∝ validation gain"; return; fi
  [ "$g" = - ] || s="density=$g "
  if [ "$v" != - ]; then if [ "$m" = slerp ]; then s+="t=$v"; else s+="λ=$v"; fi; fi
  echo "${s:--}"
}
for m in $METHODS; do
  case $m in
  simple_average | model_stock) add "$m" - - "method.name=$m" ;;
  weighted_average)
    # weights: each fine-tune's gain over the pre-trained backbone on its own task's
    # validation split (at least 0.01), normalised by the method
    read -r -a pre <<<"$(evaluate val --tsv "pre=$here/checkpoints/template.pt" | cut -f3- | tr '\t' ' ')"
    read -r -a ind <<<"$(evaluate val --tsv "ind=$individual_list" | cut -f3- | tr '\t' ' ')"
    w=$(for i in "${!pre[@]}"; do awk -v a="${ind[i]}" -v b="${pre[i]}" 'BEGIN { d = a - b; printf "%.4f\n", d < 0.01 ? 0.01 : d }'; done | paste -sd,)
    echo "weighted_average weights (validation gain of each fine-tune on its task): $w"
    add "$m" - - "method.name=$m method.weights=[$w]" ;;
  task_arithmetic)
    for l in $LAMBDAS; do add "$m" - "$l" "method.name=$m method.lambda=$l"; done ;;
  slerp)
    merge "$OUT/grid/task_sum.pt" method.name=task_arithmetic method.lambda=1.0
    for t in $SLERP_T; do
      add "$m" - "$t" "method.name=slerp method.t=$t ${subset[*]} $(only none | tr '\n' ' ') models.task_sum=$OUT/grid/task_sum.pt"
    done ;;
  *)
    [ -n "${DENSITIES[$m]:-}" ] || { echo "run.sh: unknown method $m" >&2; exit 1; }
    for d in ${DENSITIES[$m]}; do
      for l in $LAMBDAS; do add "$m" "$d" "$l" "method.name=$m method.density=$d method.lambda=$l"; done
    done ;;
  esac
done

echo "== 3. validation grid: ${#cand_methods[@]} merges"
rows=()
for i in "${!cand_methods[@]}"; do
  # shellcheck disable=SC2086  # the overrides are words
  merge "$OUT/grid/$i.pt" ${cand_args[i]}
  rows+=("$i=$OUT/grid/$i.pt")
done
evaluate val --tsv "${rows[@]}" | cut -f2 >"$OUT/grid/val_avg"
# The best of each method: the highest validation average, the first in grid order on ties.
declare -A best_i best_score
for i in "${!cand_methods[@]}"; do
  m=${cand_methods[i]} score=$(sed -n "$((i + 1))p" "$OUT/grid/val_avg")
  if [ -z "${best_score[$m]:-}" ] || awk -v a="$score" -v b="${best_score[$m]}" 'BEGIN { exit !(a > b) }'; then
    best_i[$m]=$i best_score[$m]=$score
  fi
done
# One line per method and density: the validation average (%) at each λ (or t); * = chosen.
for i in "${!cand_methods[@]}"; do
  printf '%s\t%s\t%s\t%s\t%s\n' "${cand_methods[i]}" "${cand_groups[i]}" "${cand_values[i]}" \
    "$(sed -n "$((i + 1))p" "$OUT/grid/val_avg")" "$([ "${best_i[${cand_methods[i]}]}" = "$i" ] && echo '*')"
done | awk -F'\t' '
  BEGIN { print "validation average accuracy (%) at each λ (slerp: t); * = chosen" }
  { key = $1 "\t" $2
    if (key != prev) { if (line != "") print line
      line = sprintf("%-17s %-12s", $1, $2 == "-" ? "" : "density=" $2); prev = key }
    line = line sprintf("  %s%s %.2f%s", $3 == "-" ? "" : $3, $3 == "-" ? "" : ":", 100 * $4, $5 == "" ? " " : "*") }
  END { print line }'

echo "== 4. the chosen settings, merged again (timed), on the test splits"
final=() infos=()
for m in $METHODS; do
  i=${best_i[$m]}
  mem=$OUT/grid/$m.rss
  # shellcheck disable=SC2086
  /usr/bin/time -f %M -o "$mem" "$tm" run "$recipe" --profile "${subset[@]}" ${cand_args[i]} output="$OUT/$m.pt" \
    2>"$OUT/grid/$m.profile" >/dev/null
  ms=$(awk '$1 == "load" || $1 == "merge" || $1 == "save" { s += $4 } END { printf "%.1f", 1000 * s }' "$OUT/grid/$m.profile")
  mb=$(awk '{ printf "%.1f", $1 / 1024 }' "$mem")
  val=$(awk -v s="${best_score[$m]}" 'BEGIN { printf "%.2f", 100 * s }')
  final+=("$m=$OUT/$m.pt")
  infos+=(--info "$m=$(label "$i")|$val|$ms|$mb")
done
evaluate test "${refs[@]}" "${final[@]}" "${infos[@]}" \
  --info-header "chosen on validation|val avg|merge ms|peak RSS MB" \
  --markdown "$OUT/table.md" --svg "$OUT/multitask_chart.svg"
. examples/common/png.sh
png_copy "$OUT/multitask_chart.svg"
echo "table: $OUT/table.md"
