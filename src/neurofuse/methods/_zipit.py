r"""ZipIt!: zip the models' features by correlation, within and across models; partial zipping.

Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman, "ZipIt! Merging Models from Different Tasks
without Training", ICLR 2024.  The grouping is :func:`neurofuse.grouping.zip_features`.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..grouping import zip_features, zip_grouped_features, zip_matrices
from ..levels import LeveledNet, check_same_levels, fold_batchnorm, has_batchnorm, unfold_state
from ..levels._layout import (
    LevelLayout,
    NeuronMap,
    SpaceMaps,
    align_level,
    check_alignable,
    concat_maps,
    group_assignment,
    identity_ok,
    oriented,
    output_unit_groups,
    part_spans,
    stream_members,
)
from ..models.multihead import MultiHead
from ._align import NOT_PERMUTATION_IN_TRANSFORMER, LayoutAlignment, correspondence, input_part_maps
from ._base import FusionMethod, FusionRun, register_method
from ._features import FeatureMoments, feature_moments, part_moments
from ._options import Boolean, Interval, MethodOptions, OneOf, Optional_, option

__all__ = ["ZipIt", "ZipItOptions"]


@dataclasses.dataclass(frozen=True)
class ZipItOptions(MethodOptions):
    """Settings of :class:`ZipIt`.

    Attributes
    ----------
    stop_at : int, optional
        Partial zipping: zip levels ``0 .. stop_at - 1`` only and keep every model's levels from
        ``stop_at`` on as a separate head (a :class:`~neurofuse.models.multihead.MultiHead`,
        whose output is the heads' mean class probabilities).  ``None`` zips every level into
        one model of model 0's architecture.
    within_model : bool
        Allow merging features of one model with each other (the "zip"); ``False`` merges only
        across models.
    activations : str
        Correlate ``"post"``-activation features (after the non-linearity the next level
        applies, as the paper's merge points) or ``"pre"``-activation level outputs.
    """

    stop_at: Optional[int] = option(None, Optional_(Interval(int, 1)))
    within_model: bool = option(True, Boolean())
    activations: str = option("post", OneOf("post", "pre"))


@register_method("zipit")
class ZipIt(LayoutAlignment, FusionMethod):
    r"""ZipIt!: merge the most correlated features of all models, within and across models.

    At every hidden neuron space (each level's output, a level's internal spaces such as a
    residual block's first convolution, residual streams as one space, each part of a
    concatenation on its own: a merged feature never mixes parts), the features of the
    :math:`N` models are concatenated and the most correlated pairs merged greedily until the
    fused width is reached (:func:`neurofuse.grouping.zip_features`; the correlations of the
    post-activations on the fusion set; ties broken by the pre-activations'
    :meth:`~neurofuse.grouping.JointMoments.similarity`, which also tells apart features that are
    constant on the fusion set).  A space whose channels come in groups that must stay whole (a
    ``GroupNorm(g, C)``'s, or those of a grouped convolution that reads or writes it) is zipped
    group to group (:func:`neurofuse.grouping.zip_grouped_features`): every model's groups are
    assigned to model 0's (the space a grouped convolution writes keeps the assignment of the
    space it reads) and each fused group is zipped from its members, so the grouped weight stays
    block diagonal.  With merge and
    unmerge matrices :math:`\mathcal M, \mathcal U` of each space, every layer is zipped as

    .. math:: W = \sum_k \mathcal M_k\, W^k\, \mathcal U_k^{\text{prev}},

    (:math:`\mathcal M_k, \mathcal U_k` model :math:`k`'s block), biases and other per-neuron
    vectors as :math:`\sum_k \mathcal M_k b^k`; the output level is averaged.  BatchNorm is
    folded into the preceding layer first (mixing channels of a BatchNorm is not a BatchNorm) and
    written back afterwards as BatchNorms with identity statistics
    (:func:`neurofuse.levels.unfold_state`): the fused model has model 0's architecture, and
    ``repair=True`` re-estimates them.  The fused width is model 0's by default and may be set with
    ``width`` (anything from 1 to the sum of the models' widths; a residual stream keeps one
    width).  With ``stop_at``, only the levels before it are zipped and each model keeps its
    remaining levels as a head fed by its unmerge matrix (the paper's partial zipping); the
    result is a :class:`~neurofuse.models.multihead.MultiHead`.

    The result's correspondence of every zipped hidden level is its merge matrix
    :math:`\mathcal M` (each base neuron in one fused neuron).  A partially zipped model is not
    one network: its levels from ``stop_at`` on are each model's own, so the result holds the
    correspondences of the ``stop_at`` zipped levels only, and ``repair=True`` rescales those
    (the trunk) and re-estimates the heads' BatchNorms (:func:`neurofuse.repair.repair`).  It is
    not an output ensemble either: the trunk is fused, and distillation and fine-tuning train
    the whole multi-head model.

    References
    ----------
    Stoica, G., Bolya, D., Bjorner, J., Ramesh, P., Hearn, T., & Hoffman, J. (2024). ZipIt!
    Merging Models from Different Tasks without Training. ICLR 2024.
    """

    summary = ("ZipIt! (Stoica et al. 2024): zip correlated features within and across models; "
               "stop_at= keeps heads (multi-head model)")
    label = "ZipIt!"
    order = 58
    Options = ZipItOptions
    supports_width = True
    min_models = 2
    aligns_grouped = True
    unsupported_traits = frozenset({"transformer"})
    trait_reasons = MappingProxyType(
        {"transformer": NOT_PERMUTATION_IN_TRANSFORMER.format(what="a merge of features")})

    def _fuse(self, run: FusionRun) -> nn.Module:
        data = run.data
        assert data is not None
        originals = check_same_levels(run.models)
        nets = [fold_batchnorm(m) if has_batchnorm(m) else m for m in originals]  # type: ignore[misc]
        layouts, heads = check_alignable(nets, self.name, grouped=True)
        n_models, n_levels = len(nets), nets[0].num_levels
        stop = n_levels if self.options.stop_at is None else self.options.stop_at
        if stop > n_levels - 1 and self.options.stop_at is not None:
            raise ConfigError(f"stop_at={stop} leaves no level for the heads: the models have "
                              f"{n_levels} levels, so stop_at must be at most {n_levels - 1}")
        widths = [m.level_widths() for m in nets]
        target = self.resolve_widths(widths[0])
        like = originals[0].clone() if target == widths[0] else originals[0].with_widths(target[:-1])
        fused = fold_batchnorm(like) if has_batchnorm(like) else like
        with self.stream(data, n_models) as stream:
            outputs, inner = feature_moments(nets, layouts, stream, min(stop, n_levels - 1))
        maps: List[List[SpaceMaps]] = [[{} for _ in range(n_levels)] for _ in nets]
        for lvl in range(min(stop, n_levels)):
            for k in range(n_models):
                maps[k][lvl]["in"] = maps[k][lvl - 1]["out"] if lvl else None
                # a tied level's output is its stream's, known before its inner spaces
                maps[k][lvl]["out"] = maps[k][heads[lvl]]["out"] if 0 <= heads[lvl] < lvl else None
            fused_sd = fused.levels[lvl].state_dict()
            for sp in layouts[lvl].internal:  # inner spaces: zipped to the fused model's inner width
                key, kind = next((k, kd) for k, s0, _, kd in layouts[lvl].tensors if s0 == sp.name)
                blocks = self._zip(inner[lvl][sp.name],
                                   [int(oriented(net.levels[lvl].state_dict()[key], kind).shape[0]) for net in nets],
                                   int(oriented(fused_sd[key], kind).shape[0]),
                                   *_groups(layouts[lvl], sp.name, [m[lvl] for m in maps], layouts[lvl].unit_groups(sp.name)))
                for k in range(n_models):
                    maps[k][lvl][sp.name] = blocks[k]
            head = heads[lvl]
            members = stream_members(heads, head)
            if lvl == n_levels - 1 or head == -1 or n_levels - 1 in members:
                identity_ok(widths, lvl, "output level or residual stream tied to the input/output")
                out = [None] * n_models
            elif head < lvl:
                out = [maps[k][head]["out"] for k in range(n_models)]
            else:
                if any(target[m] != target[lvl] for m in members):
                    raise ConfigError(f"levels {members} form one residual stream and need one fused "
                                      f"width, got {[target[m] for m in members]}")
                pre, act = (type(s).from_state(s.state()) for s in outputs[lvl])
                for m in members[1:]:  # a residual stream: the moments of every level in it
                    if m < len(outputs):
                        pre.merge(outputs[m][0])
                        act.merge(outputs[m][1])
                if layouts[lvl].parts:
                    out = self._zip_parts((pre, act), nets, fused, layouts[lvl], lvl, maps)
                else:
                    out = self._zip((pre, act), [w[lvl] for w in widths], target[lvl],
                                    *_groups(layouts[lvl], "out", [m[lvl] for m in maps],
                                             output_unit_groups(nets[0].levels, lvl, layouts[lvl])))
            for k in range(n_models):
                maps[k][lvl]["out"] = out[k]
            if lvl < n_levels - 1:
                blocks = [np.eye(target[lvl], widths[k][lvl]) if out[k] is None else out[k].out.numpy()
                          for k in range(n_models)]
                run.record(lvl, correspondence(blocks))
        fused.load_state_dict(self._zipped_state(nets, layouts, maps, fused, min(stop, n_levels)))
        if fused is not like:  # back to model 0's architecture, BatchNorms with identity statistics
            like.load_state_dict(unfold_state(fused, like))
            fused = like
        if stop == n_levels:
            return fused
        result = MultiHead(fused, [m.clone() for m in originals], stop)
        with torch.no_grad():
            for k in range(n_models):
                m = maps[k][stop - 1]["out"]
                result.mix[k].matrix.copy_(torch.eye(widths[k][stop - 1]) if m is None else m.inc.float())
        return result

    def _zip_parts(self, moments: FeatureMoments, nets: List[LeveledNet], fused: LeveledNet,
                   layout: LevelLayout, lvl: int, maps: List[List[SpaceMaps]]) -> List[NeuronMap]:
        """A concatenation: every part zipped on its own (a fused neuron never mixes parts), the
        level's map the block diagonal of the parts' (:func:`~neurofuse.levels._layout.concat_maps`).
        A part that is the level input keeps the input's maps (the mean where the input is shared)."""
        spans = [part_spans(net, lvl, layout) for net in nets]
        fused_spans = part_spans(fused, lvl, layout)
        widths = [net.level_widths()[lvl] for net in nets]
        blocks: List[List[NeuronMap]] = [[] for _ in nets]
        for b, part in enumerate(layout.parts):
            if part == "in":
                width = spans[0][b].stop - spans[0][b].start
                for k, m in enumerate(input_part_maps(maps, range(len(nets)), lvl, width,
                                                      lambda w: _mean_map(w, len(nets)))):
                    blocks[k].append(m)
                continue
            sub = part_moments(moments, [s[b] for s in spans], widths)
            zipped = self._zip(sub, [s[b].stop - s[b].start for s in spans],
                               fused_spans[b].stop - fused_spans[b].start,
                               *_groups(layout, part, [m[lvl] for m in maps], layout.unit_groups(part)))
            for k in range(len(nets)):
                blocks[k].append(zipped[k])
                maps[k][lvl][part] = zipped[k]   # the part's own tensors are zipped (summed, not averaged)
        return [concat_maps(bl) for bl in blocks]

    def _zip(self, moments: FeatureMoments, widths: List[int], k: int, groups: int = 0,
             sigmas: Optional[List[np.ndarray]] = None) -> List[NeuronMap]:
        """Merge/unmerge maps of every model for one space from its (pre, post) moments; a space
        of ``groups`` groups (a GroupNorm's, a grouped convolution's) zipped group by group
        (:func:`~neurofuse.grouping.zip_grouped_features`), its groups assigned as ``sigmas`` says
        if given."""
        pre_m, post_m = moments
        stats = post_m if self.options.activations == "post" else pre_m
        owners = np.repeat(np.arange(len(widths)), widths)
        tie = pre_m.similarity().cpu().numpy()
        cov = stats.covariance().cpu().numpy()
        flat = stats.constant().cpu().numpy()
        cov[flat, :] = cov[:, flat] = 0.0  # no correlation: left to the tie-break
        if groups:
            labels, _ = zip_grouped_features(cov, widths, k, groups, sigmas=sigmas,
                                             within_model=self.options.within_model, tie_break=tie)
        else:
            labels = zip_features(cov, owners, k, within_model=self.options.within_model, tie_break=tie)
        merge, unmerge = zip_matrices(labels, k)
        out, start = [], 0
        for w in widths:
            mk = torch.from_numpy(merge[:, start:start + w].copy())
            uk = torch.from_numpy(unmerge[start:start + w].copy())
            out.append(NeuronMap(out=mk, inc=uk, plan=mk.T.numpy()))
            start += w
        return out

    @staticmethod
    def _zipped_state(nets: List[LeveledNet], layouts: Sequence[LevelLayout], maps: List[List[SpaceMaps]],
                      fused: LeveledNet, levels: int) -> Dict[str, Tensor]:
        """:math:`\\sum_k \\mathcal M_k W^k \\mathcal U_k` for tensors of zipped spaces, the mean
        for the others (output level, identity spaces); levels from ``levels`` on keep the
        fused model's (unused) values."""
        state = fused.state_dict()
        n = len(nets)
        for lvl in range(levels):
            layout = layouts[lvl]
            aligned = [align_level(net.levels[lvl], layout, lvl, maps[k][lvl]) for k, net in enumerate(nets)]
            space_of = {key: s0 for key, s0, _, _ in layout.tensors}
            for key, v in aligned[0].items():
                full = f"levels.{lvl}.{key}"
                if not v.is_floating_point():
                    state[full] = v.clone()
                    continue
                total = sum(a[key].double() for a in aligned)
                zipped = maps[0][lvl].get(space_of.get(key, "")) is not None
                state[full] = (total if zipped else total / n).to(v.dtype)
        return state


def _groups(layout: LevelLayout, space: str, level_maps: Sequence[SpaceMaps], groups: int
            ) -> Tuple[int, Optional[List[np.ndarray]]]:
    """``(groups, sigmas)`` of a ``space`` for :meth:`ZipIt._zip`: the assignment of groups of
    every model is fixed where a grouped convolution writes the space (that of the space it
    reads, :func:`~neurofuse.levels._layout.group_assignment`), free (``None``) elsewhere."""
    if not groups or layout.group_source(space) is None:
        return groups, None
    return groups, [group_assignment(layout, space, m, groups) for m in level_maps]


def _mean_map(width: int, n_models: int) -> NeuronMap:
    """A shared space's merge in ZipIt's convention (the models' tensors are summed): each model's
    neurons weigh ``1 / n_models``; the unmerge is the identity."""
    eye = torch.eye(width, dtype=torch.float64)
    return NeuronMap(out=eye / n_models, inc=eye, plan=eye.numpy() / n_models)
