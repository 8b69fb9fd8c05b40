"""della and della_linear (mergekit's della_magprune sparsification, then TIES / linear) through
the CLI, against an independent float64 reference written here from the formulas:

  per input j, per fibre along dim 1 (0-d and 1-D tensors: one fibre), |δ| ranked ascending
  r = 1..L (equal magnitudes: the lower index first), p = (densityⱼ − εⱼ) + (r − 1)/(L − 1)·2·εⱼ
  (L = 1: p = densityⱼ), kept when u < p with u the documented generator of merge/random.h at the
  element's row-major index (test_methods.uniform / mask_key reimplement it); then rescaled (l1 by
  default), weighted, and merged as TIES (della) or linearly (della_linear), × λ, + b.

Each floating output tensor must be within 1 ulp of its dtype of the float64 value.
"""
import textwrap

import pytest
import torch

import reference as ref
from cli_runner import assert_error, assert_ok, tm
from test_masks import read_masks
from test_methods import load, mask_key, model, uniform
from test_sparse_methods import dtypes_of, gta_ref, per_input, run, write_models

INPUTS = "abc"


# ---- reference --------------------------------------------------------------------------------------

def della_mask(seed: int, j: int, name: str, d: torch.Tensor, density: float, eps: float) -> torch.Tensor:
    """Input j's keep mask of δ (its tensor shape), flat, from the definition."""
    numel = d.numel()
    if density >= 1:
        return torch.ones(numel, dtype=torch.bool)
    x = d.reshape(1, -1) if d.dim() < 2 else d
    length = x.shape[1]
    index = torch.arange(numel).reshape(x.shape)
    fibres = x.movedim(1, -1).reshape(-1, length).tolist()
    where = index.movedim(1, -1).reshape(-1, length).tolist()
    key = mask_key(seed, j, name)
    keep = [False] * numel
    for mags, at in zip(fibres, where):
        order = sorted(range(length), key=lambda r: (abs(mags[r]), r))  # ascending, lower index first
        for pos, r in enumerate(order):
            p = density if length == 1 else (density - eps) + pos / (length - 1) * 2 * eps
            keep[at[r]] = uniform(key, at[r]) < p
    return torch.tensor(keep, dtype=torch.bool)


def della_ref(base, inputs, method, weights, lam, dens, eps, seed, rescale="l1", sign="sum", normalize=None):
    ties = method == "della"
    if normalize is None:
        normalize = ties  # mergekit: della normalizes, della_linear does not
    return gta_ref(base, inputs, weights, lam,
                   lambda k, j, d: della_mask(seed, j, k, d.reshape(base[k].shape), dens[j], eps[j]),
                   rescale=rescale, densities=dens, ties=ties, sign_rule=sign,
                   agg="mean" if normalize else "sum", normalize=normalize)


# ---- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def della_models(tmp_path_factory):
    """test_methods' small models (0-d, 1-D, 2-D fp32/fp16/bf16, an integer counter) and: a 4-D conv
    weight, rows spanning blocks ([3, 70001]: 65,536 elements a block) and a 1-D tensor over a block
    (one fibre; both longer than the bucketed fibres: sorted), rows and a 1-D tensor the buckets
    rank (64 to 65,535 elements; the 1-D one with many zero task-vector entries; rows of an odd
    length, whose fibres start at odd and even indices: random.h's coins come in pairs), rows of equal
    magnitudes (the tie rule) with zero task-vector entries, and one [5, 1] (fibres of one
    element)."""
    g = torch.Generator().manual_seed(21)
    conv = torch.randn(4, 3, 3, 2, generator=g)
    wide = torch.randn(3, 70001, generator=g)
    long = torch.randn(66000, generator=g)
    mid = torch.randn(4, 3000, generator=g)
    mid1d = torch.randn(5000, generator=g)
    odd = torch.randn(3, 1001, generator=g)
    col = torch.randn(5, 1, generator=g)
    sds = {}
    for n, tag in enumerate(["base", *INPUTS]):
        sd = model(tag)
        step = 0.0 if tag == "base" else 0.05
        sd["conv.weight"] = conv + step * torch.randn(conv.shape, generator=g)
        sd["wide"] = wide + step * torch.randn(wide.shape, generator=g)
        sd["long"] = long + step * torch.randn(long.shape, generator=g)
        sd["mid"] = mid + step * torch.randn(mid.shape, generator=g)
        sd["mid1d"] = mid1d + step * torch.randn(mid1d.shape, generator=g) * (torch.rand(5000, generator=g) < 0.6)
        sd["odd"] = odd + step * torch.randn(odd.shape, generator=g)
        sd["col"] = col + step * torch.randn(col.shape, generator=g)
        # |δ| in {0, 0.5, 1}: runs of equal magnitudes of both signs in every row
        pattern = torch.tensor([[1, -1, 0.5, 1, -0.5, 0, 1, -1, 0.5, -1], [0.5, 0.5, -0.5, 1, 0, 0, -1, 1, 1, 0.5]])
        sd["same"] = torch.zeros(2, 10) if tag == "base" else pattern.roll(n, 1) * (1 if n % 2 else -1)
        sds[tag] = sd
    return write_models(tmp_path_factory.mktemp("della_models"), sds)


def base_and_inputs(paths):
    return load(paths["base"]), [load(paths[t]) for t in INPUTS]


# ---- against the reference --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("density,epsilon,weights,lam,seed,extra,dtype", [
    ("0.5", "0.15", "1,1,1", 1.0, 0, [], None),
    ("0.3,0.6,0.8", "0.1,0.2,0.15", "1,-2,0.5", 0.8, 7, ["--rescale", "inverse"], "float16"),
    ("0.4", "0.3", "0.5,1,2", 1.3, 99, ["--rescale", "none", "--majority-sign", "count"], "bfloat16"),
    ("0.7", "0", "2,1,-1", 0.6, 3, ["--no-normalize"], "float32"),
])
def test_della_matches_float64_reference(della_models, tmp_path, method, density, epsilon, weights, lam, seed, extra,
                                         dtype):
    if method == "della_linear" and "--majority-sign" in extra:
        extra = extra[:2]
    args = ["--density", density, "--epsilon", epsilon, "--weights", weights, "--lambda", lam, "--seed", seed, *extra]
    out = run(della_models, tmp_path, method, *args, dtype=dtype)
    base, inputs = base_and_inputs(della_models)
    rescale = extra[1] if extra[:1] == ["--rescale"] else "l1"
    sign = "count" if "count" in extra else "sum"
    normalize = False if "--no-normalize" in extra else None
    expected = della_ref(base, inputs, method, weights.split(","), lam, per_input(density), per_input(epsilon), seed,
                         rescale, sign, normalize)
    ref_dtypes = dtypes_of(base, dtype)
    for k, e in expected.items():
        if e.is_floating_point():
            ref.assert_close_ulp(out[k], e, ref_dtypes[k], ulps=1, name=k)
        else:
            assert torch.equal(out[k], e), k


def test_della_masks_out_are_the_reference_masks(della_models, tmp_path):
    masks_path = tmp_path / "m.safetensors"
    run(della_models, tmp_path, "della", "--density", "0.4,0.5,0.6", "--epsilon", "0.2", "--seed", "5",
        "--masks-out", masks_path)
    masks, meta = read_masks(masks_path)
    assert meta["torchmerge_masks_of"] == "della"
    base, inputs = base_and_inputs(della_models)
    floating = [k for k, v in base.items() if v.is_floating_point()]
    assert sorted(masks) == sorted("%d.%s" % (j, k) for j in range(3) for k in floating)
    for j, (sd, dens) in enumerate(zip(inputs, [0.4, 0.5, 0.6])):
        for k in floating:
            m = masks["%d.%s" % (j, k)]
            assert m.shape == base[k].shape, k
            d = sd[k].double() - base[k].double()
            assert torch.equal(m.flatten(), della_mask(5, j, k, d, dens, 0.2)), k
    # the keep rate follows density (a large tensor: 630,003 Bernoulli draws per input)
    for j, dens in enumerate([0.4, 0.5, 0.6]):
        assert abs(masks["%d.wide" % j].double().mean().item() - dens) < 0.01


def test_equal_magnitudes_rank_by_index(tmp_path):
    """Every |δ| of a row equal: the ranks are the column order, so the keep probability of column c
    of L is (d − ε) + c/(L − 1)·2ε — checked without any sort, on the masks; and with ε = 0.45 the
    last columns are kept far more often than the first."""
    rows, length = 400, 50
    base = {"w": torch.zeros(rows, length)}
    sign = torch.where(torch.rand(rows, length, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    paths = write_models(tmp_path, {"base": base, "a": {"w": 0.25 * sign}})
    masks_path = tmp_path / "m.safetensors"
    run(paths, tmp_path, "della_linear", "--density", "0.5", "--epsilon", "0.45", "--seed", "11",
        "--masks-out", masks_path, inputs="a")
    m = read_masks(masks_path)[0]["0.w"]
    key = mask_key(11, 0, "w")
    expect = torch.tensor([[uniform(key, r * length + c) < 0.05 + c / (length - 1) * 2 * 0.45
                            for c in range(length)] for r in range(rows)])
    assert torch.equal(m, expect)
    assert m[:, :5].double().mean() < 0.2 < 0.8 < m[:, -5:].double().mean()


def test_density_one_keeps_everything(della_models, tmp_path):
    """density 1 (the default, as mergekit) keeps every element whatever epsilon: della_linear is
    task arithmetic, della is ties at density 1; the masks are all ones."""
    common = ["--weights", "1,2,-1", "--lambda", "0.7"]
    a = run(della_models, tmp_path, "della_linear", *common, "--epsilon", "0.5", "--masks-out",
            tmp_path / "m.safetensors", out="dl.pt")
    b = run(della_models, tmp_path, "task_arithmetic", *common, out="ta.pt")
    c = run(della_models, tmp_path, "della", *common, out="d.pt")
    d = run(della_models, tmp_path, "ties", "--density", "1", *common, out="t.pt")
    for k in b:
        if b[k].is_floating_point():
            ref.assert_close_ulp(a[k], b[k].double(), b[k].dtype, ulps=1, name=k)
        else:
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(c[k], d[k]), k
    assert all(bool(m.all()) for m in read_masks(tmp_path / "m.safetensors")[0].values())


def test_della_bytes_do_not_depend_on_the_thread_count(della_models, tmp_path):
    for method in ("della", "della_linear"):
        outs = []
        for threads in "12":
            masks = tmp_path / ("%s%s.masks.safetensors" % (method, threads))
            out = run(della_models, tmp_path, method, "--density", "0.45", "--epsilon", "0.25", "--seed", "2",
                      "--masks-out", masks, out="%s%s.safetensors" % (method, threads),
                      env={"TORCHMERGE_THREADS": threads})
            outs.append((out, masks.read_bytes()))
        assert outs[0] == outs[1], method


def test_mergekit_della_recipe_equals_the_cli(della_models, tmp_path):
    """mergekit's della config: per-model weight/density/epsilon, rescale: true (= l1), lambda."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""\
        merge_method: della
        base_model: %s
        models:
          - model: %s
            parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}
          - model: %s
            parameters: {weight: 0.5, density: 0.6, epsilon: 0.2}
        parameters: {lambda: 0.9, rescale: true, normalize: true}
        """ % (della_models["base"], della_models["a"], della_models["b"])))
    assert_ok(tm("run", recipe, "-o", tmp_path / "r.pt", cwd=tmp_path))
    cli = run(della_models, tmp_path, "della", "--weights", "1,0.5", "--density", "0.5,0.6", "--epsilon", "0.1,0.2",
              "--lambda", "0.9", inputs="ab", out="c.pt")
    r = load(tmp_path / "r.pt")
    assert list(r) == list(cli) and all(torch.equal(r[k], cli[k]) for k in cli)


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,args,needle", [
    ("della", ["--density", "0.9"], "density ± epsilon: 0.9 ± 0.15 leaves (0, 1) (input 0)"),
    ("della_linear", ["--density", "0.5,0.1", "--epsilon", "0.1"], "density ± epsilon: 0.1 ± 0.1 leaves (0, 1) (input 1)"),
    ("della", ["--density", "0.5", "--epsilon", "0.5"], "density ± epsilon: 0.5 ± 0.5 leaves (0, 1)"),
    ("della", ["--density", "0.5", "--epsilon", "1"], "epsilon: 1 is outside [0, 1)"),
    ("della_linear", ["--density", "0.5", "--epsilon", "-0.1"], "epsilon: -0.1 is outside [0, 1)"),
    ("della", ["--density", "0"], "density: 0 is outside (0, 1]"),
    ("della_linear", ["--density", "0.5", "--rescale", "l2"], "rescale: expected one of l1|inverse|none"),
])
def test_bad_parameters_are_one_line_naming_them(della_models, tmp_path, method, args, needle):
    res = tm(method, "--base", della_models["base"], *args, "-o", tmp_path / "o.pt", della_models["a"],
             della_models["b"], cwd=tmp_path)
    assert_error(res, needle)
    assert not (tmp_path / "o.pt").exists()


def test_epsilon_zero_is_dare_with_the_same_masks(della_models, tmp_path):
    """ε = 0: p = density for every rank, so the masks are DARE's (same key, same element index)."""
    common = ["--density", "0.35,0.5,0.65", "--seed", "4", "--weights", "1,-1,2", "--lambda", "0.8"]
    a = run(della_models, tmp_path, "della_linear", *common, "--epsilon", "0", out="della.pt")
    b = run(della_models, tmp_path, "dare_linear", *common, out="dare.pt")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in b)  # the same arithmetic too
