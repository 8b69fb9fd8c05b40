"""Trains the checkpoints shipped in examples/multitask/checkpoints/ (committed; rerun to rebuild).

    /usr/bin/python3 examples/multitask/finetune.py [OUT_DIR]   (default: examples/multitask/checkpoints)

About 25 s on one core. Needs Debian's python3-torch (1.13), python3-sklearn and
dataset-fashion-mnist (tasks.py describes the data and the splits). Deterministic: one thread,
torch.use_deterministic_algorithms(True), a seed before every stage.

1. Pre-training, once, on a generic objective: rotation prediction (which of 0/90/180/270
   degrees an image was turned by; Gidaris et al. 2018), no class labels, on the 6000 images
   of the Fashion-MNIST pre-training pool, which no task uses. 4 epochs of SGD (lr 0.05,
   momentum 0.9, batch 64).
2. Per task, a head: a linear probe (Linear(64, classes)) fitted on the frozen pre-trained
   features of the task's train split (30 epochs SGD, lr 0.1, momentum 0.9, batch 128).
3. Per task, a fine-tune of the backbone with the head frozen, as FusionBench's CLIP models
   are fine-tuned under their frozen zero-shot heads: 300 steps of SGD (lr 0.002, momentum
   0.9, batch 32) on the task's train split. So every model of a task shares one head, and
   a merged backbone is scored with the heads the fine-tunes were trained under.
One setting changed after a first merge: the fine-tuning lr was 0.02, which moved the inverted
tasks' backbones by more than the backbone's own norm and made every merge fall below the
pre-trained model; it was lowered to 0.002 on a criterion fixed before looking at merges again
(every task vector at most 0.2 of its pre-trained tensor's norm). docs/multitask.md reports it.

Files (about 2.0 MB):
  pretrained.pt                   torch.save(state_dict): backbone.* and the rotation head head.*
  template.pt                     TorchScript tasks.Features with the pre-trained backbone: the
                                  merge template (--template), tensors backbone.*
  finetuned_<task>.pt             torch.save(state_dict) of tasks.Classifier: backbone.*, head.*
  finetuned_<task>.safetensors    the same as safetensors
  finetuned_<task>_scripted.pt    the same as a TorchScript module (torch.jit.script)
  heads.pt                        torch.save({"<task>.weight": ..., "<task>.bias": ...}): every
                                  task's head (the same values as head.* in its fine-tune)
  finetune.json                   the settings and the accuracies measured here
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "soup"))
import tasks  # noqa: E402
from make_ingredients import run_epochs, save_safetensors  # noqa: E402  (shared with the soup example)

PRETRAIN = dict(seed=0, epochs=4, lr=0.05, batch=64)
PROBE = dict(epochs=30, lr=0.1, batch=128)
FINETUNE = dict(steps=300, lr=0.002, batch=32)
MOMENTUM = 0.9


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)


def pretrain(x):
    torch.manual_seed(PRETRAIN["seed"])
    gen = torch.Generator().manual_seed(PRETRAIN["seed"])
    model = tasks.Classifier(4)
    model.train()

    def loss_of(idx):  # each image turned by a random multiple of 90 degrees; the label is which
        k = torch.randint(0, 4, (len(idx),), generator=gen)
        turned = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(x[idx], k)])
        return F.cross_entropy(model(turned), k)

    run_epochs(sgd(model.parameters(), PRETRAIN["lr"]), len(x), PRETRAIN["batch"], PRETRAIN["epochs"], gen, loss_of)
    model.eval()
    return model


@torch.no_grad()
def features(backbone, x):
    backbone.eval()
    return backbone(x)


def probe(task, feats, y):
    torch.manual_seed(task.seed)
    gen = torch.Generator().manual_seed(task.seed)
    head = torch.nn.Linear(64, task.classes)
    run_epochs(sgd(head.parameters(), PROBE["lr"]), len(y), PROBE["batch"], PROBE["epochs"], gen,
               lambda idx: F.cross_entropy(head(feats[idx]), y[idx]))
    return head


def finetune(task, base, head, x, y):
    torch.manual_seed(task.seed)
    gen = torch.Generator().manual_seed(task.seed)
    model = tasks.Classifier(task.classes)
    model.backbone.load_state_dict(base.backbone.state_dict())
    model.head.load_state_dict(head.state_dict())
    for p in model.head.parameters():
        p.requires_grad_(False)
    opt = sgd(model.backbone.parameters(), FINETUNE["lr"])
    model.train()
    step, order, pos = 0, torch.randperm(len(y), generator=gen), 0
    while step < FINETUNE["steps"]:
        if pos >= len(y):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos:pos + FINETUNE["batch"]]
        pos += FINETUNE["batch"]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(1) == y).double().mean().item()


def save(task, model, out):
    name = tasks.checkpoint_name(task)
    path = os.path.join(out, name)
    if task.form == "pt":
        torch.save(model.state_dict(), path)
    elif task.form == "safetensors":
        save_safetensors(model.state_dict(), path)
    else:
        torch.jit.save(torch.jit.script(model), path)
    return name


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "checkpoints")
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    src = tasks.Sources()

    base = pretrain(tasks.as_float(src.pools("fashion")["pretrain"][0]))
    torch.save(base.state_dict(), os.path.join(out, "pretrained.pt"))
    template = tasks.Features()
    template.backbone.load_state_dict(base.backbone.state_dict())
    torch.jit.save(torch.jit.script(template.eval()), os.path.join(out, "template.pt"))

    record = {"pretrain": dict(PRETRAIN, objective="rotation prediction (4 classes) on the Fashion-MNIST pre-training pool"),
              "probe": PROBE, "finetune": dict(FINETUNE, head="frozen"), "momentum": MOMENTUM, "tasks": []}
    heads = {}
    print(f"{'task':18} {'file':36} {'pre-trained val/test %':>22} {'fine-tuned val/test %':>22}")
    for task in tasks.TASKS:
        xtr, ytr = src.split(task, "train")
        xval, yval = src.split(task, "val")
        xte, yte = src.split(task, "test")
        head = probe(task, features(base.backbone, xtr), ytr)
        start = tasks.Classifier(task.classes)
        start.backbone.load_state_dict(base.backbone.state_dict())
        start.head.load_state_dict(head.state_dict())
        model = finetune(task, base, head, xtr, ytr)
        for k, v in model.head.state_dict().items():
            heads[task.name + "." + k] = v.clone()
        name = save(task, model, out)
        acc = dict(pretrained_val=accuracy(start, xval, yval), pretrained_test=accuracy(start, xte, yte),
                   finetuned_val=accuracy(model, xval, yval), finetuned_test=accuracy(model, xte, yte))
        record["tasks"].append(dict(name=task.name, file=name, classes=task.classes, transform=task.transform,
                                    labels=task.labels, seed=task.seed, train=len(ytr), val=len(yval), test=len(yte),
                                    **acc))
        print(f"{task.name:18} {name:36} {100 * acc['pretrained_val']:10.2f} {100 * acc['pretrained_test']:10.2f} "
              f"{100 * acc['finetuned_val']:10.2f} {100 * acc['finetuned_test']:10.2f}", flush=True)
    torch.save(heads, os.path.join(out, "heads.pt"))
    with open(os.path.join(out, "finetune.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
