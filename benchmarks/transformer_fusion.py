"""Fusing transformers with every level-wise method: alignment (otfusion, git-rebasin, with and
without REPAIR), the closed form (hf-linear, kf-linear) and kf-gradient, next to vanilla
averaging and the ensemble.

    python benchmarks/transformer_fusion.py                                # digits/token task, 2 and 4 models
    python benchmarks/transformer_fusion.py --family vit --dataset mnist --train 5000 --models 2
    python benchmarks/transformer_fusion.py --seeds 0 1 2 --out runs/transformers.json
    python benchmarks/transformer_fusion.py --family vit encoder --models 2 --hidden 128 --extra-rows
    python benchmarks/transformer_fusion.py --family vit --models 3 --hidden 32 48 24 --methods ensemble otfusion kf-linear

Families (small models built from configs, each from its own initialisation):

* ``vit``: the zoo's ViT (``tiny``: hidden 32, 2 blocks, 4 heads, MLP 64; ``small`` on MNIST:
  hidden 64, 4 blocks, 4 heads, MLP 128);
* ``encoder``: a ViT written on ``nn.TransformerEncoder`` (pre-norm, GELU, hidden 32, 2 layers,
  4 heads), fused through its automatic levels;
* ``hf-vit``: Hugging Face ``ViTForImageClassification`` (:func:`neurofuse.hf.tiny_model`);
* ``hf-bert``: Hugging Face ``BertForSequenceClassification`` on :func:`neurofuse.hf.token_task`;
* ``hf-distilbert`` / ``hf-roberta``: Hugging Face ``DistilBertForSequenceClassification`` /
  ``RobertaForSequenceClassification`` on the same task;
* ``hf-gpt2``: Hugging Face ``GPT2ForSequenceClassification`` (a causal decoder, ``Conv1D``
  weights, the head on the last token) on the same task.

The image families train on scikit-learn's 8x8 digits (or MNIST with ``--dataset mnist``: the
first ``--train`` training images). ``N`` models are trained on the parts of the paper's
Dirichlet split (ratio 0.2) of the training data and fused on a 400-sample class-balanced fusion
set drawn from the training data; nothing is selected on the test set, which gives every
accuracy.  Seconds are the wall clock of each fusion call (``<label>_s``; one torch thread; run
with ``OMP_NUM_THREADS=1``) and its CPU seconds (``<label>_cpu_s``, the fair comparison on a
shared machine), the methods of one cell run one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import neurofuse
from neurofuse.data import Dataset, balanced_subset, load_dataset, partition
from neurofuse.models import ViT, make_model
from neurofuse.training import TrainConfig, evaluate, train_model

#: (label, method, options); "+repair" runs REPAIR after the method
METHODS = [("vanilla", "vanilla", {}), ("ensemble", "ensemble", {}),
           ("otfusion", "otfusion", {}), ("otfusion+repair", "otfusion", {"repair": True}),
           ("git-rebasin", "git-rebasin", {}), ("git-rebasin+repair", "git-rebasin", {"repair": True}),
           ("weight-matching", "weight-matching", {}), ("weight-matching+repair", "weight-matching", {"repair": True}),
           ("hf-linear", "hf-linear", {}), ("kf-linear", "kf-linear", {}), ("kf-gradient", "kf-gradient", {})]
#: rows added by ``--extra-rows``: soft (entropic) alignment, which Imfeld et al. (2024) found
#: better than hard alignment for transformers.  reg 0.05 (of the largest cost) with an iteration
#: cap: at the default reg 0.01 the log-domain solver does not reach its 1e-9 threshold and runs
#: to max_iter (1e6) for every head pair
SINKHORN = {"solver": "sinkhorn", "reg": 0.05, "max_iter": 10_000}
EXTRA_METHODS = [("otfusion-sinkhorn", "otfusion", SINKHORN),
                 ("otfusion-sinkhorn+repair", "otfusion", {**SINKHORN, "repair": True})]
#: rows added by ``--query-rows``: the closed form with attention's queries and keys aligned
#: (the grouped base weights) instead of fitted by least squares (option ``queries``)
QUERY_METHODS = [("hf-linear-qalign", "hf-linear", {"queries": "align"}),
                 ("kf-linear-qalign", "kf-linear", {"queries": "align"})]
#: rows added by ``--attention-rows``: the closed form with gradient steps on the queries and keys
#: (option ``attention_steps``)
ATTENTION_METHODS = [(f"{m}-att{s}", m, {"attention_steps": s}) for s in (20, 50) for m in ("kf-linear", "hf-linear")]
TWO_ONLY = {"git-rebasin", "hf-linear"}
#: families on :func:`neurofuse.hf.token_task` (the others take images)
TOKEN_FAMILIES = ("hf-bert", "hf-distilbert", "hf-roberta", "hf-gpt2")


class EncoderViT(nn.Module):
    """A ViT on ``nn.TransformerEncoder``, written without neurofuse in mind."""

    def __init__(self, shape, classes, d=32, heads=4, depth=2, patch=2):
        super().__init__()
        c, h, w = shape
        n = (h // patch) * (w // patch)
        self.patch = nn.Conv2d(c, d, patch, patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, d))
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.encoder(x)[:, 0]))


def family_data(family: str, dataset: str, train: int, seed: int) -> Dataset:
    if family in TOKEN_FAMILIES:
        import neurofuse.hf as nh

        return nh.token_task(n_train=2000, n_test=1000, seed=seed)
    ds = load_dataset(dataset)
    if dataset != "digits" and train:
        ds = Dataset(ds.name, ds.x_train[:train], ds.y_train[:train], ds.x_test, ds.y_test, ds.num_classes,
                     ds.input_shape)
    return ds


def make(family: str, ds: Dataset, seed: int, hidden: Optional[int] = None) -> nn.Module:
    """A base model; ``hidden`` (``vit`` and ``encoder``) overrides the token width, with MLP width
    ``2 * hidden``, 4 heads and the preset's depth and patch."""
    torch.manual_seed(seed)
    if family == "vit":
        m = make_model("vit", "tiny" if ds.input_shape[1] <= 8 else "small", ds.input_shape, ds.num_classes)
        if hidden is None:
            return m
        torch.manual_seed(seed)
        return ViT(ds.input_shape, ds.num_classes, m.patch, hidden, m.depth, 4, 2 * hidden)
    if family == "encoder":
        patch = 2 if ds.input_shape[1] <= 8 else 4
        return EncoderViT(ds.input_shape, ds.num_classes, d=hidden or 32, patch=patch)
    if hidden is not None:
        raise SystemExit(f"--hidden applies to the vit and encoder families, not {family}")
    import neurofuse.hf as nh

    if family == "hf-vit":
        return nh.tiny_model("vit", ds.input_shape, ds.num_classes, seed=seed)
    return nh.tiny_model(family.removeprefix("hf-"), ds.input_shape, ds.num_classes, seed=seed,
                         vocab_size=int(ds.x_train.max()) + 1)


def sinkhorn_rows(regs: Sequence[float]) -> List[tuple]:
    """otfusion with soft alignment at each ``reg`` in ``regs``, without and with REPAIR."""
    rows = []
    for reg in regs:
        opts = {"solver": "sinkhorn", "reg": reg}
        rows += [(f"otfusion-sinkhorn-{reg:g}", "otfusion", opts),
                 (f"otfusion-sinkhorn-{reg:g}+repair", "otfusion", {**opts, "repair": True})]
    return rows


def run(family: str, dataset: str, train: int, n: int, seed: int, epochs: int, lr: float,
        fusion_samples: int, methods: List[str], hidden: Optional[Sequence[int]] = None,
        table: Sequence[tuple] = METHODS, val: float = 0.0) -> Dict[str, Any]:
    """One cell.  With ``val`` > 0 a class-balanced share ``val`` of the training data is held
    out before the split (no base model trains on it, the fusion set is not drawn from it) and
    every accuracy is also reported on it (``<label>_val``): choose settings on it, never on the
    test set."""
    ds = family_data(family, dataset, train, seed)
    y = ds.y_train.numpy()
    every = np.arange(len(y))
    held = balanced_subset(y, every, int(round(val * len(y))), seed=10_000 + seed) if val > 0 else every[:0]
    pool = np.setdiff1d(every, held)
    models = []
    t0 = time.time()
    for i, part in enumerate(partition(y[pool], n, "dirichlet", seed=seed)):
        part = pool[part]
        m = make(family, ds, 1000 * seed + i, None if not hidden else hidden[i % len(hidden)])
        train_model(m, ds.x_train[part], ds.y_train[part],
                    config=TrainConfig(epochs=epochs, lr=lr, seed=1000 * seed + i))
        m.eval()
        if family == "encoder":
            m = neurofuse.levels_from(m, input_shape=ds.input_shape)
        models.append(m)
    acc = lambda m: evaluate(m, ds.x_test, ds.y_test)["accuracy"]  # noqa: E731
    val_acc = lambda m: evaluate(m, ds.x_train[held], ds.y_train[held])["accuracy"]  # noqa: E731
    idx = balanced_subset(y, pool, fusion_samples, seed=seed)
    fusion = (ds.x_train[idx], ds.y_train[idx])
    row: Dict[str, Any] = {"family": family, "dataset": "tokens" if family in TOKEN_FAMILIES else dataset,
                           "models": n, "seed": seed, "hidden": None if not hidden else list(hidden), "epochs": epochs, "train_s": time.time() - t0,
                           "base": [acc(m) for m in models]}
    if len(held):
        row["base_val"] = [val_acc(m) for m in models]
    row["mean_base"] = float(np.mean(row["base"]))
    for label, method, opts in table:
        if label not in methods or (n > 2 and method in TWO_ONLY):
            continue
        opts = dict(opts)
        t0, c0 = time.time(), time.process_time()
        fused = neurofuse.fuse(models, fusion, method=method, seed=seed, progress=False, **opts)
        row[label + "_s"] = time.time() - t0
        row[label + "_cpu_s"] = time.process_time() - c0
        row[label] = acc(fused)
        if len(held):
            row[label + "_val"] = val_acc(fused)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", nargs="+", default=["vit", "hf-vit", "hf-bert"])
    p.add_argument("--dataset", default="digits", help="digits or mnist (image families)")
    p.add_argument("--train", type=int, default=5000, help="training images of MNIST used")
    p.add_argument("--models", nargs="+", type=int, default=[2, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=30, help="training epochs per base model")
    p.add_argument("--lr", type=float, default=3e-3, help="training learning rate")
    p.add_argument("--fusion-samples", type=int, default=400)
    p.add_argument("--hidden", type=int, nargs="+", default=None,
                   help="token width of the vit and encoder families (MLP 2x, 4 heads); several: model i "
                        "gets the (i mod count)-th (models of different widths); default: the preset's")
    p.add_argument("--extra-rows", action="store_true",
                   help="also run " + ", ".join(m[0] for m in EXTRA_METHODS))
    p.add_argument("--query-rows", action="store_true",
                   help="also run " + ", ".join(m[0] for m in QUERY_METHODS))
    p.add_argument("--attention-rows", action="store_true",
                   help="also run " + ", ".join(m[0] for m in ATTENTION_METHODS))
    p.add_argument("--sinkhorn-regs", nargs="+", type=float, default=[],
                   help="add otfusion rows with solver='sinkhorn' at each reg (with and without REPAIR)")
    p.add_argument("--val", type=float, default=0.0,
                   help="hold out this share of the training data as a validation set (accuracies '<label>_val')")
    p.add_argument("--methods", nargs="+", default=None, help="labels to run (default: every row)")
    p.add_argument("--out", default=None, help="also write the rows as JSON (appended to as cells finish)")
    a = p.parse_args()
    torch.set_num_threads(1)
    table = (METHODS + (EXTRA_METHODS if a.extra_rows else []) + (QUERY_METHODS if a.query_rows else [])
             + (ATTENTION_METHODS if a.attention_rows else []) + sinkhorn_rows(a.sinkhorn_regs))
    cols = a.methods or [m[0] for m in table]
    unknown = sorted(set(cols) - {m[0] for m in table})
    if unknown:
        p.error(f"unknown method label(s) {unknown}; choose from {[m[0] for m in table]} "
                "(extra rows need --extra-rows)")
    rows = []
    print("| family | N | seed | mean base | " + " | ".join(cols) + " |")
    print("|---" * (4 + len(cols)) + "|")
    for family in a.family:
        for n in a.models:
            for seed in a.seeds:
                r = run(family, a.dataset, a.train, n, seed, a.epochs, a.lr, a.fusion_samples, cols,
                        a.hidden, table, a.val)
                rows.append(r)
                cells = [f"{r[c]:.3f}" + (f"/{r[c + '_val']:.3f}" if c + "_val" in r else "") + f" ({r[c + '_s']:.1f} s)" if c in r else "-" for c in cols]
                name = family if a.hidden is None else f"{family} (hidden {'/'.join(map(str, a.hidden))})"
                print(f"| {name} | {n} | {seed} | {r['mean_base']:.3f} | " + " | ".join(cells) + " |", flush=True)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
