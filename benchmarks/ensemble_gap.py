"""One model as good as the ensemble? Fusion vs the best base model vs the ensemble (issue 12).

    python benchmarks/ensemble_gap.py --out runs/gap                       # 2/4/8-way, 5 draws
    python benchmarks/ensemble_gap.py --out runs/gap --splits 2 --draws 1  # a quick look
    python benchmarks/ensemble_gap.py --out runs/gap --report-only         # table from results.json
    python benchmarks/ensemble_gap.py --out runs/pareto --pareto --splits 2 4   # width sweep + plot
    python benchmarks/ensemble_gap.py --out runs/gap-baselines --baselines      # the field's baselines

Protocol: MNIST (``--data-dir``, idx files), 784-256-10 MLPs (zoo ``mlp``/``paper``) trained
``--epochs`` (3) epochs each on a Dirichlet (ratio 0.2) split of the training images, minus a fixed
class-balanced **validation** set of 5,000 training images that no model trains on and no fusion
set is drawn from (the defaults of the options are chosen on it; the test set is only reported).
For every split, ``--draws`` class-balanced fusion sets of 400 training images (seeds 0..D-1); each
row is the mean over the draws of the test (and validation) accuracy.

Rows: every base model (best, mean), the ensembles (mean softmax, class-share weighted), kf-linear,
hf-linear (2-way), otfusion, git-rebasin (2-way) with conductance importance and the output level
weighted by the mean (``out=mean``) or by output-neuron importance (``out=imp``), each also with
class shares (``+cs``); kf-linear and otfusion + distillation (``neurofuse.distill``: teacher = the
class-share ensemble, no labels; also with ``--extra`` more unlabelled training images, a quarter of
the epochs, or ``--extra-epochs``, with ``--extra-lr`` and ``--extra-mixup``) and + fine-tuning with
the fusion set's labels.  ``--only A B`` keeps the rows whose name contains A or B, e.g.

    python benchmarks/ensemble_gap.py --out runs/gap-20k --splits 8 4 2 --extra 20000 --extra-epochs 20 \
        --extra-lr 1e-3 --extra-mixup 0 --only ensemble+cs "kf-linear/cond out=imp+cs +distill +20000"
With ``--baselines``: the field's baselines with their defaults (weight-matching, zipit,
cca-merge, regmean, regmean-aligned, fisher, fisher-aligned; the alignment ones also with
REPAIR) beside reference rows measured in the same run on the same base models (the ensembles,
vanilla, kf-linear, otfusion, git-rebasin and hf-linear at 2-way).
With ``--pareto``: kf-linear (conductance, output importance, class shares) at fused widths
1, 1.25, 1.5, 2, ..., N times the base width, test accuracy vs parameter count, beside the ensemble
and the best base model (``pareto.png``).

Results go to ``<out>/results.json`` (rows appended as they are measured, so an interrupted run
keeps what it has) and ``<out>/report.md``.
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
from neurofuse.finetune import FinetuneConfig
from neurofuse.training import evaluate

log = logging.getLogger("gap")
VAL_SIZE = 5000


def _acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float(evaluate(model, x, y)["accuracy"])


def build(args: argparse.Namespace, n: int) -> Tuple[Any, List[torch.nn.Module], np.ndarray, np.ndarray, np.ndarray]:
    """``(dataset, models, class_shares, val_idx, pool_idx)`` for an ``n``-way split."""
    ds = load_dataset("mnist", args.data_dir)
    y = ds.y_train.numpy()
    every = np.arange(len(y))
    val = balanced_subset(y, every, VAL_SIZE, seed=12345)
    pool = np.setdiff1d(every, val)
    parts = [pool[p] for p in partition(y[pool], n, "dirichlet", seed=args.split_seed, ratio=0.2)]
    cfg = SplitConfig(arch="mlp", size="paper", n_models=n, seed=args.split_seed, epochs=args.epochs)
    base = train_models_on_parts(ds, parts, cfg, progress=False)
    shares = class_shares(y, parts, ds.num_classes)
    return ds, base.models, np.asarray(shares), val, pool


def variants(n: int, shares: np.ndarray, distill_epochs: int, finetune_epochs: int, extra: torch.Tensor,
             extra_cfg: DistillConfig) -> List[Tuple[str, Callable[[List[torch.nn.Module], Tuple[torch.Tensor, torch.Tensor]], torch.nn.Module]]]:
    """``(name, fn(models, fusion) -> model)`` of every row."""
    rows: List[Tuple[str, Callable[..., torch.nn.Module]]] = []

    def add(name: str, **kw: Any) -> None:
        rows.append((name, lambda models, fusion, kw=kw: neurofuse.fuse(models, fusion, progress=False, **kw)))

    add("ensemble", method="ensemble")
    add("ensemble+cs", method="ensemble", class_weights=shares)
    add("kf-linear/uniform", method="kf-linear")
    methods = ["kf-linear", "otfusion"] + (["hf-linear", "git-rebasin"] if n == 2 else [])
    for m in methods:
        for out in ("mean", "importance"):
            tag = "imp" if out == "importance" else "mean"
            add(f"{m}/cond out={tag}", method=m, importance="conductance", output_weights=out)
            add(f"{m}/cond out={tag}+cs", method=m, importance="conductance", output_weights=out,
                class_weights=shares)
    for m in ("kf-linear", "otfusion"):
        add(f"{m}/cond out=imp+cs +distill", method=m, importance="conductance", class_weights=shares,
            distill=DistillConfig(epochs=distill_epochs))
        add(f"{m}/cond out=imp+cs +distill +{len(extra)} unlabelled", method=m, importance="conductance",
            class_weights=shares, distill=extra_cfg, distill_data=extra)
        add(f"{m}/cond out=imp+cs +finetune(labels)", method=m, importance="conductance",
            class_weights=shares, finetune=FinetuneConfig(epochs=finetune_epochs, lr=1e-4, schedule="cosine", val_fraction=0.2))
    return rows


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results: List[Dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    done = {(r["split"], r["draw"], r["row"]) for r in results}
    for n in args.splits:
        t0 = time.perf_counter()
        ds, models, shares, val, pool = build(args, n)
        log.info("%d-way: trained %d models in %.0f s", n, n, time.perf_counter() - t0)
        xv, yv = ds.x_train[val], ds.y_train[val]
        for d in range(args.draws):
            idx = balanced_subset(ds.y_train.numpy(), pool, args.fusion_samples, seed=d)
            fusion = (ds.x_train[idx], ds.y_train[idx])

            def record(row: str, model: torch.nn.Module, seconds: float) -> None:
                r = {"split": n, "draw": d, "row": row, "test": _acc(model, ds.x_test, ds.y_test),
                     "val": _acc(model, xv, yv), "seconds": seconds,
                     "params": sum(p.numel() for p in model.parameters())}
                results.append(r)
                path.write_text(json.dumps(results, indent=1))
                log.info("%d-way draw %d %-40s test %.2f val %.2f (%.1f s)", n, d, row, r["test"], r["val"], seconds)

            if d == 0 and (n, 0, "base 0") not in done:
                for i, m in enumerate(models):
                    record(f"base {i}", m, 0.0)
            if args.pareto:
                rows = pareto_rows(n, shares)
            elif args.baselines:
                rows = baseline_rows(n, shares)
            else:
                rest = np.setdiff1d(pool, idx)
                pick = np.random.default_rng(1000 + d).choice(rest, args.extra, replace=False)
                extra_cfg = DistillConfig(epochs=args.extra_epochs or args.distill_epochs // 4,
                                          lr=args.extra_lr, mixup=args.extra_mixup)
                rows = variants(n, shares, args.distill_epochs, args.finetune_epochs, ds.x_train[np.sort(pick)],
                                extra_cfg)
            for name, fn in rows:
                if (n, d, name) in done or (args.only and not any(o in name for o in args.only)):
                    continue
                t = time.perf_counter()
                fused = fn(models, fusion)
                record(name, fused, time.perf_counter() - t)
    report(args)


#: the field's baselines (issue 28), run with their defaults; the alignment ones also with REPAIR
BASELINES = ["weight-matching", "zipit", "cca-merge", "regmean", "regmean-aligned", "fisher", "fisher-aligned"]
REPAIRED = ["weight-matching", "zipit", "cca-merge", "regmean-aligned"]


def baseline_rows(n: int, shares: np.ndarray) -> List[Tuple[str, Callable[..., torch.nn.Module]]]:
    """The baselines and the reference rows they are compared with, on one split's models."""
    rows: List[Tuple[str, Callable[..., torch.nn.Module]]] = []

    def add(name: str, **kw: Any) -> None:
        rows.append((name, lambda models, fusion, kw=kw: neurofuse.fuse(models, fusion, progress=False, **kw)))

    add("ensemble", method="ensemble")
    add("ensemble+cs", method="ensemble", class_weights=shares)
    add("vanilla", method="vanilla")
    add("kf-linear/uniform", method="kf-linear")
    add("kf-linear/cond out=imp+cs", method="kf-linear", importance="conductance", class_weights=shares)
    add("otfusion/uniform", method="otfusion")
    if n == 2:
        add("git-rebasin/uniform", method="git-rebasin")
        add("hf-linear/uniform", method="hf-linear")
    for m in BASELINES:
        add(m, method=m)
    for m in REPAIRED:
        add(f"{m} +repair", method=m, repair=True)
    return rows


def pareto_rows(n: int, shares: np.ndarray) -> List[Tuple[str, Callable[..., torch.nn.Module]]]:
    mults = [1.0, 1.25, 1.5] + [float(k) for k in range(2, n + 1)]
    rows: List[Tuple[str, Callable[..., torch.nn.Module]]] = [
        ("ensemble+cs", lambda models, fusion: neurofuse.fuse(models, fusion, method="ensemble",
                                                              class_weights=shares, progress=False))]
    for w in mults:
        rows.append((f"kf-linear x{w:g}", lambda models, fusion, w=w: neurofuse.fuse(
            models, fusion, method="kf-linear", importance="conductance", class_weights=shares,
            width=w, progress=False)))
    return rows


def _summary(results: List[Dict[str, Any]]) -> Dict[int, Dict[str, Dict[str, float]]]:
    """``table[split][row] = {test, val, test_sd, draws, params}`` (mean over draws)."""
    table: Dict[int, Dict[str, Dict[str, float]]] = {}
    for n in sorted({r["split"] for r in results}):
        rows = [r for r in results if r["split"] == n]
        bases = [r for r in rows if r["row"].startswith("base ")]
        t: Dict[str, Dict[str, float]] = {}
        if bases:
            best = max(bases, key=lambda r: r["test"])
            by_val = max(bases, key=lambda r: r["val"])
            t["best base model (test)"] = {"test": best["test"], "val": best["val"], "test_sd": 0.0,
                                           "draws": 1, "params": best["params"]}
            t["base chosen on validation"] = {"test": by_val["test"], "val": by_val["val"], "test_sd": 0.0,
                                              "draws": 1, "params": by_val["params"]}
            t["mean base model"] = {"test": float(np.mean([r["test"] for r in bases])),
                                    "val": float(np.mean([r["val"] for r in bases])), "test_sd": 0.0,
                                    "draws": 1, "params": bases[0]["params"]}
        for name in dict.fromkeys(r["row"] for r in rows if not r["row"].startswith("base ")):
            rs = [r for r in rows if r["row"] == name]
            t[name] = {"test": float(np.mean([r["test"] for r in rs])), "val": float(np.mean([r["val"] for r in rs])),
                       "test_sd": float(np.std([r["test"] for r in rs])), "draws": len(rs),
                       "params": rs[0]["params"]}
        table[n] = t
    return table


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text())
    table = _summary(results)
    lines = [f"Command: `{' '.join(['python'] + sys.argv)}`", ""]
    for n, t in table.items():
        lines += [f"### {n}-way", "", "| row | test % (mean ± sd) | validation % | draws | parameters |",
                  "|---|---|---|---|---|"]
        for name, v in t.items():
            lines.append(f"| {name} | {v['test']:.2f} ± {v['test_sd']:.2f} | {v['val']:.2f} | {v['draws']} | "
                         f"{int(v['params']):,} |")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    if args.pareto:
        plot_pareto(table, out / "pareto.png")


def plot_pareto(table: Dict[int, Dict[str, Dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 4), squeeze=False)
    for ax, (n, t) in zip(axes[0], table.items()):
        pts = sorted((v["params"], v["test"]) for k, v in t.items() if k.startswith("kf-linear x"))
        ax.plot([p for p, _ in pts], [a for _, a in pts], "o-", label="kf-linear (fused width x1 ... xN)")
        if "ensemble+cs" in t:
            e = t["ensemble+cs"]
            ax.plot([e["params"]], [e["test"]], "r*", ms=12, label="ensemble (class shares)")
            ax.axhline(e["test"], color="r", lw=0.8, ls=":")
        b, m = t.get("best base model (test)"), t.get("mean base model")
        if b:
            ax.axhline(b["test"], color="g", ls="--", label="best base model")
        if m:
            ax.axhline(m["test"], color="grey", ls="--", label="mean base model")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{n} MNIST MLPs (784-256-10)")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=os.environ.get("NEUROFUSE_DATA", "/work/shared/data"))
    p.add_argument("--splits", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--fusion-samples", type=int, default=400)
    p.add_argument("--distill-epochs", type=int, default=200)
    p.add_argument("--finetune-epochs", type=int, default=100)
    p.add_argument("--extra", type=int, default=2000,
                   help="unlabelled training images (outside the fusion and validation sets) for the "
                        "'+distill +N unlabelled' rows")
    p.add_argument("--extra-epochs", type=int, default=None,
                   help="epochs of the '+N unlabelled' rows (default: a quarter of --distill-epochs)")
    p.add_argument("--extra-lr", type=float, default=1e-4, help="learning rate of the '+N unlabelled' rows")
    p.add_argument("--extra-mixup", type=float, default=0.5, help="mixup share of the '+N unlabelled' rows")
    p.add_argument("--pareto", action="store_true", help="kf-linear width sweep instead of the method rows")
    p.add_argument("--baselines", action="store_true",
                   help="the field's baselines (weight matching, ZipIt!, CCA Merge, RegMean, Fisher merging) "
                        "beside reference rows, instead of the method rows")
    p.add_argument("--only", nargs="+", default=None, help="only rows whose name contains one of these")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("neurofuse").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.report_only:
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
