"""Plots (matplotlib, imported lazily, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path
from typing import AbstractSet, Mapping, Sequence

__all__ = ["accuracy_bars", "save_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out and write ``fig`` as a PNG atomically and durably (:func:`neurofuse._io.write_figure`);
    close it."""
    from ._io import write_figure

    _pyplot()
    fig.tight_layout()
    return write_figure(fig, Path(path), dpi=120)


def accuracy_bars(base: Sequence[float], methods: Mapping[str, float], path: str | Path,
                  title: str = "", ensembles: AbstractSet[str] = frozenset()) -> Path:
    """Horizontal bars: each base model, then each method (the keys in ``ensembles`` in their own
    colour: they keep every model), with the best and the mean base model as lines (a fused model
    is worth having only right of the best one)."""
    plt = _pyplot()
    labels = [f"base model {i}" for i in range(len(base))] + list(methods)
    values = list(base) + list(methods.values())
    colors = ["#9e9e9e"] * len(base) + [
        "#ff7f0e" if k in ensembles else "#1f77b4" for k in methods]
    fig, ax = plt.subplots(figsize=(8.5, 0.32 * len(labels) + 2.0))
    y = range(len(labels))
    ax.barh(list(y), [100 * v for v in values], color=colors)
    for yi, v in zip(y, values):
        ax.text(100 * v + 0.5, yi, f"{100 * v:.1f}", va="center", fontsize=8)
    if base:
        mean = 100 * sum(base) / len(base)
        best = 100 * max(base)
        ax.axvline(best, color="#2ca02c", ls="-", lw=1.2, label=f"best base model ({best:.1f})")
        ax.axvline(mean, color="#d62728", ls="--", lw=1, label=f"mean base model ({mean:.1f})")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False,
                  ncol=2)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(title + "\n(grey: base models, orange: ensemble of all models, blue: one fused model)",
                 fontsize=9)
    return save_figure(fig, path)
