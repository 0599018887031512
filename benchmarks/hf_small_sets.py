"""Why hf-linear, not kf-linear, loses accuracy with small fusion sets on skewed splits (issue 23).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/hf_small_sets.py \
        --models runs/fusion-size/models --name "mlp256_no-bias_dirichlet"

Reads the two cached MLPs of ``benchmarks/fusion_size.py`` and, on small (w/4) and large (4w)
class-balanced fusion sets (2 draws), reports validation accuracy (the 5,000 held-out training
images of that benchmark; the test set is not read) of: hf-linear at both sizes; the small set's
fit with the large set's matching; that model with one level's weights taken from the large
set's fit (which level's fit loses the accuracy); ``prior=False`` and fixed ridges; mixup
augmentation of the small set; kf-linear and the share of its clusters holding one model's
neurons only.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Dict

import numpy as np
import torch

import neurofuse
from neurofuse.checkpoint import load_model
from neurofuse.data import balanced_subset, load_dataset
from neurofuse.grouping import Grouping
from neurofuse.methods._levelwise import HungarianLinearFusion
from neurofuse.training import evaluate


def mixup(x: torch.Tensor, y: torch.Tensor, factor: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xs, ys = [x], [y]
    for _ in range(factor - 1):
        p = torch.randperm(len(x), generator=g)
        lam = torch.rand(len(x), generator=g).view(-1, *[1] * (x.dim() - 1))
        xs.append(lam * x + (1 - lam) * x[p])
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="runs/fusion-size/models")
    p.add_argument("--name", default="mlp256_no-bias_dirichlet")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    w = int(a.name[3:6])
    ds = load_dataset("mnist", a.data_dir)
    y = ds.y_train.numpy()
    every = np.arange(len(y))
    val = balanced_subset(y, every, 5000, seed=12345)   # as benchmarks/fusion_size.py
    pool = np.setdiff1d(every, val)
    models = [load_model(Path(a.models) / f"{a.name}_{i}.safetensors").eval() for i in range(2)]
    acc = lambda m: 100 * float(evaluate(m, ds.x_train[val], ds.y_train[val])["accuracy"])  # noqa: E731
    print("base models:", " / ".join(f"{acc(m):.2f}" for m in models))
    linears = lambda m: [x for x in m.modules() if isinstance(x, torch.nn.Linear)]  # noqa: E731
    group = HungarianLinearFusion.group
    saved: Dict[int, Grouping] = {}

    def recording(self, features, scores, widths, k, level):
        saved[level] = group(self, features, scores, widths, k, level)
        return saved[level]

    for draw in (0, 1):
        big = balanced_subset(y, pool, 4 * w, seed=draw)
        small = balanced_subset(y, pool, w // 4, seed=draw)
        fb, fs = (ds.x_train[big], ds.y_train[big]), (ds.x_train[small], ds.y_train[small])
        fuse = lambda f, method="hf-linear", **kw: neurofuse.fuse(models, f, method=method, progress=False,  # noqa: E731
                                                                   seed=draw, **kw)
        rows = {}
        try:
            HungarianLinearFusion.group = recording
            b = fuse(fb)
            HungarianLinearFusion.group = lambda self, f, s, wd, k, level: saved[level]
            s = fuse(fs)
        finally:
            HungarianLinearFusion.group = group
        rows[f"hf-linear, {4 * w} samples"] = acc(b)
        rows["hf-linear"] = acc(fuse(fs))
        rows["matching from the large set, fit from the small"] = acc(s)
        for lvl in range(len(linears(b))):
            m = copy.deepcopy(s)
            linears(m)[lvl].load_state_dict(linears(b)[lvl].state_dict())
            rows[f"  + level {lvl}'s weights from the large set's fit"] = acc(m)
        rows["hf-linear prior=False"] = acc(fuse(fs, prior=False))
        for r in (1e-3, 1e-1, 0.0):
            rows[f"hf-linear ridge={r:g}"] = acc(fuse(fs, ridge=r))
        rows["hf-linear, small set + 3x mixup"] = acc(fuse(mixup(*fs, 4, draw)))
        res = fuse(fs, "kf-linear", return_result=True)
        rows["kf-linear"] = acc(res.model)
        rows["kf-linear prior=False"] = acc(fuse(fs, "kf-linear", prior=False))
        print(f"\ndraw {draw} ({w // 4} fusion samples unless said):")
        for k, v in rows.items():
            print(f"  {k:55s} {v:6.2f}")
        for lvl, c in enumerate(res.correspondences[:-1]):
            m = np.asarray(c.matrix() > 0)
            n0 = c.widths[0]
            a0, a1 = m[:, :n0].sum(1) > 0, m[:, n0:].sum(1) > 0
            print(f"  kf-linear level {lvl}: clusters of model 0 only {int((a0 & ~a1).sum())}, "
                  f"model 1 only {int((~a0 & a1).sum())}, both {int((a0 & a1).sum())}")


if __name__ == "__main__":
    main()
