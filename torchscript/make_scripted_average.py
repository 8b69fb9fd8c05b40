"""Saves a scripted module that calls torch.ops.torchmerge.* (average_modules.Averager):

    python3 torchscript/make_scripted_average.py OUT.pt [--ops-lib build/libtorchmerge_ops.so]

Its methods: forward(tensors: List[Tensor]) -> Tensor (simple_average);
weighted(tensors, weights: List[float], normalize: bool=True) -> Tensor;
average_state_dicts(state_dicts: List[Dict[str, Tensor]], weights: Optional[List[float]]=None);
task_arithmetic(base, finetuned: List[Dict[str, Tensor]], scaling: float).

Loading it (torch.jit.load in Python, torch::jit::load in C++) needs the ops registered first:
torch.ops.load_library(...) in Python, or linking libtorchmerge_ops.so with -Wl,--no-as-needed
in C++.
"""
import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--ops-lib", help="libtorchmerge_ops.so (default: $TORCHMERGE_OPS_LIB or build/)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.ops_lib:  # average_modules loads the library when imported
        os.environ["TORCHMERGE_OPS_LIB"] = args.ops_lib
    import torch
    import average_modules

    scripted = torch.jit.script(average_modules.Averager())
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    scripted.save(args.output)
    print(f"{args.output}: scripted torchmerge averager "
          f"(forward, weighted, average_state_dicts, task_arithmetic)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
