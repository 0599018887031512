"""The field's baselines beside neurofuse's methods on a quick non-IID MLP protocol.

    OMP_NUM_THREADS=1 python benchmarks/baselines_mlp.py [--dataset digits] [--models 2] \\
        [--seeds 0 1 2] [--select [--only METHOD ...]] [--json out.json]

Base models: ``--models`` zoo MLPs (size ``small``: 64-64) trained on a Dirichlet non-IID split
(concentration ratio 0.2) of the training set, checkpoints chosen on a validation share of each
part (``neurofuse.experiment.train_base_models``); 400 class-balanced fusion samples from the
training set.  Every method listed in comparisons runs with uniform importance.

15% of the training set (stratified, per seed) is held out *before* the split and never used for
training: ``--select`` scores a grid of the new methods' options on it (the defaults are chosen
there, never on the test set); without ``--select`` the methods are scored on the test set with
their defaults.  Accuracy is the mean over seeds (and its standard deviation); seconds are the
fusion's wall-clock time (on a shared machine: compare within one run only).

The runs behind the defaults and the first numbers are in ``benchmarks/baselines_mlp/``:
``select_*`` (held-out training split; the option grids of an earlier revision, whose CCA
default was 1e-4) and ``test_*`` (test set, defaults), e.g. 2 MLPs, Dirichlet 0.2, test accuracy::

                       digits (3 seeds)   MNIST (2 seeds)
    ensemble             95.46 +- 1.31     96.41 +- 0.23
    kf-linear            89.26 +- 4.46     95.47 +- 0.31
    regmean-aligned      89.63 +- 3.73     94.46 +- 0.31
    weight-matching      81.30 +- 6.90     93.49 +- 1.46
    git-rebasin          77.69 +- 4.67     92.55 +- 1.10
    fisher-aligned       83.98 +- 6.32     92.70 +- 0.91
    zipit                86.57 +- 2.70     91.78 +- 0.86
    cca-merge            79.54 +- 9.61     91.18 +- 4.74
    regmean              85.09 +- 5.06     89.51 +- 1.40
    fisher               76.94 +- 1.69     76.98 +- 1.63
    vanilla              69.26 +- 14.2     57.70 +- 2.93
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from typing import Dict, List, Tuple

import numpy as np
import torch

from neurofuse.data import Dataset, balanced_subset, load_dataset
from neurofuse.experiment import SplitConfig, fusion_set, method_variants, run_methods, train_base_models

#: option grids of the new methods scored with --select (the first entry is the default)
GRIDS: Dict[str, List[Dict[str, object]]] = {
    "regmean": [{"alpha": 1.0, "bias": "average"}, {"alpha": 1.0, "bias": "fit"}, {"alpha": 0.9, "bias": "fit"},
                {"alpha": 0.5, "bias": "fit"}],
    "regmean-aligned": [{"alpha": 1.0, "bias": "average"}, {"alpha": 1.0, "bias": "fit"},
                        {"alpha": 0.9, "bias": "fit"}, {"alpha": 0.5, "bias": "fit"}, {"align": "weights"}],
    "fisher": [{"fisher": "expected"}, {"fisher": "empirical"}],
    "fisher-aligned": [{"fisher": "expected"}, {"fisher": "empirical"}, {"align": "weights"}],
    "cca-merge": [{"reg": 0.1}, {"reg": 1e-6}, {"reg": 1e-4}, {"reg": 1e-2}, {"reg": 0.3}, {"reg": 1.0},
                  {"activations": "pre"}],
    "zipit": [{}, {"within_model": False}, {"activations": "pre"}, {"stop_at": 2}],
    "weight-matching": [{}],
}


def split_off(ds: Dataset, share: float, seed: int) -> Tuple[Dataset, Dataset]:
    """``(rest, held)``: ``held`` has a stratified ``share`` of the training set as its *test*
    split (for selection) and ``rest`` keeps the other training samples and the real test set."""
    y = ds.y_train.numpy()
    held = balanced_subset(y, np.arange(len(y)), int(share * len(y)), seed=10_000 + seed)
    keep = np.setdiff1d(np.arange(len(y)), held)
    rest = dataclasses.replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep])
    sel = dataclasses.replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep],
                              x_test=ds.x_train[held], y_test=ds.y_train[held])
    return rest, sel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--select", action="store_true", help="score option grids on the held-out split")
    ap.add_argument("--only", nargs="+", help="with --select: only these methods' grids")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    ds = load_dataset(args.dataset, data_dir=args.data_dir) if args.data_dir else load_dataset(args.dataset)
    rows: Dict[str, List[Tuple[float, float]]] = {}
    bases: List[float] = []
    for seed in args.seeds:
        rest, sel = split_off(ds, 0.15, seed)
        cfg = SplitConfig(arch="mlp", size="small", n_models=args.models, partition="dirichlet", ratio=0.2,
                          seed=seed, epochs=args.epochs)
        base = train_base_models(rest, cfg, progress=False)
        fusion = fusion_set(rest, 400, seed=seed)
        target = sel if args.select else rest
        if args.select:
            variants = []
            options = {}
            for name, grid in GRIDS.items():
                if args.only and name not in args.only:
                    continue
                for opt in grid:
                    key = f"{name} {json.dumps(opt, sort_keys=True)}"
                    variants.append((key, name, "uniform"))
                    options[key] = opt
            results: Dict[str, Dict[str, float]] = {}
            for key, name, imp in variants:
                res, skipped, _ = run_methods(base.models, fusion, target, [(key, name, imp)], seed=seed,
                                              progress=False, options={name: options[key]})
                results.update(res)
                for k, why in skipped.items():
                    print(f"seed {seed}: {k} skipped: {why}")
        else:
            variants = list(method_variants(None, ["uniform"]))
            results, skipped, _ = run_methods(base.models, fusion, target, variants, seed=seed, progress=False)
            for k, why in skipped.items():
                print(f"seed {seed}: {k} skipped: {why}")
        from neurofuse.training import evaluate

        bases.append(max(evaluate(m, target.x_test, target.y_test)["accuracy"] for m in base.models))
        for key, r in results.items():
            rows.setdefault(key, []).append((r["accuracy"], r["seconds"]))
        print(f"seed {seed} done", flush=True)
    what = "held-out training split (selection)" if args.select else "test set"
    print(f"\n{args.dataset}, {args.models} MLPs, Dirichlet 0.2, seeds {args.seeds}; accuracy on the {what}")
    print(f"{'best base model':42s} {100 * statistics.mean(bases):6.2f}")
    table = {}
    for key, vals in sorted(rows.items(), key=lambda kv: -statistics.mean(v[0] for v in kv[1])):
        accs = [100 * a for a, _ in vals]
        secs = statistics.mean(s for _, s in vals)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        table[key] = {"accuracy": statistics.mean(accs), "std": sd, "seconds": secs, "runs": accs}
        print(f"{key:42s} {statistics.mean(accs):6.2f} ± {sd:5.2f}   {secs:7.2f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dataset": args.dataset, "models": args.models, "seeds": args.seeds, "select": args.select,
                       "best_base": [100 * b for b in bases], "methods": table}, fh, indent=1)


if __name__ == "__main__":
    main()
