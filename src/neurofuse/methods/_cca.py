r"""CCA Merge: align every model to model 0 by canonical correlation analysis, then average.

Horoi, Camillo, Eckstein & Wolf, "Harmony in Diversity: Merging Neural Networks with Canonical
Correlation Analysis", ICML 2024.  The map is :func:`neurofuse.grouping.cca_alignment`.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..grouping import JointMoments, cca_alignment, grouped_cca_alignment
from ..levels import check_same_levels, fold_batchnorm, has_batchnorm, unfold_state
from ..levels._layout import (NeuronMap, SpaceMaps, check_alignable, concat_maps, group_assignment, output_unit_groups,
                               part_spans, stream_members)
from ._align import (NOT_PERMUTATION_IN_TRANSFORMER, LayoutAlignment, aligned_state, average_states,
                     check_equal_widths, input_part_maps, out_correspondence, record_levels)
from ._base import FusionMethod, FusionRun, register_method
from ._features import feature_moments, part_moments
from ._options import Interval, MethodOptions, OneOf, option

__all__ = ["CCAMerge", "CCAMergeOptions"]

#: weight of the pre-activation covariance added to the post-activation one (relative to the
#: traces), which separates features constant on the fusion set
TIE_BREAK = 1e-6


@dataclasses.dataclass(frozen=True)
class CCAMergeOptions(MethodOptions):
    """Settings of :class:`CCAMerge`.

    Attributes
    ----------
    reg : float
        Regularisation of each model's feature covariance: this fraction of its mean variance is
        added to its diagonal (see :func:`neurofuse.grouping.cca_alignment`).  0.1 was the best
        of 1e-6 .. 1 on held-out digits and MNIST splits of 2 and 4 MLPs (1e-4 and below
        collapse; benchmarks/baselines_mlp.py --select).
    activations : str
        Correlate ``"post"``-activation features (what the next layer reads) or
        ``"pre"``-activation level outputs.
    """

    reg: float = option(0.1, Interval(float, 0, closed="neither"))
    activations: str = option("post", OneOf("post", "pre"))


@register_method("cca-merge")
class CCAMerge(LayoutAlignment, FusionMethod):
    r"""CCA Merge: a linear map per neuron space from canonical correlations, then the mean.

    For every model :math:`k \ge 1` and every hidden neuron space (level outputs, the internal
    spaces of a level, a residual stream as one space, each part of a concatenation on its own:
    the map of the concatenation is the block diagonal), the covariances of model 0's and model
    :math:`k`'s features on the fusion set give the CCA map :math:`T_k` from model :math:`k`'s
    features to model 0's (:func:`neurofuse.grouping.cca_alignment`: the canonical variables of
    the two models identified).  Every level of model :math:`k` is aligned as

    .. math:: \widetilde W^k = T_k\, W^k\, T_{k,\text{prev}}^{-1}, \qquad \tilde b^k = T_k b^k,

    (through :func:`neurofuse.levels._layout.align_level`) and the fused model is the mean
    :math:`\frac1N \sum_k \widetilde W^k` (:math:`T_0 = I`).  Unlike a permutation, :math:`T_k`
    does not commute with the non-linearity, so the alignment is exact only for a permuted copy
    (where :math:`T_k` is the permutation).  BatchNorm is folded into the preceding layer first
    (a map that mixes channels does not keep a per-channel normalisation) and written back
    afterwards as BatchNorms with identity statistics (:func:`neurofuse.levels.unfold_state`):
    the fused model has model 0's architecture, and ``repair=True`` re-estimates them.  Equal
    widths only.

    The result's correspondence of every hidden level is the soft ``[n, N n]`` matrix
    ``[I, |T_1|, ...]``: which base neurons each fused neuron draws on (the magnitudes of a
    general linear map; REPAIR reads it row-normalised, an approximation).

    References
    ----------
    Horoi, S., Camillo, A. M. O., Eckstein, E., & Wolf, G. (2024). Harmony in Diversity: Merging
    Neural Networks with Canonical Correlation Analysis. ICML 2024.
    """

    summary = "CCA Merge (Horoi et al. 2024): align to model 0 by canonical correlation analysis, then mean"
    label = "CCA Merge"
    order = 45
    Options = CCAMergeOptions
    min_models = 2
    same_architecture = True
    unsupported_traits = frozenset({"transformer"})
    aligns_grouped = True
    trait_reasons = MappingProxyType(
        {"transformer": NOT_PERMUTATION_IN_TRANSFORMER.format(what="a linear map of the stream")})

    def _fuse(self, run: FusionRun) -> nn.Module:
        data = run.data
        assert data is not None
        originals = check_same_levels(run.models)
        nets = [fold_batchnorm(m) if has_batchnorm(m) else m for m in originals]
        layouts, heads = check_alignable(nets, self.name, grouped=True)  # type: ignore[arg-type]
        widths = check_equal_widths(nets, self.name)  # type: ignore[arg-type]
        n_models, n_levels = len(nets), nets[0].num_levels
        with self.stream(data, n_models) as stream:
            outputs, inner = feature_moments(nets, layouts, stream, n_levels - 1)  # type: ignore[arg-type]
        maps: List[List[SpaceMaps]] = [[{} for _ in range(n_levels)] for _ in nets]
        for lvl in range(n_levels):
            layout = layouts[lvl]
            for k in range(1, n_models):
                maps[k][lvl]["in"] = maps[k][lvl - 1]["out"] if lvl else None
                # a tied level's output is its stream's, known before its inner spaces
                maps[k][lvl]["out"] = maps[k][heads[lvl]]["out"] if 0 <= heads[lvl] < lvl else None
            for sp in layout.internal:
                groups = layout.unit_groups(sp.name)
                tied = [group_assignment(layout, sp.name, maps[k][lvl], groups) for k in range(1, n_models)]
                for k, m in enumerate(self._align(inner[lvl][sp.name], n_models, groups, tied), start=1):
                    maps[k][lvl][sp.name] = m
            head = heads[lvl]
            members = stream_members(heads, head)
            out: List[Optional[NeuronMap]] = [None] * n_models
            if lvl == n_levels - 1 or head == -1 or n_levels - 1 in members:
                pass  # identity (equal widths are checked)
            elif head < lvl:
                out = [None] + [maps[k][head]["out"] for k in range(1, n_models)]
            else:
                pre, act = (JointMoments.from_state(s.state()) for s in outputs[lvl])
                for m in members[1:]:  # a residual stream: the moments of every level in it
                    pre.merge(outputs[m][0])
                    act.merge(outputs[m][1])
                if layouts[lvl].parts:   # a concatenation: every part aligned on its own, block diagonal
                    spans = part_spans(nets[0], lvl, layouts[lvl])
                    blocks: List[List[NeuronMap]] = [[] for _ in range(n_models - 1)]
                    for part, span in zip(layouts[lvl].parts, spans):
                        if part == "in":   # the level input: its maps
                            for k, m in enumerate(input_part_maps(maps, range(1, n_models), lvl,
                                                                  span.stop - span.start, NeuronMap.identity)):
                                blocks[k].append(m)
                            continue
                        sub = part_moments((pre, act), [span] * n_models, [widths[0][lvl]] * n_models)
                        groups = layout.unit_groups(part)   # a part a grouped convolution writes
                        tied = [group_assignment(layout, part, maps[k][lvl], groups) for k in range(1, n_models)]
                        for k, m in enumerate(self._align(sub, n_models, groups, tied)):
                            blocks[k].append(m)
                    out = [None] + [concat_maps(bl) for bl in blocks]
                else:
                    groups = output_unit_groups(nets[0].levels, lvl, layout)  # type: ignore[arg-type]
                    tied = [group_assignment(layout, "out", maps[k][lvl], groups) for k in range(1, n_models)]
                    out = [None] + self._align((pre, act), n_models, groups, tied)
            for k in range(1, n_models):
                maps[k][lvl]["out"] = out[k]
        record_levels(run, out_correspondence([None] + maps[1:], widths))  # type: ignore[arg-type]
        states = [aligned_state(net, layouts, None if k == 0 else maps[k])  # type: ignore[arg-type]
                  for k, net in enumerate(nets)]
        fused = average_states(nets[0], states)  # type: ignore[arg-type]
        if nets[0] is originals[0]:
            return fused
        like = originals[0].clone()  # back to model 0's architecture, BatchNorms with identity statistics
        like.load_state_dict(unfold_state(fused, like))
        return like

    def _align(self, moments: Tuple[JointMoments, JointMoments], n_models: int, groups: int = 0,
               tied: Optional[Sequence[Optional[np.ndarray]]] = None) -> List[NeuronMap]:
        """The CCA map of every model ``k >= 1`` onto model 0 at one space from the (pre, post)
        joint moments of all ``n_models`` models (of equal widths).  A space whose channels come
        in ``groups`` groups (a GroupNorm's, a grouped convolution's) gets a block-structured map
        (:func:`~neurofuse.grouping.grouped_cca_alignment`), its groups assigned as ``tied[k - 1]``
        says where given (the output of a grouped convolution keeps its input's assignment).

        Post-activation features that are constant on the fusion set (dead ReLUs) are told apart
        by adding the pre-activation covariance with weight :data:`TIE_BREAK` (relative to the
        traces); features whose pre-activations are constant too (:meth:`JointMoments.constant`) are paired
        by their values (see :func:`~neurofuse.grouping.cca_alignment`).  Otherwise CCA could
        mix them arbitrarily."""
        cov = moments[0].covariance().cpu().numpy()
        mean = moments[0].mean().cpu().numpy()
        constant = moments[0].constant().cpu().numpy()
        if self.options.activations == "post":
            act = moments[1].covariance().cpu().numpy()
            cov = act + TIE_BREAK * np.trace(act) / max(float(np.trace(cov)), 1e-300) * cov
        n = cov.shape[0] // n_models
        maps = []
        for k in range(1, n_models):
            idx = np.r_[0:n, k * n:(k + 1) * n]
            if groups:
                t, t_inv, _ = grouped_cca_alignment(cov[np.ix_(idx, idx)], n, groups, self.options.reg,
                                                    constant=constant[idx], values=mean[idx],
                                                    sigma=None if tied is None else tied[k - 1])
            else:
                t, t_inv = cca_alignment(cov[np.ix_(idx, idx)], n, self.options.reg, constant=constant[idx],
                                         values=mean[idx])
            maps.append(NeuronMap(out=torch.from_numpy(t), inc=torch.from_numpy(t_inv), plan=t.T / n))
        return maps
