"""Memory: loading a 1 GiB checkpoint costs < 50 MB of resident memory until the tensors are
touched (they are views of the file's pages), measured from /proc/self/status in a fresh
process; touching them then faults the pages in (so the measurement sees what it should)."""
import json
import os
import subprocess
import sys

import pytest
import torch

GIB = 1 << 30
MB = 1 << 20

PROBE = r"""
import sys, json
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
import torch, torchmerge
torchmerge.load(sys.argv[1])  # warm up: the library, torch's first-use allocations
before = rss()
sd = torchmerge.load(sys.argv[1])
loaded = rss()
# one element per 4 KiB page faults every page in
total = sum(float(t[::1024].double().sum()) * 1024 for t in sd.values())
touched = rss()
print(json.dumps({"before": before, "loaded": loaded, "touched": touched, "n": len(sd),
                  "nbytes": sum(t.numel() * t.element_size() for t in sd.values()), "sum": total}))
"""


def probe(path):
    r = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def safetensors_1gib(path):
    """Four 256 MiB float32 tensors; the data is a hole in a sparse file (zeros, no disk)."""
    n = GIB // 4 // 4
    header = {"w%d" % i: {"dtype": "F32", "shape": [n], "data_offsets": [i * n * 4, (i + 1) * n * 4]} for i in range(4)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + GIB)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_loading_1gib_costs_under_50mb_until_touched(tmp_path, fmt):
    path = tmp_path / ("big." + fmt)
    if fmt == "safetensors":
        safetensors_1gib(path)
    else:
        torch.save({"w%d" % i: torch.full((GIB // 4 // 4,), float(i)) for i in range(4)}, str(path))
    m = probe(path)
    assert m["n"] == 4 and m["nbytes"] == GIB
    assert m["loaded"] - m["before"] < 50 * MB, m
    assert m["touched"] - m["loaded"] > GIB // 2, m  # the pages really are read on first touch
    if fmt == "pt":
        assert m["sum"] == float(sum(i * (GIB // 16) for i in range(4)))
