"""The closed form on a wider ViT: is 400 fusion samples enough at hidden 256? (issue 24 probe)

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/vit_fusion_size.py 256

Two zoo ViTs of token width H (MLP 2H, 4 heads; ``benchmarks/transformer_fusion.py``'s ``make``)
trained 30 epochs on the paper's Dirichlet split of digits, fused with kf-linear at 400 and 1,000
fusion samples with the default ``ridge="auto"``, ``ridge=0``, ``ridge=1e-2`` and ``prior=False``,
and with kf-gradient at 400; test accuracy and wall seconds (one thread).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

import neurofuse
from neurofuse.data import balanced_subset, partition
from neurofuse.training import TrainConfig, evaluate, train_model

sys.path.insert(0, str(Path(__file__).parent))
from transformer_fusion import family_data, make  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    hidden, seed = int(sys.argv[1]), 0
    ds = family_data("vit", "digits", 5000, seed)
    y = ds.y_train.numpy()
    models = []
    for i, part in enumerate(partition(y, 2, "dirichlet", seed=seed)):
        m = make("vit", ds, 1000 * seed + i, hidden=hidden)
        train_model(m, ds.x_train[part], ds.y_train[part],
                    config=TrainConfig(epochs=30, lr=3e-3, seed=1000 * seed + i))
        models.append(m.eval())
    acc = lambda m: evaluate(m, ds.x_test, ds.y_test)["accuracy"]  # noqa: E731
    print("base", [acc(m) for m in models], flush=True)
    for fs in (400, 1000):
        idx = balanced_subset(y, np.arange(len(y)), fs, seed=seed)
        fusion = (ds.x_train[idx], ds.y_train[idx])
        for opts in ({}, {"ridge": 0.0}, {"ridge": 1e-2}, {"prior": False}):
            t = time.time()
            f = neurofuse.fuse(models, fusion, method="kf-linear", seed=seed, progress=False, **opts)
            print(fs, "kf-linear", opts, round(acc(f), 3), round(time.time() - t, 1), flush=True)
        if fs == 400:
            t = time.time()
            f = neurofuse.fuse(models, fusion, method="kf-gradient", seed=seed, progress=False)
            print(fs, "kf-gradient", round(acc(f), 3), round(time.time() - t, 1), flush=True)


if __name__ == "__main__":
    main()
