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
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import ConfigError, IncompatibleModelsError

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


def _sq_dist(points: np.ndarray, centres: np.ndarray, p2: np.ndarray) -> np.ndarray:
    d = p2[:, None] + (centres * centres).sum(1)[None, :] - 2.0 * points @ centres.T
    return np.maximum(d, 0.0)


def _kmeanspp(points: np.ndarray, weights: np.ndarray, k: int, p2: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """Greedy weighted k-means++ seeding (Arthur & Vassilvitskii 2007).

    Each new centre is drawn with probability proportional to ``weight * D^2`` (D the distance to
    the closest centre so far); ``2 + log(k)`` candidates are drawn per step and the one that lowers
    the weighted potential most is kept.
    """
    m = points.shape[0]
    trials = 2 + int(np.log(k))
    first = rng.choice(m, p=weights / weights.sum())
    centres = [first]
    closest = _sq_dist(points, points[first:first + 1], p2)[:, 0]
    for _ in range(1, k):
        prob = weights * closest
        total = prob.sum()
        if total > 0:
            cand = rng.choice(m, size=trials, p=prob / total)
        else:
            cand = rng.integers(m, size=trials)
        d = np.minimum(closest[None, :], _sq_dist(points[cand], points, p2[cand]))  # [trials, m]
        best = int((d * weights[None, :]).sum(1).argmin())
        centres.append(int(cand[best]))
        closest = d[best]
    return points[np.array(centres)].copy()


def _hartigan(points: np.ndarray, weights: np.ndarray, labels: np.ndarray, k: int,
              max_passes: int = 10) -> np.ndarray:
    r"""Single-point moves that lower the weighted cost (Hartigan & Wong 1979), after Lloyd.

    Moving point :math:`x` (weight :math:`w`) from cluster :math:`a` to :math:`b` changes the cost by
    :math:`\frac{w W_b}{W_b + w}\lVert x-\mu_b\rVert^2 - \frac{w W_a}{W_a - w}\lVert x-\mu_a\rVert^2`,
    with :math:`W` the clusters' total weights; every Lloyd fixed point that admits an improving move
    is left for a strictly better clustering.
    """
    labels = labels.copy()
    mu = centroids(points, weights, labels, k)
    big_w = np.bincount(labels, weights=weights, minlength=k)
    count = np.bincount(labels, minlength=k)
    for _ in range(max_passes):
        moved = False
        for j in range(points.shape[0]):
            a, w, x = labels[j], weights[j], points[j]
            if count[a] <= 1:
                continue
            d = ((mu - x) ** 2).sum(1)
            remove = w * big_w[a] / (big_w[a] - w) * d[a]
            add = w * big_w / (big_w + w) * d
            add[a] = np.inf
            b = int(add.argmin())
            if add[b] < remove * (1 - 1e-12):
                mu[a] = (mu[a] * big_w[a] - w * x) / (big_w[a] - w)
                mu[b] = (mu[b] * big_w[b] + w * x) / (big_w[b] + w)
                big_w[a] -= w
                big_w[b] += w
                count[a] -= 1
                count[b] += 1
                labels[j] = b
                moved = True
        if not moved:
            break
    return labels


def weighted_kmeans(points: np.ndarray, weights: np.ndarray, k: int, *, n_init: int = 10,
                    max_iter: int = 300, tol: float = 0.0, seed: int = 0, refine: bool = True):
    r"""Importance-weighted K-means (Lloyd with k-means++ seeding, several restarts).

    Minimises :math:`\sum_j s_j \lVert x_j - \mu_{c(j)}\rVert^2` (squared Euclidean, paper
    Eq. 3-4).  An empty cluster is repaired by moving into it the point that contributes most to
    the cost among clusters with more than one member.  With ``refine`` each Lloyd solution is
    improved by Hartigan single-point moves (a local search in the spirit of Kanungo et al. 2002,
    which the paper's approximation guarantee refers to).

    Parameters
    ----------
    points : np.ndarray
        ``[M, D]`` points (neurons).
    weights : np.ndarray
        ``[M]`` positive weights (importance scores).
    k : int
        Number of clusters, ``1 <= k <= M``.
    n_init : int
        Restarts; the lowest-cost run is kept.
    max_iter : int
        Lloyd iterations per restart (stops earlier when assignments are stable).
    tol : float
        Stop when the relative cost improvement falls below ``tol``.
    seed : int
        Seed of the ``numpy.random.Generator`` used for seeding.
    refine : bool
        Run Hartigan single-point moves after Lloyd's iterations.

    Returns
    -------
    labels : np.ndarray
        ``[M]`` cluster of every point.
    centres : np.ndarray
        ``[k, D]`` weighted centres.
    cost : float
        The weighted squared cost of the returned clustering.
    """
    points = np.asarray(points, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    m = points.shape[0]
    if not 1 <= k <= m:
        raise IncompatibleModelsError(
            f"cannot make {k} fused neurons out of {m} base neurons; choose a fused width "
            f"between 1 and {m}"
        )
    if n_init < 1 or max_iter < 1:
        raise ConfigError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
    rng = np.random.default_rng(seed)
    p2 = (points * points).sum(1)
    best = None
    for _ in range(n_init):
        centres = _kmeanspp(points, weights, k, p2, rng)
        labels = np.full(m, -1)
        prev_cost = np.inf
        for _ in range(max_iter):
            d = _sq_dist(points, centres, p2)
            new = d.argmin(1)
            # empty-cluster repair: move the costliest point of a multi-member cluster
            counts = np.bincount(new, minlength=k)
            for c in np.flatnonzero(counts == 0):
                contrib = weights * d[np.arange(m), new]
                contrib[counts[new] <= 1] = -1.0
                j = int(contrib.argmax())
                counts[new[j]] -= 1
                new[j] = c
                counts[c] += 1
            centres = centroids(points, weights, new, k)
            cost = float((weights * _sq_dist(points, centres, p2)[np.arange(m), new]).sum())
            stable = np.array_equal(new, labels)
            labels = new
            if stable or (tol > 0 and np.isfinite(prev_cost) and prev_cost - cost <= tol * prev_cost):
                break
            prev_cost = cost
        if refine:
            labels = _hartigan(points, weights, labels, k)
            centres = centroids(points, weights, labels, k)
            cost = float((weights * _sq_dist(points, centres, p2)[np.arange(m), labels]).sum())
        if best is None or cost < best[2]:
            best = (labels.copy(), centres.copy(), cost)
    assert best is not None
    return best


def kmeans_grouping(points: np.ndarray, weights: np.ndarray, k: int, *, n_init: int = 10,
                    max_iter: int = 300, seed: int = 0) -> Grouping:
    """K-means Fusion grouping (paper section 4.3.1(b)): any number of models, any widths."""
    labels, _, _ = weighted_kmeans(points, weights, k, n_init=n_init, max_iter=max_iter, seed=seed)
    return Grouping(labels.astype(np.int64), k, weights.copy())
