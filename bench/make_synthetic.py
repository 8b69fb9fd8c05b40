"""Synthetic checkpoints for the benchmark: 24 layers of 1024x1024 and 1024x1536 weights plus
small vectors (~240 MB per model in float32), saved with torch.save(state_dict).

usage: /usr/bin/python3 bench/make_synthetic.py OUTDIR N [--dtype float32|bfloat16] [--layers 24] [--torchscript]
"""
import argparse
import os

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(1024, 1024)
        self.mlp = nn.Linear(1024, 1536)
        self.norm = nn.LayerNorm(1024)


class Model(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x):
        for b in self.layers:
            x = b.norm(b.attn(x))
        return x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("outdir")
    p.add_argument("n", type=int)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--torchscript", action="store_true")
    a = p.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    dtype = getattr(torch, a.dtype)
    for i in range(a.n):
        path = os.path.join(a.outdir, f"model_{i}.pt")
        if os.path.exists(path):
            continue
        torch.manual_seed(i)
        m = Model(a.layers).to(dtype)
        if a.torchscript:
            torch.jit.save(torch.jit.script(m), path)
        else:
            torch.save(m.state_dict(), path)


if __name__ == "__main__":
    main()
