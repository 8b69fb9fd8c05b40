"""Merge methods on a base model, end to end through the CLI and recipes, against an independent
float64 reference computed here from the formulas (not from torchmerge's own arithmetic):

  task_arithmetic: b + λ Σ wᵢ (θᵢ − b), Σ wᵢ divided out with normalize.

Each floating output tensor must be within 1 ulp of its output dtype of the float64 value;
integer tensors come from the base model.
"""
import os
import textwrap
from pathlib import Path

import pytest
import torch

import reference as ref
from cli_runner import assert_error, assert_ok, tm

SEEDS = {"base": 10, "a": 11, "b": 12, "c": 13}


def model(tag: str) -> dict:
    """A small fine-tune of one base: tensors under 100 elements, a 0-d tensor, fp16/bf16/fp32
    tensors, a counter that differs per model."""
    g = torch.Generator().manual_seed(SEEDS[tag])
    base = torch.Generator().manual_seed(SEEDS["base"])
    delta = 0.0 if tag == "base" else 0.05
    sd = {}
    for name, shape, dtype in [("fc.weight", (7, 5), torch.float32), ("fc.bias", (7,), torch.float32),
                               ("scale", (), torch.float32), ("emb.weight", (9, 4), torch.float16),
                               ("head.weight", (3, 9), torch.bfloat16)]:
        b = torch.randn(shape, generator=base, dtype=torch.float64) * 3
        sd[name] = (b + delta * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    sd["steps"] = torch.tensor(SEEDS[tag], dtype=torch.int64)
    return sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("method_models")
    paths = {}
    for tag in SEEDS:
        paths[tag] = d / ("%s.pt" % tag)
        torch.save(model(tag), str(paths[tag]))
    return paths


def load(path: Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


def reference(base, weights, normalize, merge_float):
    """Non-floating tensors from the base; merge_float(name, base in float64, weights) gives the
    others in float64, with the weights divided by their sum when normalize."""
    w = [float(x) for x in weights]
    if normalize:
        w = [x / sum(w) for x in w]
    return {k: merge_float(k, b.double(), w) if b.is_floating_point() else b for k, b in base.items()}


def task_arithmetic_ref(base, inputs, weights, lam, normalize):
    return reference(base, weights, normalize,
                     lambda k, b64, w: b64 + lam * sum(wi * (sd[k].double() - b64) for wi, sd in zip(w, inputs)))


def assert_matches(out: dict, expected: dict, dtypes: dict) -> None:
    assert list(out) == list(expected)
    for k, e in expected.items():
        if e.is_floating_point():
            ref.assert_close_ulp(out[k], e, dtypes[k], ulps=1, name=k)
        else:
            assert torch.equal(out[k], e), k


@pytest.mark.parametrize("weights,lam,normalize", [
    (None, 1.0, False), ("1,2,3", 0.3, False), ("0.5,-0.25,1", 0.7, True), ("2,2,2", -0.5, False)])
@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16", "float32"])
def test_task_arithmetic_matches_float64_reference(models, tmp_path, weights, lam, normalize, dtype):
    args = ["task_arithmetic", "--base", models["base"], "--lambda", lam, "-o", tmp_path / "out.pt"]
    if weights:
        args += ["--weights", weights]
    if normalize:
        args += ["--normalize"]
    if dtype:
        args += ["--dtype", dtype]
    res = tm(*args, models["a"], models["b"], models["c"], cwd=tmp_path)
    assert_ok(res)
    assert "steps" in res.stderr  # counters differ: taken from the base, with a warning
    sds = [load(models[t]) for t in "abc"]
    base = load(models["base"])
    expected = task_arithmetic_ref(base, sds, (weights or "1,1,1").split(","), lam, normalize)
    dtypes = {k: (ref.DTYPE_BY_NAME[dtype] if dtype and v.is_floating_point() else v.dtype) for k, v in base.items()}
    assert_matches(load(tmp_path / "out.pt"), expected, dtypes)


def test_task_arithmetic_lambda_zero_gives_the_base_and_one_input_lambda_one_gives_it(models, tmp_path):
    assert_ok(tm("task_arithmetic", "--base", models["base"], "--lambda", 0, "-o", tmp_path / "zero.pt",
                 models["a"], models["b"], cwd=tmp_path))
    base, a = load(models["base"]), load(models["a"])
    zero = load(tmp_path / "zero.pt")
    assert all(torch.equal(zero[k], base[k]) for k in base)
    assert_ok(tm("task_arithmetic", "--base", models["base"], "-o", tmp_path / "one.pt", models["a"], cwd=tmp_path))
    one = load(tmp_path / "one.pt")
    assert all(torch.equal(one[k], a[k]) for k in base if k != "steps")


def test_task_arithmetic_bytes_do_not_depend_on_the_thread_count(models, tmp_path):
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / ("t%s.safetensors" % threads)
        assert_ok(tm("task_arithmetic", "-q", "--base", models["base"], "--lambda", "0.4", "-o", out,
                     models["a"], models["b"], models["c"], cwd=tmp_path, env={"TORCHMERGE_THREADS": threads}))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def fusionbench_pool(models, output: str = "out.pt") -> str:
    """A FusionBench model pool of the base (`_pretrained_`) and models a, b, c, with output:
    appended to a method's recipe text."""
    return """
        modelpool:
          _target_: fusion_bench.modelpool.BaseModelPool
          models:
            _pretrained_: %s
            a: %s
            b: %s
            c: %s
        output: %s
        """ % (models["base"], models["a"], models["b"], models["c"], output)


def same_tensors(path: Path, other: Path, note="") -> dict:
    """Asserts that every tensor of other equals path's, bit for bit; returns path's tensors."""
    r, c = load(path), load(other)
    assert all(torch.equal(r[k], c[k]) for k in c), note
    return r


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(textwrap.dedent(text).lstrip())
    return p


def test_fusionbench_task_arithmetic_recipe_equals_the_cli(models, tmp_path):
    recipe = write(tmp_path, """
        name: task_arithmetic
        scaling_factor: 0.3
        modelpool:
          models:
            _pretrained_: %s
            a: %s
            b: %s
        output: recipe.pt
        """ % (models["base"], models["a"], models["b"]))
    assert_ok(tm("run", recipe, cwd=tmp_path))
    assert_ok(tm("task_arithmetic", "--base", models["base"], "--lambda", "0.3", "-o", tmp_path / "cli.pt",
                 models["a"], models["b"], cwd=tmp_path))
    same_tensors(tmp_path / "recipe.pt", tmp_path / "cli.pt")


def test_mergekit_task_arithmetic_recipe_equals_the_cli(models, tmp_path):
    recipe = write(tmp_path, """
        merge_method: task_arithmetic
        base_model: %s
        models:
          - model: %s
            parameters: {weight: 0.5}
          - model: %s
            parameters: {weight: 1.5}
        parameters: {normalize: true, lambda: 0.8}
        output: recipe.pt
        """ % (models["base"], models["a"], models["b"]))
    res = tm("run", recipe, cwd=tmp_path)
    assert_ok(res)
    assert_ok(tm("task_arithmetic", "--base", models["base"], "--weights", "0.5,1.5", "--normalize",
                 "--lambda", "0.8", "-o", tmp_path / "cli.pt", models["a"], models["b"], cwd=tmp_path))
    r = same_tensors(tmp_path / "recipe.pt", tmp_path / "cli.pt")
    base = load(models["base"])
    expected = task_arithmetic_ref(base, [load(models["a"]), load(models["b"])], [0.5, 1.5], 0.8, True)
    assert_matches(r, expected, {k: v.dtype for k, v in base.items()})


@pytest.mark.parametrize("case", ["no_base_cli", "no_base_recipe", "base_lacks", "base_shape", "average_with_base"])
def test_base_model_errors_name_the_problem_and_write_nothing(models, tmp_path, case):
    base, a, b = models["base"], models["a"], models["b"]
    if case == "no_base_cli":
        res = tm("task_arithmetic", "-o", tmp_path / "o.pt", a, b, cwd=tmp_path)
        assert_error(res, "task_arithmetic needs a base model", "--base")
    elif case == "no_base_recipe":
        res = tm("run", write(tmp_path, "name: task_arithmetic\nmodels: [%s, %s]\noutput: o.pt\n" % (a, b)),
                 cwd=tmp_path)
        assert_error(res, "recipe.yaml:1:7:", "task_arithmetic needs a base model", "base_model")
    elif case in ("base_lacks", "base_shape"):
        sd = load(base)
        if case == "base_lacks":
            del sd["fc.bias"]
        else:
            sd["fc.bias"] = torch.zeros(8)
        bad = tmp_path / "bad_base.pt"
        torch.save(sd, str(bad))
        res = tm("task_arithmetic", "--base", bad, "-o", tmp_path / "o.pt", a, b, cwd=tmp_path)
        if case == "base_lacks":
            assert_error(res, "bad_base.pt", "the base model lacks tensor 'fc.bias'")
        else:
            assert_error(res, "bad_base.pt", "tensor 'fc.bias'", "shape [8] differs")
        os.remove(bad)
    else:
        res = tm("simple_average", "--base", base, "-o", tmp_path / "o.pt", a, b, cwd=tmp_path)
        assert_error(res, "simple_average takes no base model")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "recipe.yaml") == []


# ---- dare_linear: the documented mask generator, reimplemented ------------------------------------

M64 = (1 << 64) - 1


def mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def mask_key(seed: int, input_index: int, name: str) -> int:
    h = 0xCBF29CE484222325
    for ch in name.encode("utf-8"):
        h = ((h ^ ch) * 0x100000001B3) & M64
    return mix(mix(mix(seed) ^ input_index) ^ h)


def uniform(key: int, index: int) -> float:
    """u(index): the 32-bit half of mix(key ^ index // 2), the low one for an even index."""
    return ((mix(key ^ (index >> 1)) >> (32 * (index & 1))) & 0xFFFFFFFF) * 2.0 ** -32


def keep_mask(seed: int, input_index: int, name: str, numel: int, density: float) -> torch.Tensor:
    key = mask_key(seed, input_index, name)
    return torch.tensor([uniform(key, i) < density for i in range(numel)])


def dare_ref(base, inputs, weights, lam, densities, rescale, seed, normalize):
    def merge(k, b64, w):
        acc = torch.zeros_like(b64.flatten())
        for i, (wi, sd, dens) in enumerate(zip(w, inputs, densities)):
            d = sd[k].double().flatten() - b64.flatten()
            keep = keep_mask(seed, i, k, d.numel(), dens)
            kept = torch.where(keep, d, torch.zeros_like(d))
            if rescale == "inverse":
                kept = kept / dens
            elif rescale == "l1":
                n_all, n_kept = d.abs().sum().item(), kept.abs().sum().item()
                kept = kept * (n_all / n_kept) if n_kept > 0 else torch.zeros_like(kept)
            acc += lam * wi * kept
        return b64 + acc.reshape(b64.shape)
    return reference(base, weights, normalize, merge)


@pytest.mark.parametrize("rescale", ["l1", "inverse", "none"])
@pytest.mark.parametrize("density,seed,dtype", [("0.5", 0, None), ("0.2,0.6,0.9", 7, "bfloat16"),
                                                ("0.3", 123456789, "float16")])
def test_dare_linear_matches_float64_reference(models, tmp_path, rescale, density, seed, dtype):
    args = ["dare_linear", "--base", models["base"], "--density", density, "--rescale", rescale, "--seed", seed,
            "--lambda", "0.9", "--weights", "1,2,0.5", "-o", tmp_path / "out.pt"]
    if dtype:
        args += ["--dtype", dtype]
    assert_ok(tm(*args, models["a"], models["b"], models["c"], cwd=tmp_path))
    base = load(models["base"])
    dens = [float(x) for x in density.split(",")] * (3 if "," not in density else 1)
    expected = dare_ref(base, [load(models[t]) for t in "abc"], [1, 2, 0.5], 0.9, dens, rescale, seed, False)
    dtypes = {k: (ref.DTYPE_BY_NAME[dtype] if dtype and v.is_floating_point() else v.dtype) for k, v in base.items()}
    assert_matches(load(tmp_path / "out.pt"), expected, dtypes)


def test_dare_linear_density_one_is_task_arithmetic(models, tmp_path):
    common = ["--base", models["base"], "--lambda", "0.6", "--weights", "1,3"]
    assert_ok(tm("dare_linear", *common, "--density", "1", "-o", tmp_path / "dare.pt", models["a"], models["b"],
                 cwd=tmp_path))
    assert_ok(tm("task_arithmetic", *common, "-o", tmp_path / "ta.pt", models["a"], models["b"], cwd=tmp_path))
    dare, ta = load(tmp_path / "dare.pt"), load(tmp_path / "ta.pt")
    for k, v in ta.items():
        if v.is_floating_point():
            ref.assert_close_ulp(dare[k], v.double(), v.dtype, ulps=1, name=k)
        else:
            assert torch.equal(dare[k], v)


def test_dare_linear_masks_depend_on_the_seed_only(models, tmp_path):
    outs = {}
    for name, seed, threads in [("s0t1", 0, "1"), ("s0t2", 0, "2"), ("s1t2", 1, "2")]:
        out = tmp_path / (name + ".safetensors")
        assert_ok(tm("dare_linear", "-q", "--base", models["base"], "--density", "0.4", "--seed", seed, "-o", out,
                     models["a"], models["b"], models["c"], cwd=tmp_path, env={"TORCHMERGE_THREADS": threads}))
        outs[name] = out.read_bytes()
    assert outs["s0t1"] == outs["s0t2"]
    assert outs["s0t1"] != outs["s1t2"]


@pytest.mark.parametrize("density,needle", [("0", "density: 0 is outside (0, 1]"), ("1.5", "density: 1.5 is outside"),
                                            ("0.5,0.5", "expected 3 density (one per input), got 2")])
def test_dare_linear_bad_density_is_one_line_naming_it(models, tmp_path, density, needle):
    res = tm("dare_linear", "--base", models["base"], "--density", density, "-o", tmp_path / "o.pt",
             models["a"], models["b"], models["c"], cwd=tmp_path)
    assert_error(res, needle)
    assert list(tmp_path.iterdir()) == []


# ---- slerp -----------------------------------------------------------------------------------------

def slerp_tensor(v0, v1, t):
    """mergekit's slerp of one float64 tensor pair, from the formula."""
    n0, n1 = v0.norm().item(), v1.norm().item()
    d = (v0 * v1).sum().item() / ((n0 if n0 > 1e-8 else 1) * (n1 if n1 > 1e-8 else 1))
    if abs(d) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = torch.acos(torch.tensor(d, dtype=torch.float64))
    s = torch.sin(th)
    return torch.sin((1 - t) * th) / s * v0 + torch.sin(t * th) / s * v1


def slerp_ref(base, other, t):
    return reference(base, [], False, lambda k, v0, _: slerp_tensor(v0, other[k].double(), t))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("parallel", [False, True], ids=["spherical", "parallel"])
def test_slerp_matches_float64_reference(models, tmp_path, t, parallel):
    base = load(models["base"])
    other = load(models["a"])
    src = models["a"]
    if parallel:  # a multiple of the base: |cos| = 1, so slerp is the lerp
        other = {k: (v * 2 if v.is_floating_point() else v) for k, v in base.items()}
        src = tmp_path / "twice.pt"
        torch.save(other, str(src))
    assert_ok(tm("slerp", "-q", "--base", models["base"], "--t", t, "-o", tmp_path / "out.pt", src, cwd=tmp_path))
    out = load(tmp_path / "out.pt")
    assert_matches(out, slerp_ref(base, other, t), {k: v.dtype for k, v in base.items()})
    if t in (0.0, 1.0):  # the endpoints themselves
        end = base if t == 0.0 else other
        for k, v in end.items():
            if v.is_floating_point():
                ref.assert_close_ulp(out[k], v.double(), v.dtype, ulps=1, name=k)


def test_slerp_takes_one_input(models, tmp_path):
    res = tm("slerp", "--base", models["base"], "--t", 0.5, "-o", tmp_path / "o.pt", models["a"], models["b"],
             cwd=tmp_path)
    assert_error(res, "slerp merges at most 1 input, got 2")
