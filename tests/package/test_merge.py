"""torchmerge.merge against the CLI byte for byte (every option), its errors against the CLI's
one-line messages, merge_state_dicts against the file merge, save(), run_recipe(), methods()
and `python3 -m torchmerge`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchmerge

BIN = os.environ.get("TORCHMERGE_BIN") or torchmerge.find_cli()
ERROR_PREFIX = "torchmerge: error: "


def cli(cwd, *args):
    return subprocess.run([BIN] + [str(a) for a in args], cwd=str(cwd), capture_output=True, text=True)


def tree(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# (CLI arguments, merge() keyword arguments); inputs are fx files, OUT the output name.
CASES = {
    "simple_average": (["simple_average", "-o", "OUT.pt", "sd_a", "sd_b", "sd_c"], dict(output="OUT.pt")),
    "weighted_normalize": (["weighted_average", "--weights", "1,-0.5,2", "--no-normalize", "-o", "OUT.pt",
                            "sd_a", "sd_b", "sd_c"],
                           dict(output="OUT.pt", method="weighted_average", weights=[1, -0.5, 2], normalize=False)),
    "dtype_safetensors": (["simple_average", "--dtype", "bfloat16", "-o", "OUT.safetensors", "sd_a", "sd_b"],
                          dict(output="OUT.safetensors", dtype=torch.bfloat16)),
    "folder_shards": (["weighted_average", "--weights", "0.25,0.75", "--max-shard-size", "300", "-o", "OUT/",
                       "sd_a", "sd_b"],
                      dict(output="OUT/", method="weighted_average", weights=[0.25, 0.75], max_shard_size="300")),
    "ties_masks": (["ties", "--base", "sd_c", "--density", "0.5", "--lambda", "0.8", "--majority-sign", "count",
                    "--masks-out", "masks.safetensors", "-o", "OUT.safetensors", "sd_a", "sd_b"],
                   dict(output="OUT.safetensors", method="ties", base="sd_c", density=0.5, lambda_=0.8,
                        majority_sign="count", masks_out="masks.safetensors")),
    "dare_ties_seed": (["dare_ties", "--base", "sd_c", "--density", "0.3,0.6", "--seed", "7", "-o", "OUT.pt",
                        "sd_a", "sd_b"],
                       dict(output="OUT.pt", method="dare_ties", base="sd_c", density=[0.3, 0.6], seed=7)),
    "task_arithmetic_text": (["task_arithmetic", "--base", "sd_c", "--weights", "0.2,0.8", "-o", "OUT.pt",
                              "sd_a", "sd_b"],
                             dict(output="OUT.pt", method="task_arithmetic", base="sd_c", weights="0.2,0.8")),
    "slerp": (["slerp", "--base", "sd_a", "--t", "0.3", "-o", "OUT.pt", "sd_b"],
              dict(output="OUT.pt", method="slerp", base="sd_a", t=0.3)),
    "model_stock": (["model_stock", "--base", "sd_c", "-o", "OUT.pt", "sd_a", "sd_b"],
                    dict(output="OUT.pt", method="model_stock", base="sd_c")),
    "keys_union": (["simple_average", "--keys", "union", "-o", "OUT.pt", "sd_a", "extra_key"],
                   dict(output="OUT.pt", keys="union")),
    "nested_key": (["simple_average", "--key", "state_dict", "-o", "OUT.pt", "nested_a", "nested_b"],
                   dict(output="OUT.pt", key="state_dict")),
    "torchscript_template": (["simple_average", "--template", "template", "--format", "torchscript", "-o",
                              "OUT.pt", "sd_a", "sd_b"],
                             dict(output="OUT.pt", template="template", format="torchscript")),
}
INPUTS = {"simple_average": ["sd_a", "sd_b", "sd_c"], "weighted_normalize": ["sd_a", "sd_b", "sd_c"],
          "keys_union": ["sd_a", "extra_key"], "nested_key": ["nested_a", "nested_b"], "slerp": ["sd_b"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_is_byte_identical_to_the_cli(fx, tmp_path, case, monkeypatch):
    argv, kwargs = CASES[case]
    names = {"sd_a", "sd_b", "sd_c", "extra_key", "nested_a", "nested_b", "template"}
    resolve = lambda a: str(fx / (a + ".pt")) if a in names else a  # noqa: E731
    (tmp_path / "cli").mkdir()
    (tmp_path / "py").mkdir()
    r = cli(tmp_path / "cli", *[resolve(a) for a in argv], "-q")
    assert r.returncode == 0, r.stderr
    kwargs = {k: (resolve(v) if k in ("base", "template") else v) for k, v in kwargs.items()}
    inputs = [fx / (n + ".pt") for n in INPUTS.get(case, ["sd_a", "sd_b"])]
    monkeypatch.chdir(tmp_path / "py")
    torchmerge.merge(inputs, quiet=True, **kwargs)
    got, want = tree(tmp_path / "py"), tree(tmp_path / "cli")
    assert list(got) == list(want)
    for name in want:
        assert got[name] == want[name], name


# (CLI arguments before the inputs, inputs, merge() keyword arguments); "@name" is fx/name.pt.
ERROR_CASES = [
    ([], ["@sd_a", "@shape_mismatch"], dict()),
    ([], ["@sd_a", "@missing_key"], dict()),
    (["ties"], ["@sd_a", "@sd_b"], dict(method="ties")),
    (["ties", "--base", "@sd_c", "--density", "2"], ["@sd_a", "@sd_b"], dict(method="ties", base="@sd_c", density=2)),
    ([], ["@sd_a", "@nope"], dict()),
    ([], ["@sd_a", "@evil"], dict()),
    ([], ["@ambiguous", "@ambiguous"], dict()),
    (["dare_linear", "--base", "@sd_c", "--density", "0.5", "--rescale", "l7"], ["@sd_a", "@sd_b"],
     dict(method="dare_linear", base="@sd_c", density=0.5, rescale="l7")),
]


@pytest.mark.parametrize("args,inputs,kwargs", ERROR_CASES,
                         ids=[" ".join(c[0][:1] + c[1]) for c in ERROR_CASES])
def test_errors_are_torchmerge_errors_with_the_clis_one_line_message(fx, tmp_path, args, inputs, kwargs,
                                                                      monkeypatch):
    at = lambda a: str(fx / (a[1:] + ".pt")) if isinstance(a, str) and a.startswith("@") else a  # noqa: E731
    inputs = [at(a) for a in inputs]
    r = cli(tmp_path, *([at(a) for a in args] or ["simple_average"]), "-o", "o.pt", *inputs)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(torchmerge.TorchmergeError) as err:
        torchmerge.merge(inputs, "o.pt", quiet=True, **{k: at(v) for k, v in kwargs.items()})
    assert isinstance(err.value, RuntimeError)
    assert str(err.value) == lines[0][len(ERROR_PREFIX):]
    assert not (tmp_path / "o.pt").exists()


def test_argument_errors_name_the_argument(fx, tmp_path):
    a, b = fx / "sd_a.pt", fx / "sd_b.pt"
    for kwargs, needle in [(dict(dtype="int8"), "dtype:"), (dict(keys="some"), "keys:"),
                           (dict(format="onnx"), "format:"), (dict(max_shard_size="lots"), "max_shard_size:"),
                           (dict(method="nope"), "nope"), (dict(wieghts=[1, 2]), "wieghts")]:
        with pytest.raises(torchmerge.TorchmergeError) as err:
            torchmerge.merge([a, b], tmp_path / "o.pt", quiet=True, **kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value), (kwargs, str(err.value))


def test_warnings_progress_and_profile(fx, tmp_path):
    seen = []
    with pytest.warns(torchmerge.TorchmergeWarning, match="num_batches_tracked"):
        prof = torchmerge.merge([fx / "sd_a.pt", fx / "sd_b.pt"], tmp_path / "o.pt",
                                progress=lambda done, total: seen.append((done, total)), profile=True)
    n = len(torch.load(str(fx / "sd_a.pt")))
    assert seen[-1] == (n, n) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert prof["merge_calls"] >= 1 and prof["save_seconds"] >= 0


# ---- in memory -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params", [
    ("simple_average", {}), ("weighted_average", dict(weights=[0.3, -0.7], normalize=False)),
    ("task_arithmetic", dict(weights=[0.5, 0.5], lambda_=0.9)),
    ("ties", dict(density=0.4, majority_sign="sum")), ("dare_linear", dict(density=0.5, seed=3)),
    ("breadcrumbs", dict(density=0.8, gamma=0.1)), ("model_stock", {})])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_merge_state_dicts_equals_the_file_merge(fx, tmp_path, method, params, dtype):
    needs_base = any(m.name == method and m.needs_base for m in torchmerge.methods())
    base = fx / "sd_c.pt" if needs_base else None
    torchmerge.merge([fx / "sd_a.pt", fx / "sd_b.pt"], tmp_path / "o.pt", method=method, base=base, dtype=dtype,
                     quiet=True, **params)
    want = torch.load(str(tmp_path / "o.pt"))
    sds = [torchmerge.load(fx / "sd_a.pt"), torch.load(str(fx / "sd_b.pt"))]
    got = torchmerge.merge_state_dicts(sds, method=method, base=torchmerge.load(base) if base else None,
                                       dtype=dtype, **params)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_merge_state_dicts_checks_keys_and_shapes(fx):
    a = torch.load(str(fx / "sd_a.pt"))
    extra = torch.load(str(fx / "extra_key.pt"))
    with pytest.raises(torchmerge.TorchmergeError, match="lacks"):
        torchmerge.merge_state_dicts([a, extra])
    assert list(torchmerge.merge_state_dicts([a, extra], keys="intersection")) == list(a)
    union = torchmerge.merge_state_dicts([a, extra], method="weighted_average", keys="union", weights=[1, 3])
    assert set(union) == set(extra) and torch.equal(union[(set(extra) - set(a)).pop()],
                                                    extra[(set(extra) - set(a)).pop()])
    bad = torch.load(str(fx / "shape_mismatch.pt"))
    with pytest.raises(torchmerge.TorchmergeError, match="tensor 'fc.weight': shape"):
        torchmerge.merge_state_dicts([a, bad])
    with pytest.raises(torchmerge.TorchmergeError, match="density"):
        torchmerge.merge_state_dicts([a, a], method="ties", base=a, density=3)


# ---- save ----------------------------------------------------------------------------------------

def test_save_formats_read_back(fx, tmp_path):
    sd = torch.load(str(fx / "dtype_a.pt"))
    sd = {k: v for k, v in sd.items() if v.dtype != torch.complex128}  # no safetensors dtype for it
    sd["transposed"] = torch.randn(3, 5).t()
    torchmerge.save(sd, tmp_path / "a.pt")
    pt = torch.load(str(tmp_path / "a.pt"), weights_only=True)
    torchmerge.save(sd, tmp_path / "a.safetensors", metadata={"k": "v"})
    st = torchmerge.load(tmp_path / "a.safetensors")
    torchmerge.save(sd, str(tmp_path / "shards") + "/", max_shard_size=200)  # a Path drops the "/"
    shards = torchmerge.load(tmp_path / "shards")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    for got in (pt, st, shards):
        assert list(got) == list(sd)
        for k in sd:
            assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), k
    # folders: the caller's metadata in every shard, the library's shard layout, other files kept
    (tmp_path / "shards" / "config.json").write_text("{}")
    torchmerge.save(sd, tmp_path / "shards", max_shard_size="150", metadata={"who": "me"})
    assert all(torchmerge.inspect(p).metadata == {"who": "me", "format": "pt"}
               for p in (tmp_path / "shards").glob("*.safetensors"))
    assert (tmp_path / "shards" / "config.json").exists()
    (tmp_path / "lib").mkdir()
    torchmerge.save(sd, tmp_path / "one.safetensors")
    r = cli(tmp_path, "simple_average", "-q", "--max-shard-size", "150", "-o", str(tmp_path / "lib") + "/",
            tmp_path / "one.safetensors")
    assert r.returncode == 0, r.stderr
    import json
    index = lambda d: json.loads((d / "model.safetensors.index.json").read_text())  # noqa: E731
    assert index(tmp_path / "lib") == index(tmp_path / "shards")
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == \
        sorted(p.name for p in (tmp_path / "shards").iterdir() if p.name != "config.json")
    (tmp_path / "one.safetensors").unlink()
    import shutil
    shutil.rmtree(tmp_path / "lib")
    with pytest.raises(torchmerge.TorchmergeError, match="complex128"):
        torchmerge.save({"c": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "c.pt")
    with pytest.raises(torchmerge.TorchmergeError, match="metadata"):
        torchmerge.save(sd, tmp_path / "m.pt", metadata={"a": "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "a.safetensors", "shards"]


# ---- recipes, methods, the CLI -------------------------------------------------------------------

def test_run_recipe_with_overrides_equals_the_cli(fx, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: weighted_average\nweights: [1, 2]\nmodels:\n  - %s\n  - %s\noutput: out.safetensors\n"
                      % (fx / "sd_a.pt", fx / "sd_b.pt"))
    (tmp_path / "cli").mkdir()
    (tmp_path / "py").mkdir()
    r = cli(tmp_path / "cli", "run", recipe, "weights=[1,3]", "-q")
    assert r.returncode == 0, r.stderr
    monkeypatch.chdir(tmp_path / "py")
    torchmerge.run_recipe(recipe, overrides=["weights=[1,3]"], quiet=True)
    assert tree(tmp_path / "py") == tree(tmp_path / "cli")
    torchmerge.run_recipe(recipe.read_text(), ["output=t.pt"], text=True, quiet=True)
    with pytest.raises(torchmerge.TorchmergeError, match="r.yaml:"):
        recipe.write_text("method: weighted_average\nwieghts: [1]\nmodels: [a.pt]\noutput: x.pt\n")
        torchmerge.run_recipe(recipe, quiet=True)


def test_methods_describe_the_table():
    ms = {m.name: m for m in torchmerge.methods()}
    assert {"simple_average", "weighted_average", "ties", "dare_ties", "slerp", "model_stock"} <= set(ms)
    assert ms["ties"].needs_base and not ms["simple_average"].needs_base
    density = [p for p in ms["ties"].params if p.name == "density"][0]
    assert density.kind == "number" and 0 <= density.min <= density.max <= 1


def test_python_m_torchmerge_runs_the_cli(fx, tmp_path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "torchmerge", "simple_average", "-q", "-o", str(tmp_path / "m.pt"),
                        str(fx / "sd_a.pt"), str(fx / "sd_b.pt")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    c = cli(tmp_path, "simple_average", "-q", "-o", tmp_path / "c.pt", fx / "sd_a.pt", fx / "sd_b.pt")
    assert c.returncode == 0 and (tmp_path / "m.pt").read_bytes() == (tmp_path / "c.pt").read_bytes()
    r = subprocess.run([sys.executable, "-m", "torchmerge", "simple_average", "-o", "x.pt"], capture_output=True,
                       text=True, env=env, cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith(ERROR_PREFIX)


def test_quantized_inputs_dequantize_like_the_cli(tmp_path, monkeypatch):
    torch.manual_seed(5)
    paths = []
    for i in range(2):
        x = torch.randn(4, 6)
        sd = {"q": torch.quantize_per_tensor(x, 0.05, 3 + i, torch.qint8),
              "pc": torch.quantize_per_channel(x, torch.rand(4, dtype=torch.float64) + 0.01,
                                               torch.tensor([0, 1, 2, 3]), 0, torch.quint8),
              "f": x}
        paths.append(tmp_path / ("q%d.pt" % i))
        torch.save(sd, str(paths[-1]))
    (tmp_path / "cli").mkdir()
    (tmp_path / "py").mkdir()
    r = cli(tmp_path / "cli", "simple_average", "-q", "-o", "o.pt", *paths)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    monkeypatch.chdir(tmp_path / "py")
    with pytest.raises(torchmerge.TorchmergeError) as err:
        torchmerge.merge(paths, "o.pt", quiet=True)
    assert str(err.value) == r.stderr.strip()[len(ERROR_PREFIX):] and "tensor '" in str(err.value)
    r = cli(tmp_path / "cli", "simple_average", "-q", "--dequantize", "--dtype", "float16", "-o", "o.pt", *paths)
    assert r.returncode == 0, r.stderr
    torchmerge.merge(paths, "o.pt", dequantize=True, dtype="float16", quiet=True)
    assert (tmp_path / "py" / "o.pt").read_bytes() == (tmp_path / "cli" / "o.pt").read_bytes()


class Pair(torch.nn.Module):
    def __init__(self, p=(0.0, 0.0)):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(p, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.p


class Closeness(torch.nn.Module):
    """Score -|outputs - 1|^2 with inputs = ones."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inputs", torch.ones(2))

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        return -((outputs - 1.0) ** 2).sum()


def test_greedy_soup_equals_the_cli(tmp_path, monkeypatch):
    # alone: A = B = -0.04 > C = D = -0.18 > E; {A,B} kept, {A,B,C} dropped, {A,B,D} kept, E dropped
    pts = {"E": (5.0, 5.0), "C": (1.3, 1.3), "A": (1.0, 1.2), "D": (0.7, 0.7), "B": (1.2, 1.0)}
    inputs = []
    for name, p in pts.items():
        inputs.append(tmp_path / (name + ".pt"))
        torch.save(Pair(p).state_dict(), str(inputs[-1]))
    torch.jit.save(torch.jit.script(Pair()), str(tmp_path / "template.pt"))
    torch.jit.save(torch.jit.script(Closeness()), str(tmp_path / "eval.pt"))
    (tmp_path / "cli").mkdir()
    (tmp_path / "py").mkdir()
    r = cli(tmp_path / "cli", "greedy_soup", "-q", "--eval", tmp_path / "eval.pt", "--template",
            tmp_path / "template.pt", "-o", "soup.safetensors", *inputs)
    assert r.returncode == 0, r.stderr
    monkeypatch.chdir(tmp_path / "py")
    rep = torchmerge.greedy_soup(inputs, "soup.safetensors", tmp_path / "eval.pt", template=tmp_path / "template.pt",
                                 quiet=True)
    assert [(Path(t.input).stem, t.kept) for t in rep.tried] == [("A", True), ("B", True), ("C", False), ("D", True),
                                                                 ("E", False)]
    assert rep.n_kept == 3 and rep.final_score == pytest.approx(-0.002222, abs=2e-6)
    assert [t.score for t in rep.tried] == pytest.approx([-0.04, -0.04, -0.18, -0.18, -32.0], abs=2e-6)
    assert tree(tmp_path / "py") == tree(tmp_path / "cli")
    with pytest.raises(torchmerge.TorchmergeError, match="eval"):
        torchmerge.greedy_soup(inputs, "x.pt", tmp_path / "no_eval.pt", template=tmp_path / "template.pt", quiet=True)
