"""model_stock against an independent float64 reference written here from the formula:

  δᵢ = θᵢ − b;  cos θ over the tensor (or each row along the last dimension with filter_wise):
    pairwise cosine: mean over i < j of clamp(δᵢ·δⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6), −1, 1)   (mergekit)
    pairwise angle:  cos(mean over i < j of acos(clamp(δᵢ·δⱼ / (‖δᵢ‖‖δⱼ‖ + 1e-8), −1, 1)))  (FusionBench)
  t = N cos θ / (1 + (N − 1) cos θ  [+ 1e-8 for angle]);  θ = t·mean(θᵢ) + (1 − t)·b.

Each floating output tensor within 1 ulp of its output dtype; integer tensors from the base.
"""
from pathlib import Path

import pytest
import torch

import reference as ref
from test_methods import assert_matches, fusionbench_pool, same_tensors, write
from cli_runner import assert_error, assert_ok, tm

TAGS = ("base", "a", "b", "c")
SEEDS = {"base": 20, "a": 21, "b": 22, "c": 23, "shared": 29}
SHAPES = [("fc.weight", (7, 5), torch.float32), ("fc.bias", (7,), torch.float32), ("scale", (), torch.float32),
          ("emb.weight", (9, 4), torch.float16), ("head.weight", (3, 9), torch.bfloat16),
          ("conv.weight", (4, 3, 2, 2), torch.float32), ("col", (6, 1), torch.float32)]
BIG = [("big.weight", (3, 70001), torch.float32)]  # rows longer than a block (65536 elements)


def make_model(tag: str, shapes, own_scale: float = 0.5) -> dict:
    """A fine-tune of one base: its task vector is a shared direction plus its own noise (so the
    task vectors' cosines are positive, as between fine-tunes of one model), a counter that
    differs per model."""
    base = torch.Generator().manual_seed(SEEDS["base"])
    shared = torch.Generator().manual_seed(SEEDS["shared"])
    own = torch.Generator().manual_seed(SEEDS[tag])
    sd = {}
    for name, shape, dtype in shapes:
        b = torch.randn(shape, generator=base, dtype=torch.float64) * 3
        s = torch.randn(shape, generator=shared, dtype=torch.float64)
        o = torch.randn(shape, generator=own, dtype=torch.float64)
        if shape[-1:] in ((1,), ()):  # one-element rows: their task vectors must agree in sign (else cos θ = −1)
            s, o = s.abs() + 1, o.clamp(-1, 1)
        sd[name] = (b if tag == "base" else b + 0.05 * (s + own_scale * o)).to(dtype)
    sd["steps"] = torch.tensor(SEEDS[tag], dtype=torch.int64)
    return sd


def save_models(d: Path, shapes) -> dict:
    paths = {}
    for tag in TAGS:
        paths[tag] = d / ("%s.pt" % tag)
        torch.save(make_model(tag, shapes), str(paths[tag]))
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("stock_models"), SHAPES)


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("stock_big"), SHAPES[:3] + BIG)


def load(path: Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


def model_stock_tensor(b: torch.Tensor, xs, filter_wise: bool, pairwise: str) -> torch.Tensor:
    b = b.double()
    xs = [x.double() for x in xs]
    shape = (-1, b.shape[-1]) if filter_wise and b.dim() >= 2 else (1, -1)
    rows_b = b.reshape(shape)
    deltas = [x.reshape(shape) - rows_b for x in xs]
    n = len(xs)
    terms = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (deltas[i] * deltas[j]).sum(dim=1)
            ni, nj = deltas[i].norm(dim=1), deltas[j].norm(dim=1)
            if pairwise == "angle":
                c = (dot / (torch.sqrt((ni * ni) * (nj * nj)) + 1e-8)).clamp(-1, 1)
                terms.append(torch.acos(c))
            else:
                terms.append((dot / (ni * nj).clamp(min=1e-6)).clamp(-1, 1))
    mean = torch.stack(terms).mean(dim=0)
    if pairwise == "angle":
        cos = torch.cos(mean)
        t = n * cos / ((n - 1) * cos + 1 + 1e-8)
    else:
        t = n * mean / (1 + (n - 1) * mean)
    avg = sum(x.reshape(shape) for x in xs) / n
    return (t[:, None] * avg + (1 - t[:, None]) * rows_b).reshape(b.shape)


def model_stock_ref(base: dict, inputs, filter_wise=False, pairwise="cosine") -> dict:
    return {k: model_stock_tensor(v, [sd[k] for sd in inputs], filter_wise, pairwise) if v.is_floating_point() else v
            for k, v in base.items()}


@pytest.mark.parametrize("filter_wise", [False, True], ids=["per_tensor", "filter_wise"])
@pytest.mark.parametrize("pairwise", ["cosine", "angle"])
@pytest.mark.parametrize("tags,dtype", [("ab", None), ("abc", "bfloat16"), ("abc", "float16"), ("abc", "float32")])
def test_model_stock_matches_float64_reference(models, tmp_path, filter_wise, pairwise, tags, dtype):
    args = ["model_stock", "--base", models["base"], "--pairwise", pairwise, "-o", tmp_path / "out.pt"]
    args += ["--filter-wise"] if filter_wise else []
    args += ["--dtype", dtype] if dtype else []
    res = tm(*args, *[models[t] for t in tags], cwd=tmp_path)
    assert_ok(res)
    assert "steps" in res.stderr  # counters differ: taken from the base, with a warning
    base = load(models["base"])
    expected = model_stock_ref(base, [load(models[t]) for t in tags], filter_wise, pairwise)
    dtypes = {k: (ref.DTYPE_BY_NAME[dtype] if dtype and v.is_floating_point() else v.dtype) for k, v in base.items()}
    assert_matches(load(tmp_path / "out.pt"), expected, dtypes)


def test_model_stock_rows_longer_than_a_block(big_models, tmp_path):
    """filter_wise rows span blocks (a row stays open across them) and per-tensor sums span
    blocks; the bytes do not depend on the thread count."""
    base = load(big_models["base"])
    inputs = [load(big_models[t]) for t in "abc"]
    outs = {}
    for filter_wise in (False, True):
        for threads in ("1", "2"):
            out = tmp_path / ("fw%d_t%s.safetensors" % (filter_wise, threads))
            args = ["model_stock", "-q", "--base", big_models["base"], "-o", out]
            args += ["--filter-wise"] if filter_wise else []
            assert_ok(tm(*args, *[big_models[t] for t in "abc"], cwd=tmp_path, env={"TORCHMERGE_THREADS": threads}))
            outs[(filter_wise, threads)] = out.read_bytes()
        assert outs[(filter_wise, "1")] == outs[(filter_wise, "2")]
        out = tmp_path / ("fw%d.pt" % filter_wise)
        args = ["model_stock", "-q", "--base", big_models["base"], "-o", out] + (["--filter-wise"] if filter_wise else [])
        assert_ok(tm(*args, *[big_models[t] for t in "abc"], cwd=tmp_path))
        got = load(out)
        expected = model_stock_ref(base, inputs, filter_wise)
        for k, e in expected.items():
            if e.is_floating_point():
                ref.assert_close_ulp(got[k], e, base[k].dtype, ulps=1, name=k)


def test_identical_inputs_give_them_back(models, tmp_path):
    for filter_wise in (False, True):
        out = tmp_path / ("same%d.pt" % filter_wise)
        args = ["model_stock", "-q", "--base", models["base"], "-o", out] + (["--filter-wise"] if filter_wise else [])
        assert_ok(tm(*args, models["a"], models["a"], models["a"], cwd=tmp_path))
        got, a, base = load(out), load(models["a"]), load(models["base"])
        for k, v in a.items():
            assert torch.equal(got[k], v if v.is_floating_point() else base[k]), k


def test_two_inputs_with_orthogonal_task_vectors_give_the_base(tmp_path):
    """cos θ = 0 ⇒ t = 0: the base, exactly (the 0-d tensor: a zero task vector is orthogonal)."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 8, generator=g), "s": torch.tensor(1.5), "h": torch.randn(10, generator=g).half()}
    a, b = {}, {}
    for k, v in base.items():
        flat = torch.randn(v.numel(), generator=g, dtype=torch.float64) * 0.1
        even = torch.arange(v.numel()) % 2 == 0
        da = torch.where(even, flat, torch.zeros_like(flat)).reshape(v.shape)
        db = torch.where(even, torch.zeros_like(flat), flat).reshape(v.shape)
        a[k] = (v.double() + da).to(v.dtype)
        b[k] = (v.double() + db).to(v.dtype)
        # the stored task vectors stay orthogonal: each element moved in at most one input
        assert torch.all((a[k] == v) | (b[k] == v))
    paths = {}
    for tag, sd in (("base", base), ("a", a), ("b", b)):
        paths[tag] = tmp_path / ("%s.pt" % tag)
        torch.save(sd, str(paths[tag]))
    for filter_wise in (False, True):
        out = tmp_path / ("o%d.pt" % filter_wise)
        args = ["model_stock", "--base", paths["base"], "-o", out] + (["--filter-wise"] if filter_wise else [])
        assert_ok(tm(*args, paths["a"], paths["b"], cwd=tmp_path))
        got = load(out)
        for k, v in base.items():
            assert torch.equal(got[k], v), k


def test_filter_wise_gives_each_row_its_own_ratio(models, tmp_path):
    """A 2-D weight whose rows have different angles gets different ratios per row: the
    filter_wise output differs from the per-tensor one there, and matches its reference."""
    base = load(models["base"])
    a, b = load(models["a"]), load(models["b"])
    a["fc.weight"][0] = base["fc.weight"][0] + 0.1
    b["fc.weight"][0] = base["fc.weight"][0] + 0.1  # row 0: identical task vectors, t = 1 there
    for tag, sd in (("a2", a), ("b2", b)):
        torch.save(sd, str(tmp_path / ("%s.pt" % tag)))
    assert_ok(tm("model_stock", "-q", "--base", models["base"], "--filter-wise", "-o", tmp_path / "fw.pt",
                 tmp_path / "a2.pt", tmp_path / "b2.pt", cwd=tmp_path))
    assert_ok(tm("model_stock", "-q", "--base", models["base"], "-o", tmp_path / "pt.pt",
                 tmp_path / "a2.pt", tmp_path / "b2.pt", cwd=tmp_path))
    fw, pt = load(tmp_path / "fw.pt"), load(tmp_path / "pt.pt")
    assert torch.equal(fw["fc.weight"][0], a["fc.weight"][0])
    assert not torch.equal(pt["fc.weight"][0], a["fc.weight"][0])
    assert_matches(fw, model_stock_ref(base, [a, b], True), {k: v.dtype for k, v in base.items()})


@pytest.mark.parametrize("case", ["one_input", "no_base", "opposite"])
def test_errors_are_one_line_and_write_nothing(models, tmp_path, case):
    if case == "one_input":
        res = tm("model_stock", "--base", models["base"], "-o", tmp_path / "o.pt", models["a"], cwd=tmp_path)
        assert_error(res, "model_stock", "at least 2 inputs")
    elif case == "no_base":
        res = tm("model_stock", "-o", tmp_path / "o.pt", models["a"], models["b"], cwd=tmp_path)
        assert_error(res, "model_stock needs a base model", "--base")
    else:  # δ_b = −δ_a: cos θ = −1, 1 + (N − 1) cos θ = 0
        base, a = load(models["base"]), load(models["a"])
        neg = {k: (2 * b.double() - a[k].double()).to(b.dtype) if b.is_floating_point() else b for k, b in base.items()}
        neg_path = tmp_path.parent / ("neg_%s.pt" % tmp_path.name)
        torch.save(neg, str(neg_path))
        res = tm("model_stock", "--base", models["base"], "-o", tmp_path / "o.pt", models["a"], neg_path, cwd=tmp_path)
        assert_error(res, "tensor '", "model_stock", "undefined")
    assert list(tmp_path.iterdir()) == []


def test_mergekit_model_stock_recipe_equals_the_cli_and_the_reference(models, tmp_path):
    recipe = write(tmp_path, """
        merge_method: model_stock
        base_model: %s
        models:
          - model: %s
          - model: %s
          - model: %s
        parameters:
          filter_wise: true
        dtype: float32
        output: recipe.pt
        """ % (models["base"], models["a"], models["b"], models["c"]))
    assert_ok(tm("run", recipe, cwd=tmp_path))
    assert_ok(tm("model_stock", "--base", models["base"], "--filter-wise", "-o", tmp_path / "cli.pt",
                 models["a"], models["b"], models["c"], cwd=tmp_path))
    r = same_tensors(tmp_path / "recipe.pt", tmp_path / "cli.pt")
    base = load(models["base"])
    expected = model_stock_ref(base, [load(models[t]) for t in "abc"], True, "cosine")
    assert_matches(r, expected, {k: v.dtype for k, v in base.items()})


def fusionbench_recipe(tmp_path, models, ignore_keys="[]") -> Path:
    """FusionBench's config/method/model_stock/model_stock.yaml shape, with a model pool."""
    return write(tmp_path, """
        _target_: fusion_bench.method.model_stock.ModelStock
        ignore_keys: %s
        model_save_path: ${path.log_dir}/checkpoint
        model_save_kwargs: null""" % ignore_keys + fusionbench_pool(models, "recipe.pt"))


def test_fusionbench_model_stock_config_uses_the_mean_pairwise_angle(models, tmp_path):
    res = tm("run", fusionbench_recipe(tmp_path, models), cwd=tmp_path)
    assert_ok(res)
    assert "ignored 'model_save_path'" in res.stderr
    assert_ok(tm("model_stock", "--base", models["base"], "--pairwise", "angle", "-o", tmp_path / "cli.pt",
                 models["a"], models["b"], models["c"], cwd=tmp_path))
    r = same_tensors(tmp_path / "recipe.pt", tmp_path / "cli.pt")
    base = load(models["base"])
    expected = model_stock_ref(base, [load(models[t]) for t in "abc"], False, "angle")
    assert_matches(r, expected, {k: v.dtype for k, v in base.items()})


def test_fusionbench_model_stock_ignore_keys_are_refused(models, tmp_path):
    res = tm("run", fusionbench_recipe(tmp_path, models, '["fc.bias"]'), cwd=tmp_path)
    assert_error(res, "recipe.yaml:2:", "ignore_keys: not supported")
    assert not (tmp_path / "recipe.pt").exists()


def test_fusionbench_recipe_keeps_an_explicit_pairwise_cosine(models, tmp_path):
    recipe = fusionbench_recipe(tmp_path, models)
    recipe.write_text(recipe.read_text().replace("ignore_keys: []", "ignore_keys: []\npairwise: cosine"))
    assert_ok(tm("run", recipe, cwd=tmp_path))
    base = load(models["base"])
    expected = model_stock_ref(base, [load(models[t]) for t in "abc"], False, "cosine")
    assert_matches(load(tmp_path / "recipe.pt"), expected, {k: v.dtype for k, v in base.items()})


def test_a_tensor_held_by_one_input_is_an_error_naming_it(models, tmp_path):
    extra = load(models["a"])
    extra["only_here"] = torch.ones(3)
    base = load(models["base"])
    base["only_here"] = torch.zeros(3)
    torch.save(extra, str(tmp_path.parent / ("extra_%s.pt" % tmp_path.name)))
    torch.save(base, str(tmp_path.parent / ("base_%s.pt" % tmp_path.name)))
    res = tm("model_stock", "--keys", "union", "--base", tmp_path.parent / ("base_%s.pt" % tmp_path.name),
             "-o", tmp_path / "o.pt", tmp_path.parent / ("extra_%s.pt" % tmp_path.name), models["b"], cwd=tmp_path)
    assert_error(res, "tensor 'only_here'", "at least 2 inputs", "it is in 1")
    assert list(tmp_path.iterdir()) == []
