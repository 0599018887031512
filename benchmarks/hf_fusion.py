"""Fusing Hugging Face classifiers: base models, vanilla, ensemble, kd-head and kf-gradient (and,
with ``--methods``, every level-wise method: alignment with and without REPAIR, the closed form).

    python benchmarks/hf_fusion.py                                  # every family, 2 and 4 models
    python benchmarks/hf_fusion.py --family bert --models 4 --seeds 0 1 2
    python benchmarks/hf_fusion.py --epochs 20 --out runs/hf.json
    python benchmarks/hf_fusion.py --family resnet --methods vanilla ensemble otfusion otfusion+repair \
        git-rebasin git-rebasin+repair hf-linear kf-linear kf-gradient

For each family (``vit`` and ``resnet`` on scikit-learn's 8x8 digits, ResNet on digits upsampled
to 16x16; ``bert`` on :func:`neurofuse.hf.token_task`), ``N`` small models built from configs
(:func:`neurofuse.hf.tiny_model`, a different initialisation each) are trained on the parts of a
Dirichlet split (the paper's, ratio 0.2) of the training data, then fused on a 400-sample
class-balanced fusion set drawn from the training data; accuracies are on the test split; ``<label>_s`` is each fusion call's wall and ``<label>_cpu_s``
its CPU seconds.  ``hf-linear`` and ``git-rebasin`` fuse two models (left out for more).
Run with ``OMP_NUM_THREADS=1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List

import numpy as np
import torch.nn.functional as F

import neurofuse
import neurofuse.hf as nh
from neurofuse.data import Dataset, balanced_subset, load_dataset, partition
from neurofuse.training import TrainConfig, evaluate, train_model

METHODS = ["vanilla", "ensemble", "kd-head", "kf-gradient"]
#: methods that fuse two models only
TWO_ONLY = {"hf-linear", "git-rebasin"}


def family_data(family: str, seed: int = 0) -> Dataset:
    """The dataset a family is measured on."""
    if family == "bert":
        return nh.token_task(n_train=2000, n_test=1000, seed=seed)
    ds = load_dataset("digits")
    if family == "resnet":   # the 7x7/stride-2 stem and max-pool leave 2x2 of an 8x8 image
        up = lambda x: F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # noqa: E731
        ds = Dataset(ds.name + "16", up(ds.x_train), ds.y_train, up(ds.x_test), ds.y_test,
                     ds.num_classes, (ds.input_shape[0], 16, 16))
    return ds


def make_model(family: str, ds: Dataset, seed: int) -> nh.HFLeveledNet:
    vocab = int(ds.x_train.max()) + 1 if family == "bert" else 0
    return nh.tiny_model(family, ds.input_shape, ds.num_classes, seed=seed, vocab_size=vocab)


def train_bases(family: str, ds: Dataset, n: int, seed: int, epochs: int, lr: float) -> List[Any]:
    y = ds.y_train.numpy()
    models = []
    for i, part in enumerate(partition(y, n, "dirichlet", seed=seed)):
        m = make_model(family, ds, seed=1000 * seed + i)
        train_model(m, ds.x_train[part], ds.y_train[part],
                    config=TrainConfig(epochs=epochs, lr=lr, seed=1000 * seed + i))
        models.append(m.eval())
    return models


def run(family: str, n: int, seed: int, epochs: int, lr: float, fusion_samples: int,
        methods: List[str] = METHODS) -> Dict[str, Any]:
    ds = family_data(family, seed)
    t0 = time.time()
    models = train_bases(family, ds, n, seed, epochs, lr)
    train_s = time.time() - t0
    acc = lambda m: evaluate(m, ds.x_test, ds.y_test)["accuracy"]  # noqa: E731
    y = ds.y_train.numpy()
    idx = balanced_subset(y, np.arange(len(y)), fusion_samples, seed=seed)
    fusion = (ds.x_train[idx], ds.y_train[idx])
    row: Dict[str, Any] = {"family": family, "models": n, "seed": seed, "epochs": epochs,
                           "base": [acc(m) for m in models], "train_s": train_s}
    row["mean_base"] = float(np.mean(row["base"]))
    for label in methods:       # "<method>+repair": REPAIR after the method
        method, repair = label.removesuffix("+repair"), label.endswith("+repair")
        if n > 2 and method in TWO_ONLY:
            continue
        t0, c0 = time.time(), time.process_time()
        fused = neurofuse.fuse(models, fusion, method=method, seed=seed, progress=False,
                               **({"repair": True} if repair else {}))
        row[label + "_s"], row[label + "_cpu_s"] = time.time() - t0, time.process_time() - c0
        row[label] = acc(fused)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", nargs="+", default=["vit", "resnet", "bert"])
    p.add_argument("--models", nargs="+", type=int, default=[2, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=15, help="training epochs per base model")
    p.add_argument("--lr", type=float, default=3e-3, help="training learning rate")
    p.add_argument("--fusion-samples", type=int, default=400)
    p.add_argument("--methods", nargs="+", default=METHODS,
                   help="methods to run (a '+repair' suffix runs REPAIR after the method)")
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    a = p.parse_args()
    rows = []
    print("| family | N | seed | base models | mean base | " + " | ".join(a.methods) + " |")
    print("|---|---|---|---|---|" + "---|" * len(a.methods))
    for family in a.family:
        for n in a.models:
            for seed in a.seeds:
                r = run(family, n, seed, a.epochs, a.lr, a.fusion_samples, a.methods)
                rows.append(r)
                base = ", ".join(f"{b:.3f}" for b in r["base"])
                cells = [f"{r[m]:.3f} ({r[m + '_cpu_s']:.1f})" if m in r else "-" for m in a.methods]
                print(f"| {family} | {n} | {seed} | {base} | {r['mean_base']:.3f} | " + " | ".join(cells) + " |",
                      flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
