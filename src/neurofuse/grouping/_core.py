r"""Grouping algorithms: Hungarian matching, importance-weighted K-means, identity.

Neurons are points: neuron :math:`j` is the vector :math:`f_j` of the values it takes on the fusion
set (for the linear methods, its projection onto the image of the fused model's previous level,
written in a basis of that image).  A grouping assigns every base neuron to one of :math:`K` fused
neurons; the importance-weighted squared grouping error (paper Eq. 4) is

.. math::  \sum_j s_j \,\lVert f_j - t_{c(j)} \rVert_2^2, \qquad
           t_c = \frac{\sum_{j \in c} s_j f_j}{\sum_{j \in c} s_j}.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .._phases import phase
from ._correspondence import Correspondence
from ..errors import ConfigError, IncompatibleModelsError

ArrayLike = Union[np.ndarray, Tensor]

logger = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_WEIGHTS",
    "Grouping",
    "centroids",
    "hungarian_grouping",
    "identity_grouping",
    "kmeans_grouping",
    "kmeans_memory",
    "output_weights",
    "weighted_kmeans",
]

#: how the output level weighs the models per class (:func:`output_weights`)
OUTPUT_WEIGHTS = ("importance", "mean")


@dataclass(frozen=True)
class Grouping:
    """Assignment of the concatenated base neurons to ``k`` fused neurons.

    Attributes
    ----------
    labels : np.ndarray
        ``[M]`` cluster index of each of the ``M`` concatenated base neurons.
    k : int
        Number of fused neurons.
    weights : np.ndarray
        ``[M]`` weight of each base neuron inside its cluster's (weighted) centre.
    """

    labels: np.ndarray
    k: int
    weights: np.ndarray

    def members(self, c: int) -> np.ndarray:
        return np.flatnonzero(self.labels == c)

    def correspondence(self, widths: Sequence[int]) -> Correspondence:
        """This grouping as a :class:`Correspondence` of the base models of ``widths`` (every
        neuron in its cluster with its weight)."""
        return Correspondence.hard(self.labels, widths, self.k, self.weights)


def centroids(points: ArrayLike, weights: ArrayLike, labels: ArrayLike, k: int) -> ArrayLike:
    """Weighted centres ``[k, D]`` of ``points`` ``[M, D]``; an empty cluster gets zeros.

    numpy inputs give a float64 numpy array; a Tensor ``points`` gives a Tensor on its device
    and in its dtype (``weights`` and ``labels`` may then be numpy or Tensors).
    """
    if isinstance(points, Tensor):
        w = torch.as_tensor(weights).to(points.device, points.dtype)
        lab = torch.as_tensor(labels).to(points.device, torch.long)
        num = torch.zeros(k, points.shape[1], dtype=points.dtype, device=points.device)
        num.index_add_(0, lab, points * w[:, None])
        den = torch.zeros(k, dtype=points.dtype, device=points.device).index_add_(0, lab, w)
        return torch.where(den[:, None] > 0, num / den.clamp_min(torch.finfo(points.dtype).tiny)[:, None],
                           torch.zeros_like(num))
    d = points.shape[1]
    num = np.zeros((k, d), dtype=np.float64)
    np.add.at(num, labels, points * weights[:, None])
    den = np.bincount(labels, weights=weights, minlength=k)
    out = np.zeros_like(num)
    nz = den > 0
    out[nz] = num[nz] / den[nz, None]
    return out


def identity_grouping(widths: Sequence[int], class_weights: Optional[np.ndarray] = None) -> Grouping:
    """Output level: class ``c`` of every model goes to fused class ``c``.

    ``class_weights`` (``[N, C]``, e.g. each model's share of class ``c`` in the training data,
    the paper's "head weights") weigh the models per class; by default all models weigh equally,
    so the target is the mean logit.
    """
    if len(set(widths)) != 1:
        raise IncompatibleModelsError(f"output levels have different class counts {list(widths)}")
    n, c = len(widths), widths[0]
    labels = np.tile(np.arange(c), n)
    if class_weights is None:
        w = np.ones(n * c)
    else:
        cw = np.asarray(class_weights, dtype=np.float64)
        if cw.shape != (n, c):
            raise ConfigError(f"class weights must have shape [{n}, {c}], got {list(cw.shape)}")
        w = cw.reshape(-1) + 1e-12
    return Grouping(labels, c, w)


def output_weights(n_models: int, n_classes: int, class_weights: Optional[ArrayLike] = None,
                   scores: Optional[ArrayLike] = None) -> np.ndarray:
    r"""Weight :math:`w_{i,c}` of model :math:`i` in fused class :math:`c`, normalised over models.

    .. math::  w_{i,c} = \frac{p_{i,c}\, s_{i,c}}{\sum_j p_{j,c}\, s_{j,c}}

    where :math:`p` are the ``class_weights`` (e.g. class shares; default all ones) and :math:`s`
    the importance ``scores`` of every model's output neurons (default all ones: the mean).  This is
    how the closed-form fusion of Luenam et al. (2025, section 4.3) forms the output targets:
    the importance-weighted centre of the class-:math:`c` neurons.  A class that no model weighs
    falls back to the plain mean.

    Parameters
    ----------
    n_models, n_classes : int
        Number of models and of classes (output neurons of each model).
    class_weights : array-like, optional
        ``[N, C]`` non-negative weights of each model per class.
    scores : array-like, optional
        ``[N, C]`` non-negative importance of each model's output neuron ``c`` (raw, not
        normalised per model: scores of one class are compared across models).

    Returns
    -------
    np.ndarray
        ``[N, C]`` float64 weights; every column sums to one.
    """
    w = np.ones((n_models, n_classes), dtype=np.float64)
    for name, value in (("class weights", class_weights), ("output importance", scores)):
        if value is None:
            continue
        a = np.asarray(value.cpu() if isinstance(value, Tensor) else value, dtype=np.float64)
        if a.shape != (n_models, n_classes):
            raise ConfigError(f"{name} must have shape [{n_models}, {n_classes}], got {list(a.shape)}")
        if not np.isfinite(a).all() or (a < 0).any():
            raise ConfigError(f"{name} must be finite and non-negative; got min {a.min()!r}")
        w = w * a
    total = w.sum(0)
    empty = total <= 0
    w[:, empty] = 1.0
    return w / w.sum(0)


@phase("grouping")
def hungarian_grouping(points: ArrayLike, weights: np.ndarray, widths: Sequence[int]) -> Grouping:
    r"""Optimal one-to-one matching of two equal-width models (Hungarian Fusion, appendix B.1).

    The cost of pairing neuron :math:`i` of model 0 with neuron :math:`j` of model 1 is their
    grouping error around the weighted centre,
    :math:`\frac{s_i s_j}{s_i + s_j}\lVert f_i - f_j\rVert^2`, and
    ``scipy.optimize.linear_sum_assignment`` minimises its sum exactly (Kuhn 1955).  ``points``
    may be a Tensor: the distances are computed on its device (float64) and only the
    ``[k, k]`` cost matrix goes to the host for the solver.
    """
    if len(widths) != 2:
        raise IncompatibleModelsError(
            f"'hungarian' grouping fuses exactly two models, got {len(widths)}; use 'kf-linear' "
            "(K-means) for N models"
        )
    n0, n1 = widths
    if n0 != n1:
        raise IncompatibleModelsError(
            f"'hungarian' grouping needs equal widths, got {n0} and {n1}; use 'kf-linear' for "
            "models of different widths"
        )
    a, b = points[:n0], points[n0:]
    sa, sb = weights[:n0], weights[n0:]
    if isinstance(points, Tensor):
        a, b = a.double(), b.double()
        sq = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min_(0.0).cpu().numpy()
    else:
        sq = np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)
    cost = (sa[:, None] * sb[None, :]) / (sa[:, None] + sb[None, :]) * sq
    rows, cols = linear_sum_assignment(cost)
    labels = np.empty(n0 + n1, dtype=np.int64)
    labels[rows] = rows
    labels[n0 + cols] = rows
    return Grouping(labels, n0, weights.copy())


def _torch_centroids(points: Tensor, weights: Tensor, labels: Tensor, k: int) -> Tensor:
    num = torch.zeros(k, points.shape[1], dtype=points.dtype, device=points.device)
    num.index_add_(0, labels, points * weights[:, None])
    den = torch.zeros(k, dtype=points.dtype, device=points.device).index_add_(0, labels, weights)
    return num / den.clamp_min(1e-300)[:, None]


# ---------------------------------------------------------------------------------------------
# Importance-weighted K-means
# ---------------------------------------------------------------------------------------------

#: Largest size, in bytes, of the ``[M, M]`` weighted Gram matrix kept for the inner products (and
#: the distances between points for seeding); past it the inner products of points and centres
#: are recomputed by matrix products instead.
_GRAM_BYTES = 512 * 2**20
#: Largest size, in bytes, of one batch of restarts' ``[R * k, M]`` tensors (four, and one bool).
_BATCH_BYTES = 384 * 2**20
#: Restarts run side by side on the CPU (see the measurements in ``weighted_kmeans``).
_CPU_BATCH = 10
#: Points rescanned over all ``k`` clusters per restart and Hartigan round, at most.
_RESCAN = 64
#: Weight a cluster may take in per Hartigan round beyond its best candidate, relative to its own.
_INFLOW = 0.1
#: Times a Hartigan batch is pruned and checked again before it falls back to disjoint moves.
_VERIFY_STEPS = 4


@dataclass(frozen=True)
class _Space:
    """The points (centred on their weighted mean) and what every distance computation needs."""

    x: Tensor                 # [M, D] points minus their weighted mean
    shift: Tensor             # [D] the weighted mean
    w: Tensor                 # [M] weights
    xw: Tensor                # [M, D] w_j x_j
    p2: Tensor                # [M] squared norms
    gram_w: Optional[Tensor]  # [M, M] w_i <x_i, x_j>, or None when too large
    res: float                # rounding resolution of a squared distance
    positive: bool            # every weight > 0 (rows of gram_w divided by w_i give <x_i, x_j>)


@dataclass
class _State:
    """Clusterings of ``R`` restarts side by side; cluster ``c`` of restart ``r`` is row ``r*k+c``."""

    labels: Tensor  # [R, M] cluster of every point, in 0..k-1
    weight: Tensor  # [R*k] total weight W_c
    count: Tensor   # [R*k] number of members
    sums: Tensor    # [R*k, D] S_c, the sum of w_j x_j over the members
    inner: Tensor   # [R*k, M] <S_c, x_j>
    sqnorm: Tensor  # [R*k] |S_c|^2


def _symmetric_gram(x: Tensor, blocks: int = 4) -> Tensor:
    """``[M, M]`` the inner products ``x @ x.T``; on the CPU the lower block triangle by matrix
    products and the rest mirrored (0.58 against 0.80 s for ``M = 8192``, ``D = 400`` in float32
    on one thread: BLAS ``ssyrk`` as scipy ships it was slower than the full product)."""
    m = x.shape[0]
    if x.device.type != "cpu" or m < 1024:
        return x @ x.T
    out = torch.empty(m, m, dtype=x.dtype, device=x.device)
    edges = [round(i * m / blocks) for i in range(blocks + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        torch.mm(x[a:b], x[:b].T, out=out[a:b, :b])
    for a, b in zip(edges[:-1], edges[1:]):
        out[:a, a:b] = out[a:b, :a].T
    return out


def _space(x: Tensor, w: Tensor, gram: bool) -> _Space:
    """Centre the points; with ``gram`` keep the weighted Gram matrix (its rows also give the
    distances between points for seeding, see :func:`_point_dist`)."""
    shift = (w[:, None] * x).sum(0) / w.sum()
    xc = x - shift
    p2 = (xc * xc).sum(1)
    res = 64.0 * torch.finfo(x.dtype).eps * max(float(p2.max()), torch.finfo(x.dtype).tiny)
    gram_w = _symmetric_gram(xc).mul_(w[:, None]) if gram else None
    return _Space(xc, shift, w, xc * w[:, None], p2, gram_w, res, bool((w > 0).all()))


def _point_dist(space: _Space, idx: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``[n, M]`` squared distances of the points ``idx`` to every point (into ``out`` if given):
    from rows of the weighted Gram matrix when it is kept and every weight is positive."""
    x, p2 = space.x, space.p2
    if space.gram_w is not None and space.positive:
        rows = torch.index_select(space.gram_w, 0, idx, out=out)   # 4x faster than [idx] on the CPU
        rows.mul_((-2.0 / space.w[idx])[:, None])
    else:
        rows = torch.mm(x[idx], x.T, out=out).mul_(-2.0)
    return rows.add_(p2[idx, None]).add_(p2[None, :]).clamp_min_(0.0)


def _kmeanspp(space: _Space, k: int, u: Tensor) -> Tensor:
    r"""Greedy weighted k-means++ seeding (Arthur & Vassilvitskii 2007) of ``R`` restarts at once.

    The first centre is point :math:`j` with probability :math:`\propto s_j`; every further one is
    drawn with probability :math:`\propto s_j D_j^2` (:math:`D_j` the distance to the closest centre
    so far), :math:`T = 2 + \lfloor\ln k\rfloor` candidates at a time, keeping the candidate that
    lowers the potential :math:`\sum_j s_j D_j^2` most.  Draws are inverse-CDF look-ups of the
    uniforms ``u`` (``[R, k, T]``), so a step is one batched distance gather and no host sync.
    Returns ``[R, k]`` point indices.
    """
    w = space.w
    r, m, t = u.shape[0], w.shape[0], u.shape[2]
    ar = torch.arange(r, device=w.device)
    cw = torch.cumsum(w, 0)
    floor = torch.finfo(w.dtype).tiny * w   # all points on chosen centres: draw by weight
    idx = torch.empty(r, k, dtype=torch.long, device=w.device)
    idx[:, 0] = torch.searchsorted(cw, u[:, 0, 0].contiguous() * cw[-1], right=True).clamp_max_(m - 1)
    closest = _point_dist(space, idx[:, 0])                        # [R, M]
    for s in range(1, k):
        cum = torch.cumsum(torch.addcmul(floor, closest, w), 1)
        cand = torch.searchsorted(cum, u[:, s] * cum[:, -1:], right=True).clamp_max_(m - 1)
        d = torch.minimum(closest[:, None, :], _point_dist(space, cand.reshape(-1)).view(r, t, m))
        best = (d @ w).argmin(1)                                          # [R]
        idx[:, s] = cand[ar, best]
        closest = d[ar, best]
    return idx


@dataclass
class _Work:
    """Scratch tensors of one batch of restarts, allocated once: fresh tensors of this size cost
    page faults every time (measured: a new 40 MB tensor takes ~15 ms to fill, 1.5 ms to reuse)."""

    mat: Tensor    # [R*k, M] distances to the centres (Lloyd), then Hartigan add costs
    rows: Tensor   # [R*k, M] recomputed rows
    tmp: Tensor    # [R*k, M] a second temporary
    flags: Tensor  # [R*k, M] bool


def _work(n: int, m: int, like: Tensor) -> _Work:
    def new() -> Tensor:
        return torch.empty(n, m, dtype=like.dtype, device=like.device)
    return _Work(new(), new(), new(), torch.empty(n, m, dtype=torch.bool, device=like.device))


def _dist_rows(space: _Space, st: _State, rows: Tensor, out: Tensor) -> Tensor:
    r"""Squared distances :math:`\lVert x_j\rVert^2 - 2\langle x_j, S_c\rangle/W_c +
    \lVert S_c\rVert^2/W_c^2` of every point to the centres of the clusters ``rows``, written to
    the first rows of ``out`` (returned)."""
    n = rows.shape[0]
    o = out[:n]
    wt = st.weight[rows].clamp_min(torch.finfo(o.dtype).tiny)
    # three passes over the [n, M] block: p2 - 2 <x, S_c> / W_c (one addcmul), + |S_c|^2 / W_c^2, clamp
    inner = st.inner if n == st.inner.shape[0] else torch.index_select(st.inner, 0, rows, out=o)
    torch.addcmul(space.p2[None, :], inner, (-2.0 / wt)[:, None], out=o)
    return o.add_((st.sqnorm[rows] / (wt * wt))[:, None]).clamp_min_(0.0)


def _add_rows(space: _Space, st: _State, rows: Tensor, out: Tensor, tmp: Tensor) -> Tensor:
    r""":math:`\frac{W_c}{W_c + s_j}\lVert x_j-\mu_c\rVert^2 = \frac{W_c\lVert x_j\rVert^2 -
    2\langle x_j, S_c\rangle + \lVert S_c\rVert^2/W_c}{W_c + s_j}` for the clusters ``rows``: the
    cost of adding point :math:`j` to cluster :math:`c`, divided by :math:`s_j`, written to the
    first rows of ``out`` (returned)."""
    o = torch.index_select(st.inner, 0, rows, out=out[:rows.shape[0]])
    wt = st.weight[rows].clamp_min(torch.finfo(o.dtype).tiny)
    o.mul_(-2.0).addcmul_(wt[:, None], space.p2[None, :]).add_((st.sqnorm[rows] / wt)[:, None])
    return o.clamp_min_(0.0).div_(torch.add(wt[:, None], space.w[None, :], out=tmp[:rows.shape[0]]))


def _pair_dist(space: _Space, st: _State, rows: Tensor, j: Tensor) -> Tensor:
    """Squared distances of the points ``j`` to the centres of the clusters ``rows`` (pairwise)."""
    wt = st.weight[rows].clamp_min(torch.finfo(st.sums.dtype).tiny)
    return (space.p2[j] - 2.0 * st.inner[rows, j] / wt + st.sqnorm[rows] / (wt * wt)).clamp_min(0.0)


def _build(space: _Space, labels: Tensor, k: int) -> _State:
    """The state of the clusterings ``labels`` (``[R, M]``), computed from scratch."""
    r, m = labels.shape
    x, w = space.x, space.w
    flat = labels + k * torch.arange(r, device=x.device)[:, None]
    weight = torch.zeros(r * k, dtype=x.dtype, device=x.device)
    sums = torch.zeros(r * k, x.shape[1], dtype=x.dtype, device=x.device)
    gram = space.gram_w is not None
    inner = torch.zeros(r * k, m, dtype=x.dtype, device=x.device) if gram else sums
    for i in range(r):
        weight.index_add_(0, flat[i], w)
        sums.index_add_(0, flat[i], space.xw)
        if gram:
            inner.index_add_(0, flat[i], space.gram_w)
    if not gram:
        inner = sums @ x.T
    count = torch.bincount(flat.reshape(-1), minlength=r * k)
    return _State(labels.clone(), weight, count, sums, inner, (sums * sums).sum(1))


def _move(space: _Space, st: _State, r: Tensor, j: Tensor, new: Tensor, k: int, tmp: Tensor) -> Tensor:
    """Move point ``j[i]`` of restart ``r[i]`` to cluster ``new[i]``; returns the changed rows.

    With the Gram matrix a moved point updates :math:`\\langle S_c, x_\\cdot\\rangle` of its two
    clusters by one ``[M]`` row each; without it the changed clusters' rows are recomputed.
    ``tmp`` is scratch space with ``M`` columns.
    """
    src = r * k + st.labels[r, j]
    dst = r * k + new
    wj, ones = space.w[j], torch.ones_like(src)
    for rows, sign in ((dst, 1), (src, -1)):
        st.weight.index_add_(0, rows, wj, alpha=sign)
        st.count.index_add_(0, rows, ones, alpha=sign)
    d = space.x.shape[1]
    flat = tmp.view(-1)
    step = max(1, min(tmp.shape[0], flat.shape[0] // d))
    for lo in range(0, j.shape[0], step):   # row gathers into the scratch space, chunk by chunk
        jc = j[lo:lo + step]
        if jc.shape[0] * d <= flat.shape[0]:
            xw = torch.index_select(space.xw, 0, jc, out=flat[:jc.shape[0] * d].view(-1, d))
        else:  # points of more dimensions than the scratch space holds
            xw = space.xw[jc]
        st.sums.index_add_(0, dst[lo:lo + step], xw)
        st.sums.index_add_(0, src[lo:lo + step], xw, alpha=-1)
        if space.gram_w is not None:
            g = torch.index_select(space.gram_w, 0, jc, out=tmp[:jc.shape[0]])
            st.inner.index_add_(0, dst[lo:lo + step], g)
            st.inner.index_add_(0, src[lo:lo + step], g, alpha=-1)
    st.labels[r, j] = new
    changed = torch.unique(torch.cat([src, dst]))
    sums = st.sums[changed]
    if space.gram_w is None:
        st.inner.index_copy_(0, changed, torch.matmul(sums, space.x.T, out=tmp[:changed.shape[0]]))
    st.sqnorm[changed] = (sums * sums).sum(1)
    return changed


def _lower(bound: Tensor, values: Tensor, restart: Tensor) -> Tensor:
    """``min(bound[r, j], values[i, j])`` over the rows ``i`` of each restart ``r = restart[i]``."""
    return bound.scatter_reduce(0, restart[:, None].expand(-1, values.shape[1]), values, "amin")


def _column_min(view: Tensor, r: Tensor, j: Tensor, step: int = 2048) -> Tuple[Tensor, Tensor]:
    """Minimum and its place of ``view[r[i], :, j[i]]`` (``view`` ``[R, k, M]``), in chunks.

    The gather reads ``k`` values ``M`` apart per point; past about a sixth of all the columns one
    contiguous minimum over every column is cheaper (measured on the CPU: 20,000 of 20,480
    columns, ``k = 256``: 39 ms gathered, 6 ms in full)."""
    if 6 * r.shape[0] > view.shape[0] * view.shape[2]:
        val, arg = view.min(1)
        return val[r, j], arg[r, j]
    if r.shape[0] <= step:
        return view[r, :, j].min(1)
    parts = [view[r[lo:lo + step], :, j[lo:lo + step]].min(1) for lo in range(0, r.shape[0], step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _fill_empty(labels: Tensor, dist: Tensor, w: Tensor, k: int) -> Tensor:
    """Give every empty cluster the point that costs most among clusters of two or more members.

    ``labels`` ``[M]`` is one restart's tentative assignment and ``dist`` ``[k, M]`` the distances
    it was made from.  Rare (duplicate points, a given ``init``), hence a plain loop.
    """
    counts = torch.bincount(labels, minlength=k)
    if bool((counts > 0).all()):
        return labels
    labels = labels.clone()
    for c in torch.nonzero(counts == 0).flatten().tolist():
        contrib = w * dist.gather(0, labels[None, :])[0]
        contrib[counts[labels] <= 1] = -1.0
        j = int(contrib.argmax())
        counts[labels[j]] -= 1
        labels[j] = c
        counts[c] += 1
    return labels


def _costs(space: _Space, st: _State, k: int) -> Tensor:
    r"""``[R]`` weighted costs :math:`\sum_j s_j\lVert x_j\rVert^2 - \sum_c \lVert S_c\rVert^2/W_c`."""
    r = st.labels.shape[0]
    per = st.sqnorm / st.weight.clamp_min(torch.finfo(st.sums.dtype).tiny)
    return (space.w * space.p2).sum() - per.view(r, k).sum(1)


def _lloyd(space: _Space, st: _State, wk: _Work, k: int, max_iter: int, tol: float) -> None:
    """Lloyd iterations (the state already holds the first assignment's centres).

    Each point keeps a lower bound on its distance to the closest centre; after an iteration it is
    lowered by the recomputed rows of the changed clusters only, and a point is rescanned (over
    its ``k`` distances) only when the bound falls below its distance to its own centre, so late
    iterations, where few points move, cost a few ``[M]`` operations per changed cluster.
    """
    r, m = st.labels.shape
    dist = _dist_rows(space, st, torch.arange(r * k, device=st.labels.device), wk.mat)
    dv = dist.view(r, k, m)
    # after every full recomputation the bound is the exact minimum and its place is known
    bound, closest = dv.min(1)                                            # [R, M]
    active = torch.ones(r, dtype=torch.bool, device=bound.device)
    prev = _costs(space, st, k) if tol > 0 else None
    for _ in range(1, max_iter):
        own = dv.gather(1, st.labels[:, None, :])[:, 0]
        rr, jj = torch.nonzero((bound < own - space.res) & active[:, None], as_tuple=True)
        if rr.numel() == 0:
            break
        if closest is not None:
            best, new = bound[rr, jj], closest[rr, jj]
        else:
            best, new = _column_min(dv, rr, jj)
            bound[rr, jj] = best
        mv = best < own[rr, jj] - space.res
        rr, jj, new = rr[mv], jj[mv], new[mv]
        if rr.numel() == 0:
            break
        # a cluster left without members gets refilled (as Lloyd's repair always did)
        delta = torch.zeros_like(st.count).index_add_(0, rr * k + new, torch.ones_like(rr))
        delta.index_add_(0, rr * k + st.labels[rr, jj], torch.ones_like(rr), alpha=-1)
        empty = (st.count + delta).view(r, k).eq(0).any(1)
        if bool(empty.any()):
            rr, jj, new = _refill(space, st, dv, k, rr, jj, new, empty)
        changed = _move(space, st, rr, jj, new, k, wk.tmp)
        if 2 * changed.shape[0] > r * k:   # most rows changed: recompute them all in place
            _dist_rows(space, st, torch.arange(r * k, device=changed.device), wk.mat)
            bound, closest = dv.min(1)
        else:
            rows = _dist_rows(space, st, changed, wk.rows)
            dist.index_copy_(0, changed, rows)
            bound, closest = _lower(bound, rows, changed // k), None
        if prev is not None:
            cost = _costs(space, st, k)
            active &= ~(prev - cost <= tol * prev)
            prev = cost
            if not bool(active.any()):
                break


def _refill(space: _Space, st: _State, dv: Tensor, k: int, rr: Tensor, jj: Tensor, new: Tensor,
            empty: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The moves ``(rr, jj, new)`` with :func:`_fill_empty` applied to the restarts ``empty``."""
    out = []
    for i in range(st.labels.shape[0]):
        sel = rr == i
        if not bool(empty[i]):
            out.append((rr[sel], jj[sel], new[sel]))
            continue
        lab = st.labels[i].clone()
        lab[jj[sel]] = new[sel]
        lab = _fill_empty(lab, dv[i], space.w, k)
        j = torch.nonzero(lab != st.labels[i]).flatten()
        out.append((torch.full_like(j, i), j, lab[j]))
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]), torch.cat([o[2] for o in out])


def _batch_change(space: _Space, st: _State, src: Tensor, dst: Tensor, j: Tensor,
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Exact cost change of moving the points ``j`` from rows ``src`` to rows ``dst`` together.

    For a cluster with old weight :math:`W`, centre :math:`\mu`, incoming set :math:`I` and
    outgoing set :math:`O`, the cost changes by
    :math:`\sum_I s_i\lVert x_i-\mu\rVert^2 - \sum_O s_o\lVert x_o-\mu\rVert^2 - \lVert v\rVert^2/W'`
    with :math:`v = \sum_I s_i(x_i-\mu) - \sum_O s_o(x_o-\mu)` and :math:`W' = W + s(I) - s(O)`
    (the new centre is :math:`\mu + v/W'`).  Returns the touched rows, their changes, the
    inverse index of ``cat([src, dst])`` into them, and how many moves touch each.
    """
    n = j.shape[0]
    touched, inv = torch.unique(torch.cat([src, dst]), return_inverse=True)
    inv_s, inv_d = inv[:n], inv[n:]
    nt = touched.shape[0]
    wt = st.weight[touched]
    wj, xw = space.w[j], space.xw[j]
    z = torch.zeros(nt, dtype=xw.dtype, device=xw.device)
    dw = z.clone().index_add_(0, inv_d, wj).index_add_(0, inv_s, wj, alpha=-1)
    v = torch.zeros(nt, xw.shape[1], dtype=xw.dtype, device=xw.device)
    v.index_add_(0, inv_d, xw).index_add_(0, inv_s, xw, alpha=-1)
    v.sub_(st.sums[touched] * (dw / wt)[:, None])
    lin = z.clone().index_add_(0, inv_d, wj * _pair_dist(space, st, dst, j))
    lin.index_add_(0, inv_s, wj * _pair_dist(space, st, src, j), alpha=-1)
    change = lin - (v * v).sum(1) / (wt + dw)
    return touched, change, inv, torch.bincount(inv, minlength=nt)


def _rank_in_group(keys: Tensor) -> Tensor:
    """Position of every entry among the earlier entries with the same key (0 for the first)."""
    n = keys.shape[0]
    pos = torch.arange(n, device=keys.device)
    order = torch.argsort(keys, stable=True)
    first = torch.ones(n, dtype=torch.bool, device=keys.device)
    first[1:] = keys[order][1:] != keys[order][:-1]
    rank = torch.empty_like(pos)
    rank[order] = pos - torch.cummax(torch.where(first, pos, 0), 0).values
    return rank


def _group_cumsum(keys: Tensor, values: Tensor) -> Tensor:
    """Running sums of ``values`` over the earlier-or-same entries with the same key."""
    order = torch.argsort(keys, stable=True)
    k_s, c = keys[order], torch.cumsum(values[order], 0)
    n = keys.shape[0]
    first = torch.ones(n, dtype=torch.bool, device=keys.device)
    first[1:] = k_s[1:] != k_s[:-1]
    start = torch.cummax(torch.where(first, torch.arange(n, device=keys.device), 0), 0).values
    out = torch.empty_like(c)
    out[order] = c - c[start] + values[order][start]
    return out


def _select(space: _Space, st: _State, k: int, r: Tensor, src: Tensor, dst: Tensor, j: Tensor,
            gain: Tensor, pred: Tensor) -> Tensor:
    """Choose, among candidate moves sorted by gain, a set that lowers every restart's cost.

    A cluster takes in its best candidate and further ones while their weight stays within
    ``_INFLOW`` of its own (points arriving together at a light cluster interfere most), and gives
    away at most ``count - 1``.  The exact joint change of that batch (:func:`_batch_change`) is
    checked per restart; where it lowers the cost less than the restart's best single move would,
    every cluster whose exact change is worse than its moves' predicted changes ``pred``
    (``[2, n]``: at the source, at the destination) keeps only its best move, and the batch is
    checked again (``_VERIFY_STEPS`` times), before it falls back to moves that share no cluster,
    whose gains add up exactly.  Returns the indices of the chosen moves.
    """
    nr, n = st.labels.shape[0], j.shape[0]
    w = space.w[j]
    pos = torch.arange(n, device=j.device)
    live = (_rank_in_group(dst) == 0) | (_group_cumsum(dst, w) <= _INFLOW * st.weight[dst])
    idx = torch.nonzero(live).flatten()
    idx = idx[_rank_in_group(src[idx]) < st.count[src[idx]] - 1]
    top = torch.zeros(nr, dtype=gain.dtype, device=gain.device).scatter_reduce_(0, r, gain, "amax")
    chosen = []
    for _ in range(_VERIFY_STEPS):
        if idx.numel() == 0:
            break
        touched, change, inv, mult = _batch_change(space, st, src[idx], dst[idx], j[idx])
        ok = -torch.zeros_like(top).index_add_(0, touched // k, change) >= top * (1.0 - 1e-6)
        okm = ok[r[idx]]
        chosen.append(idx[okm])
        if bool(okm.all()):
            return torch.cat(chosen)
        # a failing restart keeps, where its moves interfere for the worse, the best move only
        m = idx.shape[0]
        excess = change - torch.zeros_like(change).index_add_(0, inv, pred[:, idx].reshape(-1))
        slack = torch.zeros_like(change).index_add_(0, inv, (2.0 * space.res) * w[idx].repeat(2))
        bad = (excess > slack) & (mult > 1) & ~ok[touched // k]
        best = torch.full_like(mult, n).scatter_reduce_(0, inv, pos[idx].repeat(2), "amin")
        ib = torch.stack([inv[:m], inv[m:]])
        idx = idx[(~bad[ib] | (best[ib] == pos[idx])).all(0) & ~okm]
    used: set = set()
    pick = []
    for i, s, d in zip(idx.tolist(), src[idx].tolist(), dst[idx].tolist()):
        if s not in used and d not in used:
            used.update((s, d))
            pick.append(i)
    chosen.append(torch.tensor(pick, dtype=torch.long, device=j.device))
    return torch.cat(chosen)


def _hartigan(space: _Space, st: _State, wk: _Work, k: int, max_rounds: int) -> int:
    r"""Batched Hartigan refinement (Hartigan & Wong 1979) of ``R`` clusterings side by side, until
    no single-point move lowers a cost.

    Moving point :math:`x` (weight :math:`w`) from cluster :math:`a` to :math:`b` lowers the cost by
    :math:`\frac{w W_a}{W_a - w}\lVert x-\mu_a\rVert^2 - \frac{w W_b}{W_b + w}\lVert x-\mu_b\rVert^2`
    (the centres move).  Every round evaluates this gain for all points at once and applies a set
    of improving moves that provably lowers the cost (:func:`_select`).  Each point keeps its
    cheapest destination and a lower bound on its cost; only the clusters changed by the last
    round update them.  A point whose bound allows a gain but is no longer exact is rescanned over
    its ``k`` clusters (at most ``_RESCAN`` per restart and round, largest possible gain first).
    Stops at Hartigan-stable clusterings (no single move lowers a cost beyond rounding); returns
    the rounds run.
    """
    r, m = st.labels.shape
    w = space.w
    tiny = torch.finfo(w.dtype).tiny
    lab = st.labels                                    # moves update it in place
    add = _add_rows(space, st, torch.arange(r * k, device=w.device), wk.mat, wk.tmp)  # own masked:
    av = add.view(r, k, m)
    av.scatter_(1, lab[:, None, :], float("inf"))
    own = _pair_dist(space, st, (lab + k * torch.arange(r, device=w.device)[:, None]).reshape(-1),
                     torch.arange(m, device=w.device).repeat(r)).view(r, m)   # [R, M] own distance
    bound, best = av.min(1)                            # [R, M] cheapest destination of every point
    exact = torch.ones_like(lab, dtype=torch.bool)     # bound is the true minimum, best its place
    hit = torch.zeros(r * k, dtype=torch.bool, device=w.device)
    where = torch.zeros(r * k, dtype=torch.long, device=w.device)
    for rnd in range(max_rounds):
        w_own = st.weight.view(r, k).gather(1, lab)
        factor = w_own / (w_own - w).clamp_min(tiny)
        rem = own * factor
        thr = (4.0 * space.res) * w * (1.0 + factor)
        pre = (w * (rem - bound) > thr) & (st.count.view(r, k).gather(1, lab) > 1)
        sr, sj = torch.nonzero(pre & ~exact, as_tuple=True)
        if sr.numel():
            if sr.numel() > _RESCAN:  # the most promising first, the rest in later rounds
                o = torch.argsort(w[sj] * (rem[sr, sj] - bound[sr, sj]), descending=True, stable=True)
                sr, sj = sr[o], sj[o]
                keep = _rank_in_group(sr) < _RESCAN
                sr, sj = sr[keep], sj[keep]
            bound[sr, sj], best[sr, sj] = av[sr, :, sj].min(1)
            exact[sr, sj] = True
            pre &= w * (rem - bound) > thr
        rr, jj = torch.nonzero(pre & exact, as_tuple=True)
        if rr.numel() == 0:
            if sr.numel() == 0:
                return rnd
            continue
        gain = w[jj] * (rem[rr, jj] - bound[rr, jj])
        order = torch.argsort(gain, descending=True, stable=True)
        rr, jj, gain = rr[order], jj[order], gain[order]
        new = best[rr, jj]
        dst = rr * k + new
        pred = torch.stack([-w[jj] * rem[rr, jj], w[jj] * add[dst, jj]])               # [2, n]
        sel = _select(space, st, k, rr, rr * k + lab[rr, jj], dst, jj, gain, pred)
        changed = _move(space, st, rr[sel], jj[sel], new[sel], k, wk.tmp)
        hit.zero_()[changed] = True
        where[changed] = torch.arange(changed.shape[0], device=w.device)
        # the changed clusters' rows, their members' own distances and masks
        rows = _add_rows(space, st, changed, wk.rows, wk.tmp)
        pr, pj = torch.nonzero(hit.view(r, k).gather(1, lab), as_tuple=True)
        prow = pr * k + lab[pr, pj]
        own[pr, pj] = _pair_dist(space, st, prow, pj)
        rows[where[prow], pj] = float("inf")
        add.index_copy_(0, changed, rows)
        # the bounds the changed rows lower (exact then) or invalidate
        rid = changed // k
        lowered = _lower(bound, rows, rid)
        low = lowered < bound
        n = rid.shape[0]
        target = torch.index_select(torch.where(low, lowered, -float("inf")), 0, rid, out=wk.tmp[:n])
        hs, hj = torch.nonzero(torch.eq(rows, target, out=wk.flags[:n]), as_tuple=True)
        best[rid[hs], hj] = changed[hs] - rid[hs] * k
        bound = lowered
        exact = (exact & ~hit.view(r, k).gather(1, best)) | low
    logger.debug("Hartigan refinement stopped after %d rounds", max_rounds)
    return max_rounds


def _exact_costs(space: _Space, labels: Tensor, k: int) -> Tensor:
    """``[R]`` weighted costs of the clusterings ``labels``, centres and residuals from scratch."""
    x, w = space.x, space.w
    res = torch.empty_like(x)
    out = []
    for lab in labels:
        mu = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, lab, space.xw)
        wt = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, lab, w)
        mu /= wt.clamp_min(torch.finfo(x.dtype).tiny)[:, None]
        torch.index_select(mu, 0, lab, out=res).sub_(x).square_()
        out.append(res.sum(1) @ w)
    return torch.stack(out)


def kmeans_memory(m: int, dims: int, k: int) -> int:
    """Bytes :func:`weighted_kmeans` holds for ``m`` float32 points of ``dims`` coordinates and
    ``k`` clusters: the points and their weighted copy, the weighted Gram matrix when it fits
    ``_GRAM_BYTES``, one batch of restarts' scratch rows (``[R * k, M]``) and centres."""
    f32 = 4
    gram = m * m * f32 if m * m * f32 <= _GRAM_BYTES else 0
    per_run = (4 * f32 + 1) * k * m
    runs = min(_CPU_BATCH, max(1, _BATCH_BYTES // per_run))
    return 3 * m * dims * f32 + gram + runs * per_run + runs * k * dims * f32 * 2


@phase("grouping")
def weighted_kmeans(points: ArrayLike, weights: ArrayLike, k: int, *, init: Optional[ArrayLike] = None,
                    n_init: int = 10, max_iter: int = 300, tol: float = 0.0, seed: int = 0,
                    refine: bool = True) -> Tuple[ArrayLike, ArrayLike, float]:
    r"""Importance-weighted K-means (k-means++ seeding, Lloyd, batched Hartigan refinement).

    Minimises :math:`\sum_j s_j \lVert x_j - \mu_{c(j)}\rVert^2` (squared Euclidean, paper
    Eq. 3-4), :math:`\mu_c = \sum_{j\in c} s_j x_j / W_c`, :math:`W_c = \sum_{j \in c} s_j`.

    * **Seeding** (each of ``n_init`` restarts, all side by side): greedy weighted k-means++, see
      :func:`_kmeanspp`.
    * **Lloyd**: assign every point to its closest centre, recompute the centres, until no
      assignment changes (or ``max_iter``, or a relative improvement below ``tol``).  An empty
      cluster gets the point that contributes most to the cost among clusters with more than one
      member.  Distances use
      :math:`\lVert x_j-\mu_c\rVert^2 = \lVert x_j\rVert^2 - 2\langle x_j, S_c\rangle/W_c +
      \lVert S_c\rVert^2/W_c^2` with :math:`S_c = W_c\mu_c`; with the Gram matrix
      :math:`\langle x_i, x_j\rangle` (when it fits in ``_GRAM_BYTES``) a point that changes
      cluster updates :math:`\langle x_\cdot, S_c\rangle` of its two clusters by one ``[M]`` row,
      and only changed clusters' distances are recomputed.
    * **Refinement** (``refine``): Hartigan's single-point moves, whose gain accounts for the
      centres moving, computed for all points at once; each round applies a set of moves whose
      exact joint cost change is negative (:func:`_hartigan`, :func:`_select`), until no single
      move lowers the cost.  A local search in the spirit of Kanungo et al. 2002, which the
      paper's approximation guarantee refers to; it never raises a restart's cost, so a refined
      result is never worse than the plain Lloyd one (``refine=False``).

    Runs in torch on the device and in the dtype of ``points`` (numpy inputs run on the CPU in
    float64 and give numpy outputs; float16/bfloat16 run in float32).  Seeds come from a CPU
    ``torch.Generator``, so a given seed draws the same uniforms on every device.

    Speed, measured with ``benchmarks/kmeans_speed.py`` on a 2-core CPU, one torch/BLAS thread,
    ``M = 2048`` ReLU neurons of 8 random MLPs in ``D = 400``, ``k = 256``, ``n_init = 10``: 1.4 s
    (0.7 s with ``refine=False``; 1.0 s and 0.4 s on two threads), where the previous
    implementation, with Python loops over the k-means++ steps and over the points of every
    Hartigan pass, took 112 s; ``M = 512``: 0.25 s against 7.3 s.  Most of the time goes to
    the refinement, whose rounds are memory-bound passes over the ``[k, M]`` rows of the
    clusters they change.  scikit-learn's ``KMeans(sample_weight=...)`` is not used on the CPU:
    it took 3.4 s (2.7 s on two threads) for a 6 % higher cost than the refined result (and
    0.2 % higher than ``refine=False``).  The restarts run side by side (``_CPU_BATCH`` of them
    on the CPU, where running them one at a time was no faster; as many as fit in
    ``_BATCH_BYTES`` on a GPU), in scratch tensors allocated once per batch.

    Parameters
    ----------
    points : np.ndarray or Tensor
        ``[M, D]`` points (neurons).
    weights : np.ndarray or Tensor
        ``[M]`` positive weights (importance scores).
    k : int
        Number of clusters, ``1 <= k <= M``.
    init : array, optional
        ``[k, D]`` initial centres (e.g. one base model's neurons): one deterministic run.
    n_init : int
        Restarts from k-means++ seeds when ``init`` is not given; the lowest-cost run is kept.
    max_iter : int
        Lloyd iterations per restart (stops earlier when assignments are stable).
    tol : float
        Also stop when the relative cost improvement falls below ``tol``.
    seed : int
        Seed of the ``torch.Generator`` used for seeding.
    refine : bool
        Run the batched Hartigan refinement after Lloyd's iterations (``False``: plain Lloyd).

    Returns
    -------
    labels : np.ndarray or Tensor
        ``[M]`` cluster of every point; no cluster is empty.
    centres : np.ndarray or Tensor
        ``[k, D]`` weighted centres.
    cost : float
        The weighted squared cost of the returned clustering.
    """
    as_numpy = not isinstance(points, Tensor)
    if as_numpy:
        x = torch.as_tensor(np.asarray(points, dtype=np.float64))
    else:
        x = points if points.dtype in (torch.float32, torch.float64) else points.to(torch.float32)
    w = torch.as_tensor(weights).to(device=x.device, dtype=x.dtype)
    m, dim = x.shape
    if not 1 <= k <= m:
        raise IncompatibleModelsError(
            f"cannot make {k} fused neurons out of {m} base neurons; choose a fused width "
            f"between 1 and {m}"
        )
    if n_init < 1 or max_iter < 1:
        raise ConfigError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
    start: Optional[Tensor] = None
    if init is not None:
        start = torch.as_tensor(init).to(device=x.device, dtype=x.dtype)
        if start.shape != (k, dim):
            raise ConfigError(f"init must have shape [{k}, {dim}], got {list(start.shape)}")
    runs = 1 if start is not None else n_init
    space = _space(x, w, gram=m * m * x.element_size() <= _GRAM_BYTES)
    if start is not None:
        c = start - space.shift
        seeds = None
    else:
        gen = torch.Generator().manual_seed(int(seed))
        u = torch.rand(runs, k, 2 + int(np.log(k)), generator=gen, dtype=torch.float64)
        seeds = _kmeanspp(space, k, u.to(device=x.device, dtype=x.dtype))
    per_run = (4 * x.element_size() + 1) * k * m
    batch = max(1, _BATCH_BYTES // per_run)
    if x.device.type == "cpu":
        batch = min(batch, _CPU_BATCH)
    best: Optional[Tuple[float, Tensor]] = None
    for lo in range(0, runs, batch):
        nr = 1 if seeds is None else seeds[lo:lo + batch].shape[0]
        wk = _work(nr * k, m, x)
        if seeds is None:
            dist0 = (space.p2[None, :] + (c * c).sum(1)[:, None] - 2.0 * c @ space.x.T).clamp_min_(0.0)
        else:  # into the scratch space Lloyd's distances will fill
            dist0 = _point_dist(space, seeds[lo:lo + batch].reshape(-1), out=wk.mat[:nr * k])
        labels = dist0.view(nr, k, m).argmin(1)
        labels = torch.stack([_fill_empty(lab, d, w, k) for lab, d in zip(labels, dist0.view(nr, k, m))])
        del dist0
        st = _build(space, labels, k)
        _lloyd(space, st, wk, k, max_iter, tol)
        # in float64 the running sums rank the restarts well enough; the final cost is exact
        exact = x.dtype != torch.float64
        costs = _exact_costs(space, st.labels, k) if exact else _costs(space, st, k)
        if refine:
            plain = st.labels.clone()
            if exact:  # drop the rounding the incremental updates gathered
                st = _build(space, plain, k)
            rounds = _hartigan(space, st, wk, k, max(100, 4 * m))
            refined = _exact_costs(space, st.labels, k) if exact else _costs(space, st, k)
            logger.debug("k-means refinement of restarts %d-%d: %d rounds", lo, lo + nr - 1, rounds)
            keep = refined <= costs            # always, up to rounding
            st.labels = torch.where(keep[:, None], st.labels, plain)
            costs = torch.where(keep, refined, costs)
        i = int(costs.argmin())
        if best is None or float(costs[i]) < best[0]:
            best = (float(costs[i]), st.labels[i].clone())
        del st, wk
    assert best is not None
    labels = best[1]
    cost = float(_exact_costs(space, labels[None], k)[0])
    centres = _torch_centroids(x, w, labels, k)
    if as_numpy:
        return labels.cpu().numpy(), centres.cpu().numpy(), cost
    if points.dtype.is_floating_point:
        centres = centres.to(points.dtype)
    return labels, centres, cost


def kmeans_grouping(points: ArrayLike, weights: np.ndarray, k: int, *, n_init: int = 10,
                    max_iter: int = 300, seed: int = 0, refine: bool = True) -> Grouping:
    """K-means Fusion grouping (paper section 4.3.1(b)): any number of models, any widths.

    ``points`` may be a numpy array (CPU, float64) or a Tensor (K-means runs on its device and
    in its dtype); ``weights`` are the neurons' importance scores.  See :func:`weighted_kmeans`.
    """
    w = np.asarray(weights, dtype=np.float64)
    pts_w = torch.as_tensor(w).to(points.device, points.dtype) if isinstance(points, Tensor) else w
    labels, _, _ = weighted_kmeans(points, pts_w, k, n_init=n_init, max_iter=max_iter, seed=seed,
                                   refine=refine)
    if isinstance(labels, Tensor):
        labels = labels.cpu().numpy()
    return Grouping(np.asarray(labels, dtype=np.int64), k, w.copy())
