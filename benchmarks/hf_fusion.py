"""Fusing Hugging Face classifiers: base models, vanilla, ensemble, kd-head and kf-gradient.

    python benchmarks/hf_fusion.py                                  # every family, 2 and 4 models
    python benchmarks/hf_fusion.py --family bert --models 4 --seeds 0 1 2
    python benchmarks/hf_fusion.py --epochs 20 --out runs/hf.json

For each family (``vit`` and ``resnet`` on scikit-learn's 8x8 digits, ResNet on digits upsampled
to 16x16; ``bert`` on :func:`neurofuse.hf.token_task`), ``N`` small models built from configs
(:func:`neurofuse.hf.tiny_model`, a different initialisation each) are trained on the parts of a
Dirichlet split (the paper's, ratio 0.2) of the training data, then fused on a 400-sample
class-balanced fusion set drawn from the training data; accuracies are on the test split.
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


def run(family: str, n: int, seed: int, epochs: int, lr: float, fusion_samples: int) -> Dict[str, Any]:
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
    for method in METHODS:
        t0 = time.time()
        fused = neurofuse.fuse(models, fusion, method=method, seed=seed, progress=False)
        row[method] = acc(fused)
        row[method + "_s"] = time.time() - t0
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", nargs="+", default=["vit", "resnet", "bert"])
    p.add_argument("--models", nargs="+", type=int, default=[2, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=15, help="training epochs per base model")
    p.add_argument("--lr", type=float, default=3e-3, help="training learning rate")
    p.add_argument("--fusion-samples", type=int, default=400)
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    a = p.parse_args()
    rows = []
    print("| family | N | seed | base models | mean base | vanilla | ensemble | kd-head | kf-gradient | kf-gradient s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in a.family:
        for n in a.models:
            for seed in a.seeds:
                r = run(family, n, seed, a.epochs, a.lr, a.fusion_samples)
                rows.append(r)
                base = ", ".join(f"{b:.3f}" for b in r["base"])
                print(f"| {family} | {n} | {seed} | {base} | {r['mean_base']:.3f} | {r['vanilla']:.3f} | "
                      f"{r['ensemble']:.3f} | {r['kd-head']:.3f} | {r['kf-gradient']:.3f} | "
                      f"{r['kf-gradient_s']:.1f} |", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
