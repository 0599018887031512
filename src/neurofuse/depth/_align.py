r"""Cross-layer alignment (CLAFusion, Nguyen et al. 2023) and depth balancing of N models.

The levels of a shallower model (``m`` levels) are mapped to distinct levels of a deeper one
(``n >= m`` levels), in order, first level to first and output level to output level, so that
the summed level dissimilarity is minimal (an unbalanced assignment problem).  With
:math:`D[i, j]` the least cost of aligning shallow levels :math:`0..i` with shallow level
:math:`i` on deep level :math:`j`,

.. math::  D[0, 0] = C[0, 0],\quad D[0, j>0] = \infty,\qquad
           D[i, j] = C[i, j] + \min_{j' < j} D[i-1, j'],

and the answer is :math:`D[m-1, n-1]`, traced back.  A running minimum makes it
:math:`O(mn)` (:func:`align_levels`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .._fusion_set import as_fusion_set
from ..errors import ConfigError, IncompatibleModelsError
from ..levels import LeveledNet, not_leveled_error
from ._balance import _output_shapes, groups_of, insert_identity_levels, merge_levels
from ._cka import METRICS, level_cost_matrix, level_features, level_grams

__all__ = [
    "BALANCE",
    "DepthAlignment",
    "PairAlignment",
    "align_levels",
    "align_models",
    "alignment_cost",
    "alignment_report",
    "plot_cost_matrix",
]

log = logging.getLogger("neurofuse")

#: depth-balancing strategies
BALANCE: Tuple[str, ...] = ("add", "merge")


# ---------------------------------------------------------------------------------------------
# the dynamic programme
# ---------------------------------------------------------------------------------------------
def align_levels(cost: Any, insertable: Optional[Any] = None) -> List[int]:
    """The optimal monotone alignment of ``m`` shallow levels onto ``n >= m`` deep levels.

    Parameters
    ----------
    cost : array-like ``[m, n]``
        ``cost[i, j]``: dissimilarity of shallow level ``i`` and deep level ``j``; ``inf`` forbids
        the pair.
    insertable : bool array-like ``[m, n]``, optional
        ``insertable[i, k]``: deep level ``k`` may be left unmatched right after shallow level
        ``i`` (used by ``balance="add"``: an identity level inserted there has shallow level
        ``i``'s axis, which must be deep level ``k``'s axis).  Default: always.

    Returns
    -------
    list of int
        ``a`` with ``a[0] = 0`` (if ``m > 1``), ``a[m-1] = n-1``, strictly increasing, minimising
        ``sum(cost[i, a[i]])``.  Ties go to the earliest deep levels.  ``O(m n)`` time.

    Raises
    ------
    IncompatibleModelsError
        If ``m > n`` or no alignment has a finite cost.
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] < 1:
        raise ConfigError(f"cost must be a non-empty [m, n] matrix, got shape {list(c.shape)}")
    m, n = c.shape
    if m > n:
        raise IncompatibleModelsError(
            f"cannot align {m} levels onto {n}: put the shallower model's levels in the rows")
    if np.isnan(c).any():
        raise ConfigError("the level cost matrix contains NaN")
    ins = np.ones((m, n), dtype=bool) if insertable is None else np.asarray(insertable, dtype=bool)
    if ins.shape != (m, n):
        raise ConfigError(f"insertable has shape {list(ins.shape)}, expected {[m, n]}")
    if m == 1:
        # one level: it is the output level, aligned to the output; every other deep level is
        # unmatched before it, which no shallow level can precede
        if n > 1 or not np.isfinite(c[0, 0]):
            if n > 1:
                raise IncompatibleModelsError(
                    "a single-level model cannot be aligned with a deeper model level by level: "
                    "the first and the output level would have to match the same deep level")
            raise IncompatibleModelsError("no alignment of finite cost: the level axes differ")
        return [0]
    inf = np.inf
    d = np.full((m, n), inf)
    back = np.full((m, n), -1, dtype=np.int64)
    d[0, 0] = c[0, 0]
    for i in range(1, m):
        prev = d[i - 1]
        window: deque = deque()   # candidate j' with increasing prev[j'] (front = argmin)
        lo = 0                    # smallest allowed j' (all deep levels in (j', j) insertable)
        for j in range(1, n):
            jp = j - 1
            while window and prev[window[-1]] > prev[jp]:
                window.pop()
            window.append(jp)
            if j >= 2 and not ins[i - 1, j - 1]:
                lo = j - 1        # deep level j-1 cannot be skipped: j' >= j-1
            while window and window[0] < lo:
                window.popleft()
            if window and np.isfinite(prev[window[0]]):
                d[i, j] = c[i, j] + prev[window[0]]
                back[i, j] = window[0]
    if not np.isfinite(d[m - 1, n - 1]):
        raise IncompatibleModelsError(
            "no monotone level alignment of finite cost: the models' level axes and output "
            "shapes cannot be matched in order (first to first, output to output)")
    a = [n - 1]
    for i in range(m - 1, 0, -1):
        a.append(int(back[i, a[-1]]))
    return a[::-1]


def alignment_cost(cost: Any, alignment: Sequence[int]) -> float:
    """``sum(cost[i, alignment[i]])``."""
    c = np.asarray(cost, dtype=np.float64)
    return float(sum(c[i, j] for i, j in enumerate(alignment)))


# ---------------------------------------------------------------------------------------------
# N models
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PairAlignment:
    """How one model was aligned with the reference.

    Attributes
    ----------
    model : int
        Index of the model in the caller's list.
    depth : int
        Its number of levels before balancing.
    shallower : str
        ``"model"`` (identity levels were inserted into it), ``"reference"`` (its levels were
        merged) or ``"equal"`` (unchanged).
    cost : numpy.ndarray
        ``[shallower levels, deeper levels]`` dissimilarities (rows: the model if it is the
        shallower one or of equal depth, else the reference).
    alignment : list of int
        The deeper level each shallower level is aligned to.
    total_cost : float
        The summed cost of the alignment.
    inserted : list of int
        Levels of the balanced model that are inserted identities (``balance="add"``).
    groups : list of list of int
        The model's original levels in each balanced level.
    """

    model: int
    depth: int
    shallower: str
    cost: np.ndarray
    alignment: List[int]
    total_cost: float
    inserted: List[int]
    groups: List[List[int]]

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cost"] = [[float(v) for v in row] for row in np.asarray(self.cost)]
        return d


@dataclasses.dataclass
class DepthAlignment:
    """What :func:`align_models` did.

    Attributes
    ----------
    reference : int
        Index (in the caller's list) of the reference model, whose depth everyone now has.
    order : list of int
        Caller indices of the returned models (reference first).
    depths : list of int
        Level counts of the caller's models, in the caller's order.
    metric, balance : str
        The settings used.
    pairs : list of PairAlignment
        One per non-reference model, in ``order``.
    """

    reference: int
    order: List[int]
    depths: List[int]
    metric: str
    balance: str
    pairs: List[PairAlignment]

    def to_dict(self) -> Dict[str, Any]:
        return {"reference": self.reference, "order": list(self.order), "depths": list(self.depths),
                "metric": self.metric, "balance": self.balance,
                "pairs": [p.to_dict() for p in self.pairs]}


def _check_models(models: Sequence[nn.Module], ref: int) -> List[LeveledNet]:
    nets: List[LeveledNet] = []
    for i, m in enumerate(models):
        if not isinstance(m, LeveledNet):
            raise not_leveled_error(m, i)
        if m.num_levels < 1:
            raise IncompatibleModelsError(f"model {i} has no levels")
        nets.append(m)
    r = nets[ref]
    for i, m in enumerate(nets):
        if m.num_classes != r.num_classes:
            raise IncompatibleModelsError(
                f"model {i} has {m.num_classes} output classes but the reference model {ref} has "
                f"{r.num_classes}: models without common output classes cannot be aligned level by "
                "level")
        if m.input_shape != r.input_shape:
            raise IncompatibleModelsError(
                f"model {i} takes inputs of shape {list(m.input_shape)} but the reference model "
                f"{ref} takes {list(r.input_shape)}")
    return nets


def _resolve_reference(reference: Optional[int], depths: List[int], balance: str) -> int:
    if reference is None:
        target = max(depths) if balance == "add" else min(depths)
        return depths.index(target)
    if isinstance(reference, bool) or not isinstance(reference, (int, np.integer)):
        raise ConfigError(f"reference must be a model index or None, got {reference!r}")
    if not -len(depths) <= int(reference) < len(depths):
        raise ConfigError(f"reference {reference} is out of range for {len(depths)} models")
    return int(reference) % len(depths)


def _level_kinds(model: LeveledNet) -> List[Tuple[Any, ...]]:
    """Per level: its axis and the shape of its rows (conv: ``(H, W)``, token: ``(T,)``).

    Level-wise fusion stacks the base models' level outputs row by row, so aligned levels (and
    inserted identity levels) must agree on both; only the neuron count may differ.
    """
    kinds = []
    for axis, shape in zip(model.axes, _output_shapes(model)):
        rows = tuple(shape[2:]) if axis == "conv" else tuple(shape[1:-1]) if axis == "token" else ()
        kinds.append((axis, rows))
    return kinds


def _compatible(rows: Sequence[Any], cols: Sequence[Any]) -> np.ndarray:
    return np.array([[r == c for c in cols] for r in rows], dtype=bool)


def align_models(models: Sequence[nn.Module], data: Any, *, reference: Optional[int] = None,
                 metric: str = "cka", balance: str = "add", batch_size: int = 256,
                 max_samples: Optional[int] = 1000, spatial: Optional[int] = 4,
                 check: bool = True) -> Tuple[List[LeveledNet], DepthAlignment]:
    """Align models of different depths with a reference model and balance them to its depth.

    Parameters
    ----------
    models : sequence of LeveledNet
        Trained models with the same input shape and classes, of any depths and widths.
    data : tensor, (x, y) pair, TensorDataset, DataLoader or FusionSet
        The fusion set (training samples); level outputs on it are compared.
    reference : int, optional
        Index of the model whose depth (and architecture) the others take; the fused model is a
        clone of it.  Default: the deepest model for ``balance="add"``, the shallowest for
        ``balance="merge"`` (the first such model on ties).
    metric : {"cka", "euclidean"}
        Level dissimilarity (:mod:`neurofuse.depth._cka`).
    balance : {"add", "merge"}
        ``"add"``: insert identity levels into every shallower model; ``"merge"``: group levels
        of every deeper model into composite levels.  Both are exact: each balanced model computes
        the same function as the original.
    batch_size : int
        Rows per batch when streaming the fusion set.
    max_samples : int, optional
        Compare levels on at most this many fusion samples (memory grows with its square).
    spatial : int, optional
        Conv feature maps are average-pooled to at most ``spatial x spatial`` before comparison
        (``None``: no pooling).
    check : bool
        Check on the first fusion batch that each balanced model reproduces its original.

    Returns
    -------
    (list of LeveledNet, DepthAlignment)
        The balanced models with the reference first (unchanged, the same object) followed by
        the others in the caller's order, all with the reference's level count and level axes;
        and a record of the alignments.  Fuse them with ``neurofuse.fuse(balanced, data, ...)``.

    Raises
    ------
    IncompatibleModelsError
        If a model is not a LeveledNet, if input shapes or class counts differ, or if the level
        axes cannot be matched in order.
    ConfigError
        On an unknown ``metric`` / ``balance``, a bad ``reference``, or a model deeper than the
        reference with ``balance="add"`` (shallower with ``"merge"``).
    """
    models = list(models)
    if not models:
        raise IncompatibleModelsError("no models to align: pass at least one model")
    if metric not in METRICS:
        raise ConfigError(f"unknown level metric {metric!r}; choose one of {list(METRICS)}")
    if balance not in BALANCE:
        raise ConfigError(f"unknown balance {balance!r}; choose one of {list(BALANCE)}")
    for i, m in enumerate(models):
        if not isinstance(m, LeveledNet):
            raise not_leveled_error(m, i)
    depths = [m.num_levels for m in models]
    ref = _resolve_reference(reference, depths, balance)
    nets = _check_models(models, ref)
    rnet = nets[ref]
    for i, d in enumerate(depths):
        if balance == "add" and d > depths[ref]:
            raise ConfigError(
                f"model {i} has {d} levels, more than the reference model {ref} ({depths[ref]}); "
                "balance='add' only inserts levels: make the deepest model the reference or use "
                "balance='merge'")
        if balance == "merge" and d < depths[ref]:
            raise ConfigError(
                f"model {i} has {d} levels, fewer than the reference model {ref} ({depths[ref]}); "
                "balance='merge' only merges levels: make the shallowest model the reference or use "
                "balance='add'")
    fset = as_fusion_set(data, batch_size)
    fset.check_input_shape(rnet.input_shape)

    order = [ref] + [i for i in range(len(nets)) if i != ref]
    balanced: List[LeveledNet] = [rnet]
    pairs: List[PairAlignment] = []
    if len(nets) > 1:
        ref_grams = level_grams(level_features(rnet, fset, spatial=spatial, max_samples=max_samples),
                                metric)
    ref_kinds = _level_kinds(rnet)
    for i in order[1:]:
        net = nets[i]
        kinds = _level_kinds(net)
        # cost[reference level, model level]
        cost_rm = level_cost_matrix(rnet, net, fset, metric=metric, spatial=spatial,
                                    max_samples=max_samples, grams_a=ref_grams)
        if net.num_levels <= rnet.num_levels:     # the model is the shallower (or equal) one
            cost = cost_rm.T
            ok = _compatible(kinds, ref_kinds)
            try:
                a = align_levels(np.where(ok, cost, np.inf), ok)
            except IncompatibleModelsError as exc:
                raise IncompatibleModelsError(f"model {i} vs reference model {ref}: {exc}") from None
            if net.num_levels == rnet.num_levels:
                out: LeveledNet = net
                shallower, inserted = "equal", []
            else:
                out = insert_identity_levels(net, a, rnet.num_levels, deep=rnet)
                shallower = "model"
                inserted = [k for k in range(rnet.num_levels) if k not in set(a)]
            groups = [[a.index(k)] if k in a else [] for k in range(rnet.num_levels)]
        else:                                      # the reference is the shallower one: merge
            cost = cost_rm
            try:
                a = align_levels(np.where(_compatible(ref_kinds, kinds), cost, np.inf))
            except IncompatibleModelsError as exc:
                raise IncompatibleModelsError(f"model {i} vs reference model {ref}: {exc}") from None
            out = merge_levels(net, a)
            shallower, inserted, groups = "reference", [], groups_of(a)
        if out.axes != rnet.axes:  # cannot happen: the masked costs force equal axes
            raise IncompatibleModelsError(
                f"model {i} balanced to axes {out.axes}, but the reference has {rnet.axes}")
        if check and out is not net:
            _check_same_function(net, out, fset, i)
        pairs.append(PairAlignment(model=i, depth=net.num_levels, shallower=shallower, cost=cost,
                                   alignment=list(a), total_cost=alignment_cost(cost, a),
                                   inserted=inserted, groups=groups))
        balanced.append(out)
        log.info("depth: model %d (%d levels) -> %d levels (%s), alignment %s", i, net.num_levels,
                 out.num_levels, shallower, a)
    info = DepthAlignment(reference=ref, order=order, depths=depths, metric=metric,
                          balance=balance, pairs=pairs)
    return balanced, info


def _check_same_function(original: LeveledNet, balanced: LeveledNet, fset: Any, index: int) -> None:
    xb, _ = next(iter(fset.batches(next(original.parameters()).device)))
    xb = xb[:64]
    was = (original.training, balanced.training)
    original.eval()
    balanced.eval()
    with torch.no_grad():
        y0, y1 = original(xb), balanced(xb)
    original.train(was[0])
    balanced.train(was[1])
    err = float((y0 - y1).abs().max())
    scale = float(y0.abs().max()) + 1.0
    if not err <= 1e-4 * scale:
        raise IncompatibleModelsError(
            f"balancing changed model {index}'s outputs by {err:.3g}; its levels may not end at "
            "pre-activations (the next level must start with the non-linearity)")


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def alignment_report(info: DepthAlignment) -> str:
    """A plain-text summary of :func:`align_models`' alignments (one block per model)."""
    lines = [f"depth alignment: metric={info.metric}, balance={info.balance}, reference=model "
             f"{info.reference} ({info.depths[info.reference]} levels)"]
    for p in info.pairs:
        lines.append(f"model {p.model} ({p.depth} levels): {p.shallower} is shallower"
                     if p.shallower != "equal" else f"model {p.model} ({p.depth} levels): same depth")
        if p.shallower == "reference":
            maps = ", ".join(f"ref {i} <- levels {g[0]}..{g[-1]}" if len(g) > 1 else f"ref {i} <- {g[0]}"
                             for i, g in enumerate(p.groups))
        else:
            maps = ", ".join(f"{i} -> ref {j}" for i, j in enumerate(p.alignment))
            if p.inserted:
                maps += f"; identity levels at {p.inserted}"
        lines.append(f"  {maps}")
        lines.append(f"  total cost {p.total_cost:.4f} (mean {p.total_cost / len(p.alignment):.4f} "
                     "per aligned level)")
        rows, cols = p.cost.shape
        lines.append("  cost: rows = shallower levels, columns = deeper levels ([x] = aligned)")
        for r in range(rows):
            cells = []
            for c in range(cols):
                v = p.cost[r, c]
                txt = " inf " if not np.isfinite(v) else f"{v:5.3f}"
                cells.append(f"[{txt}]" if p.alignment[r] == c else f" {txt} ")
            lines.append(f"  {r:3d} " + "".join(cells))
    return "\n".join(lines)


def plot_cost_matrix(cost: Any, alignment: Sequence[int], path: str | Path, *, title: str = "",
                     row_label: str = "shallower model level",
                     col_label: str = "deeper model level") -> Path:
    """Heat map of a level cost matrix with the alignment marked; saved to ``path`` (PNG)."""
    from ..plots import _pyplot

    c = np.asarray(cost, dtype=np.float64)
    plt = _pyplot()
    m, n = c.shape
    fig, ax = plt.subplots(figsize=(max(4.5, 1.8 + 0.55 * n), max(3.0, 1.4 + 0.45 * m)))
    shown = np.where(np.isfinite(c), c, np.nan)
    im = ax.imshow(shown, cmap="viridis_r", aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="dissimilarity")
    a = [int(j) for j in alignment]
    ax.plot(a, list(range(len(a))), "o-", color="#d62728", ms=11, lw=1.2, mfc="none", mew=1.5,
            label="alignment")
    for i in range(m):
        for j in range(n):
            if np.isfinite(c[i, j]):
                ax.text(j, i, f"{c[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if c[i, j] > np.nanmean(shown) else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(m))
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=7, frameon=False)
    from ..plots import save_figure

    return save_figure(fig, path)
