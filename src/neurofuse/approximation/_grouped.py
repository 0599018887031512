r"""Closed-form least squares of a depthwise convolution, one channel at a time.

A depthwise convolution (``groups == in_channels == out_channels``) computes output channel
:math:`c` from input channel :math:`c` alone.  Its output neurons are therefore its input neurons:
the fused layer keeps the grouping of the space it reads, in which base channel :math:`j` stands
for fused channel :math:`c(j)`.  Fused channel :math:`c` sees the design matrix :math:`X_c` of the
patches of *its own* fused input channel (``kh * kw`` columns, plus a ones column for the bias),
so the least-squares weights of base channel :math:`j` are

.. math::  w_j = (X_{c(j)}^\top X_{c(j)})^+ X_{c(j)}^\top a_j,

and fused channel :math:`c` takes the importance-weighted mean of its members' :math:`w_j`
(:func:`group_means`), whose fitted values are the projection of the weighted centre of their
outputs onto the image of :math:`X_c`, as for an ungrouped layer
(:mod:`neurofuse.approximation._linear`).  Only the per-channel moments

.. math::  G_c = X_c^\top X_c, \qquad C_{:,j} = X_{c(j)}^\top a_j, \qquad q_j = \lVert a_j\rVert^2

are accumulated (:class:`DepthwiseStats`, additive like every fusion statistic), ``k`` small
``(kh kw + 1)``-square systems instead of one over all channels.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleModelsError
from ..stats import AdditiveStats
from ._linear import _eigh_dense
from ._ridge import PENALTY_GRID, gcv_curve

__all__ = ["DepthwiseStats", "depthwise_design", "group_means"]


def depthwise_design(conv: nn.Conv2d, u: Tensor) -> Tensor:
    """``[rows, C, d]`` per-channel design rows of a depthwise ``conv`` on its input ``u``
    ``[B, C, H, W]``: the ``kh * kw`` patch of channel ``c`` at every output position, plus a ones
    column when the layer has a bias.  Rows are ordered (sample, h, w), as
    :func:`neurofuse.levels.flatten_neurons` orders output rows."""
    b, c = u.shape[0], u.shape[1]
    cols = F.unfold(u, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,  # type: ignore[arg-type]
                    stride=conv.stride)                                               # [B, C*kk, L]
    kk = cols.shape[1] // c
    x = cols.reshape(b, c, kk, -1).permute(0, 3, 1, 2).reshape(-1, c, kk)
    if conv.bias is not None:
        x = torch.cat([x, torch.ones(*x.shape[:2], 1, dtype=x.dtype, device=x.device)], dim=2)
    return x


def group_means(w: Tensor, weights: Tensor, labels: Tensor, k: int) -> Tensor:
    """``[d, k]`` weighted means of the columns of ``w`` ``[d, M]`` per group (zeros for an empty
    group)."""
    s = weights.to(w.device, w.dtype)
    lab = labels.to(w.device, torch.long)
    den = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, lab, s)
    num = torch.zeros(w.shape[0], k, dtype=w.dtype, device=w.device).index_add_(1, lab, w * s)
    return num / torch.where(den > 0, den, torch.ones_like(den))


class DepthwiseStats(AdditiveStats):
    r"""Accumulates the per-channel moments of a depthwise convolution (module docstring).

    Parameters
    ----------
    labels : Tensor
        ``[M]`` fused channel of every base output channel, in ``0..k-1``.
    k : int
        Number of fused channels.
    """

    fields = ("count", "gram", "cross", "sq")

    def __init__(self, labels: Tensor, k: int) -> None:
        super().__init__()
        self.labels = torch.as_tensor(labels).long()
        self.k = int(k)
        # base channels sorted by fused channel, each in a slot of a [k, width] table (padded)
        self._order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=self.k)
        self._width = max(int(counts.max()) if counts.numel() else 0, 1)
        start = torch.cumsum(counts, 0) - counts
        lab = self.labels[self._order]
        self._slot = lab * self._width + torch.arange(lab.numel()) - start[lab]

    @property
    def rows(self) -> int:
        """Rows of the design matrices seen so far."""
        return 0 if self.count is None else int(self.count)

    def update(self, x: Tensor, a: Tensor) -> None:
        """Add one batch: ``x`` ``[rows, k, d]`` per-channel design rows of the fused layer
        (:func:`depthwise_design`), ``a`` ``[rows, M]`` the base channels' outputs."""
        if x.shape[0] != a.shape[0] or x.shape[1] != self.k or a.shape[1] != self.labels.numel():
            raise IncompatibleModelsError(
                f"depthwise statistics of {self.k} fused and {self.labels.numel()} base channels got "
                f"design rows {list(x.shape)} and outputs {list(a.shape)}")
        rows, d = x.shape[0], x.shape[2]
        xc = x.transpose(0, 1).double().contiguous()                       # [k, rows, d]
        a = a.double()
        order, slot = self._order.to(a.device), self._slot.to(a.device)
        table = torch.zeros(rows, self.k * self._width, dtype=torch.float64, device=a.device)
        table[:, slot] = a[:, order]                                         # [rows, k * width]
        table = table.T.reshape(self.k, self._width, rows)
        per = torch.bmm(table, xc)                                           # [k, width, d]
        cross = torch.empty(d, a.shape[1], dtype=torch.float64, device=a.device)
        cross[:, order] = per.reshape(-1, d)[slot].T
        self._add(count=torch.tensor(float(rows), dtype=torch.float64, device=x.device),
                  gram=torch.bmm(xc.transpose(1, 2), xc), cross=cross, sq=(a * a).sum(0))

    def solve(self, rtol: Optional[float] = None, ridge: Union[float, str] = 0.0,
              prior: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, int]:
        """Least-squares weights ``[d, M]`` of every base channel, their residuals
        :math:`\\lVert (I - P_{c(j)}) a_j\\rVert^2` ``[M]`` and the smallest per-channel rank.

        ``rtol``, ``ridge`` and ``prior`` (``[d, M]`` base weights, for the input directions the
        fusion set never excites) as in :meth:`neurofuse.approximation.LinearStats.solve`; with
        ``ridge="auto"`` every fused channel's penalty is chosen by GCV over its own fit
        (:mod:`neurofuse.approximation._ridge`; the rows are samples times positions).
        """
        if self.empty:
            raise ValueError("no statistics accumulated")
        g = 0.5 * (self.gram + self.gram.transpose(1, 2))
        if not torch.isfinite(g).all():
            raise IncompatibleModelsError(
                "the fused model's previous layer produced NaN or infinite outputs; try a larger "
                "rtol or a ridge (options rtol=..., ridge=...)")
        d = g.shape[1]
        rtol = max(self.rows, d) * float(torch.finfo(torch.float32).eps) if rtol is None else rtol
        auto = isinstance(ridge, str)
        if rtol <= 0 or (auto and ridge != "auto") or (not auto and not float(ridge) >= 0):
            raise ConfigError(f"need rtol > 0 and ridge 'auto' or >= 0, got rtol={rtol}, ridge={ridge!r}")
        lab = self.labels.to(g.device)
        try:
            evals, evecs = torch.linalg.eigh(g)                               # [k, d], [k, d, d]
        except RuntimeError:   # syevd did not converge on some channel: one by one, robust drivers
            pairs = [_eigh_dense(gc) for gc in g]
            evals, evecs = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        cut = max(rtol * rtol, 10.0 * d * float(torch.finfo(torch.float64).eps))
        keep = evals > cut * evals.max(1, keepdim=True).values.clamp_min(1e-300)
        u = evecs[lab]                                                        # [M, d, d]
        proj = torch.einsum("mde,dm->me", u, self.cross)                      # U^T c_j
        inv = torch.where(keep, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))[lab]
        feats = proj * inv.sqrt()
        residual = (self.sq - (feats * feats).sum(1)).clamp_min(0.0)
        rank = int(keep.sum(1).min())
        scale = torch.diagonal(g, dim1=1, dim2=2).mean(1)                      # [k]
        lam = self._gcv_penalties(g, evals, evecs, keep, scale, prior) if auto else float(ridge) * scale
        w = torch.einsum("mde,me->dm", u, proj * inv)                          # pseudo-inverse
        if prior is not None:
            p = prior.to(g.device, torch.float64)
            pp = torch.einsum("mde,dm->me", u, p) * keep[lab]
            w = w + p - torch.einsum("mde,me->dm", u, pp)
        if bool((lam > 0).any()):
            safe = torch.where(lam > 0, lam, torch.ones_like(lam))
            reg = g + safe[:, None, None] * torch.eye(d, dtype=g.dtype, device=g.device)
            rhs = self.cross if prior is None else self.cross + safe[lab][None, :] * prior.to(g.device, g.dtype)
            w_ridge = torch.linalg.solve(reg[lab], rhs.T.unsqueeze(-1)).squeeze(-1).T
            w = torch.where((lam > 0)[lab][None, :], w_ridge, w)
        return w, residual, rank

    def _gcv_penalties(self, g: Tensor, evals: Tensor, evecs: Tensor, keep: Tensor, scale: Tensor,
                       prior: Optional[Tensor]) -> Tensor:
        """``[k]`` absolute penalty of every fused channel's fit, chosen by GCV over
        :data:`~neurofuse.approximation._ridge.PENALTY_GRID` times its mean eigenvalue."""
        lab = self.labels.to(g.device)
        grid = torch.tensor(PENALTY_GRID, dtype=torch.float64, device=g.device)
        out = torch.zeros(self.k, dtype=torch.float64, device=g.device)
        for c in range(self.k):
            cols = (lab == c).nonzero().squeeze(1)
            if cols.numel() == 0 or not bool(keep[c].any()):
                continue
            e, vec = evals[c][keep[c]], evecs[c][:, keep[c]]
            xa = self.cross[:, cols]
            sq = self.sq[cols]
            if prior is not None:   # residual targets r_j = a_j - X p_j, from the same sums
                pc = prior.to(g.device, torch.float64)[:, cols]
                gp = g[c] @ pc
                sq = sq - 2 * (pc * xa).sum(0) + (pc * gp).sum(0)
                xa = xa - gp
            t = vec.T @ xa                                                     # [r, m]
            rss0 = sq - (t * t / e[:, None]).sum(0)
            out[c] = grid[int(torch.argmin(gcv_curve(e, t, rss0, self.rows, grid * scale[c])))] * scale[c]
        return out
