"""Makes the small checkpoints shipped in examples/checkpoints/ (committed; rerun to rebuild).

Three fine-tunes of one small MLP from a shared initialisation, as `model.state_dict()` files,
the same three as TorchScript modules, and a nested training checkpoint. Deterministic.
Run with Debian's Python: /usr/bin/python3 examples/make_checkpoints.py
"""
import argparse
import os

import torch
import torch.nn as nn

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def finetune(base, seed, steps=20):
    torch.manual_seed(seed)
    model = MLP()
    model.load_state_dict(base.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 16)
    y = torch.randint(0, 4, (64,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=HERE)
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    base = MLP()
    for i in (1, 2, 3):
        model, opt = finetune(base, seed=i)
        model.eval()
        torch.save(model.state_dict(), os.path.join(out, f"finetune_{i}.pt"))
        torch.jit.save(torch.jit.script(model), os.path.join(out, f"finetune_{i}_scripted.pt"))
        if i == 1:
            torch.save({"epoch": 20, "state_dict": model.state_dict(), "optimizer": opt.state_dict()},
                       os.path.join(out, "training_checkpoint.pt"))


if __name__ == "__main__":
    main()
