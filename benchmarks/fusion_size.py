"""Accuracy against fusion-set size: is there a size where a level-wise method breaks? (issue 23)

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fusion_size.py --out runs/fusion-size
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fusion_size.py --out runs/fusion-size --report-only

Models (MNIST, 2 per set, so that every level-wise method applies): MLPs 784-w-w/2-w/4-10 for
w = 256, 400 and 512, with and without biases, trained ``--epochs`` (5) epochs (Adam 1e-3, the
zoo's training) on an IID or a non-IID (the paper's Dirichlet, ratio 0.2) half of the training
images less a class-balanced validation set of 5,000; and VGG11 at 1/4 width (16-128 channels, no
batch norm) on IID halves of 10,000 training images, 6 epochs (3 epochs on a Dirichlet split left
one of the two at chance, so no fusion could be judged there).

Sizes: class-balanced fusion sets (drawn from the training images outside the validation set) of
w/4, w/2, 0.95w, w, 1.05w, 2w and 4w samples for the MLPs: w/4, w/2 and w are the widths of the
three hidden levels, so every hidden level meets a fusion set as large as its input (the square
least-squares fit, rows = samples) and sizes from 1/4 to 4 times the widest level.  For the VGG
the square fits are at 128 samples (the 1x1 levels have 128 channels + bias active inputs and
one row per sample; the 3x3 level 128x9 + 1 inputs and 9 rows per sample): 32 ... 512.

Methods, uniform importance, default options otherwise: kf-linear and hf-linear (``ridge="auto"``,
and ``ridge=0``, the pseudo-inverse fit before issue 23), otfusion, git-rebasin, kf-gradient.
``--draws`` fusion sets per size for the closed-form methods (default 2), one for the others.

Output: ``<out>/results.json`` (one record per fusion; a rerun resumes), ``<out>/report.md`` (per
model: test accuracy per method and size, and each method's largest drop below its own best size)
and ``<out>/fusion_size.png``.  The validation accuracy is recorded too; nothing is selected here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

import neurofuse
from neurofuse.checkpoint import load_model, save_model
from neurofuse.data import balanced_subset, load_dataset, partition
from neurofuse.models import MLP, VGG
from neurofuse.training import TrainConfig, evaluate, train_model

log = logging.getLogger("fusion_size")

#: (row name, method, options); the closed-form rows get ``--draws`` fusion sets
METHODS: List[Tuple[str, str, Dict[str, Any]]] = [
    ("kf-linear", "kf-linear", {}), ("kf-linear ridge=0", "kf-linear", {"ridge": 0.0}),
    ("hf-linear", "hf-linear", {}), ("hf-linear ridge=0", "hf-linear", {"ridge": 0.0}),
    ("otfusion", "otfusion", {}), ("git-rebasin", "git-rebasin", {}), ("kf-gradient", "kf-gradient", {}),
]
CLOSED_FORM = ("kf-linear", "hf-linear")
VGG_SIZES = [32, 64, 128, 256, 512]


def model_sets(args: argparse.Namespace) -> List[Dict[str, Any]]:
    sets = []
    for w in args.widths if args.mlp else []:
        for bias in args.bias:
            for split in args.splits:
                sets.append({"name": f"mlp{w}{'' if bias else ' no-bias'} {split}", "kind": "mlp", "width": w,
                             "bias": bias, "split": split,
                             "sizes": [w // 4, w // 2, round(0.95 * w), w, round(1.05 * w), 2 * w, 4 * w]})
    if args.vgg:
        sets.append({"name": "vgg11/4 iid", "kind": "vgg", "split": "iid", "sizes": VGG_SIZES})
    return sets


def train(ds: Any, spec: Dict[str, Any], pool: np.ndarray, args: argparse.Namespace, cache: Path) -> List[torch.nn.Module]:
    y = ds.y_train.numpy()
    if spec["kind"] == "vgg":
        pool = np.sort(balanced_subset(y, pool, 10000, seed=0))
    kw = {"ratio": 0.2} if spec["split"] == "dirichlet" else {}
    parts = [pool[p] for p in partition(y[pool], 2, spec["split"], seed=0, **kw)]
    models = []
    for i, part in enumerate(parts):
        f = cache / f"{spec['name'].replace(' ', '_')}_{i}.safetensors"
        if f.exists():
            models.append(load_model(f).eval())
            continue
        torch.manual_seed(i)
        if spec["kind"] == "vgg":
            m = VGG(ds.input_shape, 10, width_multiplier=0.25)
            cfg = TrainConfig(epochs=6, lr=1e-3, seed=i, warmup_epochs=1)
        else:
            w = spec["width"]
            m = MLP(ds.input_shape, 10, [w, w // 2, w // 4], bias=spec["bias"])
            cfg = TrainConfig(epochs=args.epochs, lr=1e-3, seed=i)
        t = time.perf_counter()
        train_model(m, ds.x_train[part], ds.y_train[part], config=cfg, progress=False)
        log.info("%s: trained model %d in %.0f s", spec["name"], i, time.perf_counter() - t)
        save_model(m.eval(), f, metadata={"dataset": "mnist"})
        models.append(m.eval())
    return models


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    cache = out / "models"
    cache.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results: List[Dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    done = {(r["model"], r["size"], r["draw"], r["row"]) for r in results}
    ds = load_dataset("mnist", args.data_dir)
    y = ds.y_train.numpy()
    every = np.arange(len(y))
    val = balanced_subset(y, every, 5000, seed=12345)
    pool = np.setdiff1d(every, val)
    xv, yv = ds.x_train[val], ds.y_train[val]
    rows = [r for r in METHODS if not args.methods or r[0] in args.methods]
    for spec in model_sets(args):
        models = train(ds, spec, pool, args, cache)
        for i, m in enumerate(models):
            if (spec["name"], 0, 0, f"base {i}") not in done:
                results.append({"model": spec["name"], "size": 0, "draw": 0, "row": f"base {i}",
                                "test": 100 * float(evaluate(m, ds.x_test, ds.y_test)["accuracy"]),
                                "val": 100 * float(evaluate(m, xv, yv)["accuracy"]), "seconds": 0.0})
        for size in spec["sizes"]:
            for draw in range(args.draws):
                idx = balanced_subset(y, pool, size, seed=draw)
                fusion = (ds.x_train[idx], ds.y_train[idx])
                for name, method, opts in rows:
                    if (spec["name"], size, draw, name) in done or (draw > 0 and method not in CLOSED_FORM):
                        continue
                    t = time.perf_counter()
                    fused = neurofuse.fuse(models, fusion, method=method, progress=False, seed=draw, **opts)
                    sec = time.perf_counter() - t
                    r = {"model": spec["name"], "size": size, "draw": draw, "row": name, "seconds": sec,
                         "test": 100 * float(evaluate(fused, ds.x_test, ds.y_test)["accuracy"]),
                         "val": 100 * float(evaluate(fused, xv, yv)["accuracy"])}
                    results.append(r)
                    path.write_text(json.dumps(results, indent=1))
                    log.info("%s n=%d draw %d %-18s test %.2f val %.2f (%.1f s)", spec["name"], size, draw,
                             name, r["test"], r["val"], sec)
    report(args)


def _table(results: List[Dict[str, Any]], key: str) -> Dict[str, Dict[str, Dict[int, float]]]:
    """``t[model][row][size]`` = mean of ``key`` over the draws."""
    t: Dict[str, Dict[str, Dict[int, float]]] = {}
    for r in results:
        if r["row"].startswith("base "):
            continue
        t.setdefault(r["model"], {}).setdefault(r["row"], {}).setdefault(r["size"], []).append(r[key])  # type: ignore[arg-type]
    return {m: {row: {s: float(np.mean(v)) for s, v in sorted(by.items())} for row, by in rows.items()}
            for m, rows in t.items()}


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text())
    lines = [f"Command: `{' '.join(['python'] + sys.argv)}`", "",
             "Test accuracy (%) against fusion-set size (closed-form rows: mean of the draws); "
             "**drop**: the largest distance below the row's own best size, on the test set and "
             "(in brackets) on the validation set.", ""]
    test, val = _table(results, "test"), _table(results, "val")
    for model, rows in test.items():
        sizes = sorted({s for by in rows.values() for s in by})
        bases = [r["test"] for r in results if r["model"] == model and r["row"].startswith("base ")]
        lines += [f"### {model} (base models {' / '.join(f'{b:.1f}' for b in bases)})", "",
                  "| method | " + " | ".join(str(s) for s in sizes) + " | drop |",
                  "|---|" + "---|" * (len(sizes) + 1)]
        for row, by in rows.items():
            drop = max(by.values()) - min(by.values())
            vb = val[model][row]
            vdrop = max(vb.values()) - min(vb.values())
            lines.append(f"| {row} | " + " | ".join(f"{by[s]:.2f}" if s in by else "" for s in sizes)
                         + f" | {drop:.2f} ({vdrop:.2f}) |")
        lines.append("")
    secs = {}
    for r in results:
        if not r["row"].startswith("base "):
            secs.setdefault(r["row"], []).append(r["seconds"])
    lines += ["Seconds per fusion (median over all cells): " + ", ".join(
        f"{k} {np.median(v):.1f}" for k, v in secs.items()), ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot(test, out / "fusion_size.png", results)


def plot(test: Dict[str, Dict[str, Dict[int, float]]], path: Path, results: List[Dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(test)
    cols = min(4, len(models))
    rows_n = (len(models) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    style = {"kf-linear": ("C0", "-"), "kf-linear ridge=0": ("C0", ":"), "hf-linear": ("C1", "-"),
             "hf-linear ridge=0": ("C1", ":"), "otfusion": ("C2", "-"), "git-rebasin": ("C3", "-"),
             "kf-gradient": ("C4", "-")}
    for ax, model in zip(axes.flat, models):
        for row, by in test[model].items():
            c, ls = style.get(row, ("k", "-"))
            ax.plot(list(by), list(by.values()), marker="o", ms=3, color=c, ls=ls, label=row)
        bases = [r["test"] for r in results if r["model"] == model and r["row"].startswith("base ")]
        if bases:
            ax.axhline(max(bases), color="grey", lw=0.8, ls="--", label="best base model")
        ax.set_xscale("log", base=2)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("fusion samples")
        ax.set_ylabel("test accuracy (%)")
        lo = min(min(by.values()) for by in test[model].values())
        ax.set_ylim(max(lo - 1, 50), None)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=72)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=os.environ.get("NEUROFUSE_DATA", "/work/shared/data"))
    p.add_argument("--widths", type=int, nargs="+", default=[256, 400, 512])
    p.add_argument("--bias", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="+", default=[False, True])
    p.add_argument("--splits", nargs="+", default=["iid", "dirichlet"])
    p.add_argument("--vgg", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--methods", nargs="+", default=None, help="only these rows (names as in the table)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--draws", type=int, default=2)
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
