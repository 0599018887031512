r"""Neuron importance through attribution (paper section 2.2, notes section 4).

For neuron :math:`j` of a level, with attribution :math:`\mathrm{attr}_{n,j,p}` of sample
:math:`n` at spatial position or token :math:`p` (zero input baseline, target = true label):

.. math::  s_j = \frac{1}{N}\sum_{n}\sum_{p} |\mathrm{attr}_{n,j,p}| + 10^{-8}

References
----------
Dhamdhere, Sundararajan, Yan, "How important is a neuron?", 2018 (Conductance).
Shrikumar, Greenside, Kundaje, "Learning important features through propagating activation
differences", ICML 2017 (DeepLIFT).
"""

from __future__ import annotations

from typing import Callable, List

import torch
from torch import Tensor

from .._fusion_set import FusionSet
from .._registry import Registry
from ..errors import DataError
from ..levels import LeveledNet

__all__ = ["importance_methods", "importance_sums", "neuron_importance", "normalize_scores", "register_importance"]

ImportanceFn = Callable[[LeveledNet, int, FusionSet, torch.device], Tensor]
_IMPORTANCE: Registry[ImportanceFn] = Registry("importance score")
EPS = 1e-8


def register_importance(name: str) -> Callable[[ImportanceFn], ImportanceFn]:
    """Register ``fn(model, level, fusion_set, device) -> scores[n_neurons]`` under ``name``."""
    return _IMPORTANCE.register(name)


def importance_methods() -> List[str]:
    """Names of the registered importance scores."""
    return _IMPORTANCE.names()


def _reduce(attr: Tensor, axis: str) -> Tensor:
    """``|attr|`` summed over positions/tokens, per sample: ``[B, neurons]``."""
    a = attr.abs()
    if axis == "conv":
        return a.sum(dim=(2, 3))
    if axis == "token":
        return a.sum(dim=1)
    return a.reshape(a.shape[0], -1)


def _level_width(model: LeveledNet, level: int) -> int:
    return model.level_widths()[level]


@register_importance("uniform")
def _uniform(model: LeveledNet, level: int, fs: FusionSet, device: torch.device) -> Tensor:
    return torch.ones(_level_width(model, level), dtype=torch.float64)


def _captum(algorithm: str) -> ImportanceFn:
    def fn(model: LeveledNet, level: int, fs: FusionSet, device: torch.device) -> Tensor:
        from captum.attr import LayerConductance, LayerDeepLift

        if fs.y is None:
            raise DataError(f"importance {algorithm!r} needs labels: pass data=(x, y)")
        layer = model.levels[level]
        model.eval()
        if algorithm == "conductance":
            attributor = LayerConductance(model, layer)
        else:
            attributor = LayerDeepLift(model, layer)
        total = None
        n = 0
        for xb, yb in fs.batches(device):
            xb = xb.clone().requires_grad_(True)
            if algorithm == "conductance":
                attr = attributor.attribute(xb, target=yb, n_steps=10)
            else:
                attr = attributor.attribute(xb, target=yb)
            red = _reduce(attr.detach(), model.axes[level]).double().sum(0).cpu()
            total = red if total is None else total + red
            n += xb.shape[0]
        assert total is not None
        return total / n + EPS

    return fn


register_importance("conductance")(_captum("conductance"))
register_importance("deeplift")(_captum("deeplift"))


def neuron_importance(model: LeveledNet, level: int, data: FusionSet, method: str = "uniform",
                      device: torch.device | str = "cpu") -> Tensor:
    """Importance score of every neuron at the output of ``model.levels[level]``.

    Parameters
    ----------
    model : LeveledNet
        The (base) model whose neurons are scored.
    level : int
        Index of the level whose output neurons are scored.
    data : FusionSet
        Samples with labels (the attribution target is the true label).
    method : str
        A name from :func:`importance_methods`: ``"uniform"``, ``"conductance"`` (captum
        ``LayerConductance``, 10 steps) or ``"deeplift"`` (captum ``LayerDeepLift``).
    device : str or torch.device
        Where attribution runs.

    Returns
    -------
    Tensor
        ``float64`` scores ``[n_neurons]``, all positive.
    """
    fn = _IMPORTANCE.get(method)
    return fn(model, level, data, torch.device(device)).double()


def normalize_scores(scores: Tensor) -> Tensor:
    """Scale scores to sum to one (per model and level), so that models weigh equally overall."""
    return scores / scores.sum()


def importance_sums(model: LeveledNet, data: FusionSet, method: str = "uniform",
                    device: torch.device | str = "cpu", levels=None):  # TEMPORARY shim
    levels = list(range(model.num_levels)) if levels is None else list(levels)
    n = len(data)
    return [(neuron_importance(model, lvl, data, method, device) - EPS) * n for lvl in levels], n
