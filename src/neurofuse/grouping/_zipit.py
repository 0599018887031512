r"""ZipIt!: merge the most correlated features, within a model as well as across models.

Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman, "ZipIt! Merging Models from Different Tasks
without Training", ICLR 2024, section 4.

The features of the :math:`N` models at one neuron space are concatenated,
:math:`f = [f^1; \dots; f^N] \in \mathbb{R}^{M}`, :math:`M = \sum_k n_k`, and their correlation
matrix :math:`R` is computed on the fusion set.  Instead of pairing each feature of one model with
one of the other (a permutation), ZipIt! *zips*: it repeatedly merges the two most correlated
features that are still unmatched, **whichever models they come from**, until :math:`k` features
are left ("iteratively match the features with the highest correlation without replacement").
Redundant features of one model therefore merge with each other, and features of one model that
have no counterpart in another need not be forced onto one.

A merged feature is the mean of its members: the merge matrix :math:`\mathcal M \in
\mathbb{R}^{k\times M}` has :math:`1/|c|` at the members of feature :math:`c`, the unmerge matrix
:math:`\mathcal U \in \mathbb{R}^{M\times k}` has a one at each member (every member is
reconstructed by its merged feature), so :math:`\mathcal M\,\mathcal U = I`.  A layer
:math:`W^k` between two spaces is zipped as

.. math:: W = \sum_k \mathcal M_k\, W^k\, \mathcal U_k^{\text{prev}},

:math:`\mathcal M_k` the columns of :math:`\mathcal M` of model :math:`k` and
:math:`\mathcal U_k^{\text{prev}}` the rows of the previous space's :math:`\mathcal U`.

:func:`zip_features` generalises the pairing to any :math:`N` and any :math:`k`: the greedy step
merges the two most correlated *groups*, the correlation of two groups being that of their summed
features (computed exactly from the covariance matrix), as long as a group holds at most
:math:`\lceil M/k\rceil` features (2 for two models at the models' width: ZipIt!'s pairs).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..stats import AdditiveStats
from ._heads import head_structured_plans, lap_inner

__all__ = ["JointMoments", "zip_features", "zip_grouped_features", "zip_matrices"]


class JointMoments(AdditiveStats):
    r"""First and second moments of a ``[rows, M]`` block of features (all models' concatenated).

    ``count`` rows, ``total`` :math:`\sum_r f_r`, ``outer`` :math:`\sum_r f_r f_r^\top`; additive
    over batches, shards and processes like every :class:`~neurofuse.stats.AdditiveStats`.
    """

    fields = ("count", "total", "outer")

    def update(self, f: Tensor) -> None:
        f = f.double()
        self._add(count=torch.tensor(float(f.shape[0]), dtype=torch.float64, device=f.device), total=f.sum(0))
        self._add_gram("outer", f)

    def select(self, index: Tensor) -> "JointMoments":
        """The moments of some features alone.

        Parameters
        ----------
        index : Tensor
            ``[m]`` feature indices (long), in the order wanted.

        Returns
        -------
        JointMoments
            Over ``[rows, m]``: the same rows, those features only.
        """
        out = JointMoments()
        out._sums = {"count": self.count.clone(), "total": self.total[index].clone(),
                     "outer": self.outer[index][:, index].clone()}
        return out

    def covariance(self) -> Tensor:
        """``[M, M]`` (population) covariance of the features."""
        n = self.count.clamp_min(1.0)
        mean = self.total / n
        return self.outer / n - mean[:, None] * mean[None, :]

    def mean(self) -> Tensor:
        """``[M]`` mean of every feature."""
        return self.total / self.count.clamp_min(1.0)

    def constant(self, rtol: float = 1e-8) -> Tensor:
        """``[M]`` booleans: features constant on the data (variance at most ``rtol`` times the
        mean square; the default is a coefficient of variation below 1e-4)."""
        var = self.covariance().diagonal().clamp_min(0.0)
        return var <= rtol * (var + self.mean() ** 2)

    def correlation(self) -> Tensor:
        """``[M, M]`` Pearson correlations (0 where a feature is constant)."""
        cov = self.covariance()
        sd = cov.diagonal().clamp_min(0.0).sqrt()
        return cov / (sd[:, None] * sd[None, :]).clamp_min(1e-12)

    def similarity(self) -> Tensor:
        """``[M, M]`` correlation minus the mean squared distance between the features relative
        to their mean square: 1 only for identical features, and it separates features that are
        constant on the data (correlation 0) by their values."""
        n = self.count.clamp_min(1.0)
        second = self.outer / n
        sq = second.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2 * second).clamp_min(0.0)
        return self.correlation() - dist / sq.mean().clamp_min(1e-300)


def zip_features(cov: np.ndarray, owners: Sequence[int], k: int, *, within_model: bool = True,
                 tie_break: Optional[np.ndarray] = None) -> np.ndarray:
    r"""Group ``M`` features into ``k`` by greedily merging the most correlated ones.

    Parameters
    ----------
    cov : np.ndarray
        ``[M, M]`` covariance of the concatenated features of every model.
    owners : sequence of int
        ``[M]`` the model each feature belongs to.
    k : int
        Number of merged features, ``1 <= k <= M``.
    within_model : bool
        Allow merging two features of one model (ZipIt!'s zip); ``False`` pairs only features of
        different models (a greedy permutation matching when ``k`` is the models' width).
    tie_break : np.ndarray, optional
        ``[M, M]`` similarities added with weight ``1e-6`` (e.g.
        :meth:`JointMoments.similarity` of the pre-activations, which tells apart features that
        are constant on the fusion set).

    Returns
    -------
    np.ndarray
        ``[M]`` the merged feature (``0..k-1``) of every feature, numbered by first member.

    Raises
    ------
    ConfigError
        If ``k`` is out of range, or ``within_model=False`` cannot reach ``k`` groups.
    """
    s = np.array(cov, dtype=np.float64)
    m = s.shape[0]
    owners = np.asarray(owners)
    if not 1 <= k <= m:
        raise ConfigError(f"cannot zip {m} features into {k}; choose 1 <= k <= {m}")
    cap = math.ceil(m / k)
    size = np.ones(m, dtype=np.int64)
    active = np.ones(m, dtype=bool)
    owned = owners[:, None] == np.unique(owners)[None, :]   # [M, N]: models in each group
    group = np.arange(m)                                     # group of every feature (its first member)
    extra = np.zeros((m, m)) if tie_break is None else 1e-6 * np.nan_to_num(np.asarray(tie_break, dtype=np.float64))

    def allowed(i: int) -> np.ndarray:
        ok = active & (size + size[i] <= cap)
        ok[i] = False
        if not within_model:
            ok &= ~(owned & owned[i]).any(1)
        return ok

    def corr(i: int) -> np.ndarray:
        sd = np.sqrt(np.clip(np.diagonal(s), 0.0, None))
        return s[i] / np.maximum(sd[i] * sd, 1e-12) + extra[i]

    def rescore() -> np.ndarray:
        out = np.full((m, m), -np.inf)
        for i in np.flatnonzero(active):
            out[i] = np.where(allowed(i), corr(i), -np.inf)
        return out

    score = rescore()
    arg = score.argmax(1)                    # best partner of every row, and its score
    best = score[np.arange(m), arg]
    groups = m
    while groups > k:
        i = int(np.argmax(best))
        j = int(arg[i])
        if not np.isfinite(best[i]):
            if cap >= m:
                raise ConfigError(f"the greedy zip of {m} features stopped at {groups} groups, not {k}: "
                                  "every remaining pair holds features of one model; allow within-model "
                                  "merges (within_model=True) or choose a larger width")
            cap = m  # every allowed pair would exceed the group size: let groups grow
            score = rescore()
            arg = score.argmax(1)
            best = score[np.arange(m), arg]
            continue
        i, j = min(i, j), max(i, j)
        s[i, :] += s[j, :]
        s[:, i] += s[:, j]
        extra[i, :] = extra[:, i] = (extra[i, :] + extra[j, :]) / 2
        size[i] += size[j]
        owned[i] |= owned[j]
        group[group == j] = i
        active[j] = False
        groups -= 1
        score[j, :] = score[:, j] = -np.inf
        row = np.where(allowed(i), corr(i), -np.inf)
        score[i, :] = score[:, i] = row
        best[j] = -np.inf
        stale = (arg == i) | (arg == j)       # rows whose best partner changed or left
        stale[i] = True
        stale &= active
        for r in np.flatnonzero(stale):
            arg[r] = int(np.argmax(score[r]))
            best[r] = score[r, arg[r]]
        better = active & (row > best)        # rows for which the merged group is now the best
        arg[better] = i
        best[better] = row[better]
    _, labels = np.unique(group, return_inverse=True)
    return labels.astype(np.int64)


def zip_grouped_features(cov: np.ndarray, widths: Sequence[int], k: int, groups: int, *,
                         sigmas: Optional[Sequence[Optional[np.ndarray]]] = None, within_model: bool = True,
                         tie_break: Optional[np.ndarray] = None) -> Tuple[np.ndarray, List[np.ndarray]]:
    r""":func:`zip_features` for a space whose channels come in ``groups`` equal contiguous groups
    that must stay whole (a GroupNorm's, or those of a grouped convolution that reads or writes
    the space): a merged feature never mixes groups, and fused group :math:`b` is zipped from one
    group of every model.

    Model :math:`j`'s group :math:`\sigma_j(b)` goes to fused group :math:`b` (model 0's group
    :math:`b` itself).  Unless ``sigmas`` fixes them, the groups of every other model are assigned
    one to one to model 0's by the Hungarian algorithm on the cost :math:`-\sum` of the
    correlations of the best one-to-one matching inside every pair of groups
    (:func:`~neurofuse.grouping.head_structured_plans`, as attention heads are matched).  Then
    the features of fused group :math:`b`'s members are zipped to :math:`k/\text{groups}` (a
    merge within one model stays inside one of its groups).

    Parameters
    ----------
    cov : np.ndarray
        ``[M, M]`` covariance of the concatenated features of every model.
    widths : sequence of int
        Every model's number of features (``M`` in all), each a multiple of ``groups``.
    k : int
        Number of merged features, a multiple of ``groups``.
    groups : int
        Number of groups.
    sigmas : sequence of np.ndarray or None, optional
        Per model, the assignment of groups to keep (``sigmas[j][b]``: model ``j``'s group that
        goes to fused group ``b``; e.g. the one of the space a grouped convolution reads);
        ``None`` (or a ``None`` entry) matches the groups by correlation.
    within_model, tie_break
        As :func:`zip_features`.

    Returns
    -------
    labels : np.ndarray
        ``[M]`` the merged feature (``0..k-1``) of every feature; fused group ``b`` holds
        ``b * k / groups ...``.
    sigmas : list of np.ndarray
        The assignment of groups of every model (model 0's the identity).

    Raises
    ------
    ConfigError
        If ``k`` or a model's width does not split into ``groups``.
    """
    widths = [int(w) for w in widths]
    if k % groups or any(w % groups for w in widths):
        raise ConfigError(f"a space of {groups} groups needs widths that split into them; got the fused width "
                          f"{k} and the models' {widths}: choose a fused width that is a multiple of {groups}")
    starts = np.cumsum([0] + widths)
    s = np.asarray(cov, dtype=np.float64)
    sd = np.sqrt(np.clip(np.diagonal(s), 0.0, None))
    corr = s / np.maximum(sd[:, None] * sd[None, :], 1e-12)
    own = [np.arange(starts[j], starts[j + 1]) for j in range(len(widths))]
    out_sigmas = [np.arange(groups)]
    for j in range(1, len(widths)):
        given = None if sigmas is None else sigmas[j]
        if given is None:
            _, given = head_structured_plans([-corr[np.ix_(own[j], own[0])]], groups, lap_inner)
        out_sigmas.append(np.asarray(given, dtype=np.int64))
    owners = np.repeat(np.arange(len(widths)), widths)
    labels = np.empty(len(owners), dtype=np.int64)
    per = k // groups
    for b in range(groups):
        members = np.concatenate([own[j].reshape(groups, -1)[out_sigmas[j][b]] for j in range(len(widths))])
        sub = np.ix_(members, members)
        labels[members] = b * per + zip_features(s[sub], owners[members], per, within_model=within_model,
                                                 tie_break=None if tie_break is None else np.asarray(tie_break)[sub])
    return labels, out_sigmas


def zip_matrices(labels: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The merge ``[k, M]`` (mean of the members) and unmerge ``[M, k]`` (copy to every member)
    matrices of a grouping ``labels`` (``[M]``, values ``0..k-1``)."""
    m = len(labels)
    unmerge = np.zeros((m, k))
    unmerge[np.arange(m), labels] = 1.0
    merge = unmerge.T / np.maximum(unmerge.sum(0), 1.0)[:, None]
    return merge, unmerge
