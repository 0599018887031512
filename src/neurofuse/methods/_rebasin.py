r"""Git Re-Basin (activation matching) with importance-weighted averaging.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023; the weighted average is the one of Luenam et al., "Model Fusion via Neuron
Interpolation", 2025, appendix C.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .._fusion_set import FusionSet
from .._phases import phase
from ..errors import IncompatibleModelsError
from ..grouping import OUTPUT_WEIGHTS, Correspondence
from ..importance import normalize_scores
from ..stats import CrossMoments
from ..levels import LeveledNet, alignment_reason, check_same_levels, flatten_neurons
from ._base import FusionMethod, FusionRun, register_method
from ._options import Anything, Boolean, MethodOptions, OneOf, option
from ..levels._layout import (
    NeuronMap,
    Space,
    SpaceMaps,
    align_level,
    capture_spaces,
    check_alignable,
    concat_maps,
    group_assignment,
    identity_ok,
    next_activation,
    part_spans,
    space_activation,
    space_units,
    output_unit_groups,
    stream_members,
)
from ..grouping import grouped_permutation, head_structured_plans, lap_inner

__all__ = ["GitRebasin", "GitRebasinOptions"]

log = logging.getLogger("neurofuse")

#: weight of the pre-activation cost that breaks ties of the post-activation cost (relative to
#: the largest post-activation cost): neurons inactive on the whole fusion set are otherwise
#: indistinguishable, and a wrong pairing of them changes the model on other inputs
TIE_BREAK = 1e-6


@dataclasses.dataclass(frozen=True)
class GitRebasinOptions(MethodOptions):
    """Settings of :class:`GitRebasin`.

    Attributes
    ----------
    metric : str
        ``"distance"``: importance-weighted Euclidean distance between the two neurons' activation
        vectors (the reference code's cost); ``"sqdistance"``: its square (Ainsworth et al.'s
        :math:`\\lVert Z_0 - \\Pi Z_1\\rVert_F^2` objective); ``"correlation"``: maximise the sum of
        Pearson correlations.
    activations : str
        ``"post"`` (after the non-linearity, as in the paper) or ``"pre"`` (level outputs).
    normalize_importance : bool
        Scale each model's scores at a level to sum to one.
    class_weights : array-like, optional
        ``[2, C]`` weights of each model per class in the output level's average (e.g. class
        shares).  Default: both alike.
    output_weights : str
        ``"importance"``: the output level's rows (class ``c``) are averaged with each model's
        importance of output neuron ``c``, normalised over the two models, times
        ``class_weights``; ``"mean"``: the plain mean (times ``class_weights``).  Same as the
        mean with ``importance="uniform"``.  See :func:`neurofuse.grouping.output_weights`.
    """

    metric: str = option("distance", OneOf("distance", "sqdistance", "correlation"))
    activations: str = option("post", OneOf("post", "pre"))
    normalize_importance: bool = option(False, Boolean())
    class_weights: Optional[Any] = option(None, Anything("null or a [2, C] array of non-negative weights"))
    output_weights: str = option("importance", OneOf(*OUTPUT_WEIGHTS))


def _tied_groups(layout: Any, space: str, maps: Dict[str, Optional[NeuronMap]], groups: int) -> Optional[np.ndarray]:
    """For a ``space`` written by a grouped convolution, the assignment of groups it keeps
    (:func:`~neurofuse.levels._layout.group_assignment`), oriented as the costs: ``tied[b]`` = the
    model-0 group matched to model-1 group ``b``.  ``None`` for other spaces."""
    sigma = group_assignment(layout, space, maps, groups)
    return None if sigma is None else np.argsort(sigma)


@register_method("git-rebasin")
class GitRebasin(FusionMethod):
    r"""Git Re-Basin activation matching of two equal-width models, importance-weighted average.

    For every level but the output (identity), the neurons of model 1 are permuted onto model
    0's by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``, Kuhn 1955) on the
    activations of the *original* models over the fusion set (post-ReLU by default, conv outputs
    flattened over batch and positions).  With importance scores :math:`s^0, s^1` the
    ``"distance"`` cost of pairing neuron :math:`i` of model 0 with neuron :math:`j` of model 1 is
    the reference code's

    .. math:: C_{ij} = s^0_i\lVert \bar a - a^0_i\rVert + s^1_j\lVert \bar a - a^1_j\rVert
              = \frac{2 s^0_i s^1_j}{s^0_i + s^1_j}\,\lVert a^0_i - a^1_j\rVert,\qquad
              \bar a = \frac{s^0_i a^0_i + s^1_j a^1_j}{s^0_i + s^1_j},

    (``"sqdistance"`` squares the norm; ``"correlation"`` maximises
    :math:`\sum_i \operatorname{corr}(a^0_i, a^1_{\pi(i)})`).  Model 1 is permuted,
    :math:`W^1 \leftarrow \Pi W^1 \Pi_{\text{prev}}^\top` (per tap for convolutions, per position
    for the classifier after a flattened feature map), and the models are averaged neuron by
    neuron with their importance (appendix C of the neuron-interpolation paper):

    .. math:: W = \operatorname{diag}\!\Bigl(\frac{s^0}{s^0+s'^1}\Bigr) W^0
              + \operatorname{diag}\!\Bigl(\frac{s'^1}{s^0+s'^1}\Bigr) \widetilde W^1,
              \qquad s'^1 = \Pi s^1,

    biases likewise; the output level is a plain mean.  Residual levels (an identity skip:
    ``level.adds_input`` or a block whose ``shortcut`` is ``nn.Identity``, as the zoo's ResNet)
    share one permutation with the level they add to; its cost is the sum of the costs of every
    level in the stream.  The inner neurons of a level (a residual block's first convolution) are
    matched too, on their own activations without importance weights, and averaged with weight
    1/2 (importance is defined for level outputs only).  Two models of equal widths only.

    With ``activations="pre"``, ``metric="distance"`` and uniform importance this equals
    ``otfusion`` with exact OT and uniform marginals (for equal widths the optimal plan is a
    permutation), the equivalence the neuron-interpolation paper notes under its table 1.

    References
    ----------
    Ainsworth, S. K., Hayase, J., & Srinivasa, S. (2023). Git Re-Basin: Merging Models modulo
    Permutation Symmetries. ICLR 2023.
    """

    summary = "Git Re-Basin (Ainsworth et al. 2023): 2 models, activation matching, weighted average"
    label = "Git Re-Basin"
    order = 50
    Options = GitRebasinOptions
    uses_importance = True
    min_models = 2
    max_models = 2
    for_more_models = "'otfusion' or 'kf-linear'"
    supports_distributed = True
    fuses_levels = True

    @classmethod
    def check_level(cls, net: nn.Module, index: int) -> Optional[str]:
        """Matching needs one permutation per neuron space (:func:`neurofuse.levels.alignment_reason`)."""
        return alignment_reason(net, index, grouped=True)

    def _fuse(self, run: FusionRun) -> nn.Module:
        nets = check_same_levels(run.models)
        layouts, heads = check_alignable(nets, self.name, grouped=True)
        m0, m1 = nets
        widths = [m.level_widths() for m in nets]
        if widths[0] != widths[1]:
            raise IncompatibleModelsError(
                f"'git-rebasin' needs equal widths, got {widths[0][:-1]} and {widths[1][:-1]}; use "
                "'otfusion' or 'kf-linear' for models of different widths"
            )
        n_levels = m0.num_levels
        outs, inner, scores = self.match_levels(run, nets, layouts, heads)
        perms: List[Optional[np.ndarray]] = [None if m is None else m.out.numpy().argmax(1) for m in outs]
        run.extras["permutations"] = perms
        fused = m0.clone()
        sd0 = m0.state_dict()
        state: Dict[str, Tensor] = {}
        # weight of model 1 in every class of the output level
        head_w1 = torch.from_numpy(self.output_level_weights(run, nets)[1])
        for lvl in range(n_levels):
            maps: SpaceMaps = {"in": outs[lvl - 1] if lvl > 0 else None, "out": outs[lvl], **inner[lvl]}
            aligned = align_level(m1.levels[lvl], layouts[lvl], lvl, maps)
            weights = {"out": head_w1 if lvl == n_levels - 1 else self._weights(scores, outs, lvl, n_levels),
                       "in": self._weights(scores, outs, lvl - 1, n_levels) if lvl > 0 else None}
            space_of = {key: s0 for key, s0, _, _ in layouts[lvl].tensors}
            # tensors whose last axis, not axis 0, runs over their space (a [in, out] weight too)
            last_axis = {key for key, _, _, kind in layouts[lvl].tensors if kind in ("last", "linear_t")}
            for key, t1 in aligned.items():
                full = f"levels.{lvl}.{key}"
                t0 = sd0[full]
                if not t0.is_floating_point():
                    state[full] = t0.clone()
                    continue
                w = weights.get(space_of.get(key, ""))
                if w is None:  # internal neurons, output level, identity spaces: plain mean
                    state[full] = ((t0.double() + t1.double()) / 2).to(t0.dtype)
                else:
                    a = w.to(t0.device)
                    a = a if key in last_axis else a.reshape(-1, *([1] * (t0.dim() - 1)))
                    state[full] = ((1 - a) * t0.double() + a * t1.double()).to(t0.dtype)
        fused.load_state_dict(state)
        for lvl in range(n_levels - 1):
            run.record(lvl, Correspondence.from_permutations([None, perms[lvl]], widths[0][lvl:lvl + 1] * 2))
        return fused

    def match_levels(self, run: FusionRun, nets: Sequence[LeveledNet], layouts: Sequence[Any],
                     heads: Sequence[int]) -> Tuple[List[Optional[NeuronMap]], List[Dict[str, NeuronMap]],
                                                    List[List[np.ndarray]]]:
        """The permutations of model 1 onto model 0 (equal widths): the map of every level's
        output (``None``: identity) and of every internal space, and the importance scores
        ``scores[model][level]`` the costs used.  Other methods align with it before they merge
        ("align, then merge")."""
        n_levels = nets[0].num_levels
        widths = [m.level_widths() for m in nets]
        assert run.data is not None
        level_stats, inner_stats = self._statistics(nets, layouts, run.data)
        scores = [[self._scores(run, m, lvl) for lvl in range(n_levels)] for m in nets]
        outs: List[Optional[NeuronMap]] = [None] * n_levels
        inner: List[Dict[str, NeuronMap]] = []
        for lvl in range(n_levels):
            inner.append({})
            for unit in space_units(layouts[lvl].internal):
                if unit[0].heads:  # attention: heads matched as units, a permutation per space
                    for sp, m in zip(unit, self._match_heads([inner_stats[lvl][sp.name] for sp in unit],
                                                              lvl, unit, scores)):
                        inner[lvl][sp.name] = m
                    continue
                sp = unit[0]
                # a tied level's output is its stream's, known before its inner spaces
                maps = {"in": outs[lvl - 1] if lvl > 0 else None, "out": outs[heads[lvl]] if heads[lvl] >= 0 else None,
                        **inner[lvl]}
                groups = layouts[lvl].unit_groups(sp.name)
                inner[lvl][sp.name] = self._perm_map(self._match([inner_stats[lvl][sp.name]], lvl, [lvl], scores, sp,
                                                                 groups=groups,
                                                                 tied=_tied_groups(layouts[lvl], sp.name, maps, groups)))
            head = heads[lvl]
            members = stream_members(heads, head)
            if lvl == n_levels - 1 or head == -1 or n_levels - 1 in members:
                identity_ok(widths, lvl, "output level or residual stream tied to the input/output")
            elif head < lvl:
                outs[lvl] = outs[head]
            elif layouts[lvl].parts:  # a concatenation: one permutation per part, block diagonal
                blocks = []
                maps = {"in": outs[lvl - 1] if lvl > 0 else None, **inner[lvl]}
                for p, part in zip(layouts[lvl].parts, part_spans(nets[0], lvl, layouts[lvl])):
                    if p == "in":
                        blocks.append(outs[lvl - 1] or NeuronMap.identity(part.stop - part.start))
                    else:   # a part a grouped convolution writes moves in its groups
                        groups = layouts[lvl].unit_groups(p)
                        blocks.append(self._perm_map(self._match([level_stats[m] for m in members], lvl,
                                                                 members, scores, None, part, groups=groups,
                                                                 tied=_tied_groups(layouts[lvl], p, maps, groups))))
                outs[lvl] = concat_maps(blocks)
            else:
                groups = output_unit_groups(nets[0].levels, lvl, layouts[lvl])
                maps = {"in": outs[lvl - 1] if lvl > 0 else None, **inner[lvl]}
                outs[lvl] = self._perm_map(self._match([level_stats[m] for m in members], lvl, members,
                                                       scores, None, groups=groups,
                                                       tied=_tied_groups(layouts[lvl], "out", maps, groups)))
        run.extras["inner_correspondences"] = {
            lvl: {name: Correspondence.from_permutations([None, m.out.numpy().argmax(1)], [m.out.shape[0]] * 2)
                  for name, m in spaces.items()}
            for lvl, spaces in enumerate(inner)}
        return outs, inner, scores

    @staticmethod
    def _perm_map(perm: np.ndarray) -> NeuronMap:
        return NeuronMap.from_permutation(perm)  # model-1 neuron perm[j] -> model-0 neuron j

    def _scores(self, run: FusionRun, net: LeveledNet, level: int) -> np.ndarray:
        s = run.importance_scores(net)[level]
        if self.options.normalize_importance:
            s = normalize_scores(s)
        return s.cpu().numpy()

    @staticmethod
    def _weights(scores: List[List[np.ndarray]], maps: List[Optional[NeuronMap]], lvl: int,
                 n_levels: int) -> Optional[Tensor]:
        """Weight of model 1 per output neuron of ``lvl``: ``s1' / (s0 + s1')``; None = 1/2."""
        if lvl == n_levels - 1 or maps[lvl] is None:
            return None
        s0 = torch.from_numpy(scores[0][lvl])
        s1p = maps[lvl].out @ torch.from_numpy(scores[1][lvl])  # type: ignore[union-attr]
        return s1p / (s0 + s1p)

    def _statistics(self, nets: Sequence[LeveledNet], layouts: Sequence[Any], data: FusionSet
                    ) -> Tuple[List[Tuple[CrossMoments, CrossMoments]],
                               List[Dict[str, Tuple[CrossMoments, CrossMoments]]]]:
        """Moments of the pre- and post-activations of both models at every level output and
        every internal space, from one pass of each model over the fusion set (a level stream).

        Matching uses the *original* models' activations, so every level's statistics are
        independent of the others' permutations and all come from the same pass.
        """
        n_levels = nets[0].num_levels
        level_stats = [(CrossMoments(), CrossMoments()) for _ in range(n_levels)]
        inner_stats = [{sp.name: (CrossMoments(), CrossMoments()) for sp in layouts[lvl].internal}
                       for lvl in range(n_levels)]
        post = self.options.activations == "post"
        with self.stream(data, 2) as stream, torch.no_grad():
            for lvl in range(n_levels):
                spaces = layouts[lvl].internal
                last = lvl == n_levels - 1
                out_act = next_activation(nets[0], lvl)
                acts = [space_activation(nets[0].levels[lvl], sp) for sp in spaces]
                for b in stream:
                    res = []
                    for i, (net, h) in enumerate(zip(nets, b.inputs)):
                        store: Dict[str, Tensor] = {}
                        inner = capture_spaces(net.levels[lvl], spaces,
                                               lambda: store.__setitem__("z", net.levels[lvl](h)), net.axes[lvl])
                        z = store["z"]
                        if not last:
                            b.keep(i, z)
                        res.append((z, inner))
                    (z0, in0), (z1, in1) = res
                    axis = nets[0].axes[lvl]
                    # level outputs flattened to [rows, neurons]; inner spaces come flattened
                    pairs = [(level_stats[lvl], flatten_neurons(z0, axis), flatten_neurons(z1, axis), out_act)]
                    for sp, a0, a1, act in zip(spaces, in0, in1, acts):
                        pairs.append((inner_stats[lvl][sp.name], a0, a1, act))
                    for (s_pre, s_post), a0, a1, act in pairs:
                        s_pre.update(a0, a1)
                        if post:
                            s_post.update(act(a0), act(a1))
                if not last:
                    stream.advance({0: nets[0].levels[lvl], 1: nets[1].levels[lvl]})
        for pair in level_stats + [p for d in inner_stats for p in d.values()]:
            self.reduce(pair[0])
            if post:
                self.reduce(pair[1])
        return level_stats, inner_stats

    def _cost(self, stats: List[CrossMoments], members: List[int], scores: List[List[np.ndarray]],
              space: Optional[Space]) -> np.ndarray:
        cost = np.zeros_like(stats[0].sq_dist())
        for s, m in zip(stats, members):
            if self.options.metric == "correlation":
                cost -= s.correlation().cpu().numpy()
                continue
            sq = s.sq_dist().cpu().numpy()
            d = sq if self.options.metric == "sqdistance" else np.sqrt(sq)
            if space is None:
                s0, s1 = scores[0][m][:, None], scores[1][m][None, :]
                d = 2.0 * s0 * s1 / (s0 + s1) * d
            cost += d
        return cost

    def _match_heads(self, stats: List[Tuple[CrossMoments, CrossMoments]], lvl: int, unit: List[Space],
                     scores: List[List[np.ndarray]]) -> List[NeuronMap]:
        """Permutations of the spaces of one attention (``unit``), heads matched as units: the
        cost of pairing two heads is the sum over the spaces of their within-head matching costs
        (:func:`neurofuse.grouping.head_structured_plans`)."""
        costs = []
        for (pre, _), sp in zip(stats, unit):
            costs.append(self._cost([pre], [lvl], scores, sp))

        # the costs are [model-0 neurons, model-1 neurons]: each plan's row j holds the model-1
        # neuron matched to model-0 neuron j
        plans, _ = head_structured_plans(costs, unit[0].heads, lap_inner)
        return [self._perm_map(p.argmax(1)) for p in plans]

    @phase("grouping")
    def _match(self, stats: List[Tuple[CrossMoments, CrossMoments]], lvl: int, members: List[int],
               scores: List[List[np.ndarray]], space: Optional[Space], part: Optional[slice] = None,
               groups: int = 0, tied: Optional[np.ndarray] = None) -> np.ndarray:
        """``perm[j]`` = the model-1 neuron matched to model-0 neuron ``j`` (at the output of
        the stream ``members``, or at the internal ``space`` of level ``lvl``), from the
        (pre, post)-activation moments ``stats`` of each member; only among the neurons ``part``
        of the output (one part of a concatenation), numbered from its start, if given; keeping
        ``groups`` contiguous groups of neurons together (a GroupNorm's, a grouped convolution's),
        if given (:func:`neurofuse.grouping.grouped_permutation`), matched as ``tied`` says if
        given (``tied[b]``: the model-0 group matched to model-1 group ``b``).

        On post-activations, neurons that are inactive on the whole fusion set all look alike
        (zero vectors), which leaves ties; they are broken by adding the pre-activation cost
        scaled by :data:`TIE_BREAK` relative to the post-activation cost.
        """
        post = self.options.activations == "post"
        cost = self._cost([s[0] for s in stats], members, scores, space)
        if post:
            tie = cost
            cost = self._cost([s[1] for s in stats], members, scores, space)
            scale = np.abs(cost).max() / max(float(np.abs(tie).max()), 1e-300)
            cost = cost + TIE_BREAK * scale * tie
        if part is not None:
            cost = cost[part, part]
        if groups:
            perm = grouped_permutation(cost, groups, tied)
            rows, cols = np.arange(len(perm)), perm
        else:
            rows, cols = linear_sum_assignment(cost)
            perm = np.empty(len(rows), dtype=np.int64)
            perm[rows] = cols
        log.debug("git-rebasin level %d%s: matching cost %.4g", lvl,
                  f" ({space.name})" if space is not None else "", float(cost[rows, cols].sum()))
        return perm
