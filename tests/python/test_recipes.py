"""Merge recipes (`torchmerge run RECIPE.yaml [key=value ...]`, tm_merge_recipe): YAML files in
FusionBench's and mergekit's shapes, checked end to end through the CLI.

  * a recipe equivalent to a CLI call gives a byte-identical .pt (the writer is deterministic);
  * per-tensor weight rules, include/exclude and overrides are checked against the float64
    reference of reference.py;
  * malformed recipes give one `torchmerge: error: FILE:LINE:COL: ...` line, exit 1, and write
    nothing;
  * the effective recipe is recorded with safetensors outputs;
  * every recipe shipped in examples/recipes/ runs.

Each test writes its recipe under work/recipes/ and runs with work/ as the working directory, so
model paths in the recipe (relative to the recipe's folder) and the output (relative to the
working directory) resolve differently, as documented.
"""
import ctypes
import json
import os
import re
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import reference as ref
from test_cli import BIN, REPO, assert_error, assert_ok, fx, load_pt, sha256, tm, work  # noqa: F401 (fixtures)

SD = ("sd_a.pt", "sd_b.pt", "sd_c.pt")
EXAMPLES = REPO / "examples" / "recipes"
EXAMPLE_CHECKPOINTS = REPO / "examples" / "checkpoints"


# ---- helpers ---------------------------------------------------------------------------------

def write_recipe(work: Path, text: str, name: str = "recipe.yaml") -> Path:
    d = work / "recipes"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def rel(path: Path, work: Path) -> str:
    """path as written in a recipe stored in work/recipes/."""
    return os.path.relpath(str(path), str(work / "recipes"))


def model_list(fx, work, names=SD, indent="  ") -> str:
    return "\n".join("%s- %s" % (indent, rel(fx(n), work)) for n in names)


def tree(root: Path) -> dict:
    """Every file under root (relative path -> sha256): what a failed run must leave unchanged."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def run(work, *args):
    return tm("run", *args, cwd=work)


def run_ok(work, *args):
    res = run(work, *args)
    assert_ok(res)
    return res


def cli_ok(work, *args, out="cli.pt"):
    res = tm(*args[:1], "-o", work / out, *args[1:], cwd=work)
    assert_ok(res)
    return work / out


def reference_per_tensor(sds, weights_for, normalize=True, dtype=None):
    """reference.reference_merge with weights that depend on the tensor name."""
    merged = ref.Merged(order=ref.merge_keys(sds, "strict"))
    for k in merged.order:
        one = ref.reference_merge([{k: sd[k]} for sd in sds], weights_for(k), normalize, "strict", dtype)
        merged.expected[k] = one.expected[k]
        merged.dtypes[k] = one.dtypes[k]
        if k in one.magnitude:
            merged.magnitude[k] = one.magnitude[k]
    return merged


def read_safetensors(path: Path):
    """(metadata, {name: tensor}) of a safetensors file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = bytearray(data[8 + n + begin:8 + n + end])
        t = torch.frombuffer(raw, dtype=dtypes[info["dtype"]]) if raw else torch.empty(0, dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"]).clone()
    return meta, out


# ---- recipes equivalent to CLI calls: byte-identical outputs ---------------------------------

def test_simple_average_recipe_is_byte_identical_to_the_cli(fx, work):
    recipe = write_recipe(work, """
        name: simple_average
        normalize: true   # accepted, and changes nothing
        models:
        %s
        output: soup.pt
        """ % model_list(fx, work, indent="        ").lstrip())
    run_ok(work, recipe)
    assert sha256(work / "soup.pt") == sha256(cli_ok(work, "simple_average", *fx(*SD)))
    ref.assert_state_dict_matches(load_pt(work / "soup.pt"), ref.reference_merge(ref.load_state_dicts(fx(*SD))))


WEIGHTED_STYLES = {
    # FusionBench's config/method/weighted_average.yaml, with the models beside it
    "fusionbench_flat": """
        name: weighted_average
        normalize: true
        weights: [0.2, 0.3, 0.5]
        models: [{a}, {b}, {c}]
        output: soup.pt
        """,
    # the same under method:, models as a FusionBench model pool (name -> path, in order)
    "fusionbench_method_and_pool": """
        method:
          name: weighted_average
          weights:
            - 0.2
            - 0.3
            - 0.5
        modelpool:
          _target_: fusion_bench.modelpool.BaseModelPool
          models:
            _pretrained_: {c}
            model_a: {a}
            model_b: {b}
            model_c: {c}
        output: soup.pt
        """,
    # FusionBench 0.2 names the class instead of the method
    "fusionbench_target": """
        _target_: fusion_bench.method.WeightedAverageAlgorithm
        weights: [0.2, 0.3, 0.5]
        models: {{a: {a}, b: {b}, c: {c}}}
        output: soup.pt
        """,
    # mergekit's linear merge
    "mergekit_linear": """
        merge_method: linear
        models:
          - model: {a}
            parameters:
              weight: 0.2
          - model: {b}
            parameters: {{weight: 0.3}}
          - model: {c}
            parameters:
              weight: 0.5
        dtype: float32
        output: soup.pt
        """,
    # an anchor in an ignored _scratch_ key, merged into method with <<
    "anchor_alias_merge_key": """
        _shared_: &common
          name: weighted_average
          weights: [0.2, 0.3, 0.5]
        method:
          <<: *common
        models: [{a}, {b}, {c}]
        output: soup.pt
        """,
}


@pytest.mark.parametrize("style", sorted(WEIGHTED_STYLES))
def test_weighted_average_recipes_are_byte_identical_to_the_cli(fx, work, style):
    text = WEIGHTED_STYLES[style]
    a, b, c = (rel(p, work) for p in fx(*SD))
    recipe = write_recipe(work, text.format(a=a, b=b, c=c))
    run_ok(work, recipe)
    expected = cli_ok(work, "weighted_average", "--weights", "0.2,0.3,0.5", *fx(*SD))
    assert sha256(work / "soup.pt") == sha256(expected)


def test_options_map_to_the_cli_options(fx, work):
    """keys, key, out_dtype, format and normalize: false, against the same CLI call."""
    a, b = rel(fx("nested_a.pt"), work), rel(fx("nested_b.pt"), work)
    recipe = write_recipe(work, """
        method: {name: weighted_average, weights: [1, 3], normalize: false}
        models: [%s, %s]
        key: state_dict
        keys: intersection
        out_dtype: float16
        dtype: float64
        format: pt
        output: out.pt
        """ % (a, b))
    run_ok(work, recipe)
    expected = cli_ok(work, "weighted_average", "--weights", "1,3", "--no-normalize", "--key", "state_dict",
                      "--keys", "intersection", "--dtype", "float16", "--format", "pt",
                      *fx("nested_a.pt", "nested_b.pt"))
    assert sha256(work / "out.pt") == sha256(expected)
    out = load_pt(work / "out.pt")
    assert out["fc.weight"].dtype == torch.float16


def test_template_and_torchscript_format(fx, work):
    recipe = write_recipe(work, """
        name: simple_average
        models: [%s, %s]
        template: %s
        format: torchscript
        output: module.pt
        """ % (rel(fx("sd_a.pt"), work), rel(fx("sd_b.pt"), work), rel(fx("template.pt"), work)))
    run_ok(work, recipe)
    module = torch.jit.load(str(work / "module.pt"))
    merged = ref.reference_merge(ref.load_state_dicts(fx("sd_a.pt", "sd_b.pt")))
    ref.assert_state_dict_matches(dict(module.state_dict()), merged, check_order=False)


# ---- per-tensor rules, include / exclude ---------------------------------------------------------

def test_mergekit_filter_rules_give_per_tensor_weights(fx, work):
    a, b, c = (rel(p, work) for p in fx(*SD))
    recipe = write_recipe(work, """
        merge_method: linear
        models:
          - model: %s
            parameters:
              weight: 1.0
          - model: %s
            parameters:
              weight:
                - filter: fc          # substring: fc.weight, fc.bias
                  value: 0.0
                - filter: "bn.running_*"   # glob over the whole name
                  value: 3.0
                - value: 1.0
          - model: %s
            parameters:
              weight: [{filter: conv.weight, value: 2.5}, {value: 0.5}]
        output: out.pt
        """ % (a, b, c))
    run_ok(work, recipe)

    def weights_for(k):
        wb = 0.0 if "fc" in k else 3.0 if k.startswith("bn.running_") else 1.0
        wc = 2.5 if "conv.weight" in k else 0.5
        return [1.0, wb, wc]

    merged = reference_per_tensor(ref.load_state_dicts(fx(*SD)), weights_for)
    out = load_pt(work / "out.pt")
    ref.assert_state_dict_matches(out, merged)
    # non-vacuous: fc is the a/c average, not the three-way one
    uniform = ref.reference_merge(ref.load_state_dicts(fx(*SD)), [1.0, 1.0, 0.5])
    assert not torch.allclose(out["fc.weight"].double(), uniform.expected["fc.weight"])


def test_top_level_parameters_give_the_default_weight_and_normalize(fx, work):
    a, b, c = (rel(p, work) for p in fx(*SD))
    recipe = write_recipe(work, """
        merge_method: linear
        parameters:
          weight: [{filter: bias, value: 0.25}, {value: 1.0}]
          normalize: false
        models:
          - %s
          - model: %s
          - model: %s
            parameters: {weight: 2}
        output: out.pt
        """ % (a, b, c))
    run_ok(work, recipe)

    def weights_for(k):
        d = 0.25 if "bias" in k else 1.0
        return [d, d, 2.0]

    merged = reference_per_tensor(ref.load_state_dicts(fx(*SD)), weights_for, normalize=False)
    ref.assert_state_dict_matches(load_pt(work / "out.pt"), merged)


def test_rules_without_a_default_must_cover_every_tensor(fx, work):
    a, b = rel(fx("sd_a.pt"), work), rel(fx("sd_b.pt"), work)
    recipe = write_recipe(work, """
        merge_method: linear
        models:
          - model: %s
            parameters: {weight: 1}
          - model: %s
            parameters:
              weight:
                - filter: conv
                  value: 0.5
        output: out.pt
        """ % (a, b))
    before = tree(work)
    res = run(work, recipe)
    line = assert_error(res, "recipes/recipe.yaml:8:", "no weight rule matches tensor", "sd_b.pt")
    assert "'bn.weight'" in line or "'fc." in line, line
    assert tree(work) == before
    # covered once the uncovered tensors are excluded (integer tensors need no weight)
    run_ok(work, recipe, "exclude=[bn, fc]")
    out = load_pt(work / "out.pt")
    assert sorted(out) == ["conv.bias", "conv.weight"]
    merged = ref.reference_merge([{k: sd[k] for k in ("conv.weight", "conv.bias")}
                                  for sd in ref.load_state_dicts(fx("sd_a.pt", "sd_b.pt"))], [1, 0.5])
    ref.assert_state_dict_matches(out, merged)


def test_rules_that_zero_a_tensors_weights_fail_before_writing(fx, work):
    a, b = rel(fx("sd_a.pt"), work), rel(fx("sd_b.pt"), work)
    recipe = write_recipe(work, """
        merge_method: linear
        parameters:
          weight: [{filter: fc.bias, value: 0}, {value: 1}]
        models: [%s, %s]
        output: out.pt
        """ % (a, b))
    before = tree(work)
    assert_error(run(work, recipe), "fc.bias", "sum to 0")
    assert tree(work) == before


def test_exclude_and_include_patterns(fx, work):
    models = model_list(fx, work, indent="          ").lstrip()
    recipe = write_recipe(work, """
        name: simple_average
        models:
          %s
        exclude:
          - num_batches_tracked
          - "fc.*"
        output: out.pt
        """ % models)
    res = run_ok(work, recipe)
    assert res.warnings == [], res.describe()
    out = load_pt(work / "out.pt")
    full = ref.reference_merge(ref.load_state_dicts(fx(*SD)))
    keep = [k for k in full.order if not k.startswith("fc.") and "num_batches_tracked" not in k]
    assert list(out) == keep
    for k in keep:
        ref.assert_close_ulp(out[k], full.expected[k], full.dtypes[k], magnitude=full.magnitude.get(k), name=k)

    (work / "out.pt").unlink()
    res = run_ok(work, recipe, "~exclude", "include=[conv, nothing_matches_this]")
    assert list(load_pt(work / "out.pt")) == ["conv.weight", "conv.bias"]
    assert any("include pattern 'nothing_matches_this' matched no tensor" in w for w in res.warnings), \
        res.describe()


# ---- overrides ---------------------------------------------------------------------------------

def test_overrides_change_weights_normalize_output_and_models(fx, work):
    recipe = write_recipe(work, """
        name: weighted_average
        weights: [0.2, 0.3, 0.5]
        models:
        %s
        output: soup.pt
        """ % model_list(fx, work, indent="        ").lstrip())
    # method.X addresses the top level of a FusionBench method file, as in FusionBench
    run_ok(work, recipe, "method.weights=[0.6,0.3,0.1]", "output=first.pt")
    assert not (work / "soup.pt").exists()
    expected = cli_ok(work, "weighted_average", "--weights", "0.6,0.3,0.1", *fx(*SD))
    assert sha256(work / "first.pt") == sha256(expected)

    # models.N=PATH: a path given on the command line is relative to the working directory
    os.symlink(str(fx("sd_b.pt")), str(work / "local_b.pt"))
    run_ok(work, recipe, "models.2=local_b.pt", "method.normalize=false", "weights=[1,1,-1]", "output=second.pt")
    sds = ref.load_state_dicts(fx("sd_a.pt", "sd_b.pt", "sd_b.pt"))
    merged = ref.reference_merge(sds, [1, 1, -1], normalize=False)
    ref.assert_state_dict_matches(load_pt(work / "second.pt"), merged)


def test_overrides_on_a_string_method_and_on_mergekit_models(fx, work):
    a, b, c = (rel(p, work) for p in fx(*SD))
    recipe = write_recipe(work, """
        method: weighted_average
        models:
          - model: %s
            parameters: {weight: 1}
          - model: %s
            parameters: {weight: 1}
        output: out.pt
        """ % (a, b))
    # add a third model (relative to the working directory), change a weight
    os.symlink(str(fx("sd_c.pt")), str(work / "c.pt"))
    run_ok(work, recipe, "models.2={model: c.pt, parameters: {weight: 2}}", "models.0.parameters.weight=0.5")
    merged = ref.reference_merge(ref.load_state_dicts(fx(*SD)), [0.5, 1, 2])
    ref.assert_state_dict_matches(load_pt(work / "out.pt"), merged)

    # method: weighted_average (a string) accepts method.weights: it becomes {name: ...}
    recipe2 = write_recipe(work, """
        method: weighted_average
        models: [%s, %s, %s]
        output: out2.pt
        """ % (a, b, c), name="r2.yaml")
    run_ok(work, recipe2, "method.weights=[0.5,1,2]")
    assert sha256(work / "out2.pt") == sha256(work / "out.pt")


def test_output_option_and_recipe_from_stdin(fx, work):
    recipe = write_recipe(work, """
        name: simple_average
        models: [%s, %s]
        """ % (rel(fx("sd_a.pt"), work), rel(fx("sd_b.pt"), work)))
    run_ok(work, recipe, "-o", "o1.pt")
    # from standard input, relative paths resolve against the working directory
    text = "name: simple_average\nmodels: [%s, %s]\noutput: o2.pt\n" % (fx("sd_a.pt"), fx("sd_b.pt"))
    p = subprocess.run([str(BIN), "run", "-"], input=text.encode(), cwd=str(work),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert sha256(work / "o1.pt") == sha256(work / "o2.pt")


@pytest.mark.parametrize("override, needles", [
    ("models.7=x.pt", ["override 'models.7=x.pt'", "out of range"]),
    ("name.x=1", ["override 'name.x=1'", "not a mapping"]),
    ("~nothing", ["override '~nothing'", "no 'nothing' to delete"]),
    ("wieghts=[1,2]", ["override 'wieghts=[1,2]'", "unknown key 'wieghts'", "weights"]),
    ("weights=[1,2", ["override 'weights=[1,2'", "invalid YAML"]),
    ("models.0=", ["override 'models.0='", "models[0]", "empty"]),
])
def test_bad_overrides_are_one_line_errors(fx, work, override, needles):
    recipe = write_recipe(work, """
        name: weighted_average
        weights: [1, 2]
        models: [%s, %s]
        output: out.pt
        """ % (rel(fx("sd_a.pt"), work), rel(fx("sd_b.pt"), work)))
    before = tree(work)
    assert_error(run(work, recipe, override), "recipes/recipe.yaml: ", *needles)
    assert tree(work) == before


# ---- malformed recipes: FILE:LINE:COL, exit 1, nothing written -------------------------------------

BAD_RECIPES = {
    "yaml_syntax": ("""
        name: simple_average
        models: [a.pt, b.pt
        output: out.pt
        """, ["recipe.yaml:3:", "invalid YAML"]),
    "tab_indent": ("name: simple_average\nmodels:\n\t- a.pt\n", ["recipe.yaml:3:1:", "invalid YAML"]),
    "unknown_method": ("""
        name: fisher_merging
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:1:7:", "unknown method 'fisher_merging'"]),
    "unknown_mergekit_method": ("""
        merge_method: passthrough
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:1:15:", "unknown method 'passthrough'"]),
    "unknown_key_in_method": ("""
        method:
          name: weighted_average
          wieghts: [1, 2]
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:3:3:", "unknown key 'wieghts' in method", "did you mean 'weights'"]),
    "unknown_top_level_key": ("""
        name: simple_average
        models: [{A}, {B}]
        ouptut: out.pt
        """, ["recipe.yaml:3:1:", "unknown key 'ouptut'", "output"]),
    "model_parameter_of_another_method": ("""
        merge_method: linear
        models:
          - model: {A}
            parameters: {{weight: 1, density: 0.5}}
          - model: {B}
            parameters: {{weight: 1}}
        output: out.pt
        """, ["recipe.yaml:4:38:", "weighted_average takes no density (methods that do: ties, dare_linear"]),
    "unknown_model_parameter": ("""
        merge_method: linear
        models:
          - model: {A}
            parameters: {{weight: 1, denisty: 0.5}}
          - model: {B}
            parameters: {{weight: 1}}
        output: out.pt
        """, ["recipe.yaml:4:29:", "unknown key 'denisty' in models[0].parameters", "did you mean 'density'"]),
    "wrong_number_of_weights": ("""
        name: weighted_average
        models: [{A}, {B}, {C}]
        weights:
          - 0.5
          - 0.5
        output: out.pt
        """, ["recipe.yaml:4:3:", "expected 3 weights", "got 2"]),
    "missing_model_file": ("""
        name: simple_average
        models:
          - {A}
          - missing_model.pt
        output: out.pt
        """, ["recipe.yaml:4:5:", "model file 'missing_model.pt' not found"]),
    "missing_template": ("""
        name: simple_average
        models: [{A}, {B}]
        template: nowhere.pt
        output: out.pt
        """, ["recipe.yaml:3:11:", "template 'nowhere.pt' not found"]),
    "weight_not_a_number": ("""
        name: weighted_average
        models: [{A}, {B}]
        weights: [0.5, half]
        output: out.pt
        """, ["recipe.yaml:3:16:", "weights[1]", "'half'"]),
    "simple_average_with_weights": ("""
        name: simple_average
        weights: [1, 2]
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:2:10:", "simple_average takes no weights"]),
    "simple_average_unnormalized": ("""
        name: simple_average
        normalize: false
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:2:12:", "normalize: false needs weighted_average"]),
    "weights_sum_to_zero": ("""
        name: weighted_average
        weights: [1, -1]
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:2:10:", "sum to 0", "normalize: false"]),
    "weighted_without_weights": ("""
        name: weighted_average
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:1:7:", "needs weights"]),
    "hydra_mandatory_missing": ("""
        name: weighted_average
        normalize: true
        weights: ???
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:3:10:", "mandatory", "method.weights="]),
    "model_without_weight": ("""
        merge_method: linear
        models:
          - model: {A}
            parameters: {{weight: 1}}
          - model: {B}
        output: out.pt
        """, ["recipe.yaml:5:12:", "has no weight"]),
    "weights_twice": ("""
        name: weighted_average
        weights: [1, 2]
        method:
          weights: [1, 2]
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:4:12:", "weights is given twice", "line 2"]),
    "duplicate_key": ("""
        name: simple_average
        models: [{A}, {B}]
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:3:1:", "duplicate key 'models'", "line 2"]),
    "narrow_compute_dtype": ("""
        name: simple_average
        models: [{A}, {B}]
        dtype: bfloat16
        output: out.pt
        """, ["recipe.yaml:3:8:", "float64", "out_dtype: bfloat16"]),
    "bad_out_dtype": ("""
        name: simple_average
        models: [{A}, {B}]
        out_dtype: int8
        output: out.pt
        """, ["recipe.yaml:3:12:", "out_dtype", "'int8'"]),
    "bad_keys": ("""
        name: simple_average
        models: [{A}, {B}]
        keys: some
        output: out.pt
        """, ["recipe.yaml:3:7:", "strict, intersection or union"]),
    "bad_normalize": ("""
        name: weighted_average
        weights: [1, 1]
        normalize: maybe
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:3:12:", "true or false", "'maybe'"]),
    "quoted_number": ("""
        name: weighted_average
        weights: ["1", 1]
        models: [{A}, {B}]
        output: out.pt
        """, ["recipe.yaml:2:11:", "expected a number", "string '1'"]),
    "no_models": ("""
        name: simple_average
        models: []
        output: out.pt
        """, ["recipe.yaml:2:9:", "no models"]),
    "no_output": ("""
        name: simple_average
        models: [{A}, {B}]
        """, ["recipe.yaml: no output"]),
    "not_a_mapping": ("""
        - {A}
        - {B}
        """, ["recipe.yaml:1:1:", "a recipe is a mapping"]),
    "two_documents": ("""
        name: simple_average
        ---
        name: simple_average
        """, ["recipe.yaml:2:1:", "one YAML document"]),
    "unknown_alias": ("""
        name: simple_average
        models: [*nothing]
        output: out.pt
        """, ["recipe.yaml:2:10:", "unknown alias"]),
    "empty": ("", ["recipe.yaml: the recipe is empty"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_malformed_recipes_name_file_line_and_column_and_write_nothing(fx, work, case):
    text, needles = BAD_RECIPES[case]
    a, b, c = (rel(p, work) for p in fx(*SD))
    text = textwrap.dedent(text).lstrip("\n")
    if "{A}" in text:
        text = text.replace("{{", "\0").replace("}}", "\1").replace("{A}", a).replace("{B}", b) \
                   .replace("{C}", c).replace("\0", "{").replace("\1", "}")
    recipe = write_recipe(work, text)
    before = tree(work)
    res = run(work, "recipes/recipe.yaml")
    line = assert_error(res, *needles)
    assert line.startswith("torchmerge: error: recipes/recipe.yaml"), line
    assert tree(work) == before
    assert recipe.exists()


def test_missing_recipe_file_is_an_error(work):
    res = run(work, "no_such_recipe.yaml")
    assert_error(res, "no_such_recipe.yaml", "cannot open the recipe")
    assert os.listdir(work) == []


@pytest.mark.parametrize("argv", [["run"], ["run", "r.yaml", "noequals"], ["run", "r.yaml", "=1"],
                                  ["run", "--bogus", "r.yaml"]])
def test_run_usage_errors_exit_2(work, argv):
    (work / "r.yaml").write_text("name: simple_average\n")
    res = tm(*argv, cwd=work)
    assert res.rc == 2, res.describe()
    assert len(res.errors) == 1, res.describe()
    assert sorted(os.listdir(work)) == ["r.yaml"]


def test_run_help_lists_the_override_syntax(work):
    res = tm("run", "--help", cwd=work)
    assert res.rc == 0
    assert "KEY=VALUE" in res.stdout and "method.weights=" in res.stdout
    assert "run RECIPE.yaml" in tm("--help", cwd=work).stdout


def test_ignored_mergekit_settings_are_warnings(fx, work):
    recipe = write_recipe(work, """
        merge_method: linear
        base_model: %s
        tokenizer_source: base
        models:
          - model: %s
            parameters: {weight: 1}
          - model: %s
            parameters: {weight: 1}
        output: out.pt
        """ % (rel(fx("sd_a.pt"), work), rel(fx("sd_a.pt"), work), rel(fx("sd_b.pt"), work)))
    res = run_ok(work, recipe)
    assert any("recipes/recipe.yaml:2:1: ignored 'base_model'" in w for w in res.warnings), res.describe()
    assert any("ignored 'tokenizer_source'" in w for w in res.warnings), res.describe()
    assert sha256(work / "out.pt") == sha256(cli_ok(work, "simple_average", *fx("sd_a.pt", "sd_b.pt")))


@pytest.mark.parametrize("setting", ["tokenizer_source: union", "tokenizer: {source: union}",
                                     "tokenizer: {source: {kind: model_token, model: x}}"])
def test_a_tokenizer_that_changes_the_embeddings_is_an_error(fx, work, setting):
    recipe = write_recipe(work, """
        merge_method: linear
        %s
        models: [%s, %s]
        output: out.pt
        """ % (setting, rel(fx("sd_a.pt"), work), rel(fx("sd_b.pt"), work)))
    res = tm("run", recipe, cwd=work)
    assert res.rc != 0 and len(res.errors) == 1 and "tokenizer source" in res.errors[0], res.describe()
    assert not (work / "out.pt").exists()


# ---- the recorded recipe -------------------------------------------------------------------------

def test_safetensors_output_records_the_effective_recipe(fx, work):
    a, b, c = (rel(p, work) for p in fx(*SD))
    recipe = write_recipe(work, """
        # a comment (not kept: the recipe is re-emitted after the overrides)
        name: weighted_average
        weights: [0.2, 0.3, 0.5]
        models: [%s, %s, %s]
        output: soup.safetensors
        """ % (a, b, c))
    run_ok(work, recipe, "method.weights=[1,2,3]", "format=safetensors")
    meta, tensors = read_safetensors(work / "soup.safetensors")
    text = meta.get("torchmerge_recipe")
    assert text, meta
    assert "# override: method.weights=[1,2,3]" in text
    recorded = yaml.safe_load(text)
    assert recorded == {"name": "weighted_average", "weights": [1, 2, 3], "models": [a, b, c],
                        "output": "soup.safetensors", "format": "safetensors"}
    merged = ref.reference_merge(ref.load_state_dicts(fx(*SD)), [1, 2, 3])
    for k in merged.order:
        ref.assert_close_ulp(tensors[k], merged.expected[k], merged.dtypes[k], magnitude=merged.magnitude.get(k),
                             name=k)
    # the recorded recipe runs again (from the original recipe's folder) and gives the same tensors
    again = write_recipe(work, text, name="again.yaml")
    run_ok(work, again, "output=again.pt", "~format")
    out = load_pt(work / "again.pt")
    for k in merged.order:
        assert torch.equal(out[k], tensors[k]), k


def test_folder_output_writes_torchmerge_recipe_yaml(fx, work):
    recipe = write_recipe(work, """
        name: simple_average
        models: [%s, %s]
        output: merged/
        format: safetensors
        max_shard_size: 200B  # the state dict has 620 bytes
        """ % (rel(fx("sd_a.pt"), work), rel(fx("sd_b.pt"), work)))
    run_ok(work, recipe)
    saved = work / "merged" / "torchmerge_recipe.yaml"
    assert saved.is_file(), sorted(os.listdir(work / "merged"))
    assert yaml.safe_load(saved.read_text())["name"] == "simple_average"
    assert len([p for p in os.listdir(work / "merged") if p.endswith(".safetensors")]) >= 2


def test_inspect_shows_the_recorded_recipe(fx, work):
    recipe = write_recipe(work, """
        name: simple_average
        models: [%s, %s]
        output: soup.safetensors
        """ % (rel(fx("sd_a.pt"), work), rel(fx("sd_b.pt"), work)))
    run_ok(work, recipe)
    res = tm("inspect", work / "soup.safetensors", cwd=work)
    assert_ok(res)
    assert "name: simple_average" in res.stdout, res.stdout
    js = json.loads(tm("inspect", "--json", work / "soup.safetensors", cwd=work).stdout)
    assert "name: simple_average" in js["recipe"]


# ---- the C API -----------------------------------------------------------------------------------

def test_c_api_merge_recipe_from_text_with_overrides(fx, work):
    lib = ctypes.CDLL(str(BIN.parent / "libtorchmerge.so"))
    lib.tm_merge_recipe.restype = ctypes.c_int
    lib.tm_merge_recipe.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p),
                                    ctypes.c_size_t, ctypes.c_void_p]
    lib.tm_errmsg.restype = ctypes.c_char_p
    text = ("name: weighted_average\nweights: [1, 1]\nmodels: [%s, %s]\noutput: %s\n"
            % (fx("sd_a.pt"), fx("sd_b.pt"), work / "capi.pt")).encode()
    overrides = (ctypes.c_char_p * 1)(b"weights=[1,3]")
    cwd = os.getcwd()
    try:
        os.chdir(str(work))
        st = lib.tm_merge_recipe(text, 0, overrides, 1, None)
        assert st == 0, lib.tm_errmsg()
        st = lib.tm_merge_recipe(b"name: simple_average\nmodels: [x.pt]\noutput: o.pt\n", 0, None, 0, None)
        assert st != 0
        assert lib.tm_errmsg().decode().startswith("<recipe>:2:10: model file 'x.pt' not found")
    finally:
        os.chdir(cwd)
    expected = cli_ok(work, "weighted_average", "--weights", "1,3", *fx("sd_a.pt", "sd_b.pt"))
    assert sha256(work / "capi.pt") == sha256(expected)


# ---- the shipped example recipes -------------------------------------------------------------------

SHIPPED = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


def test_examples_ship_the_three_recipes():
    assert {"simple_average.yaml", "weighted_average.yaml", "mergekit_linear.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_example_recipe_runs(work, name):
    recipe = EXAMPLES / name
    spec = yaml.safe_load(recipe.read_text())
    res = run_ok(work, recipe)
    assert res.warnings == [], res.describe()
    out = work / spec["output"]
    assert out.is_file()
    assert sorted(os.listdir(work)) == [spec["output"]]
    got = load_pt(out)
    models = spec.get("models") or spec["modelpool"]["models"]
    entries = list(models.values()) if isinstance(models, dict) else models
    paths = [EXAMPLE_CHECKPOINTS / os.path.basename(m if isinstance(m, str) else m["model"]) for m in entries]
    sds = ref.load_state_dicts(paths)
    if name == "simple_average.yaml":
        merged = ref.reference_merge(sds)
    elif name == "weighted_average.yaml":
        merged = ref.reference_merge(sds, spec["method"]["weights"])
    elif name == "mergekit_linear.yaml":
        merged = reference_per_tensor(sds, lambda k: [1.0, 1.0, 0.0 if "fc2" in k else 1.0],
                                      dtype=torch.float32)
    else:
        pytest.skip("no reference for %s" % name)
    ref.assert_state_dict_matches(got, merged)


def test_the_yaml_examples_in_docs_recipes_md_run(work):
    """Every recipe in docs/recipes.md (the yaml blocks that name models) runs, from a folder laid
    out like examples/recipes/ (../checkpoints beside it)."""
    text = (REPO / "docs" / "recipes.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "models:" in b]
    assert len(blocks) >= 2
    os.symlink(str(EXAMPLE_CHECKPOINTS), str(work / "checkpoints"))
    for i, block in enumerate(blocks):
        recipe = write_recipe(work, block, name="doc%d.yaml" % i)
        out = work / ("out%d" % i)
        out.mkdir()
        spec = yaml.safe_load(block)
        res = tm("run", recipe, cwd=out)
        assert_ok(res)
        assert (out / spec["output"]).is_file(), res.describe()
