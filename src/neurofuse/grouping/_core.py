r"""Grouping algorithms: Hungarian matching, importance-weighted K-means, identity.

Neurons are points: neuron :math:`j` is the vector :math:`f_j` of the values it takes on the fusion
set (for the linear methods, its projection onto the image of the fused model's previous level,
written in a basis of that image).  A grouping assigns every base neuron to one of :math:`K` fused
neurons; the importance-weighted squared grouping error (paper Eq. 4) is

.. math::  \sum_j s_j \,\lVert f_j - t_{c(j)} \rVert_2^2, \qquad
           t_c = \frac{\sum_{j \in c} s_j f_j}{\sum_{j \in c} s_j}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..errors import ConfigError, IncompatibleModelsError

ArrayLike = Union[np.ndarray, Tensor]

__all__ = [
    "Grouping",
    "centroids",
    "hungarian_grouping",
    "identity_grouping",
    "kmeans_grouping",
    "weighted_kmeans",
]


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


def centroids(points: np.ndarray, weights: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Weighted centres ``[k, D]`` of ``points`` ``[M, D]``; an empty cluster gets zeros."""
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


def hungarian_grouping(points: np.ndarray, weights: np.ndarray, widths: Sequence[int]) -> Grouping:
    r"""Optimal one-to-one matching of two equal-width models (Hungarian Fusion, appendix B.1).

    The cost of pairing neuron :math:`i` of model 0 with neuron :math:`j` of model 1 is their
    grouping error around the weighted centre,
    :math:`\frac{s_i s_j}{s_i + s_j}\lVert f_i - f_j\rVert^2`, and
    ``scipy.optimize.linear_sum_assignment`` minimises its sum exactly (Kuhn 1955).
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
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    sq = np.maximum(sq, 0.0)
    cost = (sa[:, None] * sb[None, :]) / (sa[:, None] + sb[None, :]) * sq
    rows, cols = linear_sum_assignment(cost)
    labels = np.empty(n0 + n1, dtype=np.int64)
    labels[rows] = rows
    labels[n0 + cols] = rows
    return Grouping(labels, n0, weights.copy())


def _sq_dist(points: Tensor, centres: Tensor, p2: Tensor) -> Tensor:
    d = p2[:, None] + (centres * centres).sum(1)[None, :] - 2.0 * points @ centres.T
    return d.clamp_min(0.0)


def _torch_centroids(points: Tensor, weights: Tensor, labels: Tensor, k: int) -> Tensor:
    num = torch.zeros(k, points.shape[1], dtype=points.dtype, device=points.device)
    num.index_add_(0, labels, points * weights[:, None])
    den = torch.zeros(k, dtype=points.dtype, device=points.device).index_add_(0, labels, weights)
    return num / den.clamp_min(1e-300)[:, None]


def _kmeanspp(points: Tensor, weights: Tensor, k: int, p2: Tensor, gen: torch.Generator) -> Tensor:
    """Greedy weighted k-means++ seeding (Arthur & Vassilvitskii 2007).

    Each new centre is drawn with probability proportional to ``weight * D^2`` (D the distance to
    the closest centre so far); ``2 + log(k)`` candidates are drawn per step and the one that lowers
    the weighted potential most is kept.
    """
    m = points.shape[0]
    trials = 2 + int(np.log(k))

    def draw(prob: Tensor, n: int) -> Tensor:
        prob = prob.double().cpu()
        if not float(prob.sum()) > 0:
            prob = torch.ones_like(prob)
        return torch.multinomial(prob, n, replacement=True, generator=gen).to(points.device)

    first = draw(weights, 1)
    chosen = [first]
    closest = _sq_dist(points, points[first], p2)[:, 0]
    for _ in range(1, k):
        cand = draw(weights * closest, trials)
        d = torch.minimum(closest[None, :], _sq_dist(points[cand], points, p2[cand]))  # [trials, m]
        best = int((d * weights[None, :]).sum(1).argmin())
        chosen.append(cand[best:best + 1])
        closest = d[best]
    return points[torch.cat(chosen)].clone()


def _lloyd(points: Tensor, weights: Tensor, centres: Tensor, p2: Tensor, max_iter: int,
           tol: float) -> Tensor:
    m, k = points.shape[0], centres.shape[0]
    ar = torch.arange(m, device=points.device)
    labels = torch.full((m,), -1, dtype=torch.long, device=points.device)
    prev = float("inf")
    for _ in range(max_iter):
        d = _sq_dist(points, centres, p2)
        new = d.argmin(1)
        # empty-cluster repair: move the costliest point of a multi-member cluster
        counts = torch.bincount(new, minlength=k)
        for c in torch.nonzero(counts == 0).flatten().tolist():
            contrib = weights * d[ar, new]
            contrib[counts[new] <= 1] = -1.0
            j = int(contrib.argmax())
            counts[new[j]] -= 1
            new[j] = c
            counts[c] += 1
        centres = _torch_centroids(points, weights, new, k)
        cost = float((weights * _sq_dist(points, centres, p2)[ar, new]).sum())
        stable = bool(torch.equal(new, labels))
        labels = new
        if stable or (tol > 0 and prev - cost <= tol * prev):
            break
        prev = cost
    return labels


def _hartigan(points: Tensor, weights: Tensor, labels: Tensor, k: int, p2: Tensor,
              max_passes: int = 10) -> Tensor:
    r"""Single-point moves that lower the weighted cost (Hartigan & Wong 1979), after Lloyd.

    Moving point :math:`x` (weight :math:`w`) from cluster :math:`a` to :math:`b` changes the cost by
    :math:`\frac{w W_b}{W_b + w}\lVert x-\mu_b\rVert^2 - \frac{w W_a}{W_a - w}\lVert x-\mu_a\rVert^2`,
    with :math:`W` the clusters' total weights, so a Lloyd fixed point that admits an improving move
    is left for a strictly better clustering.  The point-to-centre distances are computed once and
    only the two changed columns are refreshed after a move.
    """
    labels = labels.clone()
    mu = _torch_centroids(points, weights, labels, k)
    big_w = torch.zeros(k, dtype=points.dtype, device=points.device).index_add_(0, labels, weights)
    count = torch.bincount(labels, minlength=k)
    d = _sq_dist(points, mu, p2)
    lab, cnt = labels.tolist(), count.tolist()
    for _ in range(max_passes):
        moved = False
        for j in range(points.shape[0]):
            a = lab[j]
            if cnt[a] <= 1:
                continue
            w = weights[j]
            remove = w * big_w[a] / (big_w[a] - w) * d[j, a]
            add = w * big_w / (big_w + w) * d[j]
            add[a] = float("inf")
            b = int(add.argmin())
            if float(add[b]) < float(remove) * (1 - 1e-12):
                x = points[j]
                mu[a] = (mu[a] * big_w[a] - w * x) / (big_w[a] - w)
                mu[b] = (mu[b] * big_w[b] + w * x) / (big_w[b] + w)
                big_w[a] -= w
                big_w[b] += w
                cnt[a] -= 1
                cnt[b] += 1
                lab[j] = b
                d[:, [a, b]] = _sq_dist(points, mu[[a, b]], p2)
                moved = True
        if not moved:
            break
    return torch.tensor(lab, dtype=torch.long, device=points.device)


def weighted_kmeans(points: ArrayLike, weights: ArrayLike, k: int, *, init: Optional[ArrayLike] = None,
                    n_init: int = 10, max_iter: int = 300, tol: float = 0.0, seed: int = 0,
                    refine: bool = True) -> Tuple[ArrayLike, ArrayLike, float]:
    r"""Importance-weighted K-means (Lloyd with k-means++ seeding, restarts, Hartigan moves).

    Minimises :math:`\sum_j s_j \lVert x_j - \mu_{c(j)}\rVert^2` (squared Euclidean, paper
    Eq. 3-4).  An empty cluster is repaired by moving into it the point that contributes most to
    the cost among clusters with more than one member.  With ``refine`` each Lloyd solution is
    improved by Hartigan single-point moves (a local search in the spirit of Kanungo et al. 2002,
    which the paper's approximation guarantee refers to).  Runs in torch on the device of
    ``points`` (numpy inputs run on the CPU in float64 and give numpy outputs).

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
        Run Hartigan single-point moves after Lloyd's iterations.

    Returns
    -------
    labels : np.ndarray or Tensor
        ``[M]`` cluster of every point.
    centres : np.ndarray or Tensor
        ``[k, D]`` weighted centres.
    cost : float
        The weighted squared cost of the returned clustering.
    """
    as_numpy = not isinstance(points, Tensor)
    x = torch.as_tensor(np.asarray(points, dtype=np.float64)) if as_numpy else points
    w = torch.as_tensor(weights).to(device=x.device, dtype=x.dtype)
    m = x.shape[0]
    if not 1 <= k <= m:
        raise IncompatibleModelsError(
            f"cannot make {k} fused neurons out of {m} base neurons; choose a fused width "
            f"between 1 and {m}"
        )
    if n_init < 1 or max_iter < 1:
        raise ConfigError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
    gen = torch.Generator().manual_seed(int(seed))
    p2 = (x * x).sum(1)
    ar = torch.arange(m, device=x.device)
    best: Optional[Tuple[Tensor, Tensor, float]] = None
    for _ in range(1 if init is not None else n_init):
        if init is not None:
            start = torch.as_tensor(init).to(device=x.device, dtype=x.dtype).clone()
            if start.shape != (k, x.shape[1]):
                raise ConfigError(f"init must have shape [{k}, {x.shape[1]}], got {list(start.shape)}")
        else:
            start = _kmeanspp(x, w, k, p2, gen)
        labels = _lloyd(x, w, start, p2, max_iter, tol)
        if refine:
            labels = _hartigan(x, w, labels, k, p2)
        centres = _torch_centroids(x, w, labels, k)
        cost = float((w * _sq_dist(x, centres, p2)[ar, labels]).sum())
        if best is None or cost < best[2]:
            best = (labels, centres, cost)
    assert best is not None
    labels, centres, cost = best
    if as_numpy:
        return labels.cpu().numpy(), centres.cpu().numpy(), cost
    return labels, centres, cost


def kmeans_grouping(points: np.ndarray, weights: np.ndarray, k: int, *, n_init: int = 10,
                    max_iter: int = 300, seed: int = 0) -> Grouping:
    """K-means Fusion grouping (paper section 4.3.1(b)): any number of models, any widths."""
    labels, _, _ = weighted_kmeans(points, weights, k, n_init=n_init, max_iter=max_iter, seed=seed)
    return Grouping(labels.astype(np.int64), k, weights.copy())
