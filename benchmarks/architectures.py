"""Fusing user architectures through their automatic levels: MobileNet-V2, a concatenation net, MLPs
with LayerNorm.

    OMP_NUM_THREADS=1 python benchmarks/architectures.py                  # both, 2 models, MNIST
    python benchmarks/architectures.py --arch mobilenet_v2 --models 2 4 --seeds 0 1
    python benchmarks/architectures.py --width 1 --out runs/arch.json

``mobilenet_v2`` (inverted residuals with depthwise convolutions, ReLU6, linear bottlenecks) and
``branches`` (a 3x3 and a 5x5 convolution branch joined by ``torch.cat``) are the
torchvision-style models of ``tests/levels/user_models.py``, built with one input channel and every
width times ``--width`` (4 by default: MobileNet-V2 with 16 to 128 channels, the concatenation net
with branches of 24 and 40); ``mlp_ln`` is its MLP whose hidden layers are
``Linear -> LayerNorm -> ReLU -> Dropout`` (two of ``32 * --width`` neurons); ``resmlp`` its
pre-norm residual MLP (an embedding of ``32 * --width``, two blocks ``x + MLP(LayerNorm(x))`` with
``64 * --width`` hidden neurons, a ``LayerNorm`` and the head); ``resnet18_gn`` torchvision's
ResNet-18 with ``GroupNorm(2, C)`` (widths ``4, 8, 8, 16`` times ``--width``); ``resnext`` a small
ResNeXt (torchvision's ``Bottleneck`` with a grouped 3x3 convolution of 4 groups of ``4 * --width``
channels; two stages of ``8, 16`` times ``--width`` planes); ``bottleneck`` the same with one group
(a plain bottleneck ResNet of the same widths); ``grouped_end`` residual blocks whose second
3x3 convolution is grouped (4 groups) and ends the block (``x + BN(gconv(...))``: the grouped
convolution writes the residual stream), widths ``8, 16`` times ``--width``, the first block of
the second stage strided with a projection shortcut.  ``N`` of them, each from its own initialisation, are trained briefly
on the parts of a Dirichlet split (the paper's, ratio 0.2) of the training data, cut into levels
with ``neurofuse.levels_from(model, input_shape=...)`` (nothing declared) and fused on a
400-sample class-balanced fusion set drawn from the training data with every level-wise method
that applies, alone and followed by REPAIR (``name+repair``), and the references (vanilla
averaging, the ensemble).  Accuracies are on the test split; seconds are the fusion call's CPU
time with one torch thread (``process_time``: other processes on the machine do not count) and,
in the JSON, its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np
import torch

import neurofuse
from neurofuse.data import balanced_subset, load_dataset, partition
from neurofuse.training import TrainConfig, evaluate, train_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "levels"))
from user_models import MLP, BranchNet, GroupedEndResNet, MobileNetV2, ResMLP, ResNeXt, resnet18_gn  # noqa: E402

ARCHS = {"mobilenet_v2": lambda s, k, w: MobileNetV2(num_classes=k, in_ch=s[0], width_mult=w),
         "branches": lambda s, k, w: BranchNet(num_classes=k, in_ch=s[0], widths=(8 * w, 6 * w, 10 * w, 16 * w),
                                               hidden=32 * w),
         "mlp_ln": lambda s, k, w: MLP(in_features=int(np.prod(s)), hidden=(32 * w, 32 * w), num_classes=k),
         "resmlp": lambda s, k, w: ResMLP(in_features=int(np.prod(s)), dim=32 * w, hidden=64 * w, num_classes=k),
         "resnet18_gn": lambda s, k, w: resnet18_gn(k, (4 * w, 8 * w, 8 * w, 16 * w), s[0]),
         "resnext": lambda s, k, w: ResNeXt(k, s[0], (8 * w, 16 * w), groups=4, base_width=4 * w),
         "bottleneck": lambda s, k, w: ResNeXt(k, s[0], (8 * w, 16 * w), groups=1, base_width=16 * w),
         "grouped_end": lambda s, k, w: GroupedEndResNet(k, s[0], (8 * w, 16 * w), groups=4)}
METHODS = ["vanilla", "ensemble", "kf-linear", "hf-linear", "otfusion", "otfusion+repair", "git-rebasin",
           "git-rebasin+repair", "kf-gradient"]


def train_bases(arch: str, ds: Any, n: int, seed: int, epochs: int, lr: float, width: int = 1) -> List[Any]:
    parts = partition(ds.y_train.numpy(), n, "dirichlet", seed=seed)
    models = []
    for i, part in enumerate(parts):
        torch.manual_seed(1000 * seed + i)          # a different initialisation per model
        m = ARCHS[arch](ds.input_shape, ds.num_classes, width)
        train_model(m, ds.x_train[part], ds.y_train[part],
                    config=TrainConfig(epochs=epochs, lr=lr, batch_size=128, warmup_epochs=0,
                                       seed=1000 * seed + i))
        models.append(m.eval())
    return models


def run(arch: str, dataset: str, n: int, seed: int, epochs: int, lr: float, fusion_samples: int,
        methods: List[str], width: int) -> Dict[str, Any]:
    ds = load_dataset(dataset)
    t0 = time.time()
    models = train_bases(arch, ds, n, seed, epochs, lr, width)
    nets = [neurofuse.levels_from(m, input_shape=ds.input_shape) for m in models]
    acc = lambda m: evaluate(m, ds.x_test, ds.y_test)["accuracy"]  # noqa: E731
    y = ds.y_train.numpy()
    idx = balanced_subset(y, np.arange(len(y)), fusion_samples, seed=seed)
    fusion = (ds.x_train[idx], ds.y_train[idx])
    row: Dict[str, Any] = {"arch": arch, "dataset": dataset, "models": n, "seed": seed, "epochs": epochs,
                           "width": width, "base": [acc(m) for m in models], "train_s": time.time() - t0,
                           "levels": nets[0].kinds}
    row["mean_base"] = float(np.mean(row["base"]))
    for spec in methods:
        method, _, post = spec.partition("+")
        cls = neurofuse.methods.get_method(method)
        if cls.max_models is not None and n > cls.max_models:
            continue
        t0, c0 = time.time(), time.process_time()
        fused = neurofuse.fuse(nets, fusion, method=method, seed=seed, progress=False, repair=post == "repair")
        row[spec + "_s"] = time.process_time() - c0
        row[spec + "_wall_s"] = time.time() - t0
        row[spec] = acc(fused)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--dataset", default="mnist", help="mnist (needs the data folder) or digits")
    p.add_argument("--models", nargs="+", type=int, default=[2])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=2, help="training epochs per base model")
    p.add_argument("--width", type=int, default=4, help="width multiplier of the models")
    p.add_argument("--lr", type=float, default=3e-3, help="training learning rate")
    p.add_argument("--fusion-samples", type=int, default=400)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    cols = [m for m in a.methods]
    print("| model | N | seed | base models | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for arch in a.arch:
        for n in a.models:
            for seed in a.seeds:
                r = run(arch, a.dataset, n, seed, a.epochs, a.lr, a.fusion_samples, a.methods, a.width)
                rows.append(r)
                base = ", ".join(f"{100 * b:.1f}" for b in r["base"])
                cells = [f"{100 * r[m]:.1f} ({r[m + '_s']:.1f} s)" if m in r else "n/a" for m in cols]
                print(f"| {arch} | {n} | {seed} | {base} | " + " | ".join(cells) + " |", flush=True)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
