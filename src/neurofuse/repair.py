r"""REPAIR: restore the activation statistics of a fused model (Jordan et al., ICLR 2023).

Averaging aligned networks shrinks the variance of their hidden units ("variance collapse"); the
fix is to give every fused neuron the statistics its base neurons had.  :func:`repair` does two
things, for the output of any fusion method:

1. **BatchNorm reset.**  Running statistics of every BatchNorm layer are reset and re-estimated
   on the fusion data, layer after layer in forward order (:func:`reset_batchnorm`).
2. **Rescaling** (``rescale=True``, :class:`~neurofuse.levels.LeveledNet` models).  From the input
   on, for every level :math:`\ell` but the output, with mean :math:`m_j` and standard deviation
   :math:`\sigma_j` of fused neuron :math:`j`'s pre-activation over the fusion set (conv outputs
   over batch and positions; earlier levels already repaired) and targets
   :math:`\bar m_j, \bar\sigma_j`, the averages of the means and standard deviations of the base
   neurons matched to :math:`j`, the level output becomes

   .. math:: z_j \mapsto a_j z_j + b_j, \qquad a_j = \bar\sigma_j/\sigma_j, \quad
             b_j = \bar m_j - a_j m_j,

   folded into the level's last affine layer (``W_j <- a_j W_j``, ``b_j <- a_j b_j + b_j'``; a
   trailing BatchNorm's weight and bias instead), so no module is added.  BatchNorms of later
   levels are re-estimated once earlier levels have been corrected.  A neuron that is
   constant on the fusion set (:math:`\sigma_j \approx 0`) is only shifted.

Which base neurons are "matched" to fused neuron :math:`j` comes from ``groups`` (the methods
``otfusion`` and ``git-rebasin`` record theirs in their ``groupings`` attribute, which
:func:`neurofuse.fuse` passes on).  When no grouping is known for a level, fused neuron :math:`j`
is matched with neuron :math:`j` of every base model of the fused width there, which is right for
``vanilla``, ``kd-head`` and any method that keeps model 0's neuron order with aligned models,
but **not** for clustering methods whose fused neurons are cluster indices (pass their
groupings).  Levels whose output is not the output of one affine layer (residual levels: ``adds_input``,
or blocks such as the zoo's ResNet ``BasicBlock``, which sum two paths) are not rescaled; their
BatchNorms are still re-estimated.

References
----------
Jordan, K., Sedghi, H., Saukh, O., Entezari, R., & Neyshabur, B. (2023). REPAIR: REnormalizing
Permuted Activations for Interpolation Repair. ICLR 2023.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._fusion_set import FusionSet, as_fusion_set
from ._phases import phase
from .errors import ConfigError, IncompatibleModelsError
from .levels import DEFAULT_MEMORY_BUDGET, LeveledNet, LevelStream, check_same_levels, flatten_neurons
from .stats import MomentStats

__all__ = ["repair", "reset_batchnorm"]

log = logging.getLogger("neurofuse")

_EPS = 1e-8


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _batchnorms(module: nn.Module) -> List[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def reset_batchnorm(model: nn.Module, data: Any, batch_size: int = 256,
                    modules: Optional[Sequence[_BatchNorm]] = None) -> int:
    """Reset and re-estimate the running statistics of ``model``'s BatchNorm layers on ``data``.

    The layers are re-estimated one at a time in the order the forward pass reaches them: each
    sees its inputs exactly as they are at evaluation time (every other module in eval mode,
    earlier layers already re-estimated), and averages the batch statistics over all of
    ``data`` (``momentum=None``).  ``modules`` restricts the reset to some layers.  The model
    ends in eval mode.  Returns the number of layers reset.
    """
    fs = data if isinstance(data, FusionSet) else as_fusion_set(data, batch_size)
    bns = list(_batchnorms(model) if modules is None else modules)
    if not bns:
        return 0
    device = _device_of(model)
    model.eval()
    order: List[_BatchNorm] = []
    hooks = [bn.register_forward_pre_hook(lambda m, _i: order.append(m) if m not in order else None)
             for bn in bns]
    try:
        with torch.no_grad():
            model(next(fs.batches(device))[0])
    finally:
        for h in hooks:
            h.remove()
    order += [bn for bn in bns if bn not in order]  # not on the forward path: reset only
    for bn in order:
        momentum = bn.momentum
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
        try:
            with torch.no_grad():
                for xb, _ in fs.batches(device):
                    model(xb)
        finally:
            bn.momentum = momentum
            bn.eval()
    model.eval()
    return len(bns)


def _fold_target(level: nn.Module) -> Optional[nn.Module]:
    """The module whose per-channel output *is* the level output up to parameter-free ops: the
    last ``Linear`` / ``Conv2d`` / affine BatchNorm of a sequential level; ``None`` for levels
    whose output sums several paths (residual levels) or ends in another parametrised module."""
    if not isinstance(level, nn.Sequential) or getattr(level, "adds_input", False):
        return None
    target = None
    for m in level.modules():
        if list(m.children()):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)) or (isinstance(m, _BatchNorm) and m.affine):
            target = m
        elif any(True for _ in m.parameters(recurse=False)):
            target = None  # a parametrised module after the candidate
    return target


def _moments(stats: MomentStats) -> Tuple[np.ndarray, np.ndarray]:
    mean, std = stats.mean_std()
    return mean.cpu().numpy(), std.cpu().numpy()


def _base_statistics(models: Sequence[LeveledNet], fs: FusionSet) -> List[List[Tuple[np.ndarray, np.ndarray]]]:
    """Per model, per level: (mean, std) of every neuron's output over the fusion set (one
    forward pass per model)."""
    out = []
    for m in models:
        dev = _device_of(m)
        acc = [MomentStats() for _ in range(m.num_levels)]
        with torch.no_grad():
            for xb, _ in fs.batches(dev):
                h = xb
                for i, level in enumerate(m.levels):
                    h = level(h)
                    acc[i].update(flatten_neurons(h, m.axes[i]))
        out.append([_moments(a) for a in acc])
    return out


def _matching(groups: Any, level: int, n_fused: int, widths: Sequence[int]) -> Optional[np.ndarray]:
    """Row-stochastic ``[n_fused, sum(widths)]`` matrix of fused neurons to base neurons."""
    total = int(sum(widths))
    g = None if groups is None else groups[level]
    if g is None:  # same index in every base model of the fused width
        b = np.zeros((n_fused, total))
        off = 0
        for w in widths:
            if w == n_fused:
                b[:, off:off + w] = np.eye(w)
            off += w
        if not b.any():
            log.warning("repair: no grouping for level %d and no base model of width %d; level "
                        "left unchanged (pass groups=)", level, n_fused)
            return None
    elif hasattr(g, "labels") or (isinstance(g, np.ndarray) and g.ndim == 1) or (
            isinstance(g, (list, tuple)) and len(g) > 0 and np.isscalar(g[0])):
        labels = np.asarray(getattr(g, "labels", g), dtype=np.int64)
        if labels.shape != (total,) or labels.min() < 0 or labels.max() >= n_fused:
            raise ConfigError(
                f"grouping of level {level} must label the {total} base neurons with fused neurons "
                f"0..{n_fused - 1}"
            )
        b = np.zeros((n_fused, total))
        b[labels, np.arange(total)] = 1.0
    elif isinstance(g, (list, tuple)):
        mats = [np.asarray(m, dtype=np.float64) for m in g]
        if len(mats) != len(widths) or any(m.shape != (n_fused, w) for m, w in zip(mats, widths)):
            raise ConfigError(
                f"grouping of level {level} must hold one [{n_fused}, width] matrix per base model, "
                f"widths {list(widths)}"
            )
        mats = [m / np.maximum(m.sum(1, keepdims=True), 1e-300) for m in mats]
        b = np.concatenate(mats, axis=1)
    else:
        b = np.asarray(g, dtype=np.float64)
        if b.shape != (n_fused, total):
            raise ConfigError(f"grouping of level {level} must have shape [{n_fused}, {total}]")
    if (b < 0).any():
        raise ConfigError(f"grouping of level {level} has negative weights")
    return b / np.maximum(b.sum(1, keepdims=True), 1e-300)


def _fold(module: nn.Module, a: np.ndarray, b: np.ndarray, level: int) -> None:
    """``output_j <- a_j output_j + b_j`` folded into ``module``'s weight and bias."""
    w = module.weight
    at = torch.as_tensor(a, dtype=torch.float64, device=w.device)
    bt = torch.as_tensor(b, dtype=torch.float64, device=w.device)
    with torch.no_grad():
        w.copy_((w.double() * at.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.copy_((bias.double() * at + bt).to(bias.dtype))
        elif np.abs(b).max(initial=0.0) > 1e-6:
            log.warning("repair: level %d's last layer has no bias; only its scale was repaired", level)


@phase("repair")
def repair(fused: nn.Module, models: Sequence[nn.Module], data: Any, *, rescale: bool = True,
           groups: Optional[Sequence[Any]] = None, batch_size: int = 256,
           memory_budget: Optional[int] = DEFAULT_MEMORY_BUDGET) -> nn.Module:
    """Repair the statistics of a fused model (REPAIR, Jordan et al. 2023); see the module notes.

    Parameters
    ----------
    fused : nn.Module
        The fused model (not modified; a repaired copy is returned).
    models : sequence of nn.Module
        The base models it was fused from (their neuron statistics are the targets).
    data : tensor, (x, y) pair, TensorDataset, DataLoader or FusionSet
        The fusion set (training samples only).
    rescale : bool
        Also rescale every fused neuron to its matched base neurons' mean and std.
    groups : sequence, optional
        Per level (every level but the output), which base neurons each fused neuron stands for:
        ``None`` (same index in every base model of the fused width), a
        :class:`~neurofuse.grouping.Grouping` or label array over the concatenated base neurons
        (cluster members are averaged), a list of one ``[n_fused, n_k]`` non-negative matrix per
        base model (soft matches, e.g. OT barycentric maps; rows are normalised), or one
        ``[n_fused, sum n_k]`` matrix.
    batch_size : int
        Rows per forward pass.
    memory_budget : int, optional
        Bytes of the fused model's level inputs kept in memory while they are carried forward
        (see :class:`neurofuse.levels.LevelStream`); beyond it they go to temporary files.

    Returns
    -------
    nn.Module
        The repaired copy, in eval mode.

    Raises
    ------
    ConfigError
        If ``fused`` is an output ensemble (nothing is fused) or ``groups`` is malformed.
    IncompatibleModelsError
        If ``rescale`` is asked for models that are not compatible level-wise.
    """
    from .models.ensemble import Ensemble

    if isinstance(fused, Ensemble):
        raise ConfigError("cannot repair an output ensemble: it has no fused neurons")
    fs = data if isinstance(data, FusionSet) else as_fusion_set(data, batch_size)
    out = copy.deepcopy(fused).eval()
    n_bn = reset_batchnorm(out, fs)
    if n_bn:
        log.info("repair: re-estimated the statistics of %d BatchNorm layers", n_bn)
    if not rescale:
        return out
    if not isinstance(out, LeveledNet):
        raise IncompatibleModelsError(
            f"repair(rescale=True) needs a LeveledNet, got {type(out).__name__}; use rescale=False "
            "to only reset BatchNorm statistics"
        )
    nets = check_same_levels([out, *models])
    bases = nets[1:]
    if not bases:
        raise IncompatibleModelsError("repair needs the base models the fused model came from")
    n_levels = out.num_levels
    if groups is not None and len(groups) not in (n_levels - 1, n_levels):
        raise ConfigError(f"groups must list {n_levels - 1} levels (all but the output), got {len(groups)}")
    base_stats = _base_statistics(bases, fs)
    base_widths = [m.level_widths() for m in bases]
    device = _device_of(out)
    changed = False
    # the fused model's level inputs, carried forward as its levels are rescaled
    stream = LevelStream(fs, 1, device, memory_budget=memory_budget)
    with stream:
        for lvl in range(n_levels - 1):
            level = out.levels[lvl]
            bns = _batchnorms(level)
            if bns and changed:  # inputs changed since step 1: re-estimate this level's BatchNorms
                reset_batchnorm(out, fs, modules=bns)
            target = _fold_target(level)
            if target is None:
                log.debug("repair: level %d (%s) does not end in one affine layer (residual?); "
                          "not rescaled", lvl, type(level).__name__)
                stream.advance({0: level})
                continue
            acc = MomentStats()
            with torch.no_grad():
                for b in stream:
                    acc.update(flatten_neurons(level(b.inputs[0]), out.axes[lvl]))
            mean_f, std_f = _moments(acc)
            bm = _matching(groups, lvl, len(mean_f), [w[lvl] for w in base_widths])
            if bm is not None:
                mean_t = bm @ np.concatenate([s[lvl][0] for s in base_stats])
                std_t = bm @ np.concatenate([s[lvl][1] for s in base_stats])
                matched = bm.sum(1) > 0
                flat = std_f <= _EPS * np.maximum(1.0, np.abs(mean_f))
                a = np.where(matched & ~flat, std_t / np.where(flat, 1.0, std_f), 1.0)
                shift = np.where(matched, mean_t - a * mean_f, 0.0)
                _fold(target, a, shift, lvl)
                changed = True
                log.debug("repair level %d: scale in [%.3g, %.3g]", lvl, float(a.min()), float(a.max()))
            stream.advance({0: level})
    return out.eval()
