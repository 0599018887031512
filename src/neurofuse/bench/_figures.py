"""Figures of the benchmarks.

* ``accuracy_bars.png``: grouped bar chart of the main table (rows x splits).
* ``clustering.png`` (the paper's figure 2): the first-level neurons of three MLPs of width 10
  trained on non-IID parts of the data, and the centres of the weighted K-means that groups them
  into 10 fused neurons, with uniform importance (left) and Conductance (right).  Every neuron is
  the vector of its pre-activations on the fusion set; neurons and centres are projected to 2-D
  with one PCA (fitted on the neurons) per panel; marker size is the neuron's importance.
* ``landscape.png`` (the paper's figure 3): test loss and accuracy on the plane through the
  weights of three base models trained from a *common initialisation* on different non-IID parts
  of the data, with the fused model's orthogonal projection on that plane marked.

Why that plane: loss landscapes between independently initialised networks are dominated by the
permutation symmetry of their hidden units (the straight line between two of them crosses a high
barrier whatever their function), so a plane through them says nothing about fusion.  Models
trained from a common initialisation stay in the same coordinate system (as in federated
learning), so the plane through them is meaningful; the fused model (``kf-gradient`` by default)
is warm-started from model 0 and keeps model 0's neuron order, so its projection on the plane is
meaningful too.  The fused model itself is generally *off* the plane: the figure states its
distance to the plane and its own loss and accuracy next to those of its projection.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .._io import write_figure, write_text
from ._config import BenchConfig

__all__ = ["bars_figure", "clustering_figure", "landscape_figure", "make_figures", "pareto_figure"]

log = logging.getLogger("neurofuse")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write ``fig`` atomically (a uniquely named temporary file, fsync, rename) and close it."""
    _pyplot()
    return write_figure(fig, Path(path), dpi=120)


# ---------------------------------------------------------------------------------------------
# grouped bars
# ---------------------------------------------------------------------------------------------
def bars_figure(cfg: BenchConfig, summary: Mapping[str, Mapping[str, Any]], path: Path) -> Optional[Path]:
    """Grouped horizontal bars: one group per table row, one bar per split, error bar = std."""
    rows = [r for r in summary if any(v.get("mean") is not None for v in summary[r].values())]
    if not rows:
        return None
    plt = _pyplot()
    cols = [f"{s}-way" for s in cfg.splits]
    n = len(cols)
    h = 0.8 / n
    fig, ax = plt.subplots(figsize=(9, 0.42 * n * len(rows) + 1.6))
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, n))
    for j, c in enumerate(cols):
        ys, vals, errs = [], [], []
        for i, r in enumerate(rows):
            v = summary[r].get(c, {})
            if v.get("mean") is None:
                continue
            ys.append(i + (j - (n - 1) / 2) * h)
            vals.append(100 * v["mean"])
            errs.append(100 * (v.get("std") or 0.0))
        ax.barh(ys, vals, height=h * 0.95, xerr=errs, color=colors[j], label=f"{c} split",
                error_kw={"elinewidth": 0.8, "capsize": 2})
        for y, v, e in zip(ys, vals, errs):
            ax.text(v + e + 0.8, y, f"{v:.1f}", va="center", fontsize=7)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if summary[r].get(c, {}).get("status") == "n/a":
                ax.text(1, i + (j - (n - 1) / 2) * h, "N/A", va="center", fontsize=6, color="#777777")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 108)
    ax.set_xlabel("test accuracy (%), mean over seeds (error bar: std)")
    ax.set_title(f"{cfg.title} — scale {cfg.scale}\n{cfg.dataset}, {cfg.arch} ({cfg.size}), "
                 f"{cfg.partition} partition, {len(cfg.seeds)} seed(s)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def pareto_figure(cfg: BenchConfig, points: Sequence[Mapping[str, Any]], path: Path) -> Optional[Path]:
    """Test accuracy against parameter count, one panel per split: the fused model at every width
    (partial fusion), the ensemble at the end, the best and the mean base model as lines."""
    panels = [(n, p) for n, p in zip(cfg.splits, points) if any(c[2] is not None for c in p["curve"])]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    assert cfg.pareto is not None
    for ax, (n, p) in zip(axes[0], panels):
        pts = [c for c in p["curve"] if c[2] is not None]
        ax.errorbar([c[1] for c in pts], [100 * c[2] for c in pts], yerr=[100 * (c[3] or 0) for c in pts],
                    fmt="o-", capsize=2, label=f"{cfg.pareto.method}, width x1 ... x{n}")
        for w, params, acc, _, _ in pts:
            ax.annotate(f"x{w:g}", (params, 100 * acc), textcoords="offset points", xytext=(3, -10), fontsize=7)
        if p["ensemble"] is not None:
            ax.plot([p["ensemble"][0]], [100 * p["ensemble"][1]], "*", color="#ff7f0e", ms=12, label="ensemble")
        if p["best_base"] is not None:
            ax.axhline(100 * p["best_base"], color="#2ca02c", lw=1.2, label="best base model")
            ax.axhline(100 * p["mean_base"], color="#d62728", ls="--", lw=1, label="mean base model")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v / 1e3:.0f}k"))
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{n} models", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{cfg.title} — {cfg.dataset}, {cfg.arch} ({cfg.size}), scale {cfg.scale}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# figure 2: clustering
# ---------------------------------------------------------------------------------------------
def _train(model, ds, idx: np.ndarray, epochs: int, seed: int, device: str, lr: float = 1e-3):
    from ..data import train_val_split
    from ..training import TrainConfig, train_model

    tr, val = train_val_split(idx, 0.1, seed=seed)
    train_model(model, ds.x_train[tr], ds.y_train[tr], ds.x_train[val], ds.y_train[val],
                config=TrainConfig(epochs=epochs, lr=lr, seed=seed, device=device, warmup_epochs=1))
    return model.eval()


def clustering_figure(cfg: BenchConfig, ds, path: Path, device: str = "cpu", seed: int = 0) -> Path:
    """The paper's figure 2 (see the module docstring)."""
    from sklearn.decomposition import PCA

    from .._fusion_set import as_fusion_set
    from ..data import partition
    from ..experiment import fusion_set
    from ..grouping import weighted_kmeans
    from ..importance import neuron_importance
    from ..models import MLP

    opts = dict(cfg.figure_options.get("clustering", {}))
    width = int(opts.get("width", 10))
    n_models = int(opts.get("models", 3))
    epochs = int(opts.get("epochs", cfg.epochs_for(cfg.splits[0])))
    parts = partition(ds.y_train.numpy(), n_models, "dirichlet", seed=seed, ratio=cfg.ratio)
    models = []
    for i, part in enumerate(parts):
        torch.manual_seed(seed * 1000 + i)
        models.append(_train(MLP(ds.input_shape, ds.num_classes, [width]), ds, part, epochs,
                             seed * 1000 + i, device, lr=3e-3))
    x, y = fusion_set(ds, cfg.fusion_samples, seed=seed)
    fs = as_fusion_set((x, y))
    with torch.no_grad():
        acts = [m.forward_until(x, 0).T.numpy().astype(np.float64) for m in models]  # [width, samples]
    points = np.concatenate(acts)
    owner = np.repeat(np.arange(n_models), width)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 5.2))
    markers = ["o", "s", "^", "D", "v", "P"]
    pca = PCA(2).fit(points)
    p2 = pca.transform(points)
    for ax, imp in zip(axes, ["uniform", "conductance"]):
        w = np.concatenate([neuron_importance(m, 0, fs, imp).numpy() for m in models])
        w = w / w.sum() * len(w)
        labels, centres, _ = weighted_kmeans(points, w, width, n_init=10, seed=seed)
        c2 = pca.transform(centres)
        cmap = plt.get_cmap("tab10")
        sizes = 25 + 220 * (w / w.max())
        for mi in range(n_models):
            sel = owner == mi
            ax.scatter(p2[sel, 0], p2[sel, 1], s=sizes[sel], c=[cmap(int(l) % 10) for l in labels[sel]],
                       marker=markers[mi % len(markers)], alpha=0.75, edgecolors="k", linewidths=0.4,
                       label=f"neurons of model {mi}")
        for j in range(width):
            for pi in np.flatnonzero(labels == j):
                ax.plot([p2[pi, 0], c2[j, 0]], [p2[pi, 1], c2[j, 1]], color=cmap(j % 10), lw=0.5, alpha=0.5)
        ax.scatter(c2[:, 0], c2[:, 1], marker="X", s=160, c=[cmap(j % 10) for j in range(width)],
                   edgecolors="k", linewidths=1.2, label="weighted K-means centre (fused neuron)", zorder=5)
        ax.set_title(f"{imp} importance" + (" (all neurons weigh the same)" if imp == "uniform" else
                                            " (marker size = importance)"), fontsize=10)
        ax.set_xlabel(f"PC 1 ({100 * pca.explained_variance_ratio_[0]:.0f}% var.)")
        ax.set_ylabel(f"PC 2 ({100 * pca.explained_variance_ratio_[1]:.0f}% var.)")
        ax.grid(alpha=0.25)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=markers[mi % len(markers)], ls="", mfc="white", mec="k", ms=9)
               for mi in range(n_models)]
    handles.append(Line2D([], [], marker="X", ls="", mfc="#bbbbbb", mec="k", ms=11))
    lbls = [f"neurons of model {mi}" for mi in range(n_models)] + ["weighted K-means centre (fused neuron)"]
    fig.legend(handles, lbls, loc="lower center", ncol=n_models + 1, fontsize=8, frameon=False,
               markerscale=0.7)
    fig.suptitle(f"Neurons of the first hidden layer of {n_models} MLPs (width {width}, {ds.name}, non-IID) "
                 f"and their {width} weighted K-means centres\n(colour = cluster; lines join each neuron "
                 f"to its centre; one PCA fitted on all neurons' pre-activations over "
                 f"{len(y)} fusion samples)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.9))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# figure 3: landscape
# ---------------------------------------------------------------------------------------------
def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _assign(model, vec: torch.Tensor) -> None:
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(vec[i:i + n].view_as(p).to(p.dtype))
            i += n


def landscape_figure(cfg: BenchConfig, ds, path: Path, device: str = "cpu", seed: int = 0) -> Path:
    """The paper's figure 3 on the plane through three common-init base models (module docstring)."""
    from ..api import fuse
    from ..data import partition
    from ..experiment import fusion_set
    from ..models import make_model
    from ..training import evaluate

    opts = dict(cfg.figure_options.get("landscape", {}))
    grid = int(opts.get("grid", 21))
    epochs = int(opts.get("epochs", cfg.epochs_for(cfg.splits[0])))
    size = str(opts.get("size", "tiny"))
    method = str(opts.get("method", "kf-gradient"))
    margin = float(opts.get("margin", 0.35))
    n_eval = int(opts.get("eval_samples", 2000))
    parts = partition(ds.y_train.numpy(), 3, "dirichlet", seed=seed, ratio=cfg.ratio)
    torch.manual_seed(seed)
    init = make_model("mlp", size, ds.input_shape, ds.num_classes)
    lr = float(cfg.train.get("lr", 1e-3))
    models = [_train(copy.deepcopy(init), ds, p, epochs, seed * 1000 + i, device, lr=lr)
              for i, p in enumerate(parts)]
    x, y = fusion_set(ds, cfg.fusion_samples, seed=seed)
    fused = fuse(models, (x, y), method=method, seed=seed, progress=False)
    g = torch.Generator().manual_seed(0)
    sel = torch.randperm(len(ds.y_test), generator=g)[:n_eval]
    xe, ye = ds.x_test[sel], ds.y_test[sel]

    t = [_flat(m) for m in models]
    o = t[0]
    u = t[1] - o
    e1 = u / u.norm()
    v = t[2] - o
    v = v - (v @ e1) * e1
    e2 = v / v.norm()
    tf = _flat(fused)

    def coords(w: torch.Tensor):
        return ((w - o) @ e1).item(), ((w - o) @ e2).item()

    pts = [coords(w) for w in t]
    pf = coords(tf)
    proj = o + pf[0] * e1 + pf[1] * e2
    dist = (tf - proj).norm().item()
    xs = [p[0] for p in pts] + [pf[0]]
    ys = [p[1] for p in pts] + [pf[1]]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    a = np.linspace(min(xs) - margin * span, max(xs) + margin * span, grid)
    b = np.linspace(min(ys) - margin * span, max(ys) + margin * span, grid)
    probe = copy.deepcopy(models[0])
    loss = np.zeros((grid, grid))
    acc = np.zeros((grid, grid))
    for i, bi in enumerate(b):
        for j, aj in enumerate(a):
            _assign(probe, o + aj * e1 + bi * e2)
            s = evaluate(probe, xe, ye)
            loss[i, j], acc[i, j] = s["loss"], s["accuracy"]
    _assign(probe, proj)
    s_proj = evaluate(probe, xe, ye)
    s_fused = evaluate(fused, xe, ye)
    s_base = [evaluate(m, xe, ye) for m in models]

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    A, B = np.meshgrid(a, b)
    panels = [(np.log10(np.maximum(loss, 1e-6)), "log10 test loss (cross entropy)", "viridis_r"),
              (100 * acc, "test accuracy (%)", "viridis")]
    for ax, (Z, title, cmap) in zip(axes, panels):
        cs = ax.contourf(A, B, Z, levels=20, cmap=cmap)
        ax.contour(A, B, Z, levels=10, colors="k", linewidths=0.3, alpha=0.5)
        fig.colorbar(cs, ax=ax, shrink=0.9)
        for k, (px, py) in enumerate(pts):
            ax.scatter([px], [py], s=70, c="white", edgecolors="k", zorder=5)
            ax.annotate(f"model {k}\n{100 * s_base[k]['accuracy']:.1f}%", (px, py), xytext=(6, 6),
                        textcoords="offset points", fontsize=8, color="white",
                        bbox=dict(boxstyle="round,pad=0.2", fc="black", alpha=0.5))
        ax.scatter([pf[0]], [pf[1]], marker="*", s=260, c="red", edgecolors="k", zorder=6)
        ax.annotate(f"{method} (projection)\n{100 * s_proj['accuracy']:.1f}% on the plane,\n"
                    f"{100 * s_fused['accuracy']:.1f}% itself", (pf[0], pf[1]), xytext=(8, -34),
                    textcoords="offset points", fontsize=8, color="white",
                    bbox=dict(boxstyle="round,pad=0.2", fc="darkred", alpha=0.7))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("direction model 0 → model 1 (weight-space units)")
        ax.set_ylabel("orthogonal direction towards model 2")
    fig.suptitle(f"Plane through three MLPs ({size}, common initialisation, non-IID parts of {ds.name}); "
                 f"evaluated on {len(ye)} test images\n{method}'s fused model lies "
                 f"{dist:.2f} away from the plane (|model 1 − model 0| = {u.norm().item():.2f}); "
                 f"loss {s_fused['loss']:.3f} itself vs {s_proj['loss']:.3f} at its projection", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
def make_figures(cfg: BenchConfig, out: Path, ds=None, device: str = "cpu", progress: bool = True,
                 emit: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> List[str]:
    """The expensive figures of a config (clustering, landscape), each made once per output dir."""
    made: List[str] = []
    for name, fn in (("clustering", clustering_figure), ("landscape", landscape_figure)):
        if name not in cfg.figures:
            continue
        path = Path(out) / f"{name}.png"
        stamp = Path(out) / f".{name}.key"
        key = json.dumps({"options": cfg.figure_options.get(name, {}), "dataset": cfg.dataset,
                          "train_subsample": cfg.train_subsample, "fusion_samples": cfg.fusion_samples,
                          "ratio": cfg.ratio, "train": cfg.train, "splits": list(cfg.splits),
                          "version": 1}, sort_keys=True)
        if not (path.is_file() and stamp.is_file() and stamp.read_text() == key):
            fn(cfg, ds, path, device=device)
            write_text(stamp, key)
            if emit is not None:
                emit("figure", {"path": str(path)})
        made.append(path.name)
    return made
