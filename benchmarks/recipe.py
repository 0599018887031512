"""Which settings to recommend? The recipe re-selected on a validation protocol (issue 23, part 4).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/recipe.py --out runs/recipe          # the protocol
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/recipe.py --out runs/recipe --report-only

Protocol (every number is **validation** accuracy: training images that no model trains on and no
fusion set is drawn from; the test set is never read):

* datasets and widths: digits (scikit-learn, 8x8) with the zoo MLPs ``tiny`` (64-32-32-10) and
  ``small`` (64-64-64-10), 60 epochs; MNIST with ``small`` (784-64-64-10) and ``paper``
  (784-256-10), 3 epochs (Adam 1e-3, the zoo's training);
* splits: 2, 4 and 8 models, each on a non-IID part: the paper's Dirichlet split (appendix D:
  ordered concentrations ``linspace(1, 5, n)``, ``partition(..., "dirichlet", ratio=0.2)``) and
  the federated benchmarks' symmetric Dirichlet(0.3) (``dirichlet_alpha_split``, as
  ``neurofuse federate --alpha 0.3``);
* validation set: a class-balanced 5,000 (MNIST) or 300 (digits) of the training images, held
  out before the split;
* ``--draws`` (3) class-balanced fusion sets of 400 of the remaining training images per setting.

Rows (kf-linear, ``ridge="auto"``; ``+cs``: ``class_weights`` = the models' class shares; ``imp`` /
``mean``: ``output_weights``): ``default`` (uniform importance), ``+cs``, ``cond imp``, ``cond imp
+cs`` (the README's recipe before issue 23), ``cond mean``, ``cond mean +cs``, ``+refine`` and
``cond imp +cs +refine`` (K-means Hartigan refinement), ``n_init=R`` and ``+cs n_init=R`` for
R = 1, 3, 10 (K-means restarts), ``cond imp +cs +distill`` and ``+cs
+distill`` (100 epochs on the fusion set alone, ``DistillConfig()``; the kept epoch is recorded),
and the references ``ensemble``, ``ensemble +cs``, the best and mean base model (each by
validation accuracy).  ``--rows``, ``--sizes``, ``--datasets``, ``--splits`` run a part.

About 35 minutes on one core of the 2-core development machine (``--threads 1``).  Results go to
``<out>/results.json`` (appended row by row; a rerun resumes) and ``<out>/report.md``: per setting
the mean over the draws, and per row the mean, the worst difference to ``default`` over the
settings, and the number of settings where it beats / loses to ``default``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

import neurofuse
from neurofuse.data import balanced_subset, class_shares, load_dataset, partition
from neurofuse.distill import DistillConfig
from neurofuse.experiment import SplitConfig, train_models_on_parts
from neurofuse.training import evaluate

log = logging.getLogger("recipe")

#: (dataset, zoo size, training epochs, validation images)
MODELS = [("digits", "tiny", 60, 300), ("digits", "small", 60, 300),
          ("mnist", "small", 3, 5000), ("mnist", "paper", 3, 5000)]
SPLITS = [2, 4, 8]
#: the paper's ordered Dirichlet (ratio 0.2) and the federated benchmarks' Dirichlet(alpha)
CONCENTRATIONS = ["ratio0.2", "alpha0.3"]
REFERENCES = ("ensemble", "ensemble +cs", "best base", "mean base")


def rows(shares: np.ndarray) -> List[Tuple[str, Callable[[List[torch.nn.Module], Any], torch.nn.Module]]]:
    """``(name, fn(models, fusion))`` of every compared setting."""
    out: List[Tuple[str, Callable[..., torch.nn.Module]]] = []

    def add(name: str, **kw: Any) -> None:
        out.append((name, lambda models, fusion, kw=kw: neurofuse.fuse(models, fusion, progress=False, **kw)))

    cs = {"class_weights": shares}
    add("ensemble", method="ensemble")
    add("ensemble +cs", method="ensemble", **cs)
    add("default", method="kf-linear")
    add("+cs", method="kf-linear", **cs)
    add("+refine", method="kf-linear", refine=True)
    for r in (1, 3, 10):                                # K-means restarts (default 3)
        add(f"n_init={r}", method="kf-linear", n_init=r)
        add(f"+cs n_init={r}", method="kf-linear", n_init=r, **cs)
    for out_w in ("importance", "mean"):
        tag = "imp" if out_w == "importance" else "mean"
        add(f"cond {tag}", method="kf-linear", importance="conductance", output_weights=out_w)
        add(f"cond {tag} +cs", method="kf-linear", importance="conductance", output_weights=out_w, **cs)
    add("cond imp +cs +refine", method="kf-linear", importance="conductance", refine=True, **cs)
    add("cond imp +cs +distill", method="kf-linear", importance="conductance", distill=DistillConfig(), **cs)
    add("+cs +distill", method="kf-linear", distill=DistillConfig(), **cs)
    return out


def wanted(args: argparse.Namespace, name: str) -> bool:
    """Whether ``--rows`` (exact names; default all) asks for the row ``name``."""
    return not args.rows or name in args.rows


def split(y: np.ndarray, n: int, conc: str, seed: int) -> List[np.ndarray]:
    if conc.startswith("ratio"):
        return partition(y, n, "dirichlet", seed=seed, ratio=float(conc[5:]))
    from neurofuse.federated._data import dirichlet_alpha_split

    return dirichlet_alpha_split(y, n, float(conc[5:]), seed=seed)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results: List[Dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    done = {(r["setting"], r["draw"], r["row"]) for r in results}
    for dataset, size, epochs, n_val in MODELS:
        if args.datasets and dataset not in args.datasets or args.sizes and size not in args.sizes:
            continue
        ds = load_dataset(dataset, args.data_dir)
        y = ds.y_train.numpy()
        every = np.arange(len(y))
        val = balanced_subset(y, every, n_val, seed=12345)
        pool = np.setdiff1d(every, val)
        xv, yv = ds.x_train[val], ds.y_train[val]
        for conc in CONCENTRATIONS:
            for n in args.splits:
                setting = f"{dataset}/{size}/{conc}/{n}-way"
                todo = [(d, name) for d in range(args.draws) for name, _ in rows(np.ones((n, 10)))
                        if (setting, d, name) not in done and wanted(args, name)]
                if not todo:
                    continue
                t0 = time.perf_counter()
                parts = [pool[p] for p in split(y[pool], n, conc, args.seed)]
                cfg = SplitConfig(arch="mlp", size=size, n_models=n, seed=args.seed, epochs=epochs)
                base = train_models_on_parts(ds, parts, cfg, progress=False)
                shares = np.asarray(class_shares(y, parts, ds.num_classes))
                log.info("%s: trained %d models in %.0f s", setting, n, time.perf_counter() - t0)

                def record(row: str, draw: int, acc: float, seconds: float, **extra: Any) -> None:
                    results.append({"setting": setting, "draw": draw, "row": row, "val": acc,
                                    "seconds": seconds, **extra})
                    path.write_text(json.dumps(results, indent=1))
                    log.info("%s draw %d %-24s val %.2f (%.1f s)", setting, draw, row, acc, seconds)

                bases = [100.0 * float(evaluate(m, xv, yv)["accuracy"]) for m in base.models]
                for d in range(args.draws):
                    if (setting, d, "best base") not in done:
                        record("best base", d, max(bases), 0.0)
                        record("mean base", d, float(np.mean(bases)), 0.0)
                    idx = balanced_subset(y, pool, args.fusion_samples, seed=d)
                    fusion = (ds.x_train[idx], ds.y_train[idx])
                    for name, fn in rows(shares):
                        if (setting, d, name) in done or not wanted(args, name):
                            continue
                        t = time.perf_counter()
                        fused = fn(base.models, fusion)
                        hist = getattr(fused, "distill_history", None)
                        extra = {"best_epoch": hist["best_epoch"]} if hist else {}
                        record(name, d, 100.0 * float(evaluate(fused, xv, yv)["accuracy"]),
                               time.perf_counter() - t, **extra)
    report(args)


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text())
    settings = list(dict.fromkeys(r["setting"] for r in results))
    names = list(dict.fromkeys(r["row"] for r in results))
    mean = {(s, n): float(np.mean([r["val"] for r in results if r["setting"] == s and r["row"] == n]))
            for s in settings for n in names
            if any(r["setting"] == s and r["row"] == n for r in results)}
    lines = [f"Command: `{' '.join(['python'] + sys.argv)}`", "",
             "Validation accuracy (%), mean over the fusion-set draws.", "",
             "| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in settings:
        lines.append(f"| {s} | " + " | ".join(f"{mean[(s, n)]:.2f}" if (s, n) in mean else "" for n in names) + " |")
    lines += ["", "Against `default` (kf-linear, uniform importance) over the settings: mean difference, "
              "worst difference, settings better / worse (by more than 0.05 point) / all.", "",
              "| row | mean % | mean diff | worst diff | better | worse | settings |", "|---|---|---|---|---|---|---|"]
    for n in names:
        common = [s for s in settings if (s, n) in mean and (s, "default") in mean]
        if not common:
            continue
        diff = np.array([mean[(s, n)] - mean[(s, "default")] for s in common])
        lines.append(f"| {n} | {np.mean([mean[(s, n)] for s in common]):.2f} | {diff.mean():+.2f} | "
                     f"{diff.min():+.2f} | {(diff > 0.05).sum()} | {(diff < -0.05).sum()} | {len(common)} |")
    for group in ("digits", "mnist", "ratio0.2", "alpha0.3", "2-way", "4-way", "8-way"):
        cells = []
        for n in names:
            common = [s for s in settings if group in s.split("/") and (s, n) in mean and (s, "default") in mean]
            if common:
                diff = np.array([mean[(s, n)] - mean[(s, "default")] for s in common])
                cells.append(f"{n} {diff.mean():+.2f} (worst {diff.min():+.2f})")
        if cells:
            lines += ["", f"Mean difference to `default` on the settings with `{group}`: " + "; ".join(cells)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=os.environ.get("NEUROFUSE_DATA", "/work/shared/data"))
    p.add_argument("--datasets", nargs="+", default=None, help="digits and/or mnist (default both)")
    p.add_argument("--splits", type=int, nargs="+", default=SPLITS)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    p.add_argument("--fusion-samples", type=int, default=400)
    p.add_argument("--rows", nargs="+", default=None, help="only these rows (exact names)")
    p.add_argument("--sizes", nargs="+", default=None, help="only these zoo sizes (tiny, small, paper)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("neurofuse").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    if args.report_only:
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
