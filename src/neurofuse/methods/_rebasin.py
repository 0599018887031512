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
from ..errors import ConfigError, IncompatibleModelsError
from ..importance import normalize_scores
from ..stats import CrossMoments
from ..levels import LeveledNet, check_same_levels, flatten_neurons
from ._base import FusionMethod, check_output_weights, register_method
from ..levels._layout import (
    NeuronMap,
    Space,
    SpaceMaps,
    activation_module,
    align_level,
    check_alignable,
    identity_ok,
    next_activation,
    stream_members,
)

__all__ = ["GitRebasin", "GitRebasinOptions"]

log = logging.getLogger("neurofuse")

#: weight of the pre-activation cost that breaks ties of the post-activation cost (relative to
#: the largest post-activation cost): neurons inactive on the whole fusion set are otherwise
#: indistinguishable, and a wrong pairing of them changes the model on other inputs
TIE_BREAK = 1e-6


@dataclasses.dataclass(frozen=True)
class GitRebasinOptions:
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

    metric: str = "distance"
    activations: str = "post"
    normalize_importance: bool = False
    class_weights: Optional[Any] = None
    output_weights: str = "importance"

    def __post_init__(self) -> None:
        check_output_weights(self.output_weights)
        if self.metric not in ("distance", "sqdistance", "correlation"):
            raise ConfigError(
                f"metric must be 'distance', 'sqdistance' or 'correlation', got {self.metric!r}")
        if self.activations not in ("post", "pre"):
            raise ConfigError(f"activations must be 'post' or 'pre', got {self.activations!r}")


def _run_capturing(level: nn.Module, h: Tensor, points: Sequence[nn.Module]) -> Tuple[Tensor, List[Tensor]]:
    """``level(h)`` and the outputs of its sub-modules ``points`` during that call."""
    store: Dict[int, Tensor] = {}
    handles = [p.register_forward_hook(lambda _m, _i, o, i=i: store.__setitem__(i, o))
               for i, p in enumerate(points)]
    try:
        out = level(h)
    finally:
        for hd in handles:
            hd.remove()
    return out, [store[i] for i in range(len(points))]


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
    Options = GitRebasinOptions
    uses_importance = True
    min_models = 2
    max_models = 2
    for_more_models = "'otfusion' or 'kf-linear'"
    supports_distributed = True

    def _fuse(self, models: List[nn.Module], data: Optional[FusionSet]) -> nn.Module:
        assert data is not None
        nets = check_same_levels(models)
        layouts, heads = check_alignable(nets, self.name)
        m0, m1 = nets
        widths = [m.level_widths() for m in nets]
        if widths[0] != widths[1]:
            raise IncompatibleModelsError(
                f"'git-rebasin' needs equal widths, got {widths[0][:-1]} and {widths[1][:-1]}; use "
                "'otfusion' or 'kf-linear' for models of different widths"
            )
        n_levels = m0.num_levels
        level_stats, inner_stats = self._statistics(nets, layouts, data)
        scores = [[self._scores(m, lvl, data) for lvl in range(n_levels)] for m in nets]
        outs: List[Optional[NeuronMap]] = [None] * n_levels
        inner: List[Dict[str, NeuronMap]] = []
        for lvl in range(n_levels):
            inner.append({sp.name: self._perm_map(self._match([inner_stats[lvl][sp.name]], lvl, [lvl],
                                                              scores, sp))
                          for sp in layouts[lvl].internal})
            head = heads[lvl]
            members = stream_members(heads, head)
            if lvl == n_levels - 1 or head == -1 or n_levels - 1 in members:
                identity_ok(widths, lvl, "output level or residual stream tied to the input/output")
            elif head < lvl:
                outs[lvl] = outs[head]
            else:
                outs[lvl] = self._perm_map(self._match([level_stats[m] for m in members], lvl, members,
                                                       scores, None))
        self.permutations: List[Optional[np.ndarray]] = [
            None if m is None else m.out.numpy().argmax(1) for m in outs]
        fused = m0.clone()
        sd0 = m0.state_dict()
        state: Dict[str, Tensor] = {}
        # weight of model 1 in every class of the output level
        head_w1 = torch.from_numpy(self.output_level_weights(nets, data)[1])
        for lvl in range(n_levels):
            maps: SpaceMaps = {"in": outs[lvl - 1] if lvl > 0 else None, "out": outs[lvl], **inner[lvl]}
            aligned = align_level(m1.levels[lvl], layouts[lvl], lvl, maps)
            weights = {"out": head_w1 if lvl == n_levels - 1 else self._weights(scores, outs, lvl, n_levels),
                       "in": self._weights(scores, outs, lvl - 1, n_levels) if lvl > 0 else None}
            space_of = {key: s0 for key, s0, _, _ in layouts[lvl].tensors}
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
                    a = w.to(t0.device).reshape(-1, *([1] * (t0.dim() - 1)))
                    state[full] = ((1 - a) * t0.double() + a * t1.double()).to(t0.dtype)
        fused.load_state_dict(state)
        self.groupings = [[np.eye(widths[0][lvl]), np.eye(widths[0][lvl]) if outs[lvl] is None
                           else outs[lvl].out.numpy()] for lvl in range(n_levels - 1)]
        return fused

    @staticmethod
    def _perm_map(perm: np.ndarray) -> NeuronMap:
        n = len(perm)
        plan = np.zeros((n, n))
        plan[perm, np.arange(n)] = 1.0 / n  # model-1 neuron perm[j] -> model-0 neuron j
        return NeuronMap.from_plan(plan, np.full(n, 1.0 / n))

    def _scores(self, net: LeveledNet, level: int, data: FusionSet) -> np.ndarray:
        s = self.importance_scores(net, data)[level]
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
                mods = [dict(net.levels[lvl].named_modules()) for net in nets]
                last = lvl == n_levels - 1
                for b in stream:
                    res = []
                    for i, (net, h) in enumerate(zip(nets, b.inputs)):
                        z, inner = _run_capturing(net.levels[lvl], h, [mods[i][sp.point] for sp in spaces])
                        if not last:
                            b.keep(i, z)
                        res.append((z, inner))
                    (z0, in0), (z1, in1) = res
                    axis = nets[0].axes[lvl]
                    pairs = [(level_stats[lvl], z0, z1, next_activation(nets[0], lvl))]
                    for sp, a0, a1 in zip(spaces, in0, in1):
                        act = activation_module(mods[0].get(sp.act) if sp.act else None)
                        pairs.append((inner_stats[lvl][sp.name], a0, a1, act))
                    for (s_pre, s_post), a0, a1, act in pairs:
                        s_pre.update(flatten_neurons(a0, axis), flatten_neurons(a1, axis))
                        if post:
                            s_post.update(flatten_neurons(act(a0), axis), flatten_neurons(act(a1), axis))
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

    @phase("grouping")
    def _match(self, stats: List[Tuple[CrossMoments, CrossMoments]], lvl: int, members: List[int],
               scores: List[List[np.ndarray]], space: Optional[Space]) -> np.ndarray:
        """``perm[j]`` = the model-1 neuron matched to model-0 neuron ``j`` (at the output of
        the stream ``members``, or at the internal ``space`` of level ``lvl``), from the
        (pre, post)-activation moments ``stats`` of each member.

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
        rows, cols = linear_sum_assignment(cost)
        perm = np.empty(len(rows), dtype=np.int64)
        perm[rows] = cols
        log.debug("git-rebasin level %d%s: matching cost %.4g", lvl,
                  f" ({space.name})" if space is not None else "", float(cost[rows, cols].sum()))
        return perm
