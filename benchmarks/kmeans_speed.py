"""Time importance-weighted K-means on neuron-like points: this implementation, scikit-learn's
``KMeans(sample_weight=...)`` and, optionally, an older ``neurofuse.grouping._core`` side by side.

    python benchmarks/kmeans_speed.py [--models 2 4 8] [--baseline-src OLD/src] [--threads 1]

The points are the neurons of ``N`` random ReLU MLPs' hidden level (256 neurons each) on
``--dim`` fusion samples: ``M = 256 N`` points in ``D = --dim`` dimensions, ``k = 256`` fused
neurons, ``n_init = 10`` (``kmeans_grouping``'s defaults).  ``--data gauss`` uses Gaussian points
instead, ``--weights gamma`` skewed importance scores instead of the uniform ones.  Every method
gets the same torch/BLAS thread count.  Prints seconds and each cost relative to scikit-learn's.

``--baseline-src DIR`` loads ``DIR/neurofuse/grouping/_core.py`` (e.g. a checkout of an older
commit) as the baseline; it can take minutes on the largest case.

Measured on a 2-core x86 VM beside other jobs (seconds, best of 2; baseline: the implementation
before the batched one, Python loops over k-means++ steps and Hartigan points; one run)::

    --threads 1 --baseline-src ...          sklearn      new   new, refine=False   baseline
    M=512  (2 models)   time                 0.85     0.25        0.08               7.3
                        cost / sklearn       1        0.921       0.999              0.924
    M=1024 (4 models)   time                 1.67     0.48        0.20              26.2
                        cost / sklearn       1        0.936       0.998              0.936
    M=2048 (8 models)   time                 3.41     1.37        0.69             111.6
                        cost / sklearn       1        0.942       0.998              0.943

    --threads 2: M=512 0.81 / 0.15 / 0.06 s, M=1024 1.45 / 0.36 / 0.13 s,
                 M=2048 2.69 / 0.97 / 0.42 s (sklearn / new / refine=False), same costs.
    --data gauss --weights gamma --models 8 --threads 1: sklearn 2.90 s, new 2.13 s (cost 0.947),
                 refine=False 0.57 s (0.999): skewed weights need the most refinement rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from neurofuse.grouping import _core as current
from neurofuse.grouping import centroids


def load_baseline(src: str) -> ModuleType:
    """``neurofuse.grouping._core`` of another source tree, under a name of its own."""
    path = Path(src) / "neurofuse" / "grouping" / "_core.py"
    name = "neurofuse.grouping._baseline_core"  # relative imports resolve in the installed package
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def neurons(models: int, dim: int, data: str, weights: str, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``[256 models, dim]`` points and their ``[256 models]`` importance weights."""
    rng = np.random.default_rng(seed)
    m = 256 * models
    if data == "gauss":
        x = rng.normal(size=(m, dim))
    else:  # hidden ReLU neurons of random MLPs on structured, non-negative inputs
        inputs = np.maximum(rng.normal(size=(dim, 40)) @ rng.normal(size=(40, 784)), 0.0)
        x = np.concatenate([
            np.maximum(inputs @ rng.normal(size=(784, 256)) / np.sqrt(784) + 0.1 * rng.normal(size=256), 0).T
            for _ in range(models)
        ])
    w = np.ones(m) if weights == "uniform" else rng.gamma(1.0, size=m) + 1e-3
    return x, w


def cost_of(x: np.ndarray, w: np.ndarray, labels: np.ndarray, k: int) -> float:
    c = centroids(x, w, np.asarray(labels, dtype=np.int64), k)
    return float((w * ((x - c[labels]) ** 2).sum(1)).sum())


def timed(fn: Callable[[], np.ndarray], repeat: int) -> Tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--dim", type=int, default=400)
    ap.add_argument("--n-init", type=int, default=10)
    ap.add_argument("--data", choices=["relu", "gauss"], default="relu")
    ap.add_argument("--weights", choices=["uniform", "gamma"], default="uniform")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs (baseline: one)")
    ap.add_argument("--baseline-src", default=None, help="source tree of the implementation to compare")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    baseline: Optional[ModuleType] = load_baseline(a.baseline_src) if a.baseline_src else None
    torch.set_num_threads(a.threads)
    print(f"{a.data} points, {a.weights} weights, D={a.dim}, k={a.k}, n_init={a.n_init}, "
          f"{a.threads} thread(s)")
    with threadpool_limits(a.threads):
        for n in a.models:
            x, w = neurons(n, a.dim, a.data, a.weights, a.seed)
            k = min(a.k, len(x))
            runs = {}
            runs["sklearn"] = timed(lambda: KMeans(n_clusters=k, n_init=a.n_init, random_state=a.seed)
                                    .fit(x, sample_weight=w).labels_, a.repeat)
            runs["new"] = timed(lambda: current.weighted_kmeans(x, w, k, n_init=a.n_init, seed=a.seed)[0],
                                a.repeat)
            runs["new, refine=False"] = timed(
                lambda: current.weighted_kmeans(x, w, k, n_init=a.n_init, seed=a.seed, refine=False)[0],
                a.repeat)
            if baseline is not None:
                runs["baseline"] = timed(
                    lambda: baseline.weighted_kmeans(x, w, k, n_init=a.n_init, seed=a.seed)[0], 1)
            ref = cost_of(x, w, runs["sklearn"][1], k)
            print(f"M={len(x)} ({n} models):")
            for name, (sec, labels) in runs.items():
                print(f"  {name:18s} {sec:8.3f} s   cost/sklearn {cost_of(x, w, labels, k) / ref:.4f}",
                      flush=True)


if __name__ == "__main__":
    main()
