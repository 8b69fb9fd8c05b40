"""examples/multitask/run.sh, reduced (2 tasks, 2 methods), checked against Python torch.

Every accuracy multitask_evaluate (LibTorch, C++) prints — each task's test accuracy, the
average, and the validation average of the chosen setting — equals, to the last printed
decimal, the accuracy Python torch measures on the same merged files with the data rebuilt
by tasks.py and the heads from checkpoints/heads.pt (not the evaluation modules run.sh made).
The chosen setting is the validation argmax over the grid (recomputed here on the merged grid
files run.sh kept), and the chosen task-arithmetic merge is base + λ Σ (θᵢ − base) computed in
float64 over the shipped fine-tunes, within one float32 ulp (as tests/python/test_methods.py).
ctest: multitask_pytest ($TORCHMERGE_BIN, as cli_pytest); about 15 s.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "multitask"
BIN = Path(os.environ.get("TORCHMERGE_BIN", str(REPO / "build" / "torchmerge"))).resolve()
TASKS = ["fashion", "digits"]
METHODS = ["task_arithmetic", "ties"]
LAMBDAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0]   # run.sh's grid

sys.path.insert(0, str(EXAMPLE))
sys.path.insert(0, str(REPO / "tests" / "python"))
import reference  # noqa: E402  (the float64-reference comparison the method tests use)
import tasks  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multitask")
    env = dict(os.environ, LC_ALL="C", BUILD=str(BIN.parent), OUT=str(out), TASKS=",".join(TASKS),
               METHODS=" ".join(METHODS))
    p = subprocess.run(["bash", str(EXAMPLE / "run.sh")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr.decode()
    return out, p.stdout.decode()


def table(stdout):
    """{row name: [cells]} of the test table (the lines after its header)."""
    lines = stdout.split("== 4.", 1)[1].splitlines()[1:]
    header = re.split(r"\s{2,}", lines[0].strip())
    assert header[:len(TASKS) + 2] == ["model"] + TASKS + ["average"]
    rows = {}
    for line in lines[1:]:
        if line.startswith("("):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


class Data:
    """Each task's split and head, rebuilt from tasks.py and heads.pt."""

    def __init__(self):
        self.src = tasks.Sources()
        self.heads = torch.load(EXAMPLE / "checkpoints" / "heads.pt")
        self.cache = {}

    def accuracy(self, model_path, task_name, part):
        key = (task_name, part)
        if key not in self.cache:
            self.cache[key] = self.src.split(tasks.BY_NAME[task_name], part)
        x, y = self.cache[key]
        backbone = torch.jit.load(str(model_path)).eval()
        with torch.no_grad():
            f = backbone(x)
            logits = f @ self.heads[task_name + ".weight"].t() + self.heads[task_name + ".bias"]
        return (logits.argmax(1) == y).double().mean().item()


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return Data()


def printed(value, measured):
    # the C++ prints 100 * accuracy with 2 decimals; equal to the last decimal
    assert abs(float(value) - 100 * measured) <= 0.005 + 1e-9, (value, 100 * measured)


def test_every_printed_accuracy(run, data):
    out, stdout = run
    rows = table(stdout)
    assert set(rows) == {"pre-trained", "individual fine-tunes"} | set(METHODS)
    for name, cells in rows.items():
        accs = []
        for i, task in enumerate(TASKS):
            if name == "pre-trained":
                path = EXAMPLE / "checkpoints" / "template.pt"
            elif name == "individual fine-tunes":
                path = out / ("individual_%s.pt" % task)
            else:
                path = out / ("%s.pt" % name)
            accs.append(data.accuracy(path, task, "test"))
            printed(cells[i], accs[-1])
        printed(cells[len(TASKS)], sum(accs) / len(accs))
        if name in METHODS:  # chosen setting | validation average | merge ms | peak RSS MB
            val = [data.accuracy(out / ("%s.pt" % name), t, "val") for t in TASKS]
            printed(cells[len(TASKS) + 2], sum(val) / len(val))


def test_choice_is_the_validation_argmax(run, data):
    out, stdout = run
    rows = table(stdout)
    # run.sh's candidates, in order: task arithmetic at each λ, then TIES at each density, λ
    grid = [("task_arithmetic", "λ=%g" % l) for l in LAMBDAS]
    grid += [("ties", "density=%g λ=%g" % (d, l)) for d in (0.1, 0.2, 0.3) for l in LAMBDAS]
    best = {}
    for i, (method, label) in enumerate(grid):
        val = sum(data.accuracy(out / "grid" / ("%d.pt" % i), t, "val") for t in TASKS) / len(TASKS)
        if method not in best or val > best[method][0]:
            best[method] = (val, label)
    for method in METHODS:
        assert rows[method][len(TASKS) + 1] == best[method][1]


def read_backbone(path):
    path = str(path)
    if path.endswith(".safetensors"):
        import json
        import struct
        raw = Path(path).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        out = {}
        for name, v in json.loads(raw[8:8 + n]).items():
            if name != "__metadata__":
                a, b = v["data_offsets"]
                out[name] = torch.frombuffer(bytearray(raw[8 + n + a:8 + n + b]), dtype=torch.float32).view(v["shape"])
    elif path.endswith("_scripted.pt"):
        out = dict(torch.jit.load(path).state_dict())
    else:
        out = torch.load(path)
    return {k: v for k, v in out.items() if k.startswith("backbone.")}


def test_task_arithmetic_merge_is_the_float64_sum(run):
    out, stdout = run
    lam = float(table(stdout)["task_arithmetic"][len(TASKS) + 1].split("=")[1])
    ck = EXAMPLE / "checkpoints"
    base = read_backbone(ck / "pretrained.pt")
    fts = [read_backbone(ck / tasks.checkpoint_name(tasks.BY_NAME[t])) for t in TASKS]
    merged = dict(torch.jit.load(str(out / "task_arithmetic.pt")).state_dict())
    assert set(merged) == set(base)
    for k, b in base.items():
        ref = b.double() + lam * sum(f[k].double() - b.double() for f in fts)
        reference.assert_close_ulp(merged[k], ref, torch.float32, ulps=1, name=k)
