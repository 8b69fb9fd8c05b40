"""mergekit configs in recipes: the base model listed among the models, layer gradients, slices.

The base model listed in models: (slerp's two models; often ties') is the base, not an input, as
mergekit leaves it out of the task vectors. A parameter given as a list of numbers is
a gradient: anchors spread evenly over the layers, t = i / (n − 1) for layer i of n (1 with one
layer), tensors outside the layers (embeddings, final norm, head) at t = 0, and linear
interpolation between neighbouring anchors (mergekit's evaluate_setting). slices: with one slice
whose sources take every layer are the models. Checked against float64 references computed here
from those rules."""
import textwrap

import pytest
import torch

import reference as ref
from cli_runner import assert_error, assert_ok, tm
from test_methods import load, slerp_tensor

N_LAYERS = 4


def llama_like(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(11, 6, generator=g)}
    for i in range(N_LAYERS):
        sd["model.layers.%d.self_attn.q_proj.weight" % i] = torch.randn(6, 6, generator=g)
        sd["model.layers.%d.mlp.up_proj.weight" % i] = torch.randn(8, 6, generator=g)
        sd["model.layers.%d.input_layernorm.weight" % i] = torch.randn(6, generator=g)
    sd["model.norm.weight"] = torch.randn(6, generator=g)
    sd["lm_head.weight"] = torch.randn(11, 6, generator=g)
    return sd


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamas")
    paths = {}
    for tag, seed in [("a", 1), ("b", 2), ("c", 3)]:
        paths[tag] = d / ("%s.pt" % tag)
        torch.save(llama_like(seed), str(paths[tag]))
    return paths


def gradient_at(anchors, t):
    """mergekit's evaluate_setting for a list of numbers."""
    scaled = t * (len(anchors) - 1)
    i0 = int(scaled)
    i1 = min(len(anchors) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * anchors[i0] + frac * anchors[i1]


def layer_t(name):
    parts = [p for p in name.split(".") if p.isdigit()]
    return int(parts[0]) / (N_LAYERS - 1) if parts else 0.0


def run_recipe(tmp_path, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(text))
    return tm("run", recipe, cwd=tmp_path)


SLERP = """\
    slices:
      - sources:
          - model: {a}
            layer_range: [0, {n}]
          - model: {b}
            layer_range: [0, {n}]
    merge_method: slerp
    base_model: {a}
    parameters:
      t:
        - filter: self_attn
          value: [0, 0.5, 0.3, 0.7, 1]
        - filter: mlp
          value: [1, 0.5, 0.7, 0.3, 0]
        - value: 0.5
    dtype: float32
    output: {out}
    """


def test_the_classic_slerp_config_runs_unchanged(llamas, tmp_path):
    """The slerp example of mergekit's README (slices, gradients with filters, a default)."""
    assert_ok(run_recipe(tmp_path, SLERP.format(a=llamas["a"], b=llamas["b"], n=N_LAYERS, out=tmp_path / "o.pt")))
    a, b, out = load(llamas["a"]), load(llamas["b"]), load(tmp_path / "o.pt")
    for k in a:
        if "self_attn" in k:
            t = gradient_at([0, 0.5, 0.3, 0.7, 1], layer_t(k))
        elif "mlp" in k:
            t = gradient_at([1, 0.5, 0.7, 0.3, 0], layer_t(k))
        else:
            t = 0.5
        ref.assert_close_ulp(out[k], slerp_tensor(a[k].double(), b[k].double(), t), torch.float32, ulps=1, name=k)


def test_a_per_model_weight_gradient(llamas, tmp_path):
    assert_ok(run_recipe(tmp_path, """\
        merge_method: linear
        models:
          - model: {a}
            parameters: {{weight: [1, 0]}}
          - model: {b}
            parameters: {{weight: [0, 1]}}
          - model: {c}
            parameters: {{weight: 0.5}}
        parameters: {{normalize: true}}
        output: {out}
        """.format(a=llamas["a"], b=llamas["b"], c=llamas["c"], out=tmp_path / "o.pt")))
    sds = [load(llamas[t]) for t in "abc"]
    out = load(tmp_path / "o.pt")
    for k in sds[0]:
        t = layer_t(k)
        w = [gradient_at([1, 0], t), gradient_at([0, 1], t), 0.5]
        expected = sum(wi * sd[k].double() for wi, sd in zip(w, sds)) / sum(w)
        ref.assert_close_ulp(out[k], expected, torch.float32, ulps=1, name=k)


@pytest.mark.parametrize("case,needle", [
    ("two_slices", "give one slice whose sources take every layer"),
    ("part", "layer_range [0, 2] is not every layer of the models ([0, 4])"),
    ("differ", "differs from the first source's"),
    ("out_of_range", "t: 1.5 is outside [0, 1]"),
    ("empty", "parameters.t: the gradient (list of numbers) is empty"),
])
def test_unsupported_slices_and_bad_gradients_are_one_line(llamas, tmp_path, case, needle):
    text = SLERP.format(a=llamas["a"], b=llamas["b"], n=N_LAYERS, out=tmp_path / "o.pt")
    if case == "two_slices":
        text = text.replace("    merge_method", "      - sources:\n          - model: %s\n            layer_range: [0, 4]\n"
                            "    merge_method" % llamas["a"], 1)
    elif case == "part":
        text = text.replace("[0, %d]" % N_LAYERS, "[0, 2]")
    elif case == "differ":  # the second source starts one layer later
        first = text.index("layer_range: [0, %d]" % N_LAYERS)
        second = text.index("layer_range: [0, %d]" % N_LAYERS, first + 1)
        text = text[:second] + "layer_range: [1, %d]" % N_LAYERS + text[second + len("layer_range: [0, 4]"):]
    elif case == "out_of_range":
        text = text.replace("[0, 0.5, 0.3, 0.7, 1]", "[0, 1.5]")
    elif case == "empty":
        text = text.replace("[0, 0.5, 0.3, 0.7, 1]", "[]")
    res = run_recipe(tmp_path, text)
    assert_error(res, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_the_base_model_listed_among_the_models_is_not_an_input(llamas, tmp_path):
    assert_ok(run_recipe(tmp_path, """\
        merge_method: task_arithmetic
        base_model: {a}
        models:
          - model: {a}
          - model: {b}
            parameters: {{weight: 0.7}}
          - model: {c}
            parameters: {{weight: 0.2}}
        parameters: {{normalize: true}}
        output: {out}
        """.format(a=llamas["a"], b=llamas["b"], c=llamas["c"], out=tmp_path / "r.pt")))
    assert_ok(tm("task_arithmetic", "--base", llamas["a"], "--weights", "0.7,0.2", "--normalize", "-o",
                 tmp_path / "c.pt", llamas["b"], llamas["c"], cwd=tmp_path))
    assert (tmp_path / "r.pt").read_bytes() == (tmp_path / "c.pt").read_bytes() or all(
        torch.equal(v, load(tmp_path / "c.pt")[k]) for k, v in load(tmp_path / "r.pt").items())
