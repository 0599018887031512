r"""Writing a BatchNorm-folded model back into its original architecture.

:func:`~neurofuse.levels.fold_batchnorm` replaces every ``(Conv2d, BatchNorm2d)`` and
``(Linear, BatchNorm1d)`` pair by one affine layer with a bias.  Methods that mix channels
(ZipIt!, CCA Merge) fuse the folded models; :func:`unfold_state` writes the result in the
original architecture, so that it can be saved and rebuilt from the model's config and its
BatchNorms re-estimated (REPAIR).  A folded layer :math:`z = W' x + b'` becomes the pair

.. math:: z = W' x + b_{\text{layer}}, \qquad
          \mathrm{BN}(z) = \gamma\,\frac{z - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta
          \quad\text{with}\quad \gamma = 1,\ \mu = 0,\ \sigma^2 = 1 - \epsilon,

and :math:`\beta = b'` when the original layer has no bias (:math:`b_{\text{layer}} = b'` and
:math:`\beta = 0` otherwise): the same function, up to the rounding of :math:`\sqrt{1}`.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, fx, nn

from ..errors import IncompatibleModelsError
from ._bn import _is_pair

__all__ = ["unfold_state"]


def unfold_state(folded: nn.Module, like: nn.Module) -> Dict[str, Tensor]:
    """The state dict of ``like`` (the original, unfolded architecture) that computes what
    ``folded`` (``fold_batchnorm`` of a model of that architecture, possibly with other
    parameter values) computes, in eval mode.

    Raises
    ------
    IncompatibleModelsError
        If ``folded`` is not a folded copy of ``like``'s architecture.
    """
    out: Dict[str, Tensor] = {}
    _walk(folded, like, "", out)
    missing = set(like.state_dict()) - set(out)
    if missing:
        raise IncompatibleModelsError(f"cannot unfold: no value for {sorted(missing)[:3]}")
    return out


def _own(module: nn.Module, prefix: str, out: Dict[str, Tensor]) -> None:
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t is not None:
            out[prefix + name] = t.detach().clone()


def _walk(folded: nn.Module, like: nn.Module, prefix: str, out: Dict[str, Tensor]) -> None:
    if isinstance(like, nn.Sequential) and isinstance(folded, nn.Sequential):
        kids, fkids = list(like.named_children()), list(folded.children())
        i = j = 0
        while i < len(kids):
            name, child = kids[i]
            if j >= len(fkids):
                raise IncompatibleModelsError(f"cannot unfold {prefix}{name}: the folded model is shorter")
            if i + 1 < len(kids) and _is_pair(child, kids[i + 1][1]):
                _pair(fkids[j], child, kids[i + 1][1], f"{prefix}{name}.", f"{prefix}{kids[i + 1][0]}.", out)
                i += 2
            else:
                _walk(fkids[j], child, f"{prefix}{name}.", out)
                i += 1
            j += 1
        return
    if type(folded) is not type(like) and not (isinstance(folded, fx.GraphModule) and isinstance(like, fx.GraphModule)):
        # (torch.fx gives every GraphModule a class of its own: compare the kind, then the children)
        raise IncompatibleModelsError(f"cannot unfold {prefix or 'the model'}: {type(folded).__name__} "
                                      f"where the architecture has {type(like).__name__}")
    _own(folded, prefix, out)
    fkids = dict(folded.named_children())
    for name, child in like.named_children():
        if name not in fkids:
            raise IncompatibleModelsError(f"cannot unfold {prefix}{name}: missing in the folded model")
        _walk(fkids[name], child, f"{prefix}{name}.", out)


def _pair(affine: nn.Module, layer: nn.Module, bn: nn.Module, lp: str, bp: str, out: Dict[str, Tensor]) -> None:
    """``affine`` (folded, with a bias) written as ``layer`` followed by an identity-statistics ``bn``."""
    if type(affine) is not type(layer) or affine.weight.shape != layer.weight.shape:
        raise IncompatibleModelsError(f"cannot unfold {lp[:-1]}: the folded layer does not match")
    w, b = affine.weight.detach(), affine.bias.detach()
    out[lp + "weight"] = w.clone()
    if layer.bias is not None:
        out[lp + "bias"] = b.clone()
        shift = torch.zeros_like(b)
    else:
        shift = b.clone()
    n = b.shape[0]
    like = dict(bn.state_dict())
    if "weight" in like:
        out[bp + "weight"] = torch.ones(n, dtype=b.dtype, device=b.device)
    if "bias" in like:
        out[bp + "bias"] = shift
    elif shift.abs().max() > 0:
        raise IncompatibleModelsError(f"cannot unfold {bp[:-1]}: it has no bias to hold the folded one")
    out[bp + "running_mean"] = torch.zeros(n, dtype=b.dtype, device=b.device)
    out[bp + "running_var"] = torch.full((n,), 1.0 - bn.eps, dtype=b.dtype, device=b.device)
    if "num_batches_tracked" in like:
        out[bp + "num_batches_tracked"] = like["num_batches_tracked"].clone()
