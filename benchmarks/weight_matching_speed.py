"""Time Git Re-Basin weight matching on two full-width CIFAR ResNet-18s beside activation matching.

    OMP_NUM_THREADS=1 python benchmarks/weight_matching_speed.py [--repeats 5] [--samples 256]

Two zoo ResNet-18s (``ResNet((3, 32, 32), 10, depth=18)``, widths 64..512, 11.2M parameters)
with random weights, and for ``git-rebasin`` (activation matching, the same permutation spaces)
``--samples`` random CIFAR-shaped inputs as the fusion set.  The runs are interleaved (weight
matching, activation matching, weight matching, ...) so that load from other jobs hits both alike;
the median of ``--repeats`` is reported, with:

* ``fuse``: the whole ``neurofuse.fuse(...)`` call (model checks, matching, averaging);
* ``matching``: :func:`neurofuse.grouping.weight_matching` alone (the coordinate descent);
* ``--pair permuted``: model B is model A permuted in every hidden space plus Gaussian noise
  of the weights' own scale (a stand-in for two trained models that learnt similar features):
  the permutation is recovered, and the descent stops after its second sweep.

The issue's goal is at most 1.5 s for the whole weight matching on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List

import numpy as np
import torch

import neurofuse
from neurofuse.grouping import weight_matching
from neurofuse.levels import check_same_levels
from neurofuse.levels._layout import NeuronMap, check_alignable
from neurofuse.methods._align import _matched_tensors, apply_maps, permutation_spec
from neurofuse.models import ResNet


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=256, help="fusion samples for git-rebasin")
    ap.add_argument("--pair", choices=["random", "permuted"], default="random")
    ap.add_argument("--json", help="write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    a = ResNet((3, 32, 32), 10, depth=18).eval()
    b = ResNet((3, 32, 32), 10, depth=18).eval()
    nets = check_same_levels([a, b])
    layouts, heads = check_alignable(nets, "weight-matching")
    spec = permutation_spec(a, layouts, heads, a.level_widths())
    truth = None
    if args.pair == "permuted":
        with torch.no_grad():
            for p, q in zip(b.parameters(), a.parameters()):
                p.copy_(q + p)  # noise of the weights' own (init) scale
        rng = np.random.default_rng(1)
        truth = [rng.permutation(n) for n in spec.sizes]
        maps = [{s: (None if g is None else NeuronMap.from_permutation(truth[g])) for s, g in sp.items()}
                for sp in spec.groups]
        b = apply_maps(b, layouts, maps)
    x = torch.randn(args.samples, 3, 32, 32)
    y = torch.randint(0, 10, (args.samples,))
    tensors = _matched_tensors(spec, layouts, a, b)
    runs: Dict[str, List[float]] = {"weight-matching fuse": [], "weight-matching matching": [],
                                    "git-rebasin fuse": []}
    result = weight_matching(tensors, spec.sizes)
    for _ in range(args.repeats):
        runs["weight-matching fuse"].append(_timed(lambda: neurofuse.fuse([a, b], None, method="weight-matching",
                                                                          progress=False)))
        runs["weight-matching matching"].append(_timed(lambda: weight_matching(tensors, spec.sizes)))
        runs["git-rebasin fuse"].append(_timed(lambda: neurofuse.fuse([a, b], (x, y), method="git-rebasin",
                                                                      progress=False)))
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {"threads": torch.get_num_threads(), "pair": args.pair, "samples": args.samples,
           "repeats": args.repeats, "sweeps": result.sweeps, "converged": result.converged,
           "median_seconds": med, "all_seconds": runs,
           "ratio_weight_to_activation_matching": med["weight-matching fuse"] / med["git-rebasin fuse"]}
    if truth is not None:
        out["recovered"] = float(np.mean([np.mean(np.argsort(t) == p) for t, p in zip(truth, result.perms)]))
    for k, v in med.items():
        print(f"{k:28s} {v:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in runs[k])})")
    print(f"sweeps {result.sweeps} (converged: {result.converged}); weight / activation matching "
          f"{out['ratio_weight_to_activation_matching']:.2f}" + (f"; permutation recovered {out['recovered']:.3f}"
                                                                  if truth is not None else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
