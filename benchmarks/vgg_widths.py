"""Why do OTFusion and Git Re-Basin fall apart on narrow VGGs? A short measured probe (issue 12, part 4).

    PYTHONPATH=src python benchmarks/vgg_widths.py --out runs/vgg-widths --widths 0.125 0.25 0.5
    PYTHONPATH=src python benchmarks/vgg_widths.py --report runs/vgg-widths*/results.json
    PYTHONPATH=src python benchmarks/vgg_widths.py --out runs/vgg-baselines --baselines --widths 0.125 1.0

MNIST, a class-balanced subset of ``--train`` training images split Dirichlet (ratio 0.2) between
2 VGG11s (zoo ``VGG``, BatchNorm, ``width_multiplier``) trained ``--epochs`` epochs; 400-image
class-balanced fusion set; test accuracy on the 10,000 test images.  For every width:

* a **permuted copy** check: each model fused with a copy of itself whose channels are permuted at
  every level must give the model back (largest logit difference on the fusion set);
* otfusion, git-rebasin (post- and pre-activation matching) and kf-linear, uniform importance,
  class shares at the output, each with and without REPAIR; the base models and the ensemble.

With ``--baselines``: instead, the field's baselines with their defaults (weight-matching, zipit,
cca-merge, regmean, regmean-aligned, fisher, fisher-aligned), each with and without REPAIR, beside
otfusion +REPAIR and kf-linear (class shares) re-measured on the same base models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import neurofuse
from neurofuse.data import balanced_subset, class_shares, load_dataset, partition
from neurofuse.methods import get_method
from neurofuse.models import VGG
from neurofuse.training import TrainConfig, evaluate, predict_logits, train_model

log = logging.getLogger("vgg")


def permuted_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy whose hidden channels are permuted at every level (BatchNorm folded along)."""
    g = torch.Generator().manual_seed(seed)
    out = model.clone()
    with torch.no_grad():
        levels = list(out.levels)
        for lvl, nxt in zip(levels[:-1], levels[1:]):
            mods = [m for m in lvl.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d))]
            aff = [m for m in mods if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
            perm = torch.randperm(aff.weight.shape[0], generator=g)
            for m in mods[mods.index(aff):]:
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(m, name, None)
                    if t is not None and t.shape[0] == len(perm):
                        t.copy_(t[perm])
            nxt_aff = [m for m in nxt.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][0]
            w = nxt_aff.weight
            if isinstance(nxt_aff, nn.Linear) and w.shape[1] != len(perm):
                w.copy_(w.reshape(w.shape[0], len(perm), -1)[:, perm].reshape(w.shape))
            else:
                w.copy_(w[:, perm])
    return out.eval()


COLUMNS = ["ensemble+cs", "otfusion", "otfusion +REPAIR", "git-rebasin", "git-rebasin +REPAIR",
           "git-rebasin/pre", "git-rebasin/pre +REPAIR", "kf-linear", "kf-linear +REPAIR", "vanilla",
           "vanilla +REPAIR"]


#: the field's baselines (issue 28) of ``--baselines``, each also with REPAIR
BASELINES = ["weight-matching", "zipit", "cca-merge", "regmean", "regmean-aligned", "fisher", "fisher-aligned"]
BASELINE_COLUMNS = ["ensemble+cs", "otfusion +REPAIR", "kf-linear"] + [
    name for m in BASELINES for name in (m, m + " +REPAIR")]


def report(paths: list) -> str:
    """A markdown table of the mean over the runs (``results.json`` files, one per seed) per width
    (the ``--baselines`` columns when the runs have them)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    widths = sorted({w for r in runs for w in r}, key=float)
    first = next(iter(runs[0].values()))
    columns = BASELINE_COLUMNS if BASELINES[0] in first else COLUMNS
    head = ["width", "seeds", "best base"] + columns
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in widths:
        cells = [r[w] for r in runs if w in r]
        mean = lambda key: np.mean([c[key] for c in cells])  # noqa: E731
        best = np.mean([max(c["base"]) for c in cells])
        frac = {0.125: "1/8", 0.25: "1/4", 0.5: "1/2", 1.0: "1"}.get(float(w), w)
        lines.append("| " + " | ".join([frac, str(len(cells)), f"{best:.1f}"]
                                      + [f"{mean(k):.1f}" for k in columns]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--report", nargs="+", metavar="RESULTS_JSON",
                   help="print the mean table of earlier runs and exit")
    p.add_argument("--out")
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--widths", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="split, fusion set and initialisation")
    p.add_argument("--baselines", action="store_true",
                   help="the field's baselines (with and without REPAIR) beside otfusion and kf-linear")
    args = p.parse_args()
    if args.report:
        print(report(args.report))
        return
    if not args.out:
        p.error("--out is required (or --report)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("neurofuse").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("mnist", args.data_dir)
    y = ds.y_train.numpy()
    sub = np.sort(balanced_subset(y, np.arange(len(y)), args.train, seed=args.seed))
    parts = [sub[pt] for pt in partition(y[sub], 2, "dirichlet", seed=args.seed, ratio=0.2)]
    shares = class_shares(y, parts, 10)
    rest = np.setdiff1d(np.arange(len(y)), sub)
    fidx = balanced_subset(y, rest, 400, seed=args.seed)
    fusion = (ds.x_train[fidx], ds.y_train[fidx])
    results = {}
    for w in args.widths:
        t0 = time.perf_counter()
        models = []
        for i, part in enumerate(parts):
            torch.manual_seed(1000 * args.seed + i)
            m = VGG(ds.input_shape, 10, width_multiplier=w)
            train_model(m, ds.x_train[part], ds.y_train[part],
                        config=TrainConfig(epochs=args.epochs, lr=1e-3, seed=1000 * args.seed + i, warmup_epochs=1))
            models.append(m.eval())
        r = {"train_seconds": time.perf_counter() - t0}
        acc = lambda m: 100 * evaluate(m, ds.x_test, ds.y_test)["accuracy"]  # noqa: E731
        r["base"] = [acc(m) for m in models]
        r["ensemble+cs"] = acc(neurofuse.fuse(models, None, method="ensemble", class_weights=shares))
        for method in ("otfusion", "git-rebasin") if not args.baselines else ():
            twin = permuted_copy(models[0], seed=3)
            f = neurofuse.fuse([models[0], twin], fusion, method=method, progress=False)
            r[f"permuted copy {method}: max logit diff"] = float(
                (predict_logits(f, fusion[0]) - predict_logits(models[0], fusion[0])).abs().max())
        variants = [("otfusion", {}), ("git-rebasin", {"activations": "post"}),
                    ("git-rebasin", {"activations": "pre"}), ("kf-linear", {"n_init": 3}),
                    ("vanilla", {})]
        repairs = [(False, True)] * len(variants)
        if args.baselines:
            variants = [("otfusion", {}), ("kf-linear", {"n_init": 3})] + [(m, {}) for m in BASELINES]
            repairs = [(True,), (False,)] + [(False, True)] * len(BASELINES)
        for (method, kw), modes in zip(variants, repairs):
            for repair in modes:
                name = method + ("/pre" if kw.get("activations") == "pre" else "") + (" +REPAIR" if repair else "")
                opts = dict(kw)
                if "class_weights" in {f.name for f in dataclasses.fields(get_method(method).Options)}:
                    opts["class_weights"] = shares
                try:
                    t = time.perf_counter()
                    f = neurofuse.fuse(models, fusion, method=method, progress=False, repair=repair, **opts)
                    r[name] = acc(f)
                    r[name + " seconds"] = time.perf_counter() - t
                except neurofuse.errors.NeurofuseError as exc:
                    r[name] = str(exc)
                log.info("width %g %s: %s", w, name, r[name])
        results[str(w)] = r
        (out / "results.json").write_text(json.dumps(results, indent=1))
        log.info("width %g: %s", w, r)


if __name__ == "__main__":
    main()
