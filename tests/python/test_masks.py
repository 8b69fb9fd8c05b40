"""--masks-out: the boolean keep-masks of the methods that drop task-vector elements, one
"{input}.{tensor}" per input (0-based) and merged floating tensor, in a safetensors file written
beside its target and renamed only when the merge succeeds. Checked against the generator's
definition (test_methods.keep_mask reimplements merge/random.h) and against the merged output
itself: with rescale none, out = base + λ Σ wᵢ maskᵢ δᵢ."""
import json
import struct
import textwrap

import pytest
import torch

import reference as ref
from cli_runner import assert_error, assert_ok, tm
from test_methods import keep_mask, load, models  # noqa: F401 (models is a fixture)


def read_masks(path):
    """{name: bool tensor} and the metadata, read straight from the safetensors layout."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        assert e["dtype"] == "BOOL", name
        a, b = e["data_offsets"]
        data = torch.frombuffer(bytearray(raw[8 + n + a:8 + n + b]), dtype=torch.uint8)
        assert set(data.tolist()) <= {0, 1}, name
        out[name] = data.reshape(e["shape"]).bool()
    return out, meta


def dare(models, tmp_path, *extra, out="out.pt", masks="masks.safetensors", env=None):
    return tm("dare_linear", "--base", models["base"], "--density", "0.4", "--rescale", "none", "--seed", "7",
              "--lambda", "0.5", "--weights", "1,-2", *extra, "--masks-out", tmp_path / masks,
              "-o", tmp_path / out, models["a"], models["b"], cwd=tmp_path, env=env)


def test_masks_are_the_documented_generator_and_explain_the_output(models, tmp_path):
    assert_ok(dare(models, tmp_path))
    masks, meta = read_masks(tmp_path / "masks.safetensors")
    assert meta["torchmerge_masks_of"] == "dare_linear"
    base, inputs = load(models["base"]), [load(models["a"]), load(models["b"])]
    floating = [k for k, v in base.items() if v.is_floating_point()]
    assert sorted(masks) == sorted("%d.%s" % (i, k) for i in range(2) for k in floating)
    out = load(tmp_path / "out.pt")
    for k in floating:
        acc = base[k].double().clone()
        for i, (w, x) in enumerate(zip([1, -2], inputs)):
            m = masks["%d.%s" % (i, k)]
            assert m.shape == base[k].shape, k
            assert torch.equal(m.flatten(), keep_mask(7, i, k, base[k].numel(), 0.4)), k
            acc += 0.5 * w * m.double() * (x[k].double() - base[k].double())
        ref.assert_close_ulp(out[k], acc, base[k].dtype, ulps=1, name=k)


def test_masks_do_not_depend_on_the_thread_count(models, tmp_path):
    for threads in ("1", "2"):
        assert_ok(dare(models, tmp_path, masks="m%s.safetensors" % threads, out="o%s.pt" % threads,
                       env={"TORCHMERGE_THREADS": threads}))
    assert (tmp_path / "m1.safetensors").read_bytes() == (tmp_path / "m2.safetensors").read_bytes()


def test_a_method_that_keeps_everything_has_no_masks(models, tmp_path):
    res = tm("task_arithmetic", "--base", models["base"], "--masks-out", tmp_path / "m.safetensors",
             "-o", tmp_path / "o.pt", models["a"], models["b"], cwd=tmp_path)
    assert_error(res, "masks_out", "task_arithmetic keeps every element")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["input", "output"])
def test_masks_never_replace_an_input_or_the_output(models, tmp_path, target):
    before = models["a"].read_bytes()
    masks = models["a"] if target == "input" else tmp_path / "out.pt"
    res = tm("dare_linear", "--base", models["base"], "--density", "0.5", "--masks-out", masks,
             "-o", tmp_path / "out.pt", models["a"], models["b"], cwd=tmp_path)
    assert_error(res, "masks_out")
    assert models["a"].read_bytes() == before
    assert list(tmp_path.iterdir()) == []


def test_a_failed_merge_leaves_no_masks(models, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = tm("dare_linear", "--base", models["base"], "--density", "0.5", "--masks-out", tmp_path / "m.safetensors",
             "-o", tmp_path / "out.pt", models["a"], bad, cwd=tmp_path)
    assert res.rc != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_recipe_masks_out_key(models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""\
        merge_method: dare_linear
        base_model: %s
        models:
          - model: %s
          - model: %s
        parameters: {density: 0.4, rescale: none, seed: 7, lambda: 0.5}
        output: %s
        masks_out: %s
        """ % (models["base"], models["a"], models["b"], tmp_path / "r.pt", tmp_path / "r.safetensors")))
    assert_ok(tm("run", recipe, cwd=tmp_path))
    assert_ok(tm("dare_linear", "--base", models["base"], "--density", "0.4", "--rescale", "none", "--seed", "7",
                 "--lambda", "0.5", "--masks-out", tmp_path / "c.safetensors", "-o", tmp_path / "c.pt",
                 models["a"], models["b"], cwd=tmp_path))
    assert read_masks(tmp_path / "r.safetensors")[0].keys() == read_masks(tmp_path / "c.safetensors")[0].keys()
    for k, v in read_masks(tmp_path / "r.safetensors")[0].items():
        assert torch.equal(v, read_masks(tmp_path / "c.safetensors")[0][k])
