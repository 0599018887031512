r"""Folding batch normalisation into the preceding affine layer.

In eval mode a ``BatchNorm`` is the per-channel affine map
:math:`y = \gamma (z - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`.  When it directly follows a
``Conv2d`` or ``Linear`` (:math:`z = W x + b`), the pair is the single affine layer

.. math::  W' = \mathrm{diag}(s)\, W, \qquad b' = s \odot (b - \mu) + \beta, \qquad
           s = \gamma / \sqrt{\sigma^2 + \epsilon},

so a level ``[..., Conv2d, BatchNorm2d]`` becomes ``[..., Conv2d]``, which the closed-form methods
(``hf-linear``, ``kf-linear``) can fit (:func:`neurofuse.levels.split_affine`).  The folded model
computes the same function as the original in eval mode (up to float rounding).
"""

from __future__ import annotations

import copy
from typing import Tuple

import torch
from torch import nn

from ..errors import IncompatibleModelsError

__all__ = ["fold_batchnorm", "has_batchnorm"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains a ``BatchNorm1d`` or ``BatchNorm2d`` module."""
    return any(isinstance(m, _BN) for m in model.modules())


def _fold_pair(affine: nn.Module, bn: nn.Module) -> nn.Module:
    """A new Linear/Conv2d equal (in eval mode) to ``bn(affine(x))``."""
    if bn.running_mean is None or bn.running_var is None:
        raise IncompatibleModelsError(
            f"cannot fold {type(bn).__name__} without running statistics "
            "(track_running_stats=False); use method='kf-gradient'"
        )
    out_features = affine.weight.shape[0]
    if bn.num_features != out_features:
        raise IncompatibleModelsError(
            f"{type(bn).__name__}({bn.num_features}) follows a layer with {out_features} outputs"
        )
    with torch.no_grad():
        w = affine.weight.detach().double()
        b = (affine.bias.detach().double() if affine.bias is not None
             else torch.zeros(out_features, dtype=torch.float64, device=w.device))
        mean, var = bn.running_mean.double(), bn.running_var.double()
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        new_b = scale * (b - mean) + beta
    if isinstance(affine, nn.Conv2d):
        folded: nn.Module = nn.Conv2d(
            affine.in_channels, affine.out_channels, affine.kernel_size, stride=affine.stride,
            padding=affine.padding, dilation=affine.dilation, groups=affine.groups, bias=True,
            padding_mode=affine.padding_mode)
    else:
        folded = nn.Linear(affine.in_features, affine.out_features, bias=True)
    folded = folded.to(device=affine.weight.device, dtype=affine.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(new_w.to(affine.weight.dtype))
        folded.bias.copy_(new_b.to(affine.weight.dtype))
    return folded


def _is_pair(a: nn.Module, b: nn.Module) -> bool:
    return ((isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d))
            or (isinstance(a, nn.Linear) and isinstance(b, nn.BatchNorm1d)))


def _fold_sequential(seq: nn.Sequential) -> Tuple[nn.Sequential, int]:
    children = list(seq.children())
    out, i, n = [], 0, 0
    while i < len(children):
        if i + 1 < len(children) and _is_pair(children[i], children[i + 1]):
            out.append(_fold_pair(children[i], children[i + 1]))
            i += 2
            n += 1
        else:
            out.append(children[i])
            i += 1
    return nn.Sequential(*out), n


def _fold_in_place(module: nn.Module) -> int:
    n = 0
    for name, child in list(module.named_children()):
        n += _fold_in_place(child)
        if isinstance(child, nn.Sequential):
            new, k = _fold_sequential(child)
            if k:
                setattr(module, name, new)
                n += k
    return n


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm that follows a Conv2d/Linear folded into it.

    Every ``nn.Sequential`` in the model (levels included) is scanned for adjacent
    ``(Conv2d, BatchNorm2d)`` and ``(Linear, BatchNorm1d)`` children; each pair is replaced by
    one affine layer with a bias (see the module docstring).  ``model`` itself is not modified.
    BatchNorms in other positions (e.g. before a conv, or outside an ``nn.Sequential``) stay.

    Parameters
    ----------
    model : nn.Module
        Any model, typically a :class:`~neurofuse.levels.LeveledNet`.

    Returns
    -------
    nn.Module
        A new model of the same class computing the same function in eval mode; it is returned
        in eval mode.

    Raises
    ------
    IncompatibleModelsError
        If a BatchNorm to fold has no running statistics.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    >>> folded = fold_batchnorm(net.eval())
    >>> [type(m).__name__ for m in folded]
    ['Conv2d']
    """
    out = copy.deepcopy(model)
    if isinstance(out, nn.Sequential):
        out, _ = _fold_sequential(out)
    _fold_in_place(out)
    return out.eval()
