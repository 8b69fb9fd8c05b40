"""The merge methods of issue 13 written in Python with torch, the way the anchors compute them in
memory: the benchmark's speed and memory baseline for `torchmerge METHOD` (not a correctness
reference: tests/python/ has the float64 references).

As mergekit does by default: every model's state dict in memory (torch.load; mmap where the
torch has it), each tensor computed in float32 (generalized task arithmetic: task vectors,
sparsify, sign consensus, weighted sum, normalise, × lambda; slerp; model stock), random masks
from torch's global generator. `ties --trim-scope global` is FusionBench's ties_merging: every
model flattened into one vector (sorted keys), the top `density` fraction of each task vector
kept by magnitude over the whole model (|δ| ≥ the k-th value), signs elected per element with
zero sums resolved by the majority of all elected signs, the disjoint mean (normalize) or sum.

Takes torchmerge's command line (same method names and parameter flags), so the benchmark times
both with one argument list:

usage: /usr/bin/python3 bench/methods_python.py METHOD --base BASE [--weights W,..] [--lambda L]
           [--density D] [--gamma G] [--epsilon E] [--t T] [--majority-sign sum|count]
           [--trim-scope tensor|global] [--rescale l1|inverse|none] [--[no-]normalize]
           [--[no-]filter-wise] [--seed S] [-q] -o OUT INPUT...
"""
import argparse
import inspect
import math
import os

import torch

# method: (sparsification, consensus, default normalize, default rescale) as in mergekit's table
GTA = {
    "task_arithmetic": (None, False, False, "none"),
    "ties": ("magnitude", True, True, "none"),
    "dare_linear": ("random", False, False, "l1"),
    "dare_ties": ("random", True, True, "l1"),
    "breadcrumbs": ("magnitude_outliers", False, False, "none"),
    "breadcrumbs_ties": ("magnitude_outliers", True, True, "none"),
    "della_linear": ("della_magprune", False, False, "l1"),
    "della": ("della_magprune", True, True, "l1"),
}
METHODS = list(GTA) + ["slerp", "model_stock"]
WORK = torch.float32  # mergekit's default compute dtype


def load(path):
    kw = {"map_location": "cpu"}
    params = inspect.signature(torch.load).parameters
    if "weights_only" in params:
        kw["weights_only"] = True
    if "mmap" in params:  # torch >= 2.1
        kw["mmap"] = True
    sd = torch.load(path, **kw)
    assert isinstance(sd, dict) and sd, f"{path}: not a state dict"
    return sd


# ---- sparsification (per task vector) -----------------------------------------------------------

def rescaled(delta, mask, rescale, density):
    kept = delta * mask
    if rescale == "none":
        return kept
    if rescale == "inverse":
        return kept / density
    before, after = delta.abs().sum(), kept.abs().sum()  # l1: keep ‖δ‖₁ (mergekit's eps guard)
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def magnitude(delta, density, rescale):
    """TIES trim: the k = ⌊density·numel⌋ largest |δ| (k = 0 keeps nothing)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=WORK)
    if k > 0:
        mask[torch.topk(delta.abs().reshape(-1), k, sorted=False).indices] = 1
    return rescaled(delta, mask.view_as(delta), rescale, density)


def magnitude_outliers(delta, density, gamma, rescale):
    """Breadcrumbs: drop the ⌊gamma·n⌋ largest and the smallest |δ| so that ⌊density·n⌋ remain
    (correct where ⌊gamma·n⌋ = 0, where mergekit's slice [n_bot:-0] drops everything)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, n_top = int(density * n), int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = torch.sort(delta.abs().reshape(-1)).indices
    mask = torch.zeros(n, dtype=WORK)
    mask[order[n_bot:n - n_top]] = 1
    return rescaled(delta, mask.view_as(delta), rescale, density)


def bernoulli(delta, density, rescale):
    """DARE: keep each element with probability density."""
    if density >= 1:
        return delta
    return rescaled(delta, torch.bernoulli(torch.full_like(delta, density)), rescale, density)


def della_magprune(delta, density, epsilon, rescale):
    """DELLA: keep probability from the magnitude rank along dim 1, density ± epsilon."""
    if density >= 1:
        return delta
    shape = delta.shape
    d = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = torch.argsort(torch.argsort(d.abs(), dim=1), dim=1).to(WORK)  # 0 .. m-1 per row
    span = float(d.shape[1] - 1)
    rank_norm = ranks / span if span > 0 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs)
    return rescaled(d, mask, rescale, density).reshape(shape)


def sparsify(kind, delta, a, j):
    dens = a.density[j]
    if kind == "magnitude":
        return magnitude(delta, dens, a.rescale)
    if kind == "random":
        return bernoulli(delta, dens, a.rescale)
    if kind == "magnitude_outliers":
        return magnitude_outliers(delta, dens, a.gamma, a.rescale)
    if kind == "della_magprune":
        return della_magprune(delta, dens, a.epsilon, a.rescale)
    return delta


# ---- per-tensor methods ---------------------------------------------------------------------------

def gta(base, xs, a):
    """mergekit's generalized task arithmetic on one tensor (float32)."""
    kind, consensus, _, _ = GTA[a.method]
    deltas = torch.stack([sparsify(kind, x - base, a, j) for j, x in enumerate(xs)])
    w = torch.tensor(a.weights, dtype=WORK).reshape((-1,) + (1,) * base.dim())
    wd = deltas * w
    del deltas
    if consensus:
        sign = wd.sign()
        elect = wd.sum(0) if a.majority_sign == "sum" else sign.sum(0)
        majority = (elect >= 0).to(WORK) * 2 - 1  # a zero sum elects +
        mask = (sign == majority).to(WORK)
        mixed = (wd * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = wd.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if a.normalize:
        mixed = mixed / divisor
    return base + a.lam * mixed


def slerp(base, xs, a):
    """mergekit's slerp from the base (t = 0) to the one input (t = 1)."""
    v0, v1 = base, xs[0]

    def unit(v):
        n = v.norm()
        return v / n if n > 1e-8 else v

    dot = float((unit(v0) * unit(v1)).sum())
    if abs(dot) > 0.9995:
        return (1 - a.t) * v0 + a.t * v1
    theta0 = math.acos(dot)
    s0 = math.sin(theta0 - theta0 * a.t) / math.sin(theta0)
    s1 = math.sin(theta0 * a.t) / math.sin(theta0)
    return s0 * v0 + s1 * v1


def model_stock(base, xs, a):
    """mergekit's model_stock: t from the mean pairwise cosine of the task vectors."""
    shape = base.shape
    if a.filter_wise:
        w0 = base.unsqueeze(0) if base.dim() <= 1 else base.reshape(base.shape[0], -1)
    else:
        w0 = base.reshape(-1)
    ws = [x.reshape(w0.shape) for x in xs]
    offsets = [w - w0 for w in ws]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            cos.append(((offsets[i] * offsets[j]).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


PER_TENSOR = dict({m: gta for m in GTA}, slerp=slerp, model_stock=model_stock)


def merge_per_tensor(base_sd, sds, a):
    out = {}
    for name, b in base_sd.items():
        if not b.is_floating_point():  # integer/bool tensors come from the base
            out[name] = b.clone()
            continue
        xs = [sd[name].to(WORK) for sd in sds]
        out[name] = PER_TENSOR[a.method](b.to(WORK), xs, a).to(b.dtype)
    return out


# ---- FusionBench's global TIES -------------------------------------------------------------------

def merge_ties_global(base_sd, sds, a):
    """FusionBench ties_merging: flattened models, a per-model trim over all the model's entries."""
    assert all(w == 1 for w in a.weights), "trim_scope global: FusionBench's ties_merging has no weights"
    assert len(set(a.density)) == 1, "trim_scope global: one density"
    keys = sorted(k for k, v in base_sd.items() if v.is_floating_point())
    flat_base = torch.cat([base_sd[k].to(WORK).reshape(-1) for k in keys])
    tv = torch.vstack([torch.cat([sd[k].to(WORK).reshape(-1) for k in keys]) for sd in sds]) - flat_base
    d = tv.shape[1]
    kth = tv.abs().kthvalue(d - int(d * a.density[0]), dim=1, keepdim=True).values
    tv = tv * (tv.abs() >= kth)  # keeps ⌊density·d⌋ + 1 entries and ties, as FusionBench
    signs = torch.sign(tv.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())  # zero sums: the majority of all elected signs
    selected = tv * torch.where(signs.unsqueeze(0) > 0, tv > 0, tv < 0)
    del tv
    merged = selected.sum(0)
    if a.normalize:  # merge_func mean: ÷ the count of agreeing entries
        merged = merged / (selected != 0).sum(0).clamp(min=1).to(WORK)
    del selected
    flat = flat_base + a.lam * merged
    out, at = {}, 0
    for k, v in base_sd.items():
        if not v.is_floating_point():
            out[k] = v.clone()
    for k in keys:
        n = base_sd[k].numel()
        out[k] = flat[at:at + n].reshape(base_sd[k].shape).to(base_sd[k].dtype)
        at += n
    assert at == d
    return out


# ---- command line -----------------------------------------------------------------------------------

def numbers(text):
    return [float(v) for v in text.split(",")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=METHODS)
    p.add_argument("--base", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--weights", type=numbers)
    p.add_argument("--lambda", dest="lam", type=float, default=1.0)
    p.add_argument("--density", type=numbers, default=[1.0])
    p.add_argument("--gamma", type=float, default=0.01)
    p.add_argument("--epsilon", type=float, default=0.15)
    p.add_argument("--t", type=float)
    p.add_argument("--majority-sign", choices=["sum", "count"], default="sum")
    p.add_argument("--trim-scope", choices=["tensor", "global"], default="tensor")
    p.add_argument("--rescale", choices=["l1", "inverse", "none"])
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction)
    p.add_argument("--filter-wise", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args()
    n = len(a.inputs)
    if a.method == "slerp" and (n != 1 or a.t is None):
        p.error("slerp: one INPUT and --t")
    if a.method == "model_stock" and n < 2:
        p.error("model_stock: at least 2 INPUTs")
    a.weights = a.weights or [1.0] * n
    a.density = a.density * n if len(a.density) == 1 else a.density
    if len(a.weights) != n or len(a.density) != n:
        p.error("--weights/--density: one value, or one per input")
    _, _, norm, rescale = GTA.get(a.method, (None, False, False, "none"))
    a.normalize = norm if a.normalize is None else a.normalize
    a.rescale = a.rescale or rescale
    # Debian's torch starts with one thread (OpenMP sees 1): use every CPU, as torchmerge does
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(a.seed)  # the masks come from torch's global generator, as in mergekit

    base_sd = load(a.base)
    sds = [load(path) for path in a.inputs]
    for path, sd in zip(a.inputs, sds):
        assert sd.keys() == base_sd.keys(), f"{path}: other tensor names than the base"
    if a.trim_scope == "global":
        assert a.method == "ties", "--trim-scope global: ties only"
        out = merge_ties_global(base_sd, sds, a)
    else:
        out = merge_per_tensor(base_sd, sds, a)
    # a sane model: every tensor of the base merged, same shapes and dtypes, finite
    assert out.keys() == base_sd.keys()
    for k, v in out.items():
        assert v.shape == base_sd[k].shape and v.dtype == base_sd[k].dtype, k
        assert not v.is_floating_point() or bool(torch.isfinite(v).all()), f"{k}: not finite"
    torch.save(out, a.output)
    if not a.quiet:
        print(f"{a.method}: {len(out)} tensors -> {a.output}")


if __name__ == "__main__":
    main()
