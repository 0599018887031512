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

Which base neurons are "matched" to fused neuron :math:`j` comes from ``correspondences``: every
fusion method records one :class:`~neurofuse.grouping.Correspondence` per hidden level in its
:class:`~neurofuse.methods.FusionResult`, which :func:`neurofuse.fuse` passes on.  When none is
given for a level, fused neuron :math:`j` is matched with neuron :math:`j` of every base model of
the fused width there, which is right only for averaging without alignment.  Levels whose output is not the output of one affine layer (residual levels: ``adds_input``,
or blocks such as the zoo's ResNet ``BasicBlock``, which sum two paths) are not rescaled; their
BatchNorms are still re-estimated.  A multi-head model (:class:`~neurofuse.models.MultiHead`,
ZipIt!'s partial zipping) has its fused trunk rescaled (the correspondences of its levels); its
heads are the base models' own levels, whose BatchNorms are re-estimated afterwards.

References
----------
Jordan, K., Sedghi, H., Saukh, O., Entezari, R., & Neyshabur, B. (2023). REPAIR: REnormalizing
Permuted Activations for Interpolation Repair. ICLR 2023.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._fusion_set import FusionSet, as_fusion_set
from ._phases import phase
from .errors import ConfigError, IncompatibleModelsError
from .levels import DEFAULT_MEMORY_BUDGET, LeveledNet, LevelStream, check_same_levels, flatten_neurons
from .levels._transformer import describe as describe_transformer
from .grouping import Correspondence
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
    last ``Linear`` / ``Conv2d`` / affine BatchNorm, LayerNorm over the neurons, GroupNorm or InstanceNorm of a
    sequential level (a normalisation's output is its weight and bias applied per channel, so
    the rescaling folds into them); ``None`` for levels whose output sums several paths (residual
    levels) or ends in another parametrised module."""
    if not isinstance(level, nn.Sequential) or getattr(level, "adds_input", False):
        return None
    if describe_transformer(level) is not None:   # a transformer level: the stream is a residual sum
        return None
    target = None
    for m in level.modules():
        if list(m.children()):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)) or (isinstance(m, _BatchNorm) and m.affine) or (
                isinstance(m, (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)) and m.affine) or (
                isinstance(m, nn.LayerNorm) and m.elementwise_affine and len(m.normalized_shape) == 1):
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


def _base_level_inputs(models: Sequence[LeveledNet], fs: FusionSet, level: int) -> List[List[Any]]:
    """Per model, the inputs of ``level`` on every fusion batch."""
    out = []
    for m in models:
        xs = []
        with torch.no_grad():
            for xb, _ in fs.batches(_device_of(m)):
                h = xb
                for i in range(level):
                    h = m.levels[i](h)
                xs.append(h)
        out.append(xs)
    return out


def _matching(correspondences: Optional[Sequence[Optional[Correspondence]]], level: int, n_fused: int,
              widths: Sequence[int]) -> Optional[np.ndarray]:
    """Row-stochastic ``[n_fused, sum(widths)]`` matrix of fused neurons to base neurons."""
    c = None if correspondences is None else correspondences[level]
    if c is None:  # same index in every base model of the fused width
        c = Correspondence.same_index(widths, n_fused)
        if not c.covered().any():
            log.warning("repair: no correspondence for level %d and no base model of width %d; level "
                        "left unchanged (pass correspondences=)", level, n_fused)
            return None
    if not isinstance(c, Correspondence):
        raise ConfigError(f"correspondences[{level}] is a {type(c).__name__}, not a "
                          "neurofuse.grouping.Correspondence (FusionResult.correspondences holds them)")
    if c.n_fused != n_fused or list(c.widths) != [int(w) for w in widths]:
        raise ConfigError(
            f"the correspondence of level {level} relates {c.n_fused} fused neurons to base widths "
            f"{list(c.widths)}, but the models have {n_fused} and {list(widths)} there")
    return c.normalized()


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


def _probe_values(level: nn.Module, space: Any, h: Any) -> List[Any]:
    """The values ``[rows, n]`` of every probe of internal ``space`` while ``level`` runs on ``h``."""
    from .levels._layout import Space, capture_spaces, own_spaces

    space = own_spaces(level, [space])[0]      # the level's own rows (its widths may differ)
    one = [Space(f"{space.name}.{i}", space.point, None, probes=(p,)) for i, p in enumerate(space.probes)]
    return capture_spaces(level, one, lambda: level(h), "token")


def _repair_inner(out: LeveledNet, bases: Sequence[LeveledNet], fs: FusionSet, lvl: int,
                  inner: Dict[str, Correspondence], fused_inputs: Any, base_inputs: Sequence[Any]) -> bool:
    """REPAIR inside a transformer level: every internal space with a correspondence (attention
    queries, keys, values; MLP hidden neurons) gets its matched base neurons' mean and std, folded
    into the rows of the projection that writes it (in forward order, each measured after the
    earlier ones were repaired).  Returns whether anything changed."""
    from .levels._layout import level_layout
    from .levels._transformer import tensor_of
    from .levels._layout import oriented

    changed = False
    layout = level_layout(out.levels[lvl], lvl)
    for space in layout.internal:
        corr = inner.get(space.name)
        if corr is None or not space.probes:
            continue
        bm = corr.normalized()
        for pi, (_, weight, bias, start, stop, transposed) in enumerate(space.probes):
            base = []
            for m, xs in zip(bases, base_inputs):
                acc = MomentStats()
                with torch.no_grad():
                    for h in xs:
                        acc.update(_probe_values(m.levels[lvl], space, h)[pi])
                base.append(_moments(acc))
            acc = MomentStats()
            with torch.no_grad():
                for h in fused_inputs:
                    acc.update(_probe_values(out.levels[lvl], space, h)[pi])
            mean_f, std_f = _moments(acc)
            mean_t = bm @ np.concatenate([b[0] for b in base])
            std_t = bm @ np.concatenate([b[1] for b in base])
            matched = bm.sum(1) > 0
            flat = std_f <= _EPS * np.maximum(1.0, np.abs(mean_f))
            a = np.where(matched & ~flat, std_t / np.where(flat, 1.0, std_f), 1.0)
            shift = np.where(matched, mean_t - a * mean_f, 0.0)
            w = tensor_of(out.levels[lvl], weight)
            at = torch.as_tensor(a, dtype=torch.float64, device=w.device)
            with torch.no_grad():
                rows = oriented(w, "linear_t" if transposed else "linear")[start:stop]
                rows.copy_((rows.double() * at[:, None]).to(w.dtype))
                if bias is not None:
                    b = tensor_of(out.levels[lvl], bias)[start:stop]
                    b.copy_((b.double() * at + torch.as_tensor(shift, device=w.device)).to(b.dtype))
            changed = True
    return changed


@phase("repair")
def repair(fused: nn.Module, models: Sequence[nn.Module], data: Any, *, rescale: bool = True,
           correspondences: Optional[Sequence[Optional[Correspondence]]] = None, batch_size: int = 256,
           memory_budget: Optional[int] = DEFAULT_MEMORY_BUDGET,
           inner_correspondences: Optional[Dict[int, Dict[str, Correspondence]]] = None) -> nn.Module:
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
    correspondences : sequence of Correspondence, optional
        Per level (every level but the output), which base neurons each fused neuron stands for
        (:attr:`neurofuse.methods.FusionResult.correspondences`; the targets are the
        correspondence-weighted means of the base neurons' statistics).  ``None`` (or ``None`` for
        a level): fused neuron ``j`` stands for neuron ``j`` of every base model of the fused width.
    batch_size : int
        Rows per forward pass.
    inner_correspondences : dict, optional
        ``{level: {space: Correspondence}}`` for the internal spaces of transformer levels (the
        alignment methods record them in ``FusionResult.extras["inner_correspondences"]``): the
        attention queries, keys and values and the MLP hidden neurons are then repaired inside
        the level (a transformer level's output is a residual sum and is not rescaled).
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
        If ``fused`` is an output ensemble (nothing is fused) or a correspondence does not fit.
    IncompatibleModelsError
        If ``rescale`` is asked for models that are not compatible level-wise.
    """
    from .models.ensemble import Ensemble
    from .models.multihead import MultiHead

    if isinstance(fused, Ensemble):
        raise ConfigError("cannot repair an output ensemble: it has no fused neurons")
    fs = data if isinstance(data, FusionSet) else as_fusion_set(data, batch_size)
    out = copy.deepcopy(fused).eval()
    n_bn = reset_batchnorm(out, fs)
    if n_bn:
        log.info("repair: re-estimated the statistics of %d BatchNorm layers", n_bn)
    if not rescale:
        return out
    if isinstance(out, MultiHead):  # the fused trunk is rescaled; the heads are the models' own
        bases = check_same_levels(list(models))
        levels, axes, hidden = list(out.trunk), out.trunk_axes, out.stop_at
    elif isinstance(out, LeveledNet):
        bases = check_same_levels([out, *models])[1:]
        levels, axes, hidden = list(out.levels), out.axes, out.num_levels - 1
    else:
        raise IncompatibleModelsError(
            f"repair(rescale=True) needs a LeveledNet, got {type(out).__name__}; use rescale=False "
            "to only reset BatchNorm statistics"
        )
    if not bases:
        raise IncompatibleModelsError("repair needs the base models the fused model came from")
    if correspondences is not None and len(correspondences) not in (hidden, hidden + 1):
        raise ConfigError(f"correspondences must list {hidden} levels (every fused level but the output), "
                          f"got {len(correspondences)}")
    changed = _rescale(out, levels, axes, hidden, bases, fs, correspondences, memory_budget,
                       inner_correspondences)
    if changed and isinstance(out, MultiHead):  # the heads' inputs changed: re-estimate their BatchNorms
        head_bns = [bn for head in out.heads for bn in _batchnorms(head)]
        if head_bns:
            reset_batchnorm(out, fs, modules=head_bns)
    return out.eval()


def _rescale(out: nn.Module, levels: Sequence[nn.Module], axes: Sequence[str], hidden: int,
             bases: Sequence[LeveledNet], fs: FusionSet,
             correspondences: Optional[Sequence[Optional[Correspondence]]],
             memory_budget: Optional[int],
             inner_correspondences: Optional[Dict[int, Dict[str, Correspondence]]] = None) -> bool:
    """Rescale the first ``hidden`` fused ``levels`` of ``out`` (in place) to the statistics of
    their corresponding base neurons; returns whether any level changed."""
    base_stats = _base_statistics(bases, fs)
    base_widths = [m.level_widths() for m in bases]
    device = _device_of(out)
    changed = False
    unmapped: List[int] = []   # transformer levels without maps of their heads and MLP neurons
    # the fused model's level inputs, carried forward as its levels are rescaled
    stream = LevelStream(fs, 1, device, memory_budget=memory_budget)
    with stream:
        for lvl in range(hidden):
            level = levels[lvl]
            bns = _batchnorms(level)
            if bns and changed:  # inputs changed since step 1: re-estimate this level's BatchNorms
                reset_batchnorm(out, fs, modules=bns)
            spec = describe_transformer(level)
            if spec is not None and inner_correspondences and lvl in inner_correspondences:
                base_in = _base_level_inputs(bases, fs, lvl)
                if _repair_inner(out, bases, fs, lvl, inner_correspondences[lvl],
                                 [b.inputs[0] for b in stream], base_in):
                    changed = True
                stream.advance({0: level})
                continue
            if spec is not None and spec.layout().internal:
                unmapped.append(lvl)
            target = _fold_target(level)
            if target is None:
                log.debug("repair: level %d (%s) does not end in one affine layer (residual?); "
                          "not rescaled", lvl, type(level).__name__)
                stream.advance({0: level})
                continue
            acc = MomentStats()
            with torch.no_grad():
                for b in stream:
                    acc.update(flatten_neurons(level(b.inputs[0]), axes[lvl]))
            mean_f, std_f = _moments(acc)
            bm = _matching(correspondences, lvl, len(mean_f), [w[lvl] for w in base_widths])
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
    if unmapped:
        log.warning("repair: transformer levels %s were left as they are: the fusion recorded no map of "
                    "their heads and MLP neurons (otfusion, git-rebasin, weight-matching and the aligned "
                    "merges do)", ", ".join(map(str, unmapped)))
    return changed
