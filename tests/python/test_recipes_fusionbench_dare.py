"""FusionBench's DARE method configs (config/method/dare/*.yaml: DareTaskArithmetic, and the
same keys for DareSimpleAverage / DareTiesMerging) run through recipes: sparsity_ratio is
1 − density, the boolean rescale is ÷ density (true) or none (false), scaling_factor is λ with
every weight 1; only_on_linear_weights: true is refused. Checked against the float64 DARE
reference of test_methods.py (imported, with its models)."""
import textwrap

import pytest

from cli_runner import assert_error, assert_ok, tm
from test_methods import write, assert_matches, dare_ref, fusionbench_pool, load, same_tensors, models  # noqa: F401 (models: the fixture)


def expected(models, lam, density, rescale):
    base = load(models["base"])
    return base, dare_ref(base, [load(models[t]) for t in "abc"], [1, 1, 1], lam, [density] * 3, rescale, 0, False)


@pytest.mark.parametrize("sparsity,rescale_key,rescale", [("0.5", "true", "inverse"), ("0.7", "false", "none"),
                                                          ("0.25", "True", "inverse")])
def test_published_dare_task_arithmetic_config_matches_the_reference(models, tmp_path, sparsity, rescale_key, rescale):
    recipe = write(tmp_path, """
        _target_: fusion_bench.method.DareTaskArithmetic
        scaling_factor: 0.3
        sparsity_ratio: %s
        only_on_linear_weights: false
        rescale: %s
        """ % (sparsity, rescale_key) + fusionbench_pool(models))
    assert_ok(tm("run", recipe, cwd=tmp_path))
    base, exp = expected(models, 0.3, 1 - float(sparsity), rescale)
    assert_matches(load(tmp_path / "out.pt"), exp, {k: v.dtype for k, v in base.items()})


def test_dare_config_under_method_equals_the_cli(models, tmp_path):
    recipe = write(tmp_path, """
        method:
          _target_: fusion_bench.method.dare.DareTaskArithmetic
          scaling_factor: 0.6
          sparsity_ratio: 0.2
          only_on_linear_weights: false
          rescale: true
        """ + fusionbench_pool(models))
    assert_ok(tm("run", recipe, cwd=tmp_path))
    assert_ok(tm("dare_linear", "--base", models["base"], "--density", 0.8, "--rescale", "inverse", "--lambda", 0.6,
                 "-o", tmp_path / "cli.pt", models["a"], models["b"], models["c"], cwd=tmp_path))
    same_tensors(tmp_path / "out.pt", tmp_path / "cli.pt")


def test_mergekit_boolean_rescale_is_its_l1_norm(models, tmp_path):
    """mergekit's own rescale: true is its L1-norm rescale (RescaleNorm.l1), false none."""
    for flag, ours in (("true", "l1"), ("false", "none")):
        recipe = write(tmp_path, """
            merge_method: dare_linear
            base_model: %s
            models:
              - model: %s
              - model: %s
            parameters: {density: 0.4, rescale: %s}
            output: mk.pt
            """ % (models["base"], models["a"], models["b"], flag))
        assert_ok(tm("run", recipe, cwd=tmp_path))
        assert_ok(tm("dare_linear", "--base", models["base"], "--density", 0.4, "--rescale", ours,
                     "-o", tmp_path / "cli.pt", models["a"], models["b"], cwd=tmp_path))
        same_tensors(tmp_path / "mk.pt", tmp_path / "cli.pt", flag)


@pytest.mark.parametrize("settings,needles", [
    ("sparsity_ratio: 0.5\nonly_on_linear_weights: true", ["only_on_linear_weights: true is not supported"]),
    ("sparsity_ratio: 0.5\ndensity: 0.5", ["give density or sparsity_ratio", "not both"]),
    ("sparsity_ratio: 1", ["sparsity_ratio: 1 gives density 0, outside (0, 1]"]),
    ("sparsity_ratio: -0.1", ["sparsity_ratio: -0.1 gives density 1.1, outside (0, 1]"]),
    ("sparsity_ratio: 0.5\nrescale: maybe", ["rescale", "maybe"]),
])
def test_bad_dare_settings_are_one_line_errors(models, tmp_path, settings, needles):
    recipe = write(tmp_path, "_target_: fusion_bench.method.DareTaskArithmetic\nscaling_factor: 0.3\n" + settings +
                   textwrap.dedent(fusionbench_pool(models)))
    res = tm("run", recipe, cwd=tmp_path)
    assert_error(res, "recipe.yaml:", *needles)
    assert not (tmp_path / "out.pt").exists()


def test_sparsity_ratio_on_a_method_without_density_is_an_error(models, tmp_path):
    recipe = write(tmp_path, "name: task_arithmetic\nscaling_factor: 0.3\nsparsity_ratio: 0.5\n" +
                   textwrap.dedent(fusionbench_pool(models)))
    assert_error(tm("run", recipe, cwd=tmp_path), "recipe.yaml:3:", "task_arithmetic takes no sparsity_ratio")
