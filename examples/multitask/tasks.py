"""The tasks of the multi-task example: data, splits, the network. Imported by finetune.py
(which trains the shipped checkpoints) and make_eval.py (which builds the evaluation modules
run.sh scores on); one definition, so training and evaluation cannot drift apart.

Data (nothing is downloaded):
  Fashion-MNIST   Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist
                  (60,000 train + 10,000 test 28x28 grey images, 10 clothing classes)
  digits          scikit-learn's load_digits (python3-sklearn): 1797 8x8 images, pixels 0..16,
                  upscaled to 28x28 (bilinear) so one network takes both

Splits, fixed before anything was trained or merged (seeds below):
  Fashion-MNIST train, one permutation (seed 0):
      [0, 6000)       the pre-training pool (the backbone's generic objective only)
      [6000, 11000)   the validation pool
      [11000, 60000)  the fine-tuning pool
  Fashion-MNIST test: the test pool (the official test set; no task trains on it).
  Each Fashion-MNIST task draws, with its own seed, 3000 train images from the fine-tuning
  pool, 400 validation images from the validation pool and 1000 test images from the test
  pool. The digits (one permutation, seed 0) split once into 597 test, 300 validation and
  900 train images; every digits task uses all three parts (there are too few to subsample),
  each with its own transform and labels. So no image is a training image of one task and a
  test image of another, and the pre-training pool is disjoint from every task's images.
"""
import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FASHION_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
N_PRETRAIN, N_VAL_POOL = 6000, 5000
N_TRAIN, N_VAL, N_TEST = 3000, 400, 1000            # per Fashion-MNIST task
DIGITS_TEST, DIGITS_VAL = 597, 300                  # the rest (900) trains

# Fashion-MNIST classes 0..9: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
# Sneaker, Bag, Ankle boot. The group task: tops / trousers and dresses / footwear / bags.
FASHION_GROUP = [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]


@dataclass(frozen=True)
class Task:
    name: str
    source: str        # "fashion" or "digits"
    classes: int
    transform: str     # "none", "invert" (1 - x) or "rot90" (a quarter turn counter-clockwise)
    labels: str        # "class", "group" (FASHION_GROUP) or "parity" (digit % 2)
    seed: int
    form: str          # how finetune.py ships it: "pt" (state dict), "safetensors", "torchscript"


TASKS = [
    Task("fashion", "fashion", 10, "none", "class", 101, "pt"),
    Task("fashion_group", "fashion", 4, "none", "group", 102, "safetensors"),
    Task("fashion_inverted", "fashion", 10, "invert", "class", 103, "torchscript"),
    Task("fashion_rotated", "fashion", 10, "rot90", "class", 104, "pt"),
    Task("digits", "digits", 10, "none", "class", 105, "safetensors"),
    Task("digits_inverted", "digits", 10, "invert", "class", 106, "pt"),
    Task("digits_parity", "digits", 2, "none", "parity", 107, "torchscript"),
    Task("digits_rotated", "digits", 10, "rot90", "class", 108, "pt"),
]
BY_NAME = {t.name: t for t in TASKS}


def checkpoint_name(task):
    ext = {"pt": ".pt", "safetensors": ".safetensors", "torchscript": "_scripted.pt"}[task.form]
    return "finetuned_" + task.name + ext


class Backbone(nn.Module):
    """28x28 grey image -> 64 features. About 47,000 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, stride=2, padding=1)    # 14x14
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)   # 7x7
        self.conv3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)   # 4x4
        self.fc = nn.Linear(32 * 4 * 4, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return torch.relu(self.fc(x.flatten(1)))


class Features(nn.Module):
    """The merge template: a backbone alone, so its tensors are named backbone.*."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class Classifier(nn.Module):
    """A backbone and one task's head: tensors backbone.* and head.*."""

    def __init__(self, classes):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy())


def fashion():
    """(train images uint8 [60000,28,28], train labels, test images, test labels)."""
    d = FASHION_DIR
    if not os.path.isdir(d):
        raise SystemExit("%s not found: install Debian's dataset-fashion-mnist (.ci/install-deps)" % d)
    return (_idx(os.path.join(d, "train-images-idx3-ubyte.gz")), _idx(os.path.join(d, "train-labels-idx1-ubyte.gz")),
            _idx(os.path.join(d, "t10k-images-idx3-ubyte.gz")), _idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz")))


def fashion_pools():
    xtr, ytr, xte, yte = fashion()
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))
    pre, val, fine = perm[:N_PRETRAIN], perm[N_PRETRAIN:N_PRETRAIN + N_VAL_POOL], perm[N_PRETRAIN + N_VAL_POOL:]
    return {"pretrain": (xtr[pre], ytr[pre]), "train": (xtr[fine], ytr[fine]), "val": (xtr[val], ytr[val]),
            "test": (xte, yte)}


def digits_splits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, val, train = perm[:DIGITS_TEST], perm[DIGITS_TEST:DIGITS_TEST + DIGITS_VAL], perm[DIGITS_TEST + DIGITS_VAL:]
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}


def as_float(images):
    """uint8 [N,28,28] -> float32 [N,1,28,28] in [0, 1]; float images pass through."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div(255.0).unsqueeze(1)
    return images


def apply(task, x, y):
    x = as_float(x)
    if task.transform == "invert":
        x = 1.0 - x
    elif task.transform == "rot90":
        x = torch.rot90(x, 1, dims=(2, 3)).contiguous()
    if task.labels == "group":
        y = torch.tensor(FASHION_GROUP, dtype=torch.int64)[y.long()]
    elif task.labels == "parity":
        y = y.long() % 2
    return x.contiguous(), y.long()


class Sources:
    """Loads each source once; split(task, part) gives (images float [N,1,28,28], labels)."""

    def __init__(self):
        self._pools = {}

    def pools(self, source):
        if source not in self._pools:
            self._pools[source] = fashion_pools() if source == "fashion" else digits_splits()
        return self._pools[source]

    def split(self, task, part):
        x, y = self.pools(task.source)[part]
        if task.source == "fashion":
            n = {"train": N_TRAIN, "val": N_VAL, "test": N_TEST}[part]
            offset = {"train": 0, "val": 1, "test": 2}[part]
            pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(task.seed * 10 + offset))[:n]
            x, y = x[pick], y[pick]
        return apply(task, x, y)


def select(names):
    """The tasks named (comma-separated string or list), in TASKS order; all when empty."""
    if not names:
        return list(TASKS)
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit("unknown task(s) %s (tasks: %s)" % (", ".join(unknown), ", ".join(BY_NAME)))
    return [t for t in TASKS if t.name in names]
