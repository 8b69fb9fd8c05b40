"""The sparsify-and-consensus methods (ties, dare_ties, breadcrumbs, breadcrumbs_ties, and ties
with trim_scope: global) through the CLI, against independent float64 references written here
from the formulas (mergekit's generalized task arithmetic, FusionBench's ties_merging_utils):

  per input δⱼ = θⱼ − b, sparsified (magnitude top-k with the lower index first among equal
  magnitudes; Breadcrumbs' outliers; DARE's documented random mask), rescaled, weighted, then
  linear (b + λ Σ) or TIES' consensus (sign election, disjoint mean/sum/max) × λ + b.

Each floating output tensor must be within 1 ulp of its dtype of the float64 value.
"""
import math

import pytest
import torch

import reference as ref
from cli_runner import assert_error, assert_ok, tm
from test_methods import assert_matches, keep_mask, load, model, models  # noqa: F401 (models: a fixture)

INPUTS = "abc"


# ---- references ------------------------------------------------------------------------------------

def ranked(d: torch.Tensor):
    """Flat indices in the order of |δ| descending, the lower index first among equal magnitudes."""
    flat = d.flatten().tolist()
    return sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))


def topk_mask(d: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * d.numel())
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[ranked(d)[:k]] = True
    return keep


def outliers_mask(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = d.numel()
    keep_n, top = int(density * n), int(gamma * n)
    top = min(top, n - keep_n)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[ranked(d)[top:top + keep_n]] = True
    return keep


def consensus(v: torch.Tensor, w, sign_rule="sum", agg="mean", zero_sign=1.0):
    """TIES over rows v[j] = wⱼ δⱼ' (float64)."""
    s = v.sum(0) if sign_rule == "sum" else torch.sign(v).sum(0)
    sigma = torch.where(s > 0, 1.0, torch.where(s < 0, -1.0, zero_sign)).double()
    agree = torch.where(sigma > 0, v > 0, v < 0)
    sel = torch.where(agree, v, torch.zeros_like(v))
    if agg == "sum":
        return sel.sum(0)
    if agg == "max":
        return sel.abs().max(0).values * sigma
    div = (torch.tensor(w, dtype=torch.float64).reshape(-1, *[1] * (v.dim() - 1)) * agree).sum(0)
    return sel.sum(0) / torch.where(div == 0, torch.ones_like(div), div)


def rescaled(d, keep, rescale, density):
    kept = torch.where(keep, d, torch.zeros_like(d))
    if rescale == "inverse":
        return kept / density
    if rescale == "l1":
        a, k = d.abs().sum().item(), kept.abs().sum().item()
        return kept * (a / k) if k > 0 else torch.zeros_like(kept)
    return kept


def gta_ref(base, inputs, weights, lam, masks, rescale="none", densities=None, ties=True, sign_rule="sum",
            agg="mean", normalize=False):
    """Generalized task arithmetic: masks(name, j, δ flat) gives input j's keep mask."""
    densities = densities or [1.0] * len(inputs)
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        b64 = b.double().flatten()
        rows = []
        for j, sd in enumerate(inputs):
            d = sd[k].double().flatten() - b64
            rows.append(rescaled(d, masks(k, j, d), rescale, densities[j]))
        w = [float(x) for x in weights]
        if ties:
            v = torch.stack([wi * r for wi, r in zip(w, rows)])
            merged = lam * consensus(v, w, sign_rule, agg)
        else:
            if normalize:
                w = [x / sum(w) for x in w]
            merged = sum(lam * wi * r for wi, r in zip(w, rows))
        out[k] = (b64 + merged).reshape(b.shape)
    return out


def run(models, tmp_path, method, *args, inputs=INPUTS, dtype=None, out="out.pt", env=None):  # noqa: F811
    cmd = [method, "-q", "--base", models["base"], "-o", tmp_path / out, *args]
    if dtype:
        cmd += ["--dtype", dtype]
    assert_ok(tm(*cmd, *[models[t] for t in inputs], cwd=tmp_path, env=env))
    return (tmp_path / out).read_bytes() if out.endswith(".safetensors") else load(tmp_path / out)


def dtypes_of(base, dtype):
    return {k: (ref.DTYPE_BY_NAME[dtype] if dtype and v.is_floating_point() else v.dtype) for k, v in base.items()}


def per_input(text, n=3):
    vals = [float(x) for x in str(text).split(",")]
    return vals * n if len(vals) == 1 else vals


# ---- ties (per tensor) -----------------------------------------------------------------------------

@pytest.mark.parametrize("density,weights,lam,sign,agg_args,agg,dtype", [
    ("0.5", "1,1,1", 1.0, "sum", [], "mean", None),
    ("0.3,0.7,0.5", "1,2,-0.5", 0.8, "sum", [], "mean", "float16"),
    ("0.4", "0.5,-1,2", 1.3, "count", ["--no-normalize"], "sum", "bfloat16"),
    ("0.6", "1,1,1", 0.5, "sum", ["--merge-func", "max"], "max", "float32"),
    ("0.05", "1,3,1", 1.0, "count", ["--merge-func", "sum"], "sum", None),
])
def test_ties_matches_float64_reference(models, tmp_path, density, weights, lam, sign, agg_args, agg, dtype):  # noqa: F811
    out = run(models, tmp_path, "ties", "--density", density, "--weights", weights, "--lambda", lam,
              "--majority-sign", sign, *agg_args, dtype=dtype)
    base = load(models["base"])
    dens = per_input(density)
    expected = gta_ref(base, [load(models[t]) for t in INPUTS], weights.split(","), lam,
                       lambda k, j, d: topk_mask(d, dens[j]), sign_rule=sign, agg=agg)
    assert_matches(out, expected, dtypes_of(base, dtype))


def write_models(tmp_path, sds):
    paths = {}
    for tag, sd in sds.items():
        paths[tag] = tmp_path / ("%s.pt" % tag)
        torch.save(sd, str(paths[tag]))
    return paths


@pytest.fixture
def tie_models(tmp_path):
    """Task vectors with many equal magnitudes (ties at the threshold, both signs), a tensor of
    90,000 elements (the histogram and candidate passes), one of 70,000 packed in one histogram bin
    with pairs of equal magnitudes (a second histogram level), one mostly untouched (the zero bin),
    a 0-d tensor and a zero task vector."""
    g = torch.Generator().manual_seed(5)
    base = {"t": torch.zeros(12), "big": torch.randn(300, 300, generator=g),
            "packed": torch.zeros(70000, dtype=torch.float64), "sparse": torch.zeros(70000),
            "zero_d": torch.tensor(1.5), "same": torch.ones(5)}
    sds = {"base": base}
    vals = [[1, -1, 2, -2, 1, 1, -1, 0, 2, -1, 1, -2], [-1, -1, 1, 2, -2, 1, 1, 1, 0, 2, -1, 1],
            [2, 1, -1, -1, 1, -2, 2, 1, 1, 0, -1, -1]]
    idx = torch.arange(70000, dtype=torch.float64)
    for j, tag in enumerate(INPUTS):
        sparse = torch.zeros(70000)
        sparse[j::50] = torch.randn(1400, generator=g)
        sds[tag] = {"t": torch.tensor(vals[j], dtype=torch.float32),
                    "big": base["big"] + 0.01 * torch.randn(300, 300, generator=g),
                    "packed": (1 + torch.div(idx, 2, rounding_mode="floor") * 2.0 ** -30) * (1 - 2 * ((idx + j) % 3 == 0)),
                    "sparse": sparse, "zero_d": torch.tensor(1.5 + 0.25 * (j - 1)), "same": torch.ones(5)}
    return write_models(tmp_path, sds)


@pytest.mark.parametrize("density", ["0.5", "0.25,0.5,0.75", "0.01"])
def test_ties_exact_top_k_with_ties_at_the_threshold(tie_models, tmp_path, density):
    out = run(tie_models, tmp_path, "ties", "--density", density, "--weights", "1,2,1", "--lambda", "0.9")
    base = load(tie_models["base"])
    dens = per_input(density)
    expected = gta_ref(base, [load(tie_models[t]) for t in INPUTS], [1, 2, 1], 0.9,
                       lambda k, j, d: topk_mask(d, dens[j]))
    assert_matches(out, expected, {k: v.dtype for k, v in base.items()})


def test_ties_density_one_is_the_sign_rule_only_and_k_zero_keeps_the_base(tie_models, tmp_path):
    base = load(tie_models["base"])
    sds = [load(tie_models[t]) for t in INPUTS]
    out = run(tie_models, tmp_path, "ties", "--weights", "1,1,2", out="one.pt")  # density defaults to 1
    expected = gta_ref(base, sds, [1, 1, 2], 1.0, lambda k, j, d: torch.ones(d.numel(), dtype=torch.bool))
    assert_matches(out, expected, {k: v.dtype for k, v in base.items()})
    # density 0.05 of 12 elements keeps none: that tensor (and the 0-d one) stays the base
    low = run(tie_models, tmp_path, "ties", "--density", "0.05", out="low.pt")
    for k in ("t", "zero_d", "same"):
        assert torch.equal(low[k], base[k]), k


# ---- ties with trim_scope: global (FusionBench's ties_merging) --------------------------------------

def fusionbench_ties(base, inputs, density, lam, merge_func, weights=None):
    """FusionBench's ties_merging on flattened models (sorted keys, floating tensors), in float64:
    topk_values_mask, resolve_sign (zero signs take the majority), disjoint_merge."""
    keys = sorted(k for k, v in base.items() if v.is_floating_point())
    ptm = torch.cat([base[k].double().flatten() for k in keys])
    tv = torch.stack([torch.cat([sd[k].double().flatten() for k in keys]) - ptm for sd in inputs])
    d = tv.shape[1]
    kept = []
    for j, row in enumerate(tv):
        k = d - int(d * density[j])
        kth = row.abs().kthvalue(k).values if k > 0 else torch.tensor(0.0, dtype=torch.float64)
        kept.append(row * (row.abs() >= kth))
    w = weights or [1.0] * len(inputs)
    v = torch.stack([wi * r for wi, r in zip(w, kept)])
    majority = torch.sign(torch.sign(v.sum(0)).sum()).item()  # resolve_zero_signs' majority
    merged = ptm + lam * consensus(v, w, "sum", merge_func, zero_sign=majority)
    out, at = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = merged[at:at + n].reshape(base[k].shape)
        at += n
    return {k: out.get(k, v) for k, v in base.items()}


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("density", ["0.2", "0.5,0.3,0.9"])
def test_global_ties_matches_fusionbench_formulas(models, tmp_path, merge_func, density):  # noqa: F811
    out = run(models, tmp_path, "ties", "--trim-scope", "global", "--density", density, "--merge-func", merge_func,
              "--lambda", "0.7")
    base = load(models["base"])
    expected = fusionbench_ties(base, [load(models[t]) for t in INPUTS], per_input(density), 0.7, merge_func)
    assert_matches(out, expected, {k: v.dtype for k, v in base.items()})


@pytest.mark.parametrize("majority", [1, -1])
def test_global_ties_zero_sum_takes_the_model_majority_sign(tmp_path, majority):
    """Element 0 of 'z' sums to exactly 0 over the inputs: it takes the sign of the sum of all
    elected signs (+ or − by construction), so its agreeing entry is the positive or negative one."""
    g = torch.Generator().manual_seed(3)
    base = {"z": torch.zeros(4, dtype=torch.float64), "w": torch.zeros(30, dtype=torch.float64)}
    a = {"z": torch.tensor([0.5, 0.1, 0.2, 0.3], dtype=torch.float64),
         "w": majority * (torch.rand(30, generator=g, dtype=torch.float64) + 1)}
    b = {"z": torch.tensor([-0.5, 0.0, 0.0, 0.0], dtype=torch.float64), "w": torch.zeros(30, dtype=torch.float64)}
    paths = write_models(tmp_path, {"base": base, "a": a, "b": b})
    out = run(paths, tmp_path, "ties", "--trim-scope", "global", "--density", "1", "--merge-func", "sum",
              inputs="ab")
    expected = fusionbench_ties(base, [a, b], [1.0, 1.0], 1.0, "sum")
    assert_matches(out, expected, {k: v.dtype for k, v in base.items()})
    assert out["z"][0].item() == (0.5 if majority > 0 else -0.5)


def test_global_ties_bytes_do_not_depend_on_the_thread_count(models, tmp_path):  # noqa: F811
    outs = [run(models, tmp_path, "ties", "--trim-scope", "global", "--density", "0.3", out="g%s.safetensors" % t,
                env={"TORCHMERGE_THREADS": t}) for t in "12"]
    assert outs[0] == outs[1]


# ---- dare_ties -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rescale", ["l1", "inverse", "none"])
@pytest.mark.parametrize("density,seed,sign,normalize,dtype", [("0.5", 0, "sum", False, None),
                                                               ("0.2,0.6,0.9", 7, "count", True, "bfloat16"),
                                                               ("0.3", 99, "sum", True, "float16")])
def test_dare_ties_matches_float64_reference(models, tmp_path, rescale, density, seed, sign, normalize, dtype):  # noqa: F811
    args = ["--density", density, "--rescale", rescale, "--seed", seed, "--majority-sign", sign, "--weights",
            "1,-2,0.5", "--lambda", "0.9"] + (["--normalize"] if normalize else [])
    out = run(models, tmp_path, "dare_ties", *args, dtype=dtype)
    base = load(models["base"])
    dens = per_input(density)
    expected = gta_ref(base, [load(models[t]) for t in INPUTS], [1, -2, 0.5], 0.9,
                       lambda k, j, d: keep_mask(seed, j, k, d.numel(), dens[j]), rescale=rescale, densities=dens,
                       sign_rule=sign, agg="mean" if normalize else "sum")
    assert_matches(out, expected, dtypes_of(base, dtype))


def test_dare_ties_density_one_is_ties_density_one(models, tmp_path):  # noqa: F811
    a = run(models, tmp_path, "dare_ties", "--density", "1", "--normalize", "--weights", "1,2,3", out="d.pt")
    b = run(models, tmp_path, "ties", "--density", "1", "--weights", "1,2,3", out="t.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sparse_methods_bytes_do_not_depend_on_the_thread_count(tie_models, tmp_path):
    for method, args in [("dare_ties", ["--density", "0.4", "--seed", "3"]), ("ties", ["--density", "0.3"]),
                         ("breadcrumbs_ties", ["--density", "0.5", "--gamma", "0.1"])]:
        outs = [run(tie_models, tmp_path, method, *args, out="%s%s.safetensors" % (method, t),
                    env={"TORCHMERGE_THREADS": t}) for t in "12"]
        assert outs[0] == outs[1], method


# ---- breadcrumbs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density,gamma", [("0.5", "0.1"), ("0.3,0.6,0.8", "0.2"), ("0.9", "0.01")])
def test_breadcrumbs_matches_float64_reference(tie_models, tmp_path, method, density, gamma):
    out = run(tie_models, tmp_path, method, "--density", density, "--gamma", gamma, "--weights", "1,0.5,2",
              "--lambda", "1.1")
    base = load(tie_models["base"])
    dens, gam = per_input(density), per_input(gamma)
    expected = gta_ref(base, [load(tie_models[t]) for t in INPUTS], [1, 0.5, 2], 1.1,
                       lambda k, j, d: outliers_mask(d, dens[j], gam[j]), ties=method == "breadcrumbs_ties",
                       agg="sum")
    assert_matches(out, expected, {k: v.dtype for k, v in base.items()})


def test_breadcrumbs_keeps_density_where_gamma_drops_nothing(tie_models, tmp_path):
    """12 elements, gamma 0.05: ⌊gamma·n⌋ = 0, so nothing is dropped as an outlier and the 6 largest
    stay (mergekit's [n_bot:-0] slice would drop the whole tensor)."""
    out = run(tie_models, tmp_path, "breadcrumbs", "--density", "0.5", "--gamma", "0.05", inputs="a")
    base, a = load(tie_models["base"]), load(tie_models["a"])
    d = a["t"].double() - base["t"].double()
    keep = topk_mask(d, 0.5)
    assert int(keep.sum()) == 6
    ref.assert_close_ulp(out["t"], base["t"].double() + torch.where(keep, d, torch.zeros_like(d)), torch.float32,
                         ulps=1, name="t")


# ---- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,args,needle", [
    ("ties", ["--density", "0"], "density: 0 is outside (0, 1]"),
    ("ties", ["--density", "1.2"], "density: 1.2 is outside (0, 1]"),
    ("breadcrumbs", ["--density", "0.95", "--gamma", "0.1"], "gamma + density: 0.1 + 0.95 is over 1"),
    ("breadcrumbs_ties", ["--density", "0.5", "--gamma", "1"], "gamma: 1 is outside [0, 1)"),
    ("breadcrumbs", [], "breadcrumbs needs density"),
    ("dare_ties", ["--density", "0.5", "--rescale", "l2"], "rescale: expected one of l1|inverse|none, got 'l2'"),
    ("ties", ["--majority-sign", "vote"], "majority_sign: expected one of sum|count"),
    ("ties", ["--merge-func", "sum", "--normalize"], "merge_func: sum contradicts normalize: true"),
    ("ties", ["--trim-scope", "global", "--rescale", "l1"], "rescale: l1"),
])
def test_bad_parameters_are_one_line_naming_them(models, tmp_path, method, args, needle):  # noqa: F811
    res = tm(method, "--base", models["base"], *args, "-o", tmp_path / "o.pt", models["a"], models["b"],
             models["c"], cwd=tmp_path)
    assert_error(res, needle)
    assert not (tmp_path / "o.pt").exists()


# ---- the fused float32 loops give the bytes of the float64 ones --------------------------------------

@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """A base and 5 fine-tunes in float32, and the same values in float64: float32 inputs take the
    fused loops (δ and the masks in registers, 1-4 inputs at once), float64 ones the rows. Tensors
    span several chunks and blocks, with equal magnitudes and unchanged elements."""
    d = tmp_path_factory.mktemp("wide")
    g = torch.Generator().manual_seed(11)
    shapes = {"w": (3, 2500), "v": (70000,), "c": (4, 300, 3)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = {}
    for tag in ["base", "1", "2", "3", "4", "5"]:
        sd = base if tag == "base" else {}
        for k, b in base.items():
            if tag == "base":
                break
            delta = torch.round(torch.randn(b.shape, generator=g) * 300) / 30000  # equal magnitudes
            delta[torch.rand(b.shape, generator=g) < 0.1] = 0  # unchanged elements
            sd[k] = (b.double() + delta.double()).float()
        for kind, dtype in [("f32", torch.float32), ("f64", torch.float64)]:
            paths[tag, kind] = d / ("%s_%s.pt" % (tag, kind))
            torch.save({k: v.to(dtype) for k, v in sd.items()}, str(paths[tag, kind]))
    return paths


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("method,args", [
    ("ties", ["--density", "0.3"]),
    ("ties", ["--density", "0.3", "--trim-scope", "global", "--merge-func", "sum"]),
    ("ties", ["--density", "0.3", "--trim-scope", "global", "--majority-sign", "count"]),
    ("dare_linear", ["--density", "0.5"]),
    ("dare_linear", ["--density", "0.5", "--rescale", "none", "--weights", "1,-0.5,2,1,0.5,1,2,-1"]),
    ("dare_ties", ["--density", "0.4", "--majority-sign", "count", "--normalize"]),
    ("breadcrumbs", ["--density", "0.6", "--gamma", "0.1"]),
    ("breadcrumbs_ties", ["--density", "0.6", "--gamma", "0.1"]),
    ("della", ["--density", "0.5", "--epsilon", "0.2"]),
    ("della_linear", ["--density", "0.5,0.7,0.4,0.6,0.5,0.3,0.8,0.5", "--epsilon", "0.1"]),
])
def test_fused_float32_loops_give_the_float64_loops_bytes(wide_models, tmp_path, method, args, n):
    args = [a if "," not in a else ",".join((a.split(",") * 2)[:n]) for a in args]
    outs = {}
    for kind in ["f32", "f64"]:
        out = tmp_path / ("%s.pt" % kind)
        inputs = [wide_models[str(i % 5 + 1), kind] for i in range(n)]  # 8: two groups of 4
        assert_ok(tm(method, "-q", "--base", wide_models["base", kind], "--dtype", "float32", "-o", out, *args,
                     *inputs, cwd=tmp_path))
        outs[kind] = load(out)
    for name, t in outs["f32"].items():
        other = outs["f64"][name]
        assert t.dtype == other.dtype == torch.float32, name
        assert torch.equal(t.view(torch.int32), other.view(torch.int32)), (method, args, n, name)
