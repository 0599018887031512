r"""Neuron importance through attribution (paper section 2.2, notes section 4).

For neuron :math:`j` of a level, with attribution :math:`\mathrm{attr}_{n,j,p}` of sample
:math:`n` at spatial position or token :math:`p` (zero input baseline, target = true label):

.. math::  s_j = \frac{1}{N}\sum_{n}\sum_{p} |\mathrm{attr}_{n,j,p}| + 10^{-8}

:func:`all_level_importance` scores every level from one set of passes (Conductance: the
``n_steps + 1 = 11`` points of one integration over the input path; DeepLIFT: one pass on inputs
and baselines) and gives what captum's ``LayerConductance`` / ``LayerDeepLift`` give level by
level; :func:`importance_sums` returns the additive form ``(sums, n)``.  Only DeepLIFT on a
model with a level that is, or ends in, a module with a rescale rule (not the zoo models) falls
back to captum, one run per level.

References
----------
Dhamdhere, Sundararajan, Yan, "How important is a neuron?", 2018 (Conductance).
Shrikumar, Greenside, Kundaje, "Learning important features through propagating activation
differences", ICML 2017 (DeepLIFT).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._fusion_set import FusionSet, as_fusion_set
from .._phases import phase
from .._registry import Registry
from ..errors import DataError
from ..levels import LeveledNet
from ._attribution import (
    LevelOutputIsRuleOutput,
    conductance_batch,
    deeplift_batch,
    deeplift_needs_fallback,
)

__all__ = [
    "EPS",
    "ImportanceFn",
    "all_level_importance",
    "importance_methods",
    "importance_sums",
    "neuron_importance",
    "normalize_scores",
    "register_importance",
]

#: ``fn(model, levels, fusion_set, device) -> (sums, n)``: per requested level, the sum over the
#: samples of the per-sample score ``[n_neurons]`` (float64), and the number of samples
ImportanceFn = Callable[[LeveledNet, List[int], FusionSet, torch.device], Tuple[List[Tensor], int]]
_IMPORTANCE: Registry[ImportanceFn] = Registry("importance score")
EPS = 1e-8
#: captum's ``n_steps`` for Conductance (``n_steps + 1`` integration points)
CONDUCTANCE_STEPS = 10


def register_importance(name: str) -> Callable[[ImportanceFn], ImportanceFn]:
    """Register an importance score under ``name``.

    The function is ``fn(model, levels, fusion_set, device) -> (sums, n)``: for each index in
    ``levels`` (a list of distinct level indices), ``sums`` holds the sum over the ``n`` samples of
    ``fusion_set`` of the per-sample score of every neuron of that level (``[n_neurons]``); the
    score is then ``sums / n + EPS`` (:func:`all_level_importance`).  Returning sums keeps the
    statistic additive, so callers can add them up across processes.
    """
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


@register_importance("uniform")
def _uniform(model: LeveledNet, levels: List[int], fs: FusionSet,
             device: torch.device) -> Tuple[List[Tensor], int]:
    widths = model.level_widths()
    n = len(fs)
    return [torch.full((widths[lvl],), float(n), dtype=torch.float64) for lvl in levels], n


def _model_dtype(model: LeveledNet) -> Optional[torch.dtype]:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else None


def _labelled_batches(model: LeveledNet, fs: FusionSet, algorithm: str, device: torch.device):
    """The fusion set's ``(x, y)`` batches on ``device``, inputs in the model's float dtype."""
    if fs.y is None:
        raise DataError(f"importance {algorithm!r} needs labels: pass data=(x, y)")
    dtype = _model_dtype(model)
    for xb, yb in fs.batches(device):
        if dtype is not None and xb.is_floating_point() and xb.dtype != dtype:
            xb = xb.to(dtype)
        assert yb is not None
        yield xb, yb


def _captum_level_sums(algorithm: str, model: LeveledNet, level: int, fs: FusionSet,
                       device: torch.device) -> Tuple[Tensor, int]:
    """One level with captum's own ``LayerConductance`` / ``LayerDeepLift`` (the fallback)."""
    from captum.attr import LayerConductance, LayerDeepLift

    layer = model.levels[level]
    attributor = (LayerConductance(model, layer) if algorithm == "conductance"
                  else LayerDeepLift(model, layer))
    total: Optional[Tensor] = None
    n = 0
    for xb, yb in _labelled_batches(model, fs, algorithm, device):
        xb = xb.clone().requires_grad_(True)
        if algorithm == "conductance":
            attr = attributor.attribute(xb, target=yb, n_steps=CONDUCTANCE_STEPS)
        else:
            attr = attributor.attribute(xb, target=yb)
        red = _reduce(attr.detach(), model.axes[level]).double().sum(0).cpu()
        total = red if total is None else total + red
        n += xb.shape[0]
    assert total is not None
    return total, n


def _one_pass_sums(algorithm: str, model: LeveledNet, levels: List[int], fs: FusionSet,
                   device: torch.device) -> Tuple[List[Tensor], int]:
    """All ``levels`` from the same passes (see :mod:`neurofuse.importance._attribution`)."""
    mods = [model.levels[lvl] for lvl in levels]
    totals: List[Optional[Tensor]] = [None] * len(levels)
    n = 0
    for xb, yb in _labelled_batches(model, fs, algorithm, device):
        if algorithm == "conductance":
            attrs = conductance_batch(model, mods, xb, yb, n_steps=CONDUCTANCE_STEPS)
        else:
            attrs = deeplift_batch(model, mods, xb, yb)
        for i, (lvl, attr) in enumerate(zip(levels, attrs)):
            red = _reduce(attr.detach(), model.axes[lvl]).double().sum(0).cpu()
            totals[i] = red if totals[i] is None else totals[i] + red
        n += xb.shape[0]
    return [t for t in totals], n  # type: ignore[misc]


def _per_level_captum(algorithm: str, model: LeveledNet, levels: List[int], fs: FusionSet,
                      device: torch.device) -> Tuple[List[Tensor], int]:
    sums, n = [], 0
    for lvl in levels:
        s, n = _captum_level_sums(algorithm, model, lvl, fs, device)
        sums.append(s)
    return sums, n


@register_importance("conductance")
def _conductance(model: LeveledNet, levels: List[int], fs: FusionSet,
                 device: torch.device) -> Tuple[List[Tensor], int]:
    """Conductance (Dhamdhere et al. 2018) as captum's ``LayerConductance`` (zero baseline,
    target = label, ``n_steps=10``, Gauss-Legendre), all levels from ``n_steps + 1`` forward and
    ``n_steps + 1`` backward passes over the fusion set (one batch of ``11 * B`` rows each)."""
    model.eval()
    return _one_pass_sums("conductance", model, levels, fs, device)


@register_importance("deeplift")
def _deeplift(model: LeveledNet, levels: List[int], fs: FusionSet,
              device: torch.device) -> Tuple[List[Tensor], int]:
    """DeepLIFT rescale (Shrikumar et al. 2017) as captum's ``LayerDeepLift`` (zero baseline,
    target = label), all levels from one forward and one backward pass on ``[x; 0]``.

    Falls back to captum, one run per level, where one shared pass cannot reproduce captum: when a
    level module is itself a rule module (``nn.ReLU``, ``nn.MaxPool2d``... used directly as a
    level: captum drops that module's rule for that level only), or when a level's output is the
    output of a rule module (a level ending in, e.g., ``nn.ReLU``: captum's result then depends on
    which single layer it hooks).  Neither happens in the zoo models, whose levels end at a
    pre-activation."""
    model.eval()
    mods = [model.levels[lvl] for lvl in levels]
    if deeplift_needs_fallback(model, mods):
        return _per_level_captum("deeplift", model, levels, fs, device)
    try:
        return _one_pass_sums("deeplift", model, levels, fs, device)
    except LevelOutputIsRuleOutput:
        return _per_level_captum("deeplift", model, levels, fs, device)


def _level_indices(model: LeveledNet, levels: Optional[Sequence[int]]) -> List[int]:
    n = model.num_levels
    if levels is None:
        return list(range(n))
    out = []
    for lvl in levels:
        i = int(lvl)
        if not -n <= i < n:
            raise IndexError(f"level {lvl} out of range for a model with {n} levels")
        out.append(i % n)
    return out


def _as_fs(data: object) -> FusionSet:
    return data if isinstance(data, FusionSet) else as_fusion_set(data)


@phase("importance")
def importance_sums(model: LeveledNet, data: object, method: str = "uniform",
                    device: torch.device | str = "cpu",
                    levels: Optional[Sequence[int]] = None) -> Tuple[List[Tensor], int]:
    r"""Additive statistics of an importance score: per level, the sum over the samples.

    For ``"conductance"`` and ``"deeplift"`` the per-sample score of neuron :math:`j` is
    :math:`\sum_p |\mathrm{attr}_{n,j,p}|` (summed over spatial positions or tokens), so
    ``sums[i] / n + EPS`` is :func:`all_level_importance`; sums from disjoint parts of the data
    (e.g. other processes) add up, and so do their ``n``.

    Parameters
    ----------
    model : LeveledNet
        The model whose neurons are scored (put in eval mode).
    data : FusionSet or (x, y)
        Samples with labels (the attribution target is the true label); anything
        :func:`neurofuse.as_fusion_set` accepts.
    method : str
        A name from :func:`importance_methods`.
    device : str or torch.device
        Where attribution runs.
    levels : sequence of int, optional
        Level indices (negative counts from the end); default every level, the last included.

    Returns
    -------
    sums : list of Tensor
        ``float64`` ``[n_neurons]`` on the CPU, one per requested level, in the order asked.
    n : int
        Number of samples summed over.

    Raises
    ------
    ConfigError
        For an unknown ``method``.
    DataError
        If an attribution score gets data without labels.
    """
    fn = _IMPORTANCE.get(method)
    fs = _as_fs(data)
    idx = _level_indices(model, levels)
    unique = list(dict.fromkeys(idx))
    sums, n = fn(model, unique, fs, torch.device(device))
    by_level: Dict[int, Tensor] = {lvl: s.detach().double().cpu() for lvl, s in zip(unique, sums)}
    return [by_level[lvl] for lvl in idx], int(n)


def all_level_importance(model: LeveledNet, data: object, method: str = "uniform",
                         device: torch.device | str = "cpu",
                         levels: Optional[Sequence[int]] = None) -> List[Tensor]:
    r"""Importance score of every neuron of every level (or of ``levels``), from one set of passes.

    :math:`s_j = \frac{1}{N}\sum_n\sum_p |\mathrm{attr}_{n,j,p}| + 10^{-8}`, with the
    attributions of all levels computed together: Conductance (Dhamdhere et al. 2018) from the
    ``n_steps + 1 = 11`` forward and backward passes of one integration over the input path,
    DeepLIFT (Shrikumar et al. 2017) from one forward and one backward pass; the results equal
    captum's ``LayerConductance`` / ``LayerDeepLift`` run on each level separately.

    Parameters
    ----------
    model : LeveledNet
        The (base) model whose neurons are scored (put in eval mode).
    data : FusionSet or (x, y)
        Samples with labels (the attribution target is the true label).
    method : str
        A name from :func:`importance_methods`: ``"uniform"``, ``"conductance"`` or ``"deeplift"``.
    device : str or torch.device
        Where attribution runs.
    levels : sequence of int, optional
        Level indices; default every level (the last, the logits, included).

    Returns
    -------
    list of Tensor
        ``float64`` scores ``[n_neurons]``, all positive, one per requested level.

    Raises
    ------
    ConfigError
        For an unknown ``method``.
    DataError
        If an attribution score gets data without labels, or the data is empty.
    """
    sums, n = importance_sums(model, data, method, device, levels)
    if n <= 0:
        raise DataError("empty fusion set: importance needs at least one sample")
    return [s / n + EPS for s in sums]


def neuron_importance(model: LeveledNet, level: int, data: object, method: str = "uniform",
                      device: torch.device | str = "cpu") -> Tensor:
    """Importance score of every neuron at the output of ``model.levels[level]``.

    One level of :func:`all_level_importance`; to score several levels, call that instead (it
    shares the passes).

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
    return all_level_importance(model, data, method, device, levels=[level])[0]


def normalize_scores(scores: Tensor) -> Tensor:
    """Scale scores to sum to one (per model and level), so that models weigh equally overall."""
    return scores / scores.sum()
