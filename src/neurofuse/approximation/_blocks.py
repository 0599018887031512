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
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import IncompatibleModelsError
from ..stats import AdditiveStats, row_chunks
from ._linear import _eigh_dense

__all__ = ["GramStats", "NeuronRegression", "RowScale", "TokenSums", "norm_units", "normalise"]


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
    r"""Per-neuron linear regression of targets ``y`` (``[rows, k]``) on one input ``x``
    (``[rows, k]``) or on ``P`` inputs (``[rows, k, P]``): for every neuron :math:`c`,
    :math:`\min_{\gamma_c,\beta_c}\sum_r (x_{rc}^\top\gamma_c + \beta_c - y_{rc})^2`."""

    fields = ("count", "sx", "sy", "sxx", "sxy", "syy")

    def update(self, x: Tensor, y: Tensor, w: Optional[Tensor] = None) -> None:
        """Add rows ``x`` (``[rows, k]`` or ``[rows, k, P]``), ``y`` (``[rows, k]``), each with
        weight ``w[row]`` (default 1)."""
        x, y = x.double(), y.double()
        w = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if w is None else w.double().reshape(-1)
        if x.dim() == 2:
            wc = w[:, None]
            self._add(count=w.sum(), sx=(wc * x).sum(0), sy=(wc * y).sum(0), sxx=(wc * x * x).sum(0),
                      sxy=(wc * x * y).sum(0), syy=(wc * y * y).sum(0))
            return
        wy = w[:, None] * y
        self._add(count=w.sum(), sx=torch.einsum("r,rkp->kp", w, x), sy=wy.sum(0),
                  sxx=torch.einsum("r,rkp,rkq->kpq", w, x, x), sxy=torch.einsum("rkp,rk->kp", x, wy),
                  syy=(wy * y).sum(0))

    def relative_error(self, gamma: Tensor, beta: Tensor) -> float:
        r""":math:`\sum_{r,c} (y_{rc} - x_{rc}^\top\gamma_c - \beta_c)^2 / \sum_{r,c} y_{rc}^2` of the
        fits ``(gamma, beta)`` over the rows added."""
        g, b = gamma.double(), beta.double()
        if self.sxx.dim() == 1:
            fit = g * g * self.sxx - 2 * g * self.sxy + 2 * g * b * self.sx
        else:
            fit = (torch.einsum("kp,kpq,kq->k", g, self.sxx, g) - 2 * (g * self.sxy).sum(-1)
                   + 2 * b * (g * self.sx).sum(-1))
        res = self.syy + fit - 2 * b * self.sy + b * b * self.count
        return float(res.sum().clamp_min(0.0) / self.syy.sum().clamp_min(1e-300))

    def solve(self, eps: float = 1e-12, intercept: bool = True) -> Tuple[Tensor, Tensor]:
        """``(gamma, beta)``: slopes (``[k]``, or ``[k, P]`` for ``P`` inputs) and intercept of
        every neuron; a slope is 0 along a direction of the inputs that does not vary.

        Parameters
        ----------
        eps : float
            Variance (or, without intercept, mean square) of ``x`` below which the slope is 0;
            for ``P`` inputs, the same floor on the eigenvalues of their (co)variance, and on
            their ratio to the largest.
        intercept : bool
            Fit an intercept; ``False``: fits through the origin, ``beta`` is 0.
        """
        n = self.count
        mx, my = self.sx / n, self.sy / n
        if self.sxx.dim() == 1:
            if not intercept:
                sxx = self.sxx / n
                gamma = torch.where(sxx > eps, (self.sxy / n) / sxx.clamp_min(eps), torch.zeros_like(sxx))
                return gamma, torch.zeros_like(gamma)
            var = self.sxx / n - mx * mx
            cov = self.sxy / n - mx * my
            gamma = torch.where(var > eps, cov / var.clamp_min(eps), torch.zeros_like(var))
            return gamma, my - gamma * mx
        cov = self.sxx / n
        rhs = self.sxy / n
        if intercept:
            cov = cov - mx[:, :, None] * mx[:, None, :]
            rhs = rhs - mx * my[:, None]
        evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(1, 2)))
        keep = evals > torch.clamp(eps * evals[:, -1:], min=eps)
        inv = torch.where(keep, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
        gamma = torch.einsum("kpi,ki,kqi,kq->kp", evecs, inv, evecs, rhs)
        beta = my - (gamma * mx).sum(-1) if intercept else torch.zeros_like(my)
        return gamma, beta


class RowScale(AdditiveStats):
    r"""Per model, the sums over the units a norm normalises (a row for LayerNorm, one sample's
    group of channels for GroupNorm) of each unit's scale :math:`\sigma_r` and of
    :math:`\sigma_r^2` (:math:`\sigma_r^2` the unit's variance plus the norm's ``eps``).

    :meth:`inverse` is every model's least-squares constant of :math:`1/\sigma_r`: the :math:`c`
    that minimises :math:`\sum_r \lVert c (z_r - \mu_r) - (z_r - \mu_r)/\sigma_r\rVert^2`, that
    is :math:`c = \sum_r \sigma_r / \sum_r \sigma_r^2` (the centred units scaled by one constant
    per model, as near as one constant gets to what the norm sees).
    """

    fields = ("s1", "s2")

    def update(self, sigmas: Sequence[Tensor]) -> None:
        r"""Add the scales :math:`\sigma_r` (``[units]``, the same units for every model) of every
        model (:func:`norm_units`)."""
        sig = torch.stack([s.double().reshape(-1) for s in sigmas], 1)
        self._add(s1=sig.sum(0), s2=(sig * sig).sum(0))

    def inverse(self) -> Tensor:
        r"""``[models]`` the constants :math:`c = \sum_r \sigma_r / \sum_r \sigma_r^2`."""
        return self.s1 / self.s2.clamp_min(1e-300)

    def relative(self) -> Tensor:
        """``[models]`` the constants :meth:`inverse` divided by their mean: the models compared in
        the units the norm sees, at their mean scale, where the norm's ``eps`` acts as in them."""
        c = self.inverse()
        return c / c.mean()


def norm_units(norm: nn.Module, z: Tensor) -> Tuple[Tensor, Tensor]:
    r"""``(z', sigma)``: the values ``z`` that the LayerNorm or GroupNorm ``norm`` reads, and the
    scale :math:`\sqrt{\mathrm{var} + \epsilon}` of every unit it normalises (a row over the last
    axis for LayerNorm, one sample's group of channels, with their positions, for GroupNorm;
    ``[units]``, float64).  ``z'`` is ``z`` less each unit's mean where a unit is one row of the
    layer's outputs (LayerNorm; GroupNorm on ``[B, C]``), which the layer with its weights centred
    over the unit's neurons computes exactly; a GroupNorm's unit over positions has a mean that
    no convolution computes, and ``z'`` is ``z``."""
    if isinstance(norm, nn.InstanceNorm2d):   # one channel per group
        u = z.reshape(z.shape[0], z.shape[1], -1)
    elif isinstance(norm, nn.GroupNorm):
        if z.dim() not in (2, 4):
            raise IncompatibleModelsError(
                f"a GroupNorm reads values of shape {list(z.shape)}; the closed form fits it after a "
                "Linear on [B, C] or a Conv2d on [B, C, H, W] only")
        u = z.reshape(z.shape[0], norm.num_groups, -1)
    else:
        u = z.reshape(-1, z.shape[-1])
    sigma = torch.sqrt(u.double().var(-1, unbiased=False) + norm.eps).reshape(-1)
    if z.dim() > 2 and isinstance(norm, (nn.GroupNorm, nn.InstanceNorm2d)):
        return z, sigma
    return (u - u.mean(-1, keepdim=True)).reshape(z.shape), sigma


def normalise(norm: nn.Module, z: Tensor) -> Tensor:
    """``z`` normalised by the LayerNorm, GroupNorm or InstanceNorm2d ``norm`` without its weight
    and bias."""
    if isinstance(norm, nn.InstanceNorm2d):
        return F.group_norm(z, z.shape[1], None, None, norm.eps)
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(z, norm.num_groups, None, None, norm.eps)
    return F.layer_norm(z, norm.normalized_shape, None, None, norm.eps)


class TokenSums(AdditiveStats):
    """Sums over samples of ``[B, T, k]`` values, per position (``mean()``: ``[T, k]``)."""

    fields = ("count", "sums")

    def update(self, v: Tensor) -> None:
        v = v.double()
        self._add(count=torch.tensor(float(v.shape[0]), dtype=torch.float64, device=v.device), sums=v.sum(0))

    def mean(self) -> Tensor:
        return self.sums / self.count
