"""Runs an example program on the fixture of make_example_inputs.py and checks its results
with Python torch against a float64 reference.

    check_examples.py c_merge_files --exe build/.../example_merge_files --dir DIR
    check_examples.py cpp_serving --exe build/.../example_serve --cli build/torchmerge --dir DIR
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_example_inputs import TinyNet  # noqa: E402


def run(cmd, expect_ok=True):
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if expect_ok and proc.returncode != 0:
        raise SystemExit(f"FAIL: {cmd[0]} exited with {proc.returncode}")
    return proc


def reference(state_dicts, weights):
    """Σ wᵢ sdᵢ / Σ wᵢ in float64 for floating tensors; the first dict's value for the others."""
    total = sum(weights)
    out = {}
    for k, first in state_dicts[0].items():
        if first.is_floating_point():
            out[k] = sum(w / total * sd[k].double() for w, sd in zip(weights, state_dicts))
        else:
            out[k] = first
    return out


def check_close(got, ref, what):
    assert list(got) == list(ref), f"{what}: keys {list(got)} != {list(ref)}"
    for k, r in ref.items():
        g = got[k]
        if g.is_floating_point():
            eps = torch.finfo(g.dtype).eps
            err = (g.double() - r).abs()
            bound = eps * r.abs() + torch.finfo(g.dtype).tiny
            assert bool((err <= bound).all()), f"{what}: '{k}' differs from the float64 reference by {err.max()}"
        else:
            assert g.dtype == r.dtype and torch.equal(g, r), f"{what}: '{k}' is not the first input's"


def c_merge_files(args):
    d = args.dir
    a, b = torch.load(os.path.join(d, "a.pt")), torch.load(os.path.join(d, "b.pt"))
    for name, flags, weights in (("merged_c.pt", [], [1.0, 1.0]),
                                 ("merged_c_weighted.pt", ["-w", "1,3"], [1.0, 3.0])):
        out = os.path.join(d, name)
        if os.path.exists(out):
            os.remove(out)
        proc = run([args.exe, *flags, out, os.path.join(d, "a.pt"), os.path.join(d, "b.pt")])
        assert os.path.exists(out), f"{out} was not written"
        assert "fc1.weight" in proc.stdout and "bn.num_batches_tracked" in proc.stdout, "tensor listing missing"
        got = torch.load(out, weights_only=True)
        check_close(got, reference([a, b], weights), name)
        assert int(got["bn.num_batches_tracked"]) == int(a["bn.num_batches_tracked"])
        # The merged state dict loads into the architecture.
        model = TinyNet()
        model.load_state_dict(got)
    # A failure: exit status 1, the message names the missing file, no output left behind.
    missing, out = os.path.join(d, "missing.pt"), os.path.join(d, "merged_c_failed.pt")
    proc = run([args.exe, out, os.path.join(d, "a.pt"), missing], expect_ok=False)
    assert proc.returncode == 1, proc.returncode
    assert "missing.pt" in proc.stderr, proc.stderr
    assert not os.path.exists(out)
    print("example_c_merge_files: ok")


def cpp_serving(args):
    d = args.dir
    merged = os.path.join(d, "soup_scripted.pt")
    if os.path.exists(merged):
        os.remove(merged)
    run([args.cli, "simple_average", "-q", "-o", merged,
         os.path.join(d, "a_scripted.pt"), os.path.join(d, "b_scripted.pt")])
    proc = run([args.exe, merged, os.path.join(d, "input.pt")])

    shape = re.search(r"^output shape: \[(.*)\]$", proc.stdout, re.M)
    assert shape, "no output shape printed"
    rows = re.findall(r"^row \d+: (.*) argmax (\d+)$", proc.stdout, re.M)
    got = torch.tensor([[float(v) for v in r[0].split()] for r in rows], dtype=torch.float64)
    argmax = torch.tensor([int(r[1]) for r in rows])
    assert [int(s) for s in shape.group(1).split(",")] == [4, 3], shape.group(0)
    assert got.shape == (4, 3)

    x = torch.load(os.path.join(d, "input.pt"))
    with torch.no_grad():
        # Python runs the same merged module ...
        expected = torch.jit.load(merged)(x).double()
        # ... and the architecture holding the float64-reference average of the two fine-tunes.
        a, b = (torch.load(os.path.join(d, f"{n}.pt")) for n in "ab")
        model = TinyNet().eval()
        model.load_state_dict({k: v.to(a[k].dtype) for k, v in reference([a, b], [1.0, 1.0]).items()})
        from_reference = model(x).double()
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (got, expected)
    assert torch.allclose(got, from_reference, rtol=1e-5, atol=1e-5), (got, from_reference)
    assert torch.equal(argmax, got.argmax(dim=1))

    # serve links LibTorch only: nothing of torchmerge is needed to run a merged model.
    readelf = shutil.which("readelf")
    if readelf:
        needed = subprocess.run([readelf, "-d", args.exe], capture_output=True, text=True).stdout
        assert "torchmerge" not in needed, needed
    print("example_cpp_serving: ok")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["c_merge_files", "cpp_serving"])
    p.add_argument("--exe", required=True)
    p.add_argument("--cli")
    p.add_argument("--dir", required=True)
    args = p.parse_args()
    globals()[args.which](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
