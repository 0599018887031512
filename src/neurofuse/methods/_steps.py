r"""The closed form inside a level: residual blocks, depthwise convolutions, concatenations.

:class:`~neurofuse.methods.LinearFusion` fits a level ``[parameter-free ops..., Linear|Conv2d]`` in
one pass (:meth:`~neurofuse.methods.LinearFusion.level_statistics`).  Every other level that the
closed form fits (:func:`neurofuse.levels.affine_reason`) is fitted here one *step* at a time, in
the order :func:`neurofuse.levels._steps.closed_form_steps` gives, each step in one pass over the
fusion set from the fused model's own values just before the layer:

* ``"new"``: the layer's input rows :math:`X` (the fused level's, captured with a hook, its
  layers before this one already fitted) and every base layer's outputs :math:`A` (grouped like
  an ordinary level: least squares, K-means or Hungarian on the projections, the groups' weighted
  mean weights; :class:`~neurofuse.approximation.LinearStats`).  Inner neurons weigh alike, the
  level's output neurons with their importance;
* ``"depthwise"``: per fused channel, from its own input channel, with the grouping of that
  channel (:class:`~neurofuse.approximation.DepthwiseStats`);
* ``"residual"``: a residual block with an identity shortcut writes :math:`s + W u`, whose neurons
  are its input's; with the input's grouping :math:`c(j)`, the target of base neuron :math:`j` is
  its block output minus the fused shortcut, :math:`a_j - s_{c(j)}`, so that the fused block
  output :math:`s_c + X w_c` is the projection of the weighted centre of its group's outputs.

A step whose ``Linear`` reads a ``LayerNorm`` of its inputs (a *pre-norm*) is fitted on the
normalised input: the fused LayerNorm gets weight 1 and bias 0, and every base layer's prior is its
weights with its own LayerNorm's affine folded in.

A step whose ``Linear`` is followed by a ``LayerNorm`` over its outputs (a step with a *norm*)
is fitted in two passes.  LayerNorm maps a row :math:`z` to :math:`\gamma \odot (z - \mu(z)) /
\sigma(z) + \beta` and ignores each row's shift and scale, so the layer is fitted to the base
models' centred rows :math:`z - \mu(z)` (which the base layer with its weights centred over its
neurons computes exactly), each base model's scaled by the least-squares constant of
:math:`1/\sigma` over the fusion set, :math:`c = \sum_r \sigma_r / \sum_r \sigma_r^2`, so that
models are compared in the units the LayerNorm sees (the statistics are rescaled after the pass,
:meth:`~neurofuse.approximation.LinearStats.scale_targets`).  A second pass fits the fused
LayerNorm's weight and bias neuron by neuron (:class:`~neurofuse.approximation.NeuronRegression`),
from the fused normalised rows to the weighted centres of the groups' LayerNorm outputs.  Such a
step's ``grouping_error`` and ``unreachable_error`` are in the units of those scaled, centred rows;
its report adds the LayerNorm fit's relative squared error (``norm_error``).

The grouping of the level output (the concatenation of its parts' for a concatenation, block
diagonal) is recorded as the level's correspondence and feeds the next level.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..approximation import (DepthwiseStats, LinearStats, NeuronRegression, RowScale, aligned_prior,
                             assign_affine, depthwise_design, design_matrix, fold_layernorm, group_means,
                             reset_layernorm)
from ..errors import IncompatibleModelsError
from ..grouping import Grouping, centroids, identity_grouping
from ..levels import LeveledNet, LevelStream, Step, closed_form_steps, flatten_neurons

__all__ = ["fit_level_in_steps"]

log = logging.getLogger("neurofuse")

#: a neuron space's grouping: per base model the fused neuron of each of its neurons, and k
Groups = Tuple[List[np.ndarray], int]


def _flat(t: Tensor) -> Tensor:
    """A layer output as ``[rows, neurons]`` (channels of a conv, last axis of tokens)."""
    return flatten_neurons(t, {4: "conv", 3: "token"}.get(t.dim(), "dense"))


def _capture(level: nn.Module, h: Tensor, inputs: Sequence[nn.Module], outputs: Sequence[nn.Module]
             ) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """``level(h)``, the inputs of ``inputs`` and the outputs of ``outputs`` during that call."""
    got_in: Dict[int, Tensor] = {}
    got_out: Dict[int, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, i=i: got_in.__setitem__(i, a[0]))
             for i, m in enumerate(inputs)]
    hooks += [m.register_forward_hook(lambda _m, _a, o, i=i: got_out.__setitem__(i, o))
              for i, m in enumerate(outputs)]
    try:
        out = level(h)
    finally:
        for hd in hooks:
            hd.remove()
    return out, [got_in[i] for i in range(len(inputs))], [got_out[i] for i in range(len(outputs))]


def _concat(groups: Sequence[Groups]) -> Groups:
    """The grouping of a concatenation: its parts' labels, offset (block diagonal)."""
    offsets = np.cumsum([0] + [k for _, k in groups])
    per_model = [np.concatenate([g[0][i] + o for g, o in zip(groups, offsets)]) for i in range(len(groups[0][0]))]
    return per_model, int(offsets[-1])


def fit_level_in_steps(method: Any, run: Any, level: int, models: List[LeveledNet], fused: LeveledNet,
                       stream: LevelStream) -> None:
    """Fit ``fused.levels[level]`` step by step (module docstring), record its correspondence and
    report in ``run`` and advance ``stream`` past the level.  ``method`` is the
    :class:`~neurofuse.methods.LinearFusion` whose options, grouping and importance are used."""
    last = level == fused.num_levels - 1
    layout, steps = closed_form_steps(fused.levels[level], level, last)
    for i, m in enumerate(models):
        try:
            other, _ = closed_form_steps(m.levels[level], level, last)
        except IncompatibleModelsError:
            other = None
        if other != layout:
            raise IncompatibleModelsError(
                f"model {i} level {level} has different layers than model 0's; the closed form needs "
                "the same architecture up to widths")
    widths = [bw[level] for bw in run.base_widths]
    scores = np.split(method.level_scores(run, models, level), np.cumsum(widths)[:-1])
    groups: Dict[str, Groups] = {}
    if run.prev_labels is not None:
        groups["in"] = ([np.asarray(p) for p in run.prev_labels], run.prev_k)
    else:  # the model input, shared: its channel c is fused channel c
        first = next(iter(stream.batches([0]))).inputs[0]
        c = first.shape[-1] if first.dim() == 3 else first.shape[1]
        groups["in"] = ([np.arange(c) for _ in models], c)
    parts_w: List[List[int]] = []
    if layout.parts:
        in_w = [len(g) for g in groups["in"][0]]
        parts_w = [layout.part_widths(m.levels[level].state_dict(), w) for m, w in zip(models, in_w)]
    steps_report: List[Dict[str, Any]] = []
    for j, step in enumerate(steps):
        info = _fit_step(method, run, level, models, fused, stream, step, groups, scores, parts_w,
                         keep=j == len(steps) - 1 and not last)
        steps_report.append(info)
    if layout.parts:
        out = _concat([groups[p] for p in layout.parts])
    else:
        out = groups["in"] if layout.tied else groups["out"]
    if not last:
        labels = np.concatenate(out[0])
        w = np.concatenate(scores)
        run.record(level, Grouping(labels, out[1], w).correspondence(widths))
    run.prev_labels, run.prev_k = list(out[0]), out[1]
    run.report.append({"level": level, "rank": min(s["rank"] for s in steps_report),
                       "rows": steps_report[-1]["rows"],
                       "grouping_error": float(sum(s["grouping_error"] for s in steps_report)),
                       "unreachable_error": float(steps_report[-1]["unreachable_error"]),
                       "steps": steps_report})
    if not last:
        stream.advance({0: fused.levels[level], **{i: m.levels[level] for i, m in enumerate(models, 1)}})


def _fit_step(method: Any, run: Any, level: int, models: List[LeveledNet], fused: LeveledNet,
              stream: LevelStream, step: Step, groups: Dict[str, Groups], scores: List[np.ndarray],
              parts_w: List[List[int]], keep: bool) -> Dict[str, Any]:
    """One step: accumulate its statistics over ``stream``, solve, write the fused layer(s) and
    the grouping of the space it writes into ``groups``."""
    opts = method.options
    flv = fused.levels[level]
    fmods = [flv.get_submodule(name) for name in step.modules]
    bmods = [[m.levels[level].get_submodule(name) for name in step.modules] for m in models]
    last = level == fused.num_levels - 1
    whole = step.kind == "residual" or (step.part == -1 and hasattr(flv, "shortcut"))
    res_mod = [flv.get_submodule(step.residual)] if step.residual else []
    in_groups = [groups[s] for s in step.inputs]
    if step.kind == "depthwise":
        lab, k = groups[step.space]
        stats: Any = DepthwiseStats(torch.from_numpy(np.concatenate(lab)), k)
    else:
        stats = LinearStats()
        if step.kind == "residual":
            res_labels = torch.from_numpy(np.concatenate(groups["in"][0])).to(method.device)
    bnorms = [m.levels[level].get_submodule(step.norm) for m in models] if step.norm else []
    spread = RowScale()
    if step.pre_norm:   # the layer is fitted on the normalised input: the LayerNorm's affine is folded
        pre = flv.get_submodule(step.pre_norm)
        reset_layernorm(pre.weight, pre.bias)
    with torch.no_grad():
        for b in stream:
            _, ins, res = _capture(flv, b.inputs[0], fmods, res_mod)
            outs = []
            for i, (m, h) in enumerate(zip(models, b.inputs[1:]), start=1):
                z, _, got = _capture(m.levels[level], h, [], bmods[i - 1])
                if keep:
                    b.keep(i, z)
                outs.append(flatten_neurons(z, m.axes[level]) if whole else _flat(got[0]))
            if bnorms:   # what the LayerNorms see: rows centred (scaled after the pass)
                spread.update(outs, [ln.eps for ln in bnorms])
                outs = [o - o.mean(1, keepdim=True) for o in outs]
            a = torch.cat(outs, dim=1)
            if step.kind == "depthwise":
                stats.update(depthwise_design(fmods[0], ins[0]), a)
                continue
            if step.kind == "residual":
                a = a - _flat(res[0])[:, res_labels]
            stats.update(torch.cat([design_matrix(f, u) for f, u in zip(fmods, ins)], dim=1), a)
    stats = method.reduce(stats)
    widths = [int(bm[0].weight.shape[0]) for bm in bmods]
    scale = None
    if bnorms:   # each model's centred rows in the units its LayerNorm sees
        scale = method.reduce(spread).inverse()
        stats.scale_targets(torch.repeat_interleave(scale, torch.tensor(widths, device=scale.device)))
    if step.kind != "new" and int(fmods[0].weight.shape[0]) != groups[step.space][1]:
        raise IncompatibleModelsError(
            f"level {level}: {step.modules[0]} keeps the neurons of the space it reads "
            f"({groups[step.space][1]} fused neurons) but has {fmods[0].weight.shape[0]} outputs; "
            "give the fused model the same width there")
    if step.part is None:
        weights = np.ones(sum(widths))
    elif step.part == -1:
        weights = np.concatenate(scores)
    else:
        off = [int(np.sum(pw[:step.part])) for pw in parts_w]
        weights = np.concatenate([s[o:o + w] for s, o, w in zip(scores, off, widths)])
    if step.kind == "depthwise":
        prior = torch.cat([_dw_prior(bm[0]) for bm in bmods], dim=1) if opts.prior else None
        w, residual, rank = stats.solve(opts.rtol, opts.ridge, prior)
        lab, k = groups[step.space]
        gw = torch.from_numpy(weights)
        f = fmods[0]
        fw = group_means(w, gw, torch.from_numpy(np.concatenate(lab)), k)       # [d, k]
        with torch.no_grad():
            kk = f.weight[0].numel()
            f.weight.copy_(fw[:kk].T.reshape(f.weight.shape).to(f.weight.dtype))
            if f.bias is not None:
                f.bias.copy_(fw[kk].to(f.bias.dtype))
        return {"space": step.space, "kind": step.kind, "rank": rank, "rows": stats.rows,
                "grouping_error": 0.0, "unreachable_error": float((gw * residual.cpu()).sum())}
    prior = None
    if opts.prior:
        priors = []
        for i, bm in enumerate(bmods):
            if step.pre_norm:   # one layer (closed_form_steps refuses a pre-norm of two fitted together)
                bm = [_Folded(bm[0], models[i].levels[level].get_submodule(step.pre_norm))]
            cols = [aligned_prior(mod, torch.from_numpy(g[0][i]), g[1]) for mod, g in zip(bm, in_groups)]
            if any(c is None for c in cols):
                priors = []
                break
            priors.append(torch.cat(cols, dim=0))  # type: ignore[arg-type]
        if priors and scale is not None:
            priors = [(p - p.mean(1, keepdim=True)) * float(c) for p, c in zip(priors, scale)]
        prior = torch.cat(priors, dim=1).to(method.device) if priors else None
        if prior is not None and prior.shape[0] != sum(f.weight[0].numel() + (f.bias is not None) for f in fmods):
            prior = None
    sol = stats.solve(opts.rtol, opts.ridge, prior)
    feats = sol.features.float()
    if step.kind == "residual":
        lab, k = groups["in"]
        grouping = Grouping(np.concatenate(lab), k, weights)
    else:
        if last and step.part == -1:
            grouping = identity_grouping(widths, method.output_level_weights(run, models))
        else:
            grouping = method.group(feats, weights, widths, int(fmods[0].weight.shape[0]), level)
        groups[step.space] = (np.split(grouping.labels, np.cumsum(widths)[:-1]), grouping.k)
    gw = torch.from_numpy(grouping.weights).to(method.device)
    labels = torch.from_numpy(grouping.labels).to(method.device)
    w = sol.combine(gw, labels, grouping.k)                                   # [d, k]
    row = 0
    for f in fmods:
        d = f.weight[0].numel() + (f.bias is not None)
        assign_affine(f, w[row:row + d])
        row += d
    f64 = feats.double()
    t = centroids(f64, gw, labels, grouping.k)
    info = {"space": step.space, "kind": step.kind, "rank": sol.rank, "rows": stats.rows,
            "grouping_error": float((gw * ((f64 - t[labels]) ** 2).sum(1)).sum()),
            "unreachable_error": float((gw * sol.residual.to(gw.device)).sum())}
    if step.norm:
        info["norm"] = step.norm
        info["norm_error"] = _fit_norm(method, level, models, flv, stream, step.norm, gw, labels, grouping.k)
    return info


class _Folded(nn.Module):
    """What :func:`~neurofuse.approximation.aligned_prior` reads of a layer (``weight``, ``bias``):
    a Linear with the affine of the LayerNorm it reads folded in
    (:func:`~neurofuse.approximation.fold_layernorm`)."""

    def __init__(self, linear: nn.Linear, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight, bias = fold_layernorm(linear.weight, linear.bias, norm.weight, norm.bias)
        self.bias = bias if linear.bias is not None else None


def _fit_norm(method: Any, level: int, models: List[LeveledNet], flv: nn.Module, stream: LevelStream,
              name: str, gw: Tensor, labels: Tensor, k: int) -> Optional[float]:
    """A step's LayerNorm ``name``: weight and bias of every fused neuron, from the fused
    normalised rows (its layer already fitted) to the weighted centres of its group's base
    LayerNorm outputs; returns the fit's relative squared error (``None`` for a LayerNorm
    without affine, which has nothing to fit)."""
    fln = flv.get_submodule(name)
    if not fln.elementwise_affine:
        return None
    blns = [m.levels[level].get_submodule(name) for m in models]
    reg = NeuronRegression()
    with torch.no_grad():
        for b in stream:
            _, ins, _ = _capture(flv, b.inputs[0], [fln], [])
            u = F.layer_norm(_flat(ins[0]), (k,), eps=fln.eps)
            ys = []
            for m, ln, h in zip(models, blns, b.inputs[1:]):
                _, _, got = _capture(m.levels[level], h, [], [ln])
                ys.append(_flat(got[0]))
            y = torch.cat(ys, 1).double()
            reg.update(u, centroids(y.T, gw.double(), labels, k).T)
    reg = method.reduce(reg)
    gamma, beta = reg.solve(intercept=fln.bias is not None)
    with torch.no_grad():
        fln.weight.copy_(gamma.to(fln.weight))
        if fln.bias is not None:
            fln.bias.copy_(beta.to(fln.bias))
    return reg.relative_error(gamma, beta)


def _dw_prior(conv: nn.Conv2d) -> Tensor:
    """``[d, C]`` a depthwise layer's own weights (and bias), one column per channel."""
    w = conv.weight.detach().double().reshape(conv.weight.shape[0], -1)
    if conv.bias is not None:
        w = torch.cat([w, conv.bias.detach().double()[:, None]], dim=1)
    return w.T
