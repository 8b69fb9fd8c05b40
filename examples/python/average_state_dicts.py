"""Averages the state_dict()s of a few fine-tuned models with torchmerge's ops and loads the
result back into a model (a "model soup"), then builds a task-arithmetic merge.

    cmake --build build --target torchmerge_ops
    /usr/bin/python3 examples/python/average_state_dicts.py [path/to/libtorchmerge_ops.so]

The library is taken from the argument, else $TORCHMERGE_OPS_LIB, else build/.
"""
import os
import sys

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_model(seed: int) -> nn.Module:
    """A shared initialisation, "fine-tuned" differently (a perturbation, BatchNorm statistics)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for _ in range(seed):  # num_batches_tracked = seed
            model(torch.randn(32, 8, generator=gen))
    return model.eval()


def main() -> int:
    lib = (sys.argv[1] if len(sys.argv) > 1 else None) or os.environ.get("TORCHMERGE_OPS_LIB") \
        or os.path.join(REPO, "build", "libtorchmerge_ops.so")
    torch.ops.load_library(lib)
    tm = torch.ops.torchmerge

    base = make_model(0)
    models = [make_model(seed) for seed in (1, 2, 3)]
    state_dicts = [m.state_dict() for m in models]

    # Uniform soup: floating tensors averaged in float64 and rounded once; integer buffers
    # (num_batches_tracked) taken from the first model.
    soup = tm.state_dict_average(state_dicts)
    model = make_model(1)
    model.load_state_dict(soup)
    for k, v in soup.items():
        if v.is_floating_point():
            ref = sum(sd[k].double() for sd in state_dicts) / len(state_dicts)
            assert torch.allclose(v.double(), ref, rtol=1e-6, atol=1e-7), k
    assert list(soup) == list(state_dicts[0]), "key order of the first state dict"
    assert int(soup["1.num_batches_tracked"]) == 1
    print(f"uniform soup of {len(models)} models: {len(soup)} tensors loaded with load_state_dict")

    # Weighted soup (weights are normalised to sum to 1).
    weighted = tm.state_dict_average(state_dicts, weights=[0.5, 0.25, 0.25])
    model.load_state_dict(weighted)
    ref = 0.5 * state_dicts[0]["0.weight"].double() + 0.25 * (state_dicts[1]["0.weight"].double()
                                                             + state_dicts[2]["0.weight"].double())
    assert torch.allclose(weighted["0.weight"].double(), ref, rtol=1e-6, atol=1e-7)
    print("weighted soup [0.5, 0.25, 0.25]: loaded")

    # Task arithmetic: θ = θ_base + λ Σ (θᵢ − θ_base), with state_dict_add / state_dict_mul.
    task_sum = None
    for sd in state_dicts:
        tau = tm.state_dict_add(sd, base.state_dict(), alpha=-1.0)
        task_sum = tau if task_sum is None else tm.state_dict_add(task_sum, tau)
    merged = tm.state_dict_add(base.state_dict(), tm.state_dict_mul(task_sum, 0.3))
    model.load_state_dict(merged)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        print("task arithmetic (lambda 0.3): output", tuple(model(x).shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
