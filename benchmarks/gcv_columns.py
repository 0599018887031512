"""One ridge penalty per level, or one per target column? The evidence behind ridge="auto" (issue 23).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/gcv_columns.py --models runs/fusion-size/models

Reuses the MNIST MLP pairs of ``benchmarks/fusion_size.py`` (run it first; its ``models`` folder):
784-400-200-100-10 IID and 784-512-256-128-10 Dirichlet without biases, 784-256-128-64-10
Dirichlet with biases.  For fusion sets of w/4, w/2, w and 2w samples (2 draws each), kf-linear and
hf-linear with ``ridge=0``, ``1e-3``, ``"auto"`` (GCV, one penalty pooled over the level's columns,
the library's) and ``"auto-col"``: GCV per column, every base neuron its own penalty from the same
grid (this script patches :meth:`LinearStats.solve` for it; the library does not keep it, since a
fused neuron's weights are then a mean of differently shrunk solutions, not one solve).
Validation accuracy (5,000 held-out training images), mean of the draws, and the mean difference
pooled - per column.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

import neurofuse
from neurofuse.approximation import _linear
from neurofuse.approximation._ridge import PENALTY_GRID, FitDiagnostics
from neurofuse.checkpoint import load_model
from neurofuse.data import balanced_subset, load_dataset
from neurofuse.methods import _levelwise
from neurofuse.training import evaluate

SETS = [("mlp400_no-bias_iid", 400), ("mlp512_no-bias_dirichlet", 512), ("mlp256_dirichlet", 256)]
RIDGES = [0.0, 1e-3, "auto", "auto-col"]
_solve = _linear.LinearStats.solve


def solve_per_column(self: _linear.LinearStats, rtol=None, ridge="auto", prior=None):  # type: ignore[no-untyped-def]
    """``ridge="auto-col"``: GCV per column over the library's grid; anything else as the library."""
    if ridge != "auto-col" or not self.has_cross:
        return _solve(self, rtol, "auto" if ridge == "auto-col" else ridge, prior)
    rtol = self.default_rtol() if rtol is None else rtol
    d = self.gram.shape[0]
    cut = max(rtol * rtol, 10.0 * d * float(torch.finfo(torch.float64).eps))
    evals, evecs = self._eigh()
    keep = evals > cut * evals.max()
    scale = float(evals.clamp_min(0).sum()) / d
    e, u = evals[keep], evecs[:, keep]
    uc = u.T @ self.cross
    pu = None if prior is None else u.T @ prior
    t = uc if pu is None else uc - e[:, None] * pu
    r_sq = self.sq if prior is None else (self.sq - 2.0 * (prior * self.cross).sum(0) + (e[:, None] * pu * pu).sum(0))
    rss0 = (r_sq - (t ** 2 / e[:, None]).sum(0)).clamp_min(0)
    grid = torch.tensor(PENALTY_GRID[1:], dtype=e.dtype) * scale
    shrink = grid[:, None] / (e[None, :] + grid[:, None])                        # [G, r]
    rss = rss0[None, :] + (shrink ** 2) @ (t ** 2 / e[:, None])                 # [G, M]
    free = max(self.rows - int(keep.sum()), 0) + shrink.sum(1)
    lam = grid[torch.argmin(self.rows * rss / free[:, None] ** 2, 0)]           # [M]
    inv = 1.0 / (e[:, None] + lam[None, :])
    y = t * inv if pu is None else pu + t * inv
    w = u @ y if prior is None else prior - u @ pu + u @ y
    feats = u @ (torch.sqrt(e)[:, None] * y)
    residual = self.sq - 2.0 * (y * uc).sum(0) + (e[:, None] * y * y).sum(0)
    diag = FitDiagnostics(self.rows, int(evals.numel()), float("nan"), float(lam.median() / scale),
                          float((e[:, None] * inv).sum(0).mean()))
    # weights per column: a group's fused weights are the weighted mean of its members' columns
    return _linear.LinearSolution(feats.T.contiguous(), residual.clamp_min(0), int(keep.sum()), w, None,
                                  lambda c, p: c, diag)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", required=True, help="the models folder of a fusion_size.py run")
    p.add_argument("--data-dir", default=os.environ.get("NEUROFUSE_DATA", "/work/shared/data"))
    args = p.parse_args()
    logging.getLogger("neurofuse").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    _linear.LinearStats.solve = solve_per_column                                # type: ignore[method-assign]
    post = _levelwise.LinearOptions.__post_init__
    _levelwise.LinearOptions.__post_init__ = lambda self: None if self.ridge == "auto-col" else post(self)  # type: ignore[method-assign]
    ds = load_dataset("mnist", args.data_dir)
    y = ds.y_train.numpy()
    every = np.arange(len(y))
    val = balanced_subset(y, every, 5000, seed=12345)
    pool = np.setdiff1d(every, val)
    xv, yv = ds.x_train[val], ds.y_train[val]
    diffs: dict = {"kf-linear": [], "hf-linear": []}
    print(f"Command: `{' '.join(['python'] + sys.argv)}`\n")
    print("| models | samples | method | " + " | ".join(f"ridge={r}" for r in RIDGES) + " |")
    print("|---|---|---|" + "---|" * len(RIDGES))
    for name, w in SETS:
        models = [load_model(Path(args.models) / f"{name}_{i}.safetensors") for i in range(2)]
        for n in (w // 4, w // 2, w, 2 * w):
            for method in ("kf-linear", "hf-linear"):
                acc = {r: [] for r in RIDGES}
                for draw in range(2):
                    idx = balanced_subset(y, pool, n, seed=draw)
                    for r in RIDGES:
                        f = neurofuse.fuse(models, (ds.x_train[idx], ds.y_train[idx]), method=method,
                                           progress=False, seed=draw, ridge=r)
                        acc[r].append(100 * float(evaluate(f, xv, yv)["accuracy"]))
                diffs[method] += list(np.subtract(acc["auto"], acc["auto-col"]))
                print(f"| {name} | {n} | {method} | " + " | ".join(f"{np.mean(acc[r]):.2f}" for r in RIDGES) + " |",
                      flush=True)
    for method, d in diffs.items():
        d = np.asarray(d)
        print(f"\n{method}: pooled - per column, mean {d.mean():+.3f} over {len(d)} fusions; "
              f"pooled better in {(d > 0).sum()}, worse in {(d < 0).sum()}")


if __name__ == "__main__":
    main()
