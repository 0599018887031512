r"""Closed-form fits of the parts of a transformer block that are not one affine layer.

The block fit (:mod:`neurofuse.methods._blockfit`) fits every sub-level of a transformer block
that is affine in its parameters by least squares (:class:`~neurofuse.approximation.LinearStats`);
three more parts are affine in their parameters *given* their normalised input, and are fitted
neuron by neuron from additive statistics:

* a LayerNorm's weight and bias, given the normalised stream :math:`n` (:class:`NeuronRegression`:
  for every neuron :math:`c`, :math:`\min_{\gamma_c,\beta_c}\sum_r (\gamma_c n_{rc} + \beta_c -
  t_{rc})^2`, a one-dimensional least squares);
* a position embedding added to tokens, and a CLS token put in front of them
  (:class:`TokenSums`: the mean over samples of target minus tokens, per position);
* the Gram matrix of the base models' residual-stream neurons over every point of the stream
  (:class:`GramStats`), whose square root gives coordinates for grouping them.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..stats import AdditiveStats, row_chunks
from ._linear import _eigh_dense

__all__ = ["GramStats", "NeuronRegression", "RowScale", "TokenSums"]


class GramStats(AdditiveStats):
    r"""Accumulates :math:`A^\top A` of ``[rows, M]`` neuron values (float64)."""

    fields = ("gram",)

    def update(self, a: "Tensor | Sequence[Tensor]") -> None:
        """Add ``[rows, M]`` neuron values, or column blocks ``[rows, M_i]`` of them in order
        (joined and converted to float64 a few MB at a time, :func:`neurofuse.stats.row_chunks`)."""
        blocks = [a] if isinstance(a, Tensor) else list(a)
        for rows in row_chunks(blocks[0].shape[0], sum(b.shape[1] for b in blocks)):
            parts = [b[rows].detach() for b in blocks]
            self._add_gram("gram", (torch.cat(parts, 1) if len(parts) > 1 else parts[0]).double())

    def coordinates(self) -> Tensor:
        r"""``[M, M]`` points whose pairwise distances are the neurons' distances over all rows:
        :math:`F = U\Lambda^{1/2}` with :math:`A^\top A = U\Lambda U^\top`, so that
        :math:`FF^\top = A^\top A` (K-means on them is K-means on the neurons' values)."""
        g = 0.5 * (self.gram + self.gram.T)
        evals, evecs = _eigh_dense(g)   # scipy's drivers, with a fallback where syevd fails
        return evecs * torch.sqrt(evals.clamp_min(0.0))[None, :]


class NeuronRegression(AdditiveStats):
    """Per-neuron simple linear regression of targets ``y`` on inputs ``x`` (both ``[rows, k]``)."""

    fields = ("count", "sx", "sy", "sxx", "sxy", "syy")

    def update(self, x: Tensor, y: Tensor, w: Optional[Tensor] = None) -> None:
        """Add rows ``x``, ``y`` (``[rows, k]``), each with weight ``w[row]`` (default 1)."""
        x, y = x.double(), y.double()
        w = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device) if w is None else w.double().reshape(-1, 1)
        self._add(count=w.sum(), sx=(w * x).sum(0), sy=(w * y).sum(0), sxx=(w * x * x).sum(0),
                  sxy=(w * x * y).sum(0), syy=(w * y * y).sum(0))

    def relative_error(self, gamma: Tensor, beta: Tensor) -> float:
        r""":math:`\sum_{r,c} (y_{rc} - \gamma_c x_{rc} - \beta_c)^2 / \sum_{r,c} y_{rc}^2` of the
        lines ``(gamma, beta)`` over the rows added."""
        g, b = gamma.double(), beta.double()
        res = (self.syy - 2 * g * self.sxy - 2 * b * self.sy + g * g * self.sxx + 2 * g * b * self.sx
               + b * b * self.count)
        return float(res.sum().clamp_min(0.0) / self.syy.sum().clamp_min(1e-300))

    def solve(self, eps: float = 1e-12, intercept: bool = True) -> Tuple[Tensor, Tensor]:
        """``(gamma, beta)``: slope and intercept of every neuron (slope 0 where ``x`` is constant).

        Parameters
        ----------
        eps : float
            Variance (or, without intercept, mean square) of ``x`` below which the slope is 0.
        intercept : bool
            Fit an intercept; ``False``: lines through the origin, ``beta`` is 0.
        """
        n = self.count
        if not intercept:
            sxx = self.sxx / n
            gamma = torch.where(sxx > eps, (self.sxy / n) / sxx.clamp_min(eps), torch.zeros_like(sxx))
            return gamma, torch.zeros_like(gamma)
        mx, my = self.sx / n, self.sy / n
        var = self.sxx / n - mx * mx
        cov = self.sxy / n - mx * my
        gamma = torch.where(var > eps, cov / var.clamp_min(eps), torch.zeros_like(var))
        return gamma, my - gamma * mx


class RowScale(AdditiveStats):
    r"""Per model, the sums over rows of each row's LayerNorm scale :math:`\sigma_r` and of
    :math:`\sigma_r^2` (:math:`\sigma_r^2` the variance of the row over the model's neurons plus
    the LayerNorm's ``eps``).

    :meth:`inverse` is every model's least-squares constant of :math:`1/\sigma_r`: the :math:`c`
    that minimises :math:`\sum_r \lVert c (z_r - \mu_r) - (z_r - \mu_r)/\sigma_r\rVert^2`, that
    is :math:`c = \sum_r \sigma_r / \sum_r \sigma_r^2` (the centred rows scaled by one constant
    per model, as near as one constant gets to what the LayerNorm sees).
    """

    fields = ("s1", "s2")

    def update(self, rows: Sequence[Tensor], eps: Sequence[float]) -> None:
        """Add ``[n, d_i]`` rows of every model ``i`` (its pre-LayerNorm values) and its ``eps``."""
        sig = torch.stack([torch.sqrt(r.double().var(1, unbiased=False) + e) for r, e in zip(rows, eps)], 1)
        self._add(s1=sig.sum(0), s2=(sig * sig).sum(0))

    def inverse(self) -> Tensor:
        r"""``[models]`` the constants :math:`c = \sum_r \sigma_r / \sum_r \sigma_r^2`."""
        return self.s1 / self.s2.clamp_min(1e-300)


class TokenSums(AdditiveStats):
    """Sums over samples of ``[B, T, k]`` values, per position (``mean()``: ``[T, k]``)."""

    fields = ("count", "sums")

    def update(self, v: Tensor) -> None:
        v = v.double()
        self._add(count=torch.tensor(float(v.shape[0]), dtype=torch.float64, device=v.device), sums=v.sum(0))

    def mean(self) -> Tensor:
        return self.sums / self.count
