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

A step whose layer is followed by a ``LayerNorm`` over its outputs or a ``GroupNorm`` over its
channels (a step with a *norm*) is fitted in two passes.  The norm maps each unit :math:`z` it
normalises (a row for LayerNorm; one sample's group of channels, over all positions, for
GroupNorm) to :math:`\gamma \odot (z - \mu(z)) / \sigma(z) + \beta` and ignores the unit's shift
and scale, so the layer is fitted to the base models' centred units :math:`z - \mu(z)`, each base
model's scaled by its least-squares constant of :math:`1/\sigma` over the fusion set,
:math:`c = \sum_r \sigma_r / \sum_r \sigma_r^2`, divided by the models' mean constant: the models
are compared in the units the norm sees, and the targets keep the models' mean scale, at which the
norm's ``eps`` acts as it does in them.  The statistics are rescaled after the pass
(:meth:`~neurofuse.approximation.LinearStats.scale_targets`); the priors are centred and scaled
alike.  A GroupNorm's unit after a convolution spans positions, and its mean is not an output of
any convolution: those targets are scaled, not centred (:func:`~neurofuse.approximation.norm_units`).  A second pass
fits the fused norm's weight and bias neuron by neuron
(:class:`~neurofuse.approximation.NeuronRegression`), from the fused normalised values to the
weighted centres of the groups' norm outputs.  Such a step's ``grouping_error`` and
``unreachable_error`` are in the units of those scaled, centred values; its report adds the norm
fit's relative squared error (``norm_error``).

A space that a ``GroupNorm`` normalises in :math:`g` groups of several channels is grouped group
by group (:func:`~neurofuse.grouping.grouped_grouping`): every model's groups matched to model
0's, then the method's grouping (K-means, Hungarian) inside each matched set of groups, so that
every fused group of channels is made of whole base groups.

In a residual block whose last layers are followed by norms, each last layer is fitted alone to
its own base outputs as above (``"new"``, or ``"keep"`` with the grouping already made: the
input's for an identity shortcut) and a ``"norms"`` step fits the norms together: for every fused
channel :math:`c`, :math:`\min \sum_r (\sum_p \gamma_{pc} n_{prc} + \beta_c - t_{rc})^2` over the
normalised outputs :math:`n_p` of the paths with a norm, where :math:`t` is the weighted centre of
the group's block outputs less the fused identity shortcut and the outputs of the paths without
one.

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
                             norm_units, normalise, reset_layernorm)
from ..errors import IncompatibleModelsError
from ..grouping import Grouping, centroids, identity_grouping
from ..levels import LeveledNet, LevelStream, Step, closed_form_steps, flatten_neurons
from ..levels._layout import output_groups

__all__ = ["fit_level_in_steps"]

log = logging.getLogger("neurofuse")

#: a neuron space's grouping: per base model the fused neuron of each of its neurons, and k
Groups = Tuple[List[np.ndarray], int]


def _flat(t: Tensor) -> Tensor:
    """A layer output as ``[rows, neurons]`` (channels of a conv, last axis of tokens)."""
    return flatten_neurons(t, {4: "conv", 3: "token"}.get(t.dim(), "dense"))


class _Enough(Exception):
    """Raised by :func:`_capture`'s hooks to stop a level's forward pass once it has what it needs."""


def _capture(level: nn.Module, h: Tensor, inputs: Sequence[nn.Module], outputs: Sequence[nn.Module],
             whole: bool = True) -> Tuple[Optional[Tensor], List[Tensor], List[Tensor]]:
    """``level(h)``, the inputs of ``inputs`` and the outputs of ``outputs`` during that call;
    with ``whole=False`` the call stops as soon as those are captured, and returns ``None`` for
    the level's output (a step reads its own layers, not the rest of the level)."""
    got_in: Dict[int, Tensor] = {}
    got_out: Dict[int, Tensor] = {}
    total = len(inputs) + len(outputs)

    def store(into: Dict[int, Tensor], i: int, value: Tensor) -> None:
        into[i] = value
        if not whole and len(got_in) + len(got_out) == total:
            raise _Enough

    hooks = [m.register_forward_pre_hook(lambda _m, a, i=i: store(got_in, i, a[0])) for i, m in enumerate(inputs)]
    hooks += [m.register_forward_hook(lambda _m, _a, o, i=i: store(got_out, i, o)) for i, m in enumerate(outputs)]
    out: Optional[Tensor] = None
    try:
        out = level(h)
    except _Enough:
        pass
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
    later = {n for s in steps for n in s.norms if n}   # norms a "norms" step fits
    split = {**dict(layout.groups), "out": output_groups(fused.levels, level),
             **{s.inputs[0]: s.groups for s in steps if s.kind == "grouped"}}
    sigmas = _stream_sigma(steps, groups, level)   # a space grouped as the stream a grouped conv writes
    for j, step in enumerate(steps):
        keep = j == len(steps) - 1 and not last
        if step.kind == "norms":
            info = _fit_block_norms(method, level, models, fused.levels[level], stream, step, groups,
                                    np.concatenate(scores), keep)
        elif step.kind == "grouped":
            widths_j = [int(m.levels[level].get_submodule(step.modules[0]).weight.shape[0]) for m in models]
            if split.get(step.space, 0) not in (0, step.groups):
                raise IncompatibleModelsError(
                    f"level {level}: a GroupNorm splits the channels of {step.modules[0]} into "
                    f"{split[step.space]} groups and its convolution into {step.groups}")
            info = _fit_grouped(method, level, models, fused.levels[level], stream, step, groups,
                                _step_weights(step, scores, parts_w, widths_j), keep, step.norm not in later)
        else:
            info = _fit_step(method, run, level, models, fused, stream, step, groups, scores, parts_w,
                             keep, split.get(step.space, 0), step.norm not in later, sigmas.get(step.space))
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
    fitted = [s for s in steps_report if s["kind"] != "norms"]
    run.report.append({"level": level, "rank": min(s["rank"] for s in fitted),
                       "rows": fitted[-1]["rows"],
                       "grouping_error": float(sum(s["grouping_error"] for s in fitted)),
                       "unreachable_error": float(fitted[-1]["unreachable_error"]),
                       "steps": steps_report})
    if not last:
        stream.advance({0: fused.levels[level], **{i: m.levels[level] for i, m in enumerate(models, 1)}})


def _fit_step(method: Any, run: Any, level: int, models: List[LeveledNet], fused: LeveledNet,
              stream: LevelStream, step: Step, groups: Dict[str, Groups], scores: List[np.ndarray],
              parts_w: List[List[int]], keep: bool, split: int, fit_norm: bool,
              sigma: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """One step: accumulate its statistics over ``stream``, solve, write the fused layer(s) and
    the grouping of the space it writes into ``groups``; ``split``: the groups of that space (0:
    none), ``sigma`` their assignment if it is fixed (:func:`_stream_sigma`); ``fit_norm``: fit
    the step's norm here (not in a later ``"norms"`` step)."""
    opts = method.options
    flv = fused.levels[level]
    fmods = [flv.get_submodule(name) for name in step.modules]
    bmods = [[m.levels[level].get_submodule(name) for name in step.modules] for m in models]
    last = level == fused.num_levels - 1
    whole = step.kind == "residual" or step.joint
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
            _, ins, res = _capture(flv, b.inputs[0], fmods, res_mod, whole=False)
            outs = []
            for i, (m, h) in enumerate(zip(models, b.inputs[1:]), start=1):
                z, _, got = _capture(m.levels[level], h, [], bmods[i - 1], whole=whole or keep)
                if keep:
                    b.keep(i, z)
                outs.append(flatten_neurons(z, m.axes[level]) if whole else got[0] if bnorms else _flat(got[0]))
            if bnorms:   # what the norms see: units centred (scaled after the pass)
                units = [norm_units(ln, o) for ln, o in zip(bnorms, outs)]
                spread.update([sig for _, sig in units])
                outs = [_flat(c) for c, _ in units]
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
        scale = method.reduce(spread).relative()
        stats.scale_targets(torch.repeat_interleave(scale, torch.tensor(widths, device=scale.device)))
    if step.kind != "new" and int(fmods[0].weight.shape[0]) != groups[step.space][1]:
        raise IncompatibleModelsError(
            f"level {level}: {step.modules[0]} keeps the neurons of the space it reads "
            f"({groups[step.space][1]} fused neurons) but has {fmods[0].weight.shape[0]} outputs; "
            "give the fused model the same width there")
    weights = _step_weights(step, scores, parts_w, widths)
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
            if isinstance(fmods[0], nn.Linear):   # units that are rows: centred as the targets
                priors = [_centre(p, _units_of(bnorms[0])) for p in priors]
            priors = [p * float(c) for p, c in zip(priors, scale)]
        prior = torch.cat(priors, dim=1).to(method.device) if priors else None
        if prior is not None and prior.shape[0] != sum(f.weight[0].numel() + (f.bias is not None) for f in fmods):
            prior = None
    sol = stats.solve(opts.rtol, opts.ridge, prior)
    feats = sol.features.float()
    if step.kind in ("residual", "keep"):
        lab, k = groups[step.space]
        grouping = Grouping(np.concatenate(lab), k, weights)
    else:
        k = int(fmods[0].weight.shape[0])
        if last and step.part == -1:
            grouping = identity_grouping(widths, method.output_level_weights(run, models))
        else:
            grouping = method.grouped(feats, weights, widths, k, level, split, sigma)
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
        if fit_norm:
            info["norm_error"] = _fit_norm(method, level, models, flv, stream, step.norm, gw, labels, grouping.k)
    return info


def _step_weights(step: Step, scores: List[np.ndarray], parts_w: List[List[int]], widths: List[int]) -> np.ndarray:
    """The weights of the base neurons a step writes: alike for inner neurons, the importance
    scores for the level output (or its part)."""
    if step.part is None:
        return np.ones(sum(widths))
    if step.part == -1:
        return np.concatenate(scores)
    off = [int(np.sum(pw[:step.part])) for pw in parts_w]
    return np.concatenate([s[o:o + w] for s, o, w in zip(scores, off, widths)])


class _Rows(nn.Module):
    """What :func:`~neurofuse.approximation.aligned_prior` reads of a layer: some of its output
    rows (``weight``, ``bias``)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias


def _fit_grouped(method: Any, level: int, models: List[LeveledNet], flv: nn.Module, stream: LevelStream,
                 step: Step, groups: Dict[str, Groups], weights: np.ndarray, keep: bool,
                 fit_norm: bool = True) -> Dict[str, Any]:
    r"""A ``"grouped"`` step: a convolution of :math:`g` groups whose input space is grouped in
    :math:`g` whole groups.  Model :math:`i`'s input group :math:`a` went to fused group
    :math:`\sigma_i(a)`, so its output group :math:`a` goes there too: for every fused group
    :math:`b` one least squares from the fused input channels of group :math:`b` to the outputs
    of the base groups :math:`\sigma_i^{-1}(b)`, grouped into :math:`k/g` fused channels.

    A grouped convolution that ends a residual block with an identity shortcut
    (``step.space == "in"``) keeps the stream's grouping, whose assignment of groups the space it
    reads was given (:func:`_stream_sigma`): with ``step.residual`` its targets are the block
    outputs less the fused shortcut, channel by channel (as a ``"residual"`` step's); with a norm
    after it, its own outputs (the norm is then fitted by a ``"norms"`` step).  One that ends a
    block with a projection shortcut (``step.joint``: ``step.modules[1]`` the shortcut's layer,
    reading the level input) is fitted with it to the block outputs, group by group: fused group
    :math:`b`'s design is its input group's patches beside the shortcut's whole input, and the
    shortcut's rows of group :math:`b` are written from the same solution."""
    opts = method.options
    f = flv.get_submodule(step.modules[0])
    bms = [m.levels[level].get_submodule(step.modules[0]) for m in models]
    short = flv.get_submodule(step.modules[1]) if step.joint else None
    bshort = [m.levels[level].get_submodule(step.modules[1]) for m in models] if step.joint else []
    whole = bool(step.residual) or step.joint   # the targets are block outputs
    g = step.groups
    lab_in, k_in = groups[step.inputs[0]]
    k_out = int(f.weight.shape[0])
    kept = groups.get(step.space) if step.space == "in" else None   # the stream's grouping, kept
    if k_in % g or k_out % g or (kept is not None and kept[1] != k_out):
        raise IncompatibleModelsError(f"level {level}: {step.modules[0]} has {g} groups but {k_in} inputs and "
                                      f"{k_out} outputs; give the fused model widths that split into its groups")
    kg_in, kg_out = k_in // g, k_out // g
    widths = [int(bm.weight.shape[0]) for bm in bms]
    offs = np.cumsum([0] + widths)
    sigma = [_group_of(lab, g, kg_in, level, step.modules[0]) for lab in lab_in]   # [i][a]: fused group
    if kept is not None and any(not np.array_equal(s, _group_of(lab, g, kg_out, level, step.modules[0]))
                                for s, lab in zip(sigma, kept[0])):
        raise IncompatibleModelsError(
            f"level {level}: the channels {step.modules[0]} reads were not grouped as the stream it writes")
    # order[b]: every model's group (i, a) whose outputs fused group b fits
    order = [[(i, int(np.flatnonzero(sigma[i] == b)[0])) for i in range(len(models))] for b in range(g)]
    design = nn.Conv2d(kg_in, 1, f.kernel_size, f.stride, f.padding, f.dilation, bias=f.bias is not None)
    stats = [LinearStats() for _ in range(g)]
    bnorms = [m.levels[level].get_submodule(step.norm) for m in models] if step.norm else []
    res_mod = [flv.get_submodule(step.residual)] if step.residual else []
    if step.residual:
        assert kept is not None
        res_labels = torch.from_numpy(np.concatenate(kept[0])).to(method.device)
    spread = RowScale()
    with torch.no_grad():
        for batch in stream:
            _, ins, res = _capture(flv, batch.inputs[0], [f] + ([short] if short is not None else []), res_mod,
                                   whole=False)
            outs = []
            for i, (m, h) in enumerate(zip(models, batch.inputs[1:]), start=1):
                z, _, got = _capture(m.levels[level], h, [], [bms[i - 1]], whole=keep or whole)
                if keep:
                    batch.keep(i, z)
                outs.append(flatten_neurons(z, m.axes[level]) if whole else got[0])
            both = [] if short is None else [design_matrix(short, ins[1])]
            if bnorms:   # scaled after the pass as its norm sees them (a conv's units span positions)
                spread.update([norm_units(ln, o)[1] for ln, o in zip(bnorms, outs)])
            outs = [_flat(o) for o in outs]
            if step.residual:   # the block output less the fused shortcut of each channel's fused channel
                shortcut = _flat(res[0])
                outs = [o - shortcut[:, res_labels[offs[i]:offs[i + 1]]] for i, o in enumerate(outs)]
            for b in range(g):
                x = torch.cat([design_matrix(design, ins[0][:, b * kg_in:(b + 1) * kg_in])] + both, dim=1)
                per = [(outs[i], widths[i] // g, a) for i, a in order[b]]
                stats[b].update(x, torch.cat([o[:, a * n:(a + 1) * n] for o, n, a in per], dim=1))
    labels = np.zeros(int(offs[-1]), dtype=np.int64)
    out_w = np.zeros(int(offs[-1]))
    info: Dict[str, Any] = {"space": step.space, "kind": step.kind, "rank": None, "rows": 0,
                            "grouping_error": 0.0, "unreachable_error": 0.0}
    scale = torch.ones(len(models), dtype=torch.float64)
    if bnorms:
        scale = method.reduce(spread).relative().cpu()
    for b in range(g):
        st = method.reduce(stats[b])
        if bnorms:
            st.scale_targets(torch.repeat_interleave(scale, torch.tensor([widths[i] // g for i, _ in order[b]])))
        idx = np.concatenate([np.arange(offs[i] + a * (widths[i] // g), offs[i] + (a + 1) * (widths[i] // g))
                              for i, a in order[b]])
        prior = None
        if opts.prior:
            cols = []
            for i, a in order[b]:
                n = widths[i] // g
                w = bms[i].weight[a * n:(a + 1) * n]
                bias = None if bms[i].bias is None else bms[i].bias[a * n:(a + 1) * n]
                per_in = len(lab_in[i]) // g
                local = torch.from_numpy(np.asarray(lab_in[i][a * per_in:(a + 1) * per_in]) - b * kg_in)
                col = aligned_prior(_Rows(w, bias), local, kg_in) * float(scale[i])
                if short is not None:   # the shortcut's rows of the group, in the fused input's coordinates
                    ws, bs = bshort[i].weight[a * n:(a + 1) * n], bshort[i].bias
                    col = torch.cat([col, aligned_prior(_Rows(ws, None if bs is None else bs[a * n:(a + 1) * n]),
                                                        torch.from_numpy(np.asarray(groups["in"][0][i])),
                                                        groups["in"][1])], dim=0)
                cols.append(col)
            prior = torch.cat(cols, dim=1).to(method.device)  # type: ignore[arg-type]
        sol = st.solve(opts.rtol, opts.ridge, prior)
        feats = sol.features.float()
        wb = weights[idx]
        if kept is None:
            grouping = method.group(feats, wb, [widths[i] // g for i, _ in order[b]], kg_out, level)
        else:
            grouping = Grouping(np.concatenate(kept[0])[idx] - b * kg_out, kg_out, wb)
        gw = torch.from_numpy(grouping.weights).to(method.device)
        lab = torch.from_numpy(grouping.labels).to(method.device)
        w = sol.combine(gw, lab, kg_out)                                  # [d, k/g]
        with torch.no_grad():
            rows = slice(b * kg_out, (b + 1) * kg_out)
            d = f.weight[0].numel()
            f.weight[rows].copy_(w[:d].T.reshape(f.weight[rows].shape).to(f.weight.dtype))
            if f.bias is not None:
                f.bias[rows].copy_(w[d].to(f.bias.dtype))
            if short is not None:
                e = d + (f.bias is not None)
                ds = short.weight[0].numel()
                short.weight[rows].copy_(w[e:e + ds].T.reshape(short.weight[rows].shape).to(short.weight.dtype))
                if short.bias is not None:
                    short.bias[rows].copy_(w[e + ds].to(short.bias.dtype))
        labels[idx] = b * kg_out + grouping.labels
        out_w[idx] = grouping.weights
        f64 = feats.double()
        t = centroids(f64, gw, lab, kg_out)
        info["rank"] = sol.rank if info["rank"] is None else min(info["rank"], sol.rank)
        info["rows"] = st.rows
        info["grouping_error"] += float((gw * ((f64 - t[lab]) ** 2).sum(1)).sum())
        info["unreachable_error"] += float((gw * sol.residual.to(gw.device)).sum())
    if kept is None:
        groups[step.space] = (np.split(labels, offs[1:-1]), k_out)
    if step.norm:
        info["norm"] = step.norm
        if fit_norm:
            info["norm_error"] = _fit_norm(method, level, models, flv, stream, step.norm,
                                           torch.from_numpy(out_w).to(method.device),
                                           torch.from_numpy(labels).to(method.device), k_out)
    return info


def _group_of(labels: Any, g: int, per: int, level: int, name: str) -> np.ndarray:
    """``[g]`` the fused group of every group of one model's channels (``labels``: their fused
    channels, ``per`` to a fused group), which must each go whole to one fused group."""
    blocks = np.asarray(labels).reshape(g, -1) // per
    if not (blocks == blocks[:, :1]).all() or len(set(blocks[:, 0])) != g:
        raise IncompatibleModelsError(f"level {level}: the channels {name} reads were not grouped in its {g} groups")
    return blocks[:, 0]


def _stream_sigma(steps: List[Step], groups: Dict[str, Groups], level: int) -> Dict[str, np.ndarray]:
    """For the space that a grouped convolution ending a residual block reads (not the stream
    itself), the assignment of groups it must be grouped with: the stream's, ``sigma[i, b]`` =
    model ``i``'s group that went to fused group ``b`` (:func:`~neurofuse.grouping.grouped_grouping`)."""
    out: Dict[str, np.ndarray] = {}
    for s in steps:
        if s.kind == "grouped" and s.space == "in" and s.inputs[0] != "in":
            lab, k = groups["in"]
            fused = np.stack([_group_of(lb, s.groups, k // s.groups, level, s.modules[0]) for lb in lab])
            out[s.inputs[0]] = np.argsort(fused, axis=1)
    return out


def _units_of(norm: nn.Module) -> int:
    """The groups of neurons a norm centres each row's values in (1 for a LayerNorm)."""
    return norm.num_groups if isinstance(norm, nn.GroupNorm) else 1


def _centre(prior: Tensor, groups: int) -> Tensor:
    """``[d, n]`` base weights, centred over the neurons of each of ``groups`` contiguous groups
    (the weights that compute the layer's outputs centred so, row by row)."""
    p = prior.reshape(prior.shape[0], groups, -1)
    return (p - p.mean(-1, keepdim=True)).reshape(prior.shape)


def _fit_block_norms(method: Any, level: int, models: List[LeveledNet], flv: nn.Module, stream: LevelStream,
                     step: Step, groups: Dict[str, Groups], weights: np.ndarray, keep: bool) -> Dict[str, Any]:
    """A ``"norms"`` step: the weights and biases of the norms after a residual block's last
    layers, channel by channel, fitted together to the weighted centres of the groups' block
    outputs less the fused identity shortcut and the outputs of the paths without a norm
    (module docstring); the bias goes to the first norm that has one."""
    lab, k = groups[step.space]
    labels = torch.from_numpy(np.concatenate(lab)).to(method.device)
    gw = torch.from_numpy(weights).double().to(method.device)
    norms = [flv.get_submodule(n) for n in step.norms if n]
    fitted = [n for n in norms if _affine(n)]
    fixed = [flv.get_submodule(m) for m, n in zip(step.modules, step.norms) if not n]
    fixed += [flv.get_submodule(step.residual)] if step.residual else []
    reg = NeuronRegression()
    with torch.no_grad():
        for b in stream:
            _, ins, outs = _capture(flv, b.inputs[0], norms, fixed, whole=False)
            ys = []
            for i, (m, h) in enumerate(zip(models, b.inputs[1:]), start=1):
                z = m.levels[level](h)
                if keep:
                    b.keep(i, z)
                ys.append(flatten_neurons(z, m.axes[level]))
            t = centroids(torch.cat(ys, 1).double().T, gw, labels, k).T
            for o in outs:
                t = t - _flat(o).double()
            xs = []
            for n, u in zip(norms, ins):
                v = _flat(normalise(n, u)).double()
                if _affine(n):
                    xs.append(v)
                else:
                    t = t - v
            if fitted:
                reg.update(torch.stack(xs, -1), t)
    info: Dict[str, Any] = {"space": step.space, "kind": step.kind, "norms": [n for n in step.norms if n],
                            "norm_error": None}
    if not fitted:
        return info
    reg = method.reduce(reg)
    with_bias = [n for n in fitted if n.bias is not None]
    gamma, beta = reg.solve(intercept=bool(with_bias))
    with torch.no_grad():
        for p, n in enumerate(fitted):
            n.weight.copy_(gamma[:, p].to(n.weight))
            if n.bias is not None:
                n.bias.copy_(beta.to(n.bias) if n is with_bias[0] else torch.zeros_like(n.bias))
    info["norm_error"] = reg.relative_error(gamma, beta)
    return info


class _Folded(nn.Module):
    """What :func:`~neurofuse.approximation.aligned_prior` reads of a layer (``weight``, ``bias``):
    a Linear with the affine of the LayerNorm it reads folded in
    (:func:`~neurofuse.approximation.fold_layernorm`)."""

    def __init__(self, linear: nn.Linear, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight, bias = fold_layernorm(linear.weight, linear.bias, norm.weight, norm.bias)
        self.bias = bias if linear.bias is not None else None


def _affine(norm: nn.Module) -> bool:
    return bool(getattr(norm, "elementwise_affine", getattr(norm, "affine", False)))


def _fit_norm(method: Any, level: int, models: List[LeveledNet], flv: nn.Module, stream: LevelStream,
              name: str, gw: Tensor, labels: Tensor, k: int) -> Optional[float]:
    """A step's norm ``name``: weight and bias of every fused neuron, from the fused normalised
    values (its layer already fitted) to the weighted centres of its group's base norm outputs;
    returns the fit's relative squared error (``None`` for a norm without affine, which has
    nothing to fit)."""
    fln = flv.get_submodule(name)
    if not _affine(fln):
        return None
    blns = [m.levels[level].get_submodule(name) for m in models]
    reg = NeuronRegression()
    with torch.no_grad():
        for b in stream:
            _, ins, _ = _capture(flv, b.inputs[0], [fln], [], whole=False)
            u = _flat(normalise(fln, ins[0]))
            ys = []
            for m, ln, h in zip(models, blns, b.inputs[1:]):
                _, _, got = _capture(m.levels[level], h, [], [ln], whole=False)
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
