"""Synthetic mixture-of-experts-like checkpoints: N small tensors per model (8x8 float32 expert
weights named like a MoE state dict), as torch.save(state_dict) and as safetensors, to measure
per-tensor costs (planning, headers, tables) rather than bytes.

usage: /usr/bin/python3 bench/make_many_tensors.py OUTDIR N_MODELS N_TENSORS
"""
import argparse
import json
import os
import struct

import torch

EXPERTS = 64  # experts per layer; 3 weights each


def names(count):
    for i in range(count):
        layer, rest = divmod(i, EXPERTS * 3)
        expert, w = divmod(rest, 3)
        yield f"model.layers.{layer}.mlp.experts.{expert}.w{w + 1}.weight"


def save_safetensors(path, tensors):
    """safetensors by hand (the Python package is not installed here): header, then the data."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.contiguous().numpy().tobytes())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("outdir")
    p.add_argument("n", type=int)
    p.add_argument("tensors", type=int)
    a = p.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    for i in range(a.n):
        pt, st = (os.path.join(a.outdir, f"model_{i}.{ext}") for ext in ("pt", "safetensors"))
        if os.path.exists(pt) and os.path.exists(st):
            continue
        g = torch.Generator().manual_seed(i)
        # One big storage cut into views would test tied storages; separate tensors test the tables.
        sd = {name: torch.randn(8, 8, generator=g) for name in names(a.tensors)}
        save_safetensors(st + ".tmp", sd)
        os.replace(st + ".tmp", st)
        torch.save(sd, pt + ".tmp")
        os.replace(pt + ".tmp", pt)


if __name__ == "__main__":
    main()
