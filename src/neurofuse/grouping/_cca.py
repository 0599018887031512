r"""CCA alignment: the linear map that writes one model's features in another's basis.

Horoi, Camillo, Eckstein & Wolf, "Harmony in Diversity: Merging Neural Networks with Canonical
Correlation Analysis" (CCA Merge), ICML 2024.

With the covariances :math:`\Sigma_{AA}, \Sigma_{BB}` of two models' features at one neuron
space and their cross-covariance :math:`\Sigma_{AB}` on the fusion set, regularised as
:math:`\Sigma_{AA} + \gamma\,\bar\sigma^2_A I` (:math:`\bar\sigma^2_A` the mean variance), canonical
correlation analysis finds directions :math:`W_A = \Sigma_{AA}^{-1/2} U`,
:math:`W_B = \Sigma_{BB}^{-1/2} V` from the singular value decomposition

.. math:: \Sigma_{AA}^{-1/2}\, \Sigma_{AB}\, \Sigma_{BB}^{-1/2} = U\, \mathrm{diag}(\rho)\, V^\top,

so that the canonical variables :math:`W_A^\top a` and :math:`W_B^\top b` are uncorrelated within
each model and maximally correlated (:math:`\rho`) pair by pair across them.  Identifying
model B's canonical variables with model A's gives the map from B's features to A's basis

.. math:: T = W_A^{-\top} W_B^\top = \Sigma_{AA}^{1/2}\, U V^\top\, \Sigma_{BB}^{-1/2},
          \qquad T^{-1} = \Sigma_{BB}^{1/2}\, V U^\top\, \Sigma_{AA}^{-1/2},

a general invertible matrix instead of a permutation (for a permuted copy, :math:`T` *is* the
permutation).  CCA Merge aligns every layer as :math:`\widetilde W^B = T\, W^B\, T_{\text{prev}}^{-1}`
and averages.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import ConfigError

__all__ = ["cca_alignment", "grouped_cca_alignment"]


def _sym_power(s: np.ndarray, power: float) -> np.ndarray:
    vals, vecs = np.linalg.eigh((s + s.T) / 2)
    vals = np.clip(vals, np.finfo(np.float64).tiny, None)
    return (vecs * vals ** power) @ vecs.T


def cca_alignment(cov: np.ndarray, n_a: int, reg: float = 1e-4, *, constant: Optional[np.ndarray] = None,
                  values: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    r"""The CCA map :math:`T` (``[n_a, n_b]``) from model B's features to model A's, and its inverse.

    Parameters
    ----------
    cov : np.ndarray
        ``[n_a + n_b, n_a + n_b]`` joint covariance of A's features (first ``n_a``) and B's.
    n_a : int
        Number of A's features.
    reg : float
        :math:`\gamma`: each model's covariance gets :math:`\gamma` times its mean variance added
        to the diagonal (features that are constant on the fusion set stay invertible).
    constant : np.ndarray, optional
        ``[n_a + n_b]`` booleans: features that are constant on the data.  Correlations cannot tell
        them apart (each is a multiple of the constant function); when both models have the same
        number of them they are paired by linear assignment on ``|values_A - values_B|`` (a
        permutation block of :math:`T`) and CCA aligns the others.
    values : np.ndarray, optional
        ``[n_a + n_b]`` the value of every feature (its mean), used with ``constant``.

    Returns
    -------
    (np.ndarray, np.ndarray)
        :math:`T` ``[n_a, n_b]`` and :math:`T^{-1}` ``[n_b, n_a]``.

    Raises
    ------
    ConfigError
        If the models have different widths or ``reg`` is not positive.
    """
    cov = np.asarray(cov, dtype=np.float64)
    n_b = cov.shape[0] - n_a
    if n_b != n_a:
        raise ConfigError(f"CCA alignment needs equal widths, got {n_a} and {n_b}")
    if not reg > 0:
        raise ConfigError(f"reg must be positive, got {reg}")
    if constant is not None and values is not None:
        const = np.asarray(constant, dtype=bool)
        ca, cb = np.flatnonzero(const[:n_a]), np.flatnonzero(const[n_a:])
        if 0 < len(ca) == len(cb):
            la, lb = np.flatnonzero(~const[:n_a]), np.flatnonzero(~const[n_a:])
            t, t_inv = np.zeros((n_a, n_b)), np.zeros((n_b, n_a))
            vals = np.asarray(values, dtype=np.float64)
            rows, cols = linear_sum_assignment(np.abs(vals[ca][:, None] - vals[n_a + cb][None, :]))
            t[ca[rows], cb[cols]] = 1.0
            t_inv[cb[cols], ca[rows]] = 1.0
            if len(la):
                idx = np.r_[la, n_a + lb]
                tl, tl_inv = cca_alignment(cov[np.ix_(idx, idx)], len(la), reg)
                t[np.ix_(la, lb)] = tl
                t_inv[np.ix_(lb, la)] = tl_inv
            return t, t_inv
    saa, sbb, sab = cov[:n_a, :n_a], cov[n_a:, n_a:], cov[:n_a, n_a:]
    saa = saa + reg * max(float(np.mean(np.diag(saa))), 1e-12) * np.eye(n_a)
    sbb = sbb + reg * max(float(np.mean(np.diag(sbb))), 1e-12) * np.eye(n_b)
    a_half, a_inv_half = _sym_power(saa, 0.5), _sym_power(saa, -0.5)
    b_half, b_inv_half = _sym_power(sbb, 0.5), _sym_power(sbb, -0.5)
    u, _, vt = np.linalg.svd(a_inv_half @ sab @ b_inv_half)
    rot = u @ vt
    return a_half @ rot @ b_inv_half, b_half @ rot.T @ a_inv_half


def _correlation_sum(cov: np.ndarray, n_a: int, reg: float) -> float:
    """The sum of the canonical correlations of the two blocks of ``cov`` (regularised as in
    :func:`cca_alignment`)."""
    n_b = cov.shape[0] - n_a
    saa, sbb, sab = cov[:n_a, :n_a], cov[n_a:, n_a:], cov[:n_a, n_a:]
    saa = saa + reg * max(float(np.mean(np.diag(saa))), 1e-12) * np.eye(n_a)
    sbb = sbb + reg * max(float(np.mean(np.diag(sbb))), 1e-12) * np.eye(n_b)
    return float(np.linalg.svd(_sym_power(saa, -0.5) @ sab @ _sym_power(sbb, -0.5), compute_uv=False).sum())


def grouped_cca_alignment(cov: np.ndarray, n_a: int, groups: int, reg: float = 1e-4, *,
                          constant: Optional[np.ndarray] = None, values: Optional[np.ndarray] = None,
                          sigma: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    r""":func:`cca_alignment` for a space whose features come in ``groups`` equal contiguous groups
    that must move as units (a GroupNorm's, a grouped convolution's): model B's groups are
    assigned one to one to model A's by the Hungarian algorithm on the sum of the canonical
    correlations of every pair of groups (largest total), unless ``sigma`` gives the assignment
    (``sigma[a]``: B's group matched to A's group ``a``), and :math:`T` is block structured: the
    CCA map of each matched pair in its block.  Returns :math:`T`, :math:`T^{-1}` and ``sigma``.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if n_a % groups or cov.shape[0] != 2 * n_a:
        raise ConfigError(f"CCA alignment of {groups} groups needs equal widths that split into them, "
                          f"got {n_a} and {cov.shape[0] - n_a}")
    d = n_a // groups

    def idx(a: int, b: int) -> np.ndarray:
        return np.r_[a * d:(a + 1) * d, n_a + b * d:n_a + (b + 1) * d]

    if sigma is None:
        score = np.array([[_correlation_sum(cov[np.ix_(idx(a, b), idx(a, b))], d, reg) for b in range(groups)]
                          for a in range(groups)])
        rows, cols = linear_sum_assignment(score, maximize=True)
        sigma = np.empty(groups, dtype=np.int64)
        sigma[rows] = cols
    t, t_inv = np.zeros((n_a, n_a)), np.zeros((n_a, n_a))
    for a in range(groups):
        b = int(sigma[a])
        i = idx(a, b)
        ta, ta_inv = cca_alignment(cov[np.ix_(i, i)], d, reg,
                                   constant=None if constant is None else np.asarray(constant)[i],
                                   values=None if values is None else np.asarray(values)[i])
        t[a * d:(a + 1) * d, b * d:(b + 1) * d] = ta
        t_inv[b * d:(b + 1) * d, a * d:(a + 1) * d] = ta_inv
    return t, t_inv, np.asarray(sigma)
