"""Fixture for the example tests: two fine-tunes of one small network, saved both as state
dicts (torch.save) and as scripted modules (torch.jit.save), and an input batch.

    python3 make_example_inputs.py DIR

DIR/a.pt, DIR/b.pt           model.state_dict() of the two fine-tunes
DIR/a_scripted.pt, ...       torch.jit.script(model), in eval mode
DIR/input.pt                 a [4, 16] float32 batch (torch.save)
"""
import os
import sys

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def finetune(seed: int, steps: int) -> TinyNet:
    """The same initialisation perturbed differently, with BatchNorm statistics from `steps`
    training batches (so num_batches_tracked differs between the models)."""
    torch.manual_seed(0)
    model = TinyNet()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        model.train()
        for _ in range(steps):
            model(torch.randn(8, 16, generator=gen))
    return model.eval()


def main(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    for name, seed, steps in (("a", 1, 3), ("b", 2, 5)):
        model = finetune(seed, steps)
        torch.save(model.state_dict(), os.path.join(out, f"{name}.pt"))
        torch.jit.script(model).save(os.path.join(out, f"{name}_scripted.pt"))
    torch.save(torch.randn(4, 16, generator=torch.Generator().manual_seed(3)), os.path.join(out, "input.pt"))
    print(f"{out}: a.pt b.pt a_scripted.pt b_scripted.pt input.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
