#!/usr/bin/env bash
# The main job on the shipped examples: installs what is missing, builds torchmerge, then
# 1. merges the shipped fine-tunes of a digits classifier into uniform, weighted and greedy soups
#    and evaluates them with a LibTorch-only C++ program (table + chart, examples/soup/), and
# 2. averages three small checkpoints (state dicts, and the same models as TorchScript modules)
#    and shows that PyTorch loads the results.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/install-deps
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target torchmerge_cli torchmerge_torch soup_evaluate >/dev/null
bash examples/soup/run.sh
out=build/example
mkdir -p "$out"
ck=examples/checkpoints
set -x
build/torchmerge simple_average -o "$out/soup.pt" --profile "$ck"/finetune_{1,2,3}.pt
build/torchmerge inspect "$out/soup.pt"
build/torchmerge weighted_average --weights 0.5,0.25,0.25 -o "$out/soup_scripted.pt" "$ck"/finetune_{1,2,3}_scripted.pt
build/torchmerge simple_average --key state_dict -o "$out/from_training.pt" "$ck"/training_checkpoint.pt "$ck"/finetune_2.pt
{ set +x; } 2>/dev/null
/usr/bin/python3 - "$out" "$ck" <<'PY'
import sys
import torch
out, ck = sys.argv[1], sys.argv[2]
soup = torch.load(f"{out}/soup.pt", weights_only=True)
parts = [torch.load(f"{ck}/finetune_{i}.pt") for i in (1, 2, 3)]
worst = max((soup[k].double() - sum(p[k].double() for p in parts) / 3).abs().max().item() for k in soup)
print(f"soup.pt: {len(soup)} tensors, loaded with weights_only=True; max |soup - mean| = {worst:.2e}")
m = torch.jit.load(f"{out}/soup_scripted.pt")
x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
print("soup_scripted.pt: torch.jit.load ok; forward ->", tuple(m(x).shape))
PY
