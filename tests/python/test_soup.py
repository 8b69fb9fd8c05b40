"""The model-soup example and `torchmerge greedy_soup`, checked against PyTorch.

1. examples/soup/run.sh on the shipped ingredients: every accuracy soup_evaluate prints
   (LibTorch, C++) equals, to the last printed decimal, the accuracy Python torch measures on
   the same files with the same test split; the soups' weights are the float64 means of the
   ingredients; greedy_soup's decisions are those of a Python greedy soup over the same files.
2. greedy_soup on a tiny case whose keep/drop decisions are worked out by hand, with inputs in
   every format, plus its errors.

The binaries: $TORCHMERGE_BIN (default <repo>/build/torchmerge) and soup_evaluate under
examples/soup/ in the same build folder.
"""
import json
import os
import re
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cli_runner import needs_torch_half  # noqa: E402

# Greedy soup scores modules with LibTorch, and the evaluator links it.
pytestmark = needs_torch_half

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("TORCHMERGE_BIN", str(REPO / "build" / "torchmerge"))).resolve()
BUILD = BIN.parent
EVALUATOR = BUILD / "examples" / "soup" / "soup_evaluate"
DATA = REPO / "examples" / "soup" / "data"
INGREDIENTS = ["ingredient_1.pt", "ingredient_2.pt", "ingredient_3.pt", "ingredient_4.pt",
               "ingredient_5_scripted.pt", "ingredient_6.safetensors"]


def run(argv, cwd, env=None, timeout=300):
    p = subprocess.run([str(a) for a in argv], cwd=str(cwd), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                       env=dict(os.environ, LC_ALL="C", **(env or {})))
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def tm(*args, cwd):
    for f in (BIN, BUILD / "libtorchmerge_torch.so"):
        if not f.exists():
            pytest.fail("%s not found (build it, or set TORCHMERGE_BIN)" % f)
    return run([BIN] + list(args), cwd)


def read_safetensors(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    dtypes = {"F32": torch.float32, "F64": torch.float64}
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[name] = torch.frombuffer(bytearray(raw[8 + n + a:8 + n + b]), dtype=dtypes[v["dtype"]]).view(v["shape"])
    return out


def write_safetensors(sd, path):
    header, blobs, off = {}, [], 0
    for name, t in sd.items():
        data = t.detach().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def load_weights(path):
    path = str(path)
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if "scripted" in path:
        return {k: v.detach() for k, v in torch.jit.load(path).state_dict().items()}
    return torch.load(path, map_location="cpu")


def mean(sds, idx):
    return {k: (sum(sds[i][k].double() for i in idx) / len(idx)).float() for k in sds[idx[0]]}


@torch.no_grad()
def score(module, ev):
    module.eval()
    return ev(module(ev.inputs)).item()


@torch.no_grad()
def module_with(template, sd):
    m = torch.jit.load(str(template))
    for name, p in m.named_parameters():
        p.copy_(sd[name])
    return m


def parse_greedy(stdout):
    rows = re.findall(r"^\s*(\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+(start|kept|dropped)\s+(\S+)$", stdout, re.M)
    final = re.search(r"^soup of (\d+) of (\d+) inputs, score (-?\d+\.\d+) -> (.+)$", stdout, re.M)
    assert rows and final, stdout
    return [(int(r[0]), float(r[1]), float(r[2]), r[3], r[4]) for r in rows], final


def no_temporaries(folder):
    left = [p.name for p in Path(folder).iterdir() if p.name.startswith(".")]
    assert not left, "temporary files left behind: %s" % left


# ---- 1. the shipped example ------------------------------------------------------------------

def test_soup_example_matches_python(tmp_path):
    if not EVALUATOR.exists():
        pytest.fail("%s not found (cmake --build build --target soup_evaluate)" % EVALUATOR)
    out = tmp_path / "out"
    rc, stdout, stderr = run(["bash", REPO / "examples" / "soup" / "run.sh"], REPO,
                             env={"BUILD": str(BUILD), "OUT": str(out)}, timeout=600)
    assert rc == 0, stdout + stderr
    rows = dict(re.findall(r"^(ingredient \d|uniform soup|weighted soup|greedy soup)\s+(\d+\.\d\d)%\s+[\d.]+ KB$",
                           stdout, re.M))
    files = {"ingredient %d" % i: out / ("ingredient_%d.pt" % i) for i in range(1, 7)}
    files.update({"uniform soup": out / "uniform_soup.pt", "weighted soup": out / "weighted_soup.pt",
                  "greedy soup": out / "greedy_soup.pt"})
    assert set(rows) == set(files), stdout

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as soup_evaluate runs
    try:
        check_soup_files(out, files, rows, stdout)
    finally:
        torch.set_num_threads(threads)


def check_soup_files(out, files, rows, stdout):
    test_eval = torch.jit.load(str(DATA / "test_eval.pt"))
    val_eval = torch.jit.load(str(DATA / "val_eval.pt"))
    assert test_eval.inputs.shape == (500, 64) and val_eval.inputs.shape == (300, 64)
    for name, path in files.items():
        acc = score(torch.jit.load(str(path)), test_eval)
        assert "%.2f" % (100 * acc) == rows[name], (name, acc, rows[name])

    # The files hold what they should: exact copies, and float64 means rounded once.
    sds = [load_weights(DATA / f) for f in INGREDIENTS]
    for i, sd in enumerate(sds):
        got = torch.jit.load(str(files["ingredient %d" % (i + 1)])).state_dict()
        assert all(torch.equal(got[k], sd[k]) for k in sd)
    uniform = torch.jit.load(str(files["uniform soup"])).state_dict()
    expect = mean(sds, list(range(6)))
    for k in expect:
        assert torch.allclose(uniform[k], expect[k], rtol=2 ** -23, atol=1e-7), k

    # Greedy soup: the same decisions as a greedy soup computed here, in Python.
    template = DATA / "template.pt"
    alone = [score(module_with(template, sd), val_eval) for sd in sds]
    order = sorted(range(6), key=lambda i: (-alone[i], i))
    kept, best, decisions = [order[0]], alone[order[0]], ["start"]
    for i in order[1:]:
        s = score(module_with(template, mean(sds, kept + [i])), val_eval)
        if s > best:
            kept.append(i)
            best = s
        decisions.append("kept" if kept[-1] == i else "dropped")
    rows_g, final = parse_greedy(stdout)
    assert [Path(r[4]).name for r in rows_g] == [INGREDIENTS[i] for i in order]
    assert [r[3] for r in rows_g] == decisions
    assert [r[1] for r in rows_g] == [round(alone[i], 6) for i in order]
    assert int(final.group(1)) == len(kept) and float(final.group(3)) == round(best, 6)
    greedy = torch.jit.load(str(files["greedy soup"])).state_dict()
    expect = mean(sds, kept)
    for k in expect:
        assert torch.allclose(greedy[k], expect[k], rtol=2 ** -23, atol=1e-7), k

    # The chart: well-formed SVG with one bar per model.
    svg = ET.parse(str(out / "soup_chart.svg")).getroot()
    bars = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if r.find("{http://www.w3.org/2000/svg}title") is not None]
    assert len(bars) == 9
    no_temporaries(out)


# ---- 2. a tiny greedy soup with known decisions ----------------------------------------------

class Pair(nn.Module):
    def __init__(self, p=(0.0, 0.0)):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.p


class Closeness(nn.Module):
    """Score -|outputs - 1|^2 with inputs = ones: the closer p is to (1, 1), the better."""

    def __init__(self, n=2):
        super().__init__()
        self.register_buffer("inputs", torch.ones(n))

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        return -((outputs - 1.0) ** 2).sum()


class NoInputs(nn.Module):
    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.sum()


class VectorScore(Closeness):
    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs


# In input order E, C, A, D, B. Alone: A = B = -0.04 > C = D = -0.18 > E; ties keep input order,
# so the order tried is A, B, C, D, E.  {A}: -0.04.  {A,B} = (1.1, 1.1): -0.02, kept.
# {A,B,C} = (1.1667, 1.1667): -0.0556, dropped.  {A,B,D} = (0.9667, 0.9667): -0.00222, kept.
# {A,B,D,E}: far off, dropped.
TINY = {"E": (5.0, 5.0), "C": (1.3, 1.3), "A": (1.0, 1.2), "D": (0.7, 0.7), "B": (1.2, 1.0)}


@pytest.fixture
def tiny(tmp_path):
    files = {}
    for name, p in TINY.items():
        m = Pair(p)
        if name == "A":
            files[name] = tmp_path / "A_scripted.pt"
            torch.jit.save(torch.jit.script(m), str(files[name]))
        elif name == "C":
            files[name] = tmp_path / "C.safetensors"
            write_safetensors(m.state_dict(), files[name])
        else:
            files[name] = tmp_path / ("%s.pt" % name)
            torch.save(m.state_dict(), str(files[name]))
    torch.jit.save(torch.jit.script(Pair()), str(tmp_path / "template.pt"))
    torch.jit.save(torch.jit.script(Closeness()), str(tmp_path / "eval.pt"))
    return tmp_path, [files[k].name for k in TINY]


@pytest.mark.parametrize("with_template", [True, False])
def test_greedy_soup_known_decisions(tiny, with_template):
    folder, inputs = tiny
    args = ["greedy_soup", "--eval", "eval.pt", "-o", "soup.pt"] + inputs
    if with_template:
        args += ["--template", "template.pt"]
    rc, stdout, stderr = tm(*args, cwd=folder)
    assert rc == 0, stdout + stderr
    rows, final = parse_greedy(stdout)
    assert [(r[4], r[3]) for r in rows] == [("A_scripted.pt", "start"), ("B.pt", "kept"), ("C.safetensors", "dropped"),
                                            ("D.pt", "kept"), ("E.pt", "dropped")]
    assert [r[1] for r in rows] == pytest.approx([-0.04, -0.04, -0.18, -0.18, -32.0], abs=2e-6)
    assert [r[2] for r in rows] == pytest.approx([-0.04, -0.02, -0.055556, -0.002222, -1.90125], abs=2e-6)
    assert final.group(1, 2, 4) == ("3", "5", "soup.pt") and float(final.group(3)) == pytest.approx(-0.002222, abs=2e-6)
    soup = torch.jit.load(str(folder / "soup.pt"))
    expect = (torch.tensor(TINY["A"], dtype=torch.float32).double() + torch.tensor(TINY["B"], dtype=torch.float32).double()
              + torch.tensor(TINY["D"], dtype=torch.float32).double()) / 3
    assert torch.equal(soup.p.detach(), expect.float())
    no_temporaries(folder)


def test_greedy_soup_keeps_only_strict_improvements(tiny):
    folder, _ = tiny
    # Two equal ingredients: the soup of both scores the same as the first, so the second is dropped.
    torch.save(Pair((1.0, 1.2)).state_dict(), str(folder / "A_copy.pt"))
    rc, stdout, stderr = tm("greedy_soup", "--eval", "eval.pt", "--template", "template.pt", "-o", "out.safetensors",
                            "A_copy.pt", "A_scripted.pt", "B.pt", cwd=folder)
    assert rc == 0, stdout + stderr
    rows, final = parse_greedy(stdout)
    assert [(r[4], r[3]) for r in rows] == [("A_copy.pt", "start"), ("A_scripted.pt", "dropped"), ("B.pt", "kept")]
    out = read_safetensors(folder / "out.safetensors")
    assert torch.equal(out["p"], torch.tensor([1.1, 1.1]))
    raw = (folder / "out.safetensors").read_bytes()
    meta = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"]
    assert meta["torchmerge_method"] == "greedy_soup"
    no_temporaries(folder)


def test_greedy_soup_errors(tiny):
    folder, inputs = tiny
    torch.jit.save(torch.jit.script(NoInputs()), str(folder / "no_inputs.pt"))
    torch.jit.save(torch.jit.script(VectorScore()), str(folder / "vector.pt"))
    torch.jit.save(torch.jit.script(Closeness(3)), str(folder / "wrong_shape.pt"))
    base = ["greedy_soup", "--template", "template.pt", "-o", "soup.pt"]
    cases = [
        (["--eval", "no_inputs.pt"] + inputs, 1, "no Tensor attribute 'inputs'"),
        (["--eval", "vector.pt"] + inputs, 1, "must return a 0-dim real score"),
        (["--eval", "wrong_shape.pt"] + inputs, 1, "forward(inputs) failed"),
        (["--eval", "missing.pt"] + inputs, 1, "missing.pt: cannot read"),
        (["--eval", "eval.pt", "-o", "B.pt"] + inputs, 1, "the output would replace an input"),
        (inputs, 2, "needs --eval"),
        (["--eval", "eval.pt", "--weights", "1,2"] + inputs, 2, "unknown option"),
    ]
    for extra, code, needle in cases:
        rc, stdout, stderr = tm(*(base + extra), cwd=folder)
        assert rc == code and needle in stderr, (extra, rc, stderr)
        assert stderr.startswith("torchmerge: error: ") and len(stderr.splitlines()) == 1, stderr
        assert not (folder / "soup.pt").exists()
        no_temporaries(folder)
    # No template and no TorchScript input: nothing to score the candidates in.
    rc, stdout, stderr = tm("greedy_soup", "--eval", "eval.pt", "-o", "soup.pt", "B.pt", "D.pt", cwd=folder)
    assert rc == 1 and "give a template module" in stderr, stderr
