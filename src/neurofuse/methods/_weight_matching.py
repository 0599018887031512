r"""Git Re-Basin weight matching: align by the weights alone (no data), then average.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023, section 3.2.  The solver is :func:`neurofuse.grouping.weight_matching`.
"""

from __future__ import annotations

import dataclasses
from torch import nn

from ..levels import check_same_levels
from ..levels._layout import check_alignable
from ._align import (
    WEIGHT_MATCHING_UNSUPPORTED,
    LayoutAlignment,
    aligned_state,
    average_states,
    check_equal_widths,
    inner_correspondences,
    out_correspondence,
    permutation_spec,
    record_levels,
    weight_maps,
)
from ._base import FusionMethod, FusionRun, register_method
from ._options import Interval, MethodOptions, option

__all__ = ["WeightMatching", "WeightMatchingOptions"]


@dataclasses.dataclass(frozen=True)
class WeightMatchingOptions(MethodOptions):
    """Settings of :class:`WeightMatching`.

    Attributes
    ----------
    max_sweeps : int
        Most sweeps of the coordinate descent over the permutation groups (the paper's code: 100;
        it stops earlier, after the first sweep that changes nothing).
    """

    max_sweeps: int = option(100, Interval(int, 1))


@register_method("weight-matching")
class WeightMatching(LayoutAlignment, FusionMethod):
    r"""Git Re-Basin weight matching of equal-width models, then the plain mean; needs no data.

    Every model :math:`k \ge 1` is permuted onto model 0 by maximising
    :math:`\sum_t \langle W^0_t, P_{g_0(t)} W^k_t P_{g_1(t)}^\top\rangle` over the permutations
    of every hidden neuron space (coordinate descent, one exact linear assignment per space and
    visit; :func:`neurofuse.grouping.weight_matching`).  The spaces come from the level layouts
    (:func:`neurofuse.levels._layout.level_layout`): every level's output, the internal spaces of
    a level (a residual block's first convolution) and residual streams, whose levels share one
    permutation; a depthwise kernel is a term of the permutation of the channels it reads, and an
    attention's query/key and value/output spaces are solved as one unit whose heads move whole
    (:func:`neurofuse.grouping.head_structured_plans`), and so are a GroupNorm's groups and the
    groups of a grouped convolution (the spaces it reads and writes: one unit, its weight a term
    of both as its block-diagonal ungrouped weight).  Running statistics follow the permutation but are not part of the objective.
    The fused model is the element-wise mean :math:`\frac1N\sum_k \widetilde W^k` (two models in
    the paper; for more, each is matched to model 0).  No data is read (``data=None`` works);
    with data, ``repair=True`` re-estimates BatchNorm statistics and rescales the neurons (REPAIR),
    which the paper's ResNet results rely on.

    The result's correspondence of every hidden level pairs model 0's neuron ``j`` with the
    neuron of every model :math:`k` matched to it.

    References
    ----------
    Ainsworth, S. K., Hayase, J., & Srinivasa, S. (2023). Git Re-Basin: Merging Models modulo
    Permutation Symmetries. ICLR 2023.
    """

    summary = "Git Re-Basin weight matching (Ainsworth et al. 2023): permutations from the weights, no data; mean"
    label = "Weight Matching"
    order = 52
    Options = WeightMatchingOptions
    needs_data = False
    min_models = 2
    same_architecture = True
    unsupported_traits = WEIGHT_MATCHING_UNSUPPORTED
    aligns_grouped = True

    def _fuse(self, run: FusionRun) -> nn.Module:
        nets = check_same_levels(run.models)
        layouts, heads = check_alignable(nets, self.name, grouped=True)
        widths = check_equal_widths(nets, self.name)
        spec = permutation_spec(nets[0], layouts, heads, widths[0])
        maps = [None] + [weight_maps(nets[0], net, layouts, spec, max_sweeps=self.options.max_sweeps,
                                     seed=self.seed) for net in nets[1:]]
        record_levels(run, out_correspondence(maps, widths))
        run.extras["inner_correspondences"] = inner_correspondences(maps)   # REPAIR inside transformers
        return average_states(nets[0], [aligned_state(net, layouts, m) for net, m in zip(nets, maps)])
