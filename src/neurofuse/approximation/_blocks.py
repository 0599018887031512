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

__all__ = ["GramStats", "NeuronRegression", "TokenSums"]


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

    fields = ("count", "sx", "sy", "sxx", "sxy")

    def update(self, x: Tensor, y: Tensor, w: Optional[Tensor] = None) -> None:
        """Add rows ``x``, ``y`` (``[rows, k]``), each with weight ``w[row]`` (default 1)."""
        x, y = x.double(), y.double()
        w = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device) if w is None else w.double().reshape(-1, 1)
        self._add(count=w.sum(), sx=(w * x).sum(0), sy=(w * y).sum(0), sxx=(w * x * x).sum(0),
                  sxy=(w * x * y).sum(0))

    def solve(self, eps: float = 1e-12) -> Tuple[Tensor, Tensor]:
        """``(gamma, beta)``: slope and intercept of every neuron (slope 0 where ``x`` is constant)."""
        n = self.count
        mx, my = self.sx / n, self.sy / n
        var = self.sxx / n - mx * mx
        cov = self.sxy / n - mx * my
        gamma = torch.where(var > eps, cov / var.clamp_min(eps), torch.zeros_like(var))
        return gamma, my - gamma * mx


class TokenSums(AdditiveStats):
    """Sums over samples of ``[B, T, k]`` values, per position (``mean()``: ``[T, k]``)."""

    fields = ("count", "sums")

    def update(self, v: Tensor) -> None:
        v = v.double()
        self._add(count=torch.tensor(float(v.shape[0]), dtype=torch.float64, device=v.device), sums=v.sum(0))

    def mean(self) -> Tensor:
        return self.sums / self.count
