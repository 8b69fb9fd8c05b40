"""Builds the evaluation modules of examples/multitask (run.sh calls it; a few seconds).

    /usr/bin/python3 examples/multitask/make_eval.py OUT_DIR [--tasks a,b,...]

For each task (tasks.py: the same data, splits and seeds the fine-tunes were trained with)
writes OUT_DIR/val_<task>.pt and OUT_DIR/test_<task>.pt: TorchScript modules with the
task's images as the Tensor attribute `inputs` ([N, 1, 28, 28] float32) and
forward(features) -> the 0-dim float64 accuracy of the task's head (from
checkpoints/heads.pt, frozen since the linear probe) on those features against the labels.
This is the evaluation-module interface of `torchmerge greedy_soup --eval`; the heads live
here, beside the labels, because they are not merged. The images are built from Debian's
data at run time rather than shipped (they would be several MB).
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tasks  # noqa: E402


class TaskEval(nn.Module):
    def __init__(self, inputs, labels, head):
        super().__init__()
        self.register_buffer("inputs", inputs)
        self.register_buffer("labels", labels)
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (self.head(features).argmax(1) == self.labels).to(torch.float64).mean()


def head_of(heads, task):
    head = nn.Linear(heads[task.name + ".weight"].shape[1], task.classes)
    head.load_state_dict({"weight": heads[task.name + ".weight"], "bias": heads[task.name + ".bias"]})
    return head.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    ap.add_argument("--checkpoints", default=os.path.join(HERE, "checkpoints"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    heads = torch.load(os.path.join(args.checkpoints, "heads.pt"))
    src = tasks.Sources()
    for task in tasks.select(args.tasks):
        for part in ("val", "test"):
            x, y = src.split(task, part)
            module = torch.jit.script(TaskEval(x, y, head_of(heads, task)).eval())
            torch.jit.save(module, os.path.join(args.out, "%s_%s.pt" % (part, task.name)))


if __name__ == "__main__":
    main()
