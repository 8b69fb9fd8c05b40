"""FusionBench's TIES method config (config/method/ties_merging.yaml: TiesMergingAlgorithm with
scaling_factor, threshold in percent, remove_keys, merge_func) runs unchanged through recipes:
it is torchmerge's ties with trim_scope global and merge_func sum (FusionBench's defaults in
FusionBench-shaped recipes), density = threshold / 100 (as is when at most 1), λ =
scaling_factor. The global trim itself is checked against FusionBench's formulas in
test_sparse_methods.py; here the recipe must give the CLI's bytes."""
import textwrap

import pytest

from cli_runner import assert_error, assert_ok, tm
from test_methods import fusionbench_pool, models  # noqa: F401 (models: the fixture)

PUBLISHED = """
    _target_: fusion_bench.method.TiesMergingAlgorithm
    scaling_factor: 0.3
    threshold: %s
    remove_keys: %s
    merge_func: %s
    """


def run(tmp_path, models, threshold="20", remove_keys="[]", merge_func="sum", extra=""):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((textwrap.dedent(PUBLISHED % (threshold, remove_keys, merge_func)) + extra +
                       textwrap.dedent(fusionbench_pool(models))).lstrip())
    return tm("run", recipe, cwd=tmp_path)


def cli(tmp_path, models, *args, out="cli.pt"):
    assert_ok(tm("ties", "--base", models["base"], "--lambda", "0.3", *args, "-o", tmp_path / out,
                 models["a"], models["b"], models["c"], cwd=tmp_path))
    return (tmp_path / out).read_bytes()


@pytest.mark.parametrize("threshold,density", [("20", "0.2"), ("0.2", "0.2"), ("100", "1")])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_the_published_config_is_global_ties(models, tmp_path, threshold, density, merge_func):
    assert_ok(run(tmp_path, models, threshold=threshold, merge_func=merge_func))
    expected = cli(tmp_path, models, "--density", density, "--trim-scope", "global", "--merge-func", merge_func)
    assert (tmp_path / "out.pt").read_bytes() == expected


def test_fusionbench_defaults_do_not_reach_mergekit_configs(models, tmp_path):
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(textwrap.dedent("""\
        merge_method: ties
        base_model: %s
        models:
          - model: %s
          - model: %s
        parameters: {density: 0.5}
        output: mk.pt
        """ % (models["base"], models["a"], models["b"])))
    assert_ok(tm("run", recipe, cwd=tmp_path))
    assert_ok(tm("ties", "--base", models["base"], "--density", "0.5", "-o", tmp_path / "c.pt", models["a"],
                 models["b"], cwd=tmp_path))
    assert (tmp_path / "mk.pt").read_bytes() == (tmp_path / "c.pt").read_bytes()


@pytest.mark.parametrize("threshold,remove_keys,needle", [
    ("0", "[]", "threshold: 0 gives density 0, outside (0, 1]"),
    ("150", "[]", "threshold: 150 gives density 1.5, outside (0, 1]"),
    ("20", "[fc.bias]", "remove_keys: not supported"),
])
def test_bad_fusionbench_settings_are_one_line(models, tmp_path, threshold, remove_keys, needle):
    assert_error(run(tmp_path, models, threshold=threshold, remove_keys=remove_keys), needle)
    assert not (tmp_path / "out.pt").exists()


def test_threshold_and_density_together_is_an_error(models, tmp_path):
    assert_error(run(tmp_path, models, extra="density: 0.3\n"), "give density or threshold")
