"""TorchScript helpers over torchmerge's operators (torch.ops.torchmerge.*).

Importing this module loads libtorchmerge_ops.so (see load_ops) and compiles the helpers with
torch.jit.script, so they can be called from Python, from other scripted code, or saved inside
a scripted module (see Averager and make_scripted_average.py) and run from C++:

    from average_modules import average_parameters, average_state_dicts, soup
    merged = average_parameters([model_a, model_b, model_c])   # eager or scripted modules
    model_a.load_state_dict(merged)

Floating tensors are accumulated in float64 and rounded once to the first input's dtype;
integer and bool tensors (e.g. BatchNorm's num_batches_tracked) come from the first input.
"""
import copy
import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ops_loaded() -> bool:
    try:
        torch.ops.torchmerge.simple_average
        return True
    except (RuntimeError, AttributeError):
        return False


def load_ops(path: Optional[str] = None) -> None:
    """Loads libtorchmerge_ops.so once: path, else $TORCHMERGE_OPS_LIB, else build/ of this
    repository."""
    if ops_loaded():
        return
    path = path or os.environ.get("TORCHMERGE_OPS_LIB") or os.path.join(_REPO, "build", "libtorchmerge_ops.so")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: libtorchmerge_ops.so not found (build it with "
                                f"`cmake --build build --target torchmerge_ops` or set TORCHMERGE_OPS_LIB)")
    torch.ops.load_library(path)


load_ops()


@torch.jit.script
def average_tensors(tensors: List[Tensor], weights: Optional[List[float]] = None) -> Tensor:
    """The (weighted) average of tensors of one shape; weights are normalised to sum to 1."""
    if weights is None:
        return torch.ops.torchmerge.simple_average(tensors)
    return torch.ops.torchmerge.weighted_average(tensors, weights, normalize=True)


@torch.jit.script
def average_state_dicts(state_dicts: List[Dict[str, Tensor]],
                        weights: Optional[List[float]] = None) -> Dict[str, Tensor]:
    """Key by key Σ wᵢ sdᵢ[k] / Σ wᵢ (uniform when weights is None), in the first dict's order."""
    return torch.ops.torchmerge.state_dict_average(state_dicts, weights)


@torch.jit.script
def task_arithmetic(base: Dict[str, Tensor], finetuned: List[Dict[str, Tensor]],
                    scaling: float) -> Dict[str, Tensor]:
    """θ = θ_base + λ Σᵢ (θᵢ − θ_base) (Ilharco et al., task vectors)."""
    merged = base
    for sd in finetuned:
        task_vector = torch.ops.torchmerge.state_dict_add(sd, base, alpha=-1.0)
        merged = torch.ops.torchmerge.state_dict_add(merged, task_vector, alpha=scaling)
    return merged


class Averager(torch.nn.Module):
    """A scriptable module whose methods call the ops: torch.jit.script(Averager()) can be
    saved and run wherever libtorchmerge_ops.so is loaded (Python or C++)."""

    def forward(self, tensors: List[Tensor]) -> Tensor:
        return torch.ops.torchmerge.simple_average(tensors)

    @torch.jit.export
    def weighted(self, tensors: List[Tensor], weights: List[float], normalize: bool = True) -> Tensor:
        return torch.ops.torchmerge.weighted_average(tensors, weights, normalize=normalize)

    @torch.jit.export
    def average_state_dicts(self, state_dicts: List[Dict[str, Tensor]],
                            weights: Optional[List[float]] = None) -> Dict[str, Tensor]:
        return torch.ops.torchmerge.state_dict_average(state_dicts, weights)

    @torch.jit.export
    def task_arithmetic(self, base: Dict[str, Tensor], finetuned: List[Dict[str, Tensor]],
                        scaling: float) -> Dict[str, Tensor]:
        return task_arithmetic(base, finetuned, scaling)


def state_dict_of(module: torch.nn.Module) -> Dict[str, Tensor]:
    """module.state_dict() as a plain Dict[str, Tensor] (works for eager and scripted modules)."""
    return {k: v for k, v in module.state_dict().items()}


def average_parameters(modules: Sequence[torch.nn.Module],
                       weights: Optional[List[float]] = None) -> Dict[str, Tensor]:
    """The averaged state dict (parameters and buffers) of modules of one architecture, eager or
    scripted (torch.jit.ScriptModule), computed by the scripted average_state_dicts."""
    return average_state_dicts([state_dict_of(m) for m in modules],
                               None if weights is None else [float(w) for w in weights])


def soup(modules: Sequence[torch.nn.Module], weights: Optional[List[float]] = None) -> torch.nn.Module:
    """A copy of modules[0] holding the average of all modules' weights (a model soup)."""
    out = copy.deepcopy(modules[0])
    out.load_state_dict(average_parameters(modules, weights))
    return out
