"""Makes the model-soup ingredients shipped in examples/soup/data/ (committed; rerun to rebuild).

    /usr/bin/python3 examples/soup/make_ingredients.py [OUT_DIR]     (default: examples/soup/data)

Needs Debian's python3-torch (1.13) and python3-sklearn: the data is scikit-learn's digits set
(sklearn.datasets.load_digits, shipped inside the package: 1797 8x8 grey images of the digits
0-9, pixel values 0..16; nothing is downloaded).

What it does, deterministically (torch.manual_seed before every run,
torch.use_deterministic_algorithms(True), torch.set_num_threads(1); the same files come out on
every run with the same torch version):

1. Fixed splits from one seeded permutation (torch.Generator seed 0) of the 1797 images:
   500 held-out test, 300 validation (what greedy soup selects on), 997 train. Pixels / 16.
2. A "pre-trained" model: an MLP 64 -> 64 (ReLU) -> 10, trained 3 epochs (SGD, lr 0.05) on the
   first 250 images of the train split only. It is the shared initialisation of every fine-tune,
   the setting where weight averaging works (Wortsman et al. 2022, "Model soups").
3. Six fine-tunes of it on the whole train split, 15 epochs of SGD with momentum 0.9, batch 32,
   with the hyper-parameters of FINETUNES below (seed, learning rate, weight decay, input
   augmentation: Gaussian pixel noise and/or random shifts of up to one pixel). The grid was
   written down before anything was measured and is not tuned to make the soups look good.

Files written (about 380 KB in all):
  template.pt                  TorchScript module: the architecture with the pre-trained weights
                               (torchmerge ... --template template.pt)
  ingredient_{1,2,3,4}.pt      torch.save(model.state_dict())
  ingredient_5_scripted.pt     torch.jit.save(torch.jit.script(model))
  ingredient_6.safetensors     safetensors, written by hand (JSON header padded to 8 bytes)
  val_eval.pt, test_eval.pt    TorchScript evaluation modules (torchmerge greedy_soup --eval):
                               attribute `inputs` (Tensor [N, 64]) and
                               forward(outputs: Tensor) -> Tensor, the 0-dim float64 accuracy
                               of outputs.argmax(1) against the stored labels
  ingredients.json             the hyper-parameters and the accuracies measured here
"""
import json
import os
import struct
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

HERE = os.path.dirname(os.path.abspath(__file__))

N_TEST, N_VAL, N_PRETRAIN = 500, 300, 250
PRETRAIN = dict(seed=0, lr=0.05, epochs=3)
FINETUNES = [
    # name, seed, lr, weight decay, noise sigma, shift (pixels), saved as
    dict(seed=1, lr=0.05, wd=0.0, noise=0.0, shift=0, form="state_dict"),
    dict(seed=2, lr=0.1, wd=0.0, noise=0.1, shift=0, form="state_dict"),
    dict(seed=3, lr=0.02, wd=0.0, noise=0.0, shift=1, form="state_dict"),
    dict(seed=4, lr=0.05, wd=1e-3, noise=0.1, shift=1, form="state_dict"),
    dict(seed=5, lr=0.2, wd=0.0, noise=0.0, shift=0, form="torchscript"),
    dict(seed=6, lr=0.1, wd=1e-3, noise=0.0, shift=1, form="safetensors"),
]
EPOCHS, BATCH, MOMENTUM = 15, 32, 0.9


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Accuracy(nn.Module):
    """The evaluation-module interface of torchmerge greedy_soup: `inputs` and forward(outputs)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.register_buffer("inputs", inputs)
        self.register_buffer("labels", labels)

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(1) == self.labels).to(torch.float64).mean()


def splits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, val, train = perm[:N_TEST], perm[N_TEST:N_TEST + N_VAL], perm[N_TEST + N_VAL:]
    return (x[train], y[train]), (x[val].clone(), y[val].clone()), (x[test].clone(), y[test].clone())


def augment(x, noise, shift, gen):
    if shift:
        img = F.pad(x.view(-1, 1, 8, 8), (shift, shift, shift, shift))
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
        x = img[:, :, dy:dy + 8, dx:dx + 8].reshape(-1, 64)
    if noise:
        x = x + noise * torch.randn(x.shape, generator=gen)
    return x


def run_epochs(opt, n, batch, epochs, gen, loss_of):
    """`epochs` passes over n examples in mini-batches, a fresh order (from gen) each pass;
    loss_of(indices) -> the batch's loss. (examples/multitask/finetune.py uses it too.)"""
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            loss = loss_of(order[i:i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()


def train(model, x, y, seed, lr, epochs, wd=0.0, noise=0.0, shift=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=wd)
    model.train()
    run_epochs(opt, len(y), BATCH, epochs, gen,
               lambda idx: F.cross_entropy(model(augment(x[idx], noise, shift, gen)), y[idx]))
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).double().mean().item()


def save_safetensors(state_dict, path):
    header, offset, blobs = {}, 0, []
    for name, t in state_dict.items():
        t = t.detach().contiguous()
        assert t.dtype == torch.float32
        data = t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "data")
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    (xtr, ytr), (xval, yval), (xte, yte) = splits()

    torch.manual_seed(PRETRAIN["seed"])
    base = MLP()
    train(base, xtr[:N_PRETRAIN], ytr[:N_PRETRAIN], PRETRAIN["seed"], PRETRAIN["lr"], PRETRAIN["epochs"])
    torch.jit.save(torch.jit.script(base), os.path.join(out, "template.pt"))
    torch.jit.save(torch.jit.script(Accuracy(xval, yval)), os.path.join(out, "val_eval.pt"))
    torch.jit.save(torch.jit.script(Accuracy(xte, yte)), os.path.join(out, "test_eval.pt"))
    record = {
        "data": "sklearn.datasets.load_digits, pixels / 16",
        "splits": {"train": len(ytr), "validation": len(yval), "test": len(yte), "pretrain": N_PRETRAIN},
        "architecture": "Linear(64, 64) -> ReLU -> Linear(64, 10)",
        "pretrain": dict(PRETRAIN, val_accuracy=accuracy(base, xval, yval), test_accuracy=accuracy(base, xte, yte)),
        "finetune": {"epochs": EPOCHS, "batch": BATCH, "optimizer": f"SGD momentum {MOMENTUM}"},
        "ingredients": [],
    }
    print(f"{'file':26} {'seed':>4} {'lr':>5} {'wd':>6} {'noise':>5} {'shift':>5} {'val %':>7} {'test %':>7}")
    print(f"{'(pre-trained template.pt)':26} {'':>4} {'':>5} {'':>6} {'':>5} {'':>5} "
          f"{100 * record['pretrain']['val_accuracy']:7.2f} {100 * record['pretrain']['test_accuracy']:7.2f}")
    for i, hp in enumerate(FINETUNES, 1):
        model = MLP()
        model.load_state_dict(base.state_dict())
        train(model, xtr, ytr, hp["seed"], hp["lr"], EPOCHS, hp["wd"], hp["noise"], hp["shift"])
        if hp["form"] == "state_dict":
            name = f"ingredient_{i}.pt"
            torch.save(model.state_dict(), os.path.join(out, name))
        elif hp["form"] == "torchscript":
            name = f"ingredient_{i}_scripted.pt"
            torch.jit.save(torch.jit.script(model), os.path.join(out, name))
        else:
            name = f"ingredient_{i}.safetensors"
            save_safetensors(model.state_dict(), os.path.join(out, name))
        val, test = accuracy(model, xval, yval), accuracy(model, xte, yte)
        record["ingredients"].append(dict(hp, file=name, val_accuracy=val, test_accuracy=test))
        print(f"{name:26} {hp['seed']:4} {hp['lr']:5} {hp['wd']:6} {hp['noise']:5} {hp['shift']:5} "
              f"{100 * val:7.2f} {100 * test:7.2f}")
    with open(os.path.join(out, "ingredients.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
