r"""The decomposition of the representation cost (paper Theorem 1).

For base neuron outputs :math:`a_j` with importance :math:`s_j`, an assignment :math:`c(j)` and fused
outputs :math:`F_c`, with :math:`t_c` the importance-weighted mean of the neurons of cluster
:math:`c` and :math:`S_c = \sum_{j\in c} s_j`:

.. math::
    \underbrace{\sum_j s_j \lVert a_j - F_{c(j)}\rVert^2}_{\text{representation cost}}
    = \underbrace{\sum_j s_j \lVert a_j - t_{c(j)}\rVert^2}_{\text{grouping error}}
    + \underbrace{\sum_c S_c \lVert t_c - F_c\rVert^2}_{\text{approximation error}}

Columns are neurons: ``A`` is ``[samples, M]`` and ``F`` is ``[samples, K]``.
"""

from __future__ import annotations

import numpy as np

from ._core import centroids

__all__ = ["approximation_error", "grouping_error", "representation_cost"]


def _targets(a: np.ndarray, s: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    return centroids(a.T, s, labels, k).T


def grouping_error(a: np.ndarray, s: np.ndarray, labels: np.ndarray, k: int) -> float:
    """:math:`\\sum_j s_j \\lVert a_j - t_{c(j)}\\rVert^2`."""
    t = _targets(a, s, labels, k)
    return float((s * ((a - t[:, labels]) ** 2).sum(0)).sum())


def approximation_error(f: np.ndarray, a: np.ndarray, s: np.ndarray, labels: np.ndarray,
                        k: int) -> float:
    """:math:`\\sum_c S_c \\lVert t_c - F_c\\rVert^2`."""
    t = _targets(a, s, labels, k)
    big_s = np.bincount(labels, weights=s, minlength=k)
    return float((big_s * ((t - f) ** 2).sum(0)).sum())


def representation_cost(f: np.ndarray, a: np.ndarray, s: np.ndarray, labels: np.ndarray) -> float:
    """:math:`\\sum_j s_j \\lVert a_j - F_{c(j)}\\rVert^2` (paper Eq. 3 for a fixed assignment)."""
    return float((s * ((a - f[:, labels]) ** 2).sum(0)).sum())
