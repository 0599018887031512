r"""OTFusion: align every model to an anchor with optimal transport, then average.

Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020 (activation-based variant).
The alignment machinery (level layouts, neuron maps, residual streams) lives in
:mod:`neurofuse.levels._layout`; the notation (:math:`T`, :math:`Q`, :math:`P`) is defined there.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .._fusion_set import FusionSet
from .._phases import phase
from ..errors import ConfigError, IncompatibleModelsError
from ..grouping import OUTPUT_WEIGHTS, Correspondence
from ..stats import CrossMoments
from ..levels import (LeveledNet, LevelStream, alignment_reason, check_same_levels, flatten_neurons, split_affine,
                      unflatten_neurons)
from ..levels._layout import (
    LevelLayout,
    NeuronMap,
    Space,
    SpaceMaps,
    align_level,
    capture_spaces,
    check_alignable,
    concat_maps,
    group_assignment,
    identity_ok,
    normalized,
    output_unit_groups,
    part_spans,
    space_sizes,
    space_units,
    stream_members,
)
from ..grouping import head_structured_plans
from ..levels._transformer import describe as describe_transformer
from ._base import FusionMethod, FusionRun, register_method
from ._options import Anything, Interval, MethodOptions, OneOf, Optional_, option

__all__ = ["OTFusion", "OTFusionOptions"]

log = logging.getLogger("neurofuse")

#: default iteration limit of each solver (option ``max_iter=None``)
SOLVER_ITERATIONS = {"exact": 1_000_000, "sinkhorn": 10_000}

# ---------------------------------------------------------------------------------------------
# OTFusion
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OTFusionOptions(MethodOptions):
    """Settings of :class:`OTFusion`.

    Attributes
    ----------
    solver : str
        ``"exact"`` (earth mover's distance, ``ot.emd``) or ``"sinkhorn"`` (entropic OT,
        ``ot.sinkhorn`` in the log domain).
    reg : float
        Entropic regularisation of ``"sinkhorn"``, relative to the largest ground cost (the cost
        matrix is divided by its maximum before solving; the exact solver is unaffected).
    ground_metric : str
        ``"euclidean"`` (the reference code's ``cdist``) or ``"sqeuclidean"`` between the neurons'
        pre-activation vectors over the fusion set.
    max_iter : int, optional
        Iteration limit of the OT solver; default (``None``) 1,000,000 network-simplex iterations
        for ``"exact"`` and 10,000 Sinkhorn iterations for ``"sinkhorn"`` (a small ``reg`` can keep
        the log-domain iterations from reaching their tolerance, and each costs a pass over the
        cost matrix: a Sinkhorn plan that stops at the limit is used as it is, with a
        ``RuntimeWarning``).
    class_weights : array-like, optional
        ``[N, C]`` weights of each model per class in the output level's average (e.g. class
        shares).  Default: all models alike.
    output_weights : str
        ``"importance"``: the output level's rows (class ``c``) are averaged with each model's
        importance of output neuron ``c``, normalised over the models, times ``class_weights``;
        ``"mean"``: the plain mean (times ``class_weights``).  Same as the mean with
        ``importance="uniform"``.  See :func:`neurofuse.grouping.output_weights`.
    """

    solver: str = option("exact", OneOf("exact", "sinkhorn"))
    reg: float = option(0.01, Interval(float, 0, closed="neither"))
    ground_metric: str = option("euclidean", OneOf("euclidean", "sqeuclidean"))
    max_iter: Optional[int] = option(None, Optional_(Interval(int, 1)))
    class_weights: Optional[Any] = option(None, Anything("null or an [N, C] array of non-negative weights"))
    output_weights: str = option("importance", OneOf(*OUTPUT_WEIGHTS))


def _ends_affine(level: nn.Module) -> bool:
    """Whether the level is ``[parameter-free ops..., Linear|Conv2d]`` (its output is linear in
    its output-side parameters)."""
    try:
        split_affine(level)
    except IncompatibleModelsError:
        return False
    return True


def _aligned(level: nn.Module, params: Dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """``level`` run with the aligned ``params``: a transformer level through its stages, which
    take the anchor's widths where the level's own modules fix theirs (a LayerNorm's
    ``normalized_shape``, a packed ``qkv``'s rows; :meth:`TransformerSpec.resized`); another level
    through its own modules, its LayerNorms and GroupNorms sized as their aligned weights
    (:func:`_resized_norms`)."""
    spec = describe_transformer(level)
    if spec is not None:
        return lambda h: spec.forward(level, h, params)
    return _resized_norms(level, params)


def _resized_norms(level: nn.Module, params: Dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """``level(h)`` with ``params``, its LayerNorms and GroupNorms sized as their aligned weights
    while it runs (models of different widths: a normalisation fixes its size, and an aligned
    level mixes the anchor's widths with its own while it is aligned).  The modules are resized in
    place and restored after each call, so hooks on them still see it run."""
    resize = []
    for name, m in level.named_modules():
        w = params.get(f"{name}.weight" if name else "weight")
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and w is not None and m.weight is not None \
                and w.shape != m.weight.shape:
            n = int(w.shape[0])
            if isinstance(m, nn.LayerNorm):
                resize.append((m, {"normalized_shape": (n,)}))
            else:   # one group stays one group, one channel per group stays so
                resize.append((m, {"num_channels": n,
                                   "num_groups": n if m.num_groups == m.num_channels else m.num_groups}))

    def run(h: Tensor) -> Tensor:
        saved = [(m, {a: getattr(m, a) for a in attrs}) for m, attrs in resize]
        try:
            for m, attrs in resize:
                for a, v in attrs.items():
                    setattr(m, a, v)
            return functional_call(level, params, (h,))
        finally:
            for m, attrs in saved:
                for a, v in attrs.items():
                    setattr(m, a, v)

    return run


def _map_outputs(m: NeuronMap, axis: str) -> Callable[[Tensor], Tensor]:
    """Level outputs in model ``k``'s basis written in the anchor's: ``Q z`` per row."""
    q = m.out

    def apply(z: Tensor) -> Tensor:
        flat = flatten_neurons(z, axis).double() @ q.to(z.device).T
        return unflatten_neurons(flat, axis, z.shape).to(z.dtype).contiguous()

    return apply


def _group_orders(layout: LevelLayout, space: str, maps: List[SpaceMaps], groups: int, sizes: Dict[int, int]
                  ) -> Optional[Dict[int, np.ndarray]]:
    """For a ``space`` written by a grouped convolution, every model ``k``'s neurons of that space
    with their groups in the anchor's order (``order[j]``: the neuron at position ``j``;
    ``sizes[k]``: its neurons in ``space``), the groups assigned as the space the convolution reads
    assigns them (:func:`~neurofuse.levels._layout.group_assignment`).  The convolution's rows
    must move with its input's groups before the level runs partially aligned, so the space is
    transported in this order (:func:`_reordered`).  ``None`` for other spaces."""
    out = {}
    for k, n in sizes.items():
        sigma = group_assignment(layout, space, maps[k], groups)
        if sigma is None:
            return None
        d = n // groups
        out[k] = np.concatenate([np.arange(int(a) * d, (int(a) + 1) * d) for a in sigma])
    return out


@dataclasses.dataclass(frozen=True)
class _Part:
    """One part of a concatenation level's output, for model ``k``'s transport: its space, model
    ``k``'s and the anchor's neurons of it, the level input's map (a part that is the input), and
    for a part a grouped convolution writes its groups and model ``k``'s neurons in the anchor's
    order of groups (:func:`_group_orders`)."""

    space: str
    mine: slice
    anchor: slice
    given: Optional[NeuronMap]
    groups: int = 0
    order: Optional[np.ndarray] = None


def _inner_solver(method: "OTFusion", level: int) -> Callable[..., Tuple[np.ndarray, float]]:
    """The within-unit problem of :func:`~neurofuse.grouping.head_structured_plans`: the method's
    transport between the unit's shares of the marginals (uniform if not given)."""
    def inner(c: np.ndarray, m: Optional[np.ndarray] = None, n: Optional[np.ndarray] = None
              ) -> Tuple[np.ndarray, float]:
        m = np.full(c.shape[0], 1.0 / c.shape[0]) if m is None else m
        n = np.full(c.shape[1], 1.0 / c.shape[1]) if n is None else n
        plan = method._solve(m, n, c, level)
        return plan, float((plan * c).sum())
    return inner


def _take(z: Tensor, index: Tensor, axis: str) -> Tensor:
    """``z``'s neurons (axis 1 of a conv output, the last axis otherwise) in the order ``index``."""
    return z.index_select(1 if axis == "conv" else z.dim() - 1, index)


def _reordered(m: NeuronMap, order: np.ndarray) -> NeuronMap:
    """The map ``m`` of neurons taken in ``order`` (:func:`_group_orders`) as a map of the neurons
    in their own order."""
    plan = np.empty_like(m.plan)
    plan[order] = m.plan
    return NeuronMap.from_plan(plan, plan.sum(0))


@register_method("otfusion")
class OTFusion(FusionMethod):
    r"""OTFusion (activation-based): optimal-transport alignment to an anchor, then averaging.

    Model 0 is the anchor.  Every other model :math:`k` is aligned to it level by level, from the
    input: at level :math:`\ell` the level's input side is first written in the anchor's basis
    (with the previous level's map), then the ground metric between model :math:`k`'s neurons
    :math:`i` and the anchor's neurons :math:`j` is

    .. math:: C_{ij} = \lVert z^{(k)}_{\cdot i} - z^{(0)}_{\cdot j}\rVert_2
              \quad(\text{or its square}),

    where :math:`z^{(k)}` are the pre-activations of the *partially aligned* model :math:`k`
    (its levels :math:`<\ell` already aligned, so its activations are recomputed as alignment
    progresses) and :math:`z^{(0)}` the anchor's, both on the fusion set with convolutional
    outputs flattened over (batch, height, width).  The transport map solves

    .. math:: T = \arg\min_{T\ge 0,\ T\mathbf 1=\mu,\ T^\top\mathbf 1=\nu} \langle T, C\rangle
              \;\bigl(-\,\varepsilon H(T)\ \text{for Sinkhorn}\bigr),

    with :math:`\mu, \nu` the importance scores of model :math:`k` and of the anchor normalised to
    probability vectors (uniform by default).  The level is aligned as
    :math:`\widetilde W = \operatorname{diag}(1/\nu) T^\top W P_{\text{prev}}`,
    :math:`P_{\text{prev}} = T_{\text{prev}}\operatorname{diag}(1/\nu_{\text{prev}})`, using the
    **target** marginal :math:`\nu` in the outgoing correction (the reference code divides by
    :math:`\mu`, which is wrong when the marginals differ).  Transport maps are rectangular, so
    the models may have different widths.  The output level is aligned by the identity.  The
    fused model has the anchor's architecture and widths and holds the plain mean of the anchor's
    and the aligned models' parameters, :math:`\frac1N\sum_k \widetilde W_k`.

    Residual levels (an identity skip: ``level.adds_input = True``, or a residual block with
    ``branch`` and an ``nn.Identity`` ``shortcut`` such as the zoo's ResNet blocks) share one
    transport with the level they add to: the whole stream is aligned with a single map whose
    ground metric is the sum of the ground metrics at every level of the stream (and whose
    marginals average the normalised scores of those levels).  A stream that starts at the input
    or reaches the output uses the identity.  The inner layers of a level (a block's first
    convolution, or a projection shortcut reading the level input) are aligned too: each inner
    neuron space gets its own transport, computed the same way from the inner pre-activations
    (captured with a forward hook) with uniform marginals, since importance scores are defined
    for level outputs only.  Per-channel normalisations (BatchNorm, including running
    statistics) follow the neurons they normalise.

    The result's ``extras["transports"]`` holds, for every model ``k >= 1``, the list of transport
    plans per level (``None`` for identity levels), and its correspondence of every hidden level
    is the blocks ``[identity, Q_1, ..., Q_{N-1}]`` (read by :func:`neurofuse.repair.repair`).

    References
    ----------
    Singh, S. P., & Jaggi, M. (2020). Model Fusion via Optimal Transport. NeurIPS 2020.
    """

    summary = "OTFusion (Singh & Jaggi 2020): OT alignment to model 0 on activations, then average"
    label = "OTFusion"
    order = 40
    Options = OTFusionOptions
    uses_importance = True
    supports_distributed = True
    fuses_levels = True
    min_models = 1

    @classmethod
    def check_level(cls, net: nn.Module, index: int) -> Optional[str]:
        """Alignment needs one map per neuron space (:func:`neurofuse.levels.alignment_reason`)."""
        return alignment_reason(net, index, grouped=True)

    def _fuse(self, run: FusionRun) -> nn.Module:
        data = run.data
        assert data is not None
        nets = check_same_levels(run.models)
        layouts, heads = check_alignable(nets, self.name, grouped=True)
        anchor = nets[0]
        widths = [m.level_widths() for m in nets]
        outs, params, inner = self._align_all(run, nets, layouts, heads, widths, data)
        run.extras["transports"] = [
            [None if m is None else m.plan for m in outs[k]] for k in range(1, len(nets))]
        states = [anchor.state_dict()]
        for k in range(1, len(nets)):
            sd: Dict[str, Tensor] = {}
            for i, p in enumerate(params[k]):
                sd.update({f"levels.{i}.{key}": v for key, v in p.items()})
            states.append(sd)
        fused = anchor.clone()
        ref = fused.state_dict()
        own = [net.state_dict() for net in nets]
        last = anchor.num_levels - 1
        # the output level's rows (classes) are averaged with per-class weights
        per_class = {f"levels.{last}.{key}" for key in layouts[last].keys_in("out")}
        w_out = torch.from_numpy(self.output_level_weights(run, nets))   # [N, C]
        avg = {}
        for key, v in ref.items():
            if v.is_floating_point():
                # tensors outside the levels (none in the zoo) are averaged as they are when their
                # shapes agree, and otherwise taken from the anchor
                vals = [s[key] if key in s else (own[i][key] if own[i][key].shape == v.shape else v)
                        for i, s in enumerate(states)]
                stacked = torch.stack([t.double() for t in vals])
                if key in per_class:
                    w = w_out.reshape(*w_out.shape, *([1] * (v.dim() - 1)))
                    avg[key] = (stacked * w).sum(0).to(v.dtype)
                else:
                    avg[key] = stacked.mean(0).to(v.dtype)
            else:
                avg[key] = v.clone()
        fused.load_state_dict(avg)
        # the internal spaces' matchings (REPAIR inside transformer levels)
        run.extras["inner_correspondences"] = {
            lvl: {name: Correspondence.from_blocks([np.eye(ms[0].out.shape[0])] + [m.out.numpy() for m in ms])
                  for name, ms in spaces.items() if ms and all(m is not None for m in ms)}
            for lvl, spaces in enumerate(inner)}
        # matching matrices (for REPAIR): row j of Q_k averages model k's neurons matched to j
        for lvl in range(anchor.num_levels - 1):
            mats = [np.eye(widths[0][lvl])]
            for k in range(1, len(nets)):
                m = outs[k][lvl]
                mats.append(np.eye(widths[k][lvl]) if m is None else m.out.numpy())
            run.record(lvl, Correspondence.from_blocks(mats))
        return fused

    # -- alignment of every model to the anchor, level by level -----------------------------
    def _align_all(self, run: FusionRun, nets: List[LeveledNet], layouts: List[LevelLayout], heads: List[int],
                   widths: List[List[int]], data: FusionSet
                   ) -> Tuple[List[List[Optional[NeuronMap]]], List[List[Dict[str, Tensor]]],
                              List[Dict[str, List[NeuronMap]]]]:
        """Transport maps ``outs[k][lvl]`` and aligned parameters ``params[k][lvl]`` of every
        model ``k >= 1``.  A level stream carries the anchor's level inputs (stream 0) and those of
        every partially aligned model (stream ``k``: its levels below already aligned, so its
        activations follow the alignment), so each model runs each level once per batch."""
        anchor, n_models, n_levels = nets[0], len(nets), nets[0].num_levels
        outs: List[List[Optional[NeuronMap]]] = [[None] * n_levels for _ in nets]
        params: List[List[Dict[str, Tensor]]] = [[] for _ in nets]
        inner: List[Dict[str, List[NeuronMap]]] = []
        others = range(1, n_models)
        with self.stream(data, n_models) as stream:
            for lvl in tqdm(range(n_levels), desc="otfusion align", disable=not self.progress, leave=False):
                layout, head = layouts[lvl], heads[lvl]
                members = stream_members(heads, head)
                known = True  # the output map is fixed before the level's inner layers are aligned
                if lvl == n_levels - 1 or head == -1 or n_levels - 1 in members:
                    why = "output level" if lvl == n_levels - 1 else "residual stream tied to the input or output"
                    identity_ok(widths, lvl, why)
                elif head < lvl:
                    for k in others:  # identity skip: the output neurons are the input neurons
                        outs[k][lvl] = outs[k][head]
                else:
                    known = False
                maps: List[SpaceMaps] = [{"in": outs[k][lvl - 1] if lvl > 0 else None, "out": outs[k][lvl]}
                                         for k in range(n_models)]
                for unit in space_units(layout.internal):  # inner layers (a residual block's, heads)
                    name = unit[0].name
                    groups = 0 if unit[0].heads else layout.unit_groups(name)
                    order = _group_orders(layout, name, maps, groups,
                                          {k: space_sizes(nets[k].levels[lvl], layout)[name] for k in others})
                    for k in order or ():   # the grouped convolution's rows follow its input's groups
                        maps[k][name] = NeuronMap.from_permutation(order[k])
                    partial = {k: align_level(nets[k].levels[lvl], layout, lvl, maps[k]) for k in others}
                    for k, ms in self._transports(run, nets, stream, partial, lvl, [lvl], unit, groups=groups,
                                                  order=order).items():
                        for sp, m in zip(unit, ms):
                            maps[k][sp.name] = m if order is None else _reordered(m, order[k])
                mapped_outputs = False
                if not known:
                    groups = output_unit_groups(anchor.levels, lvl, layout)
                    order = _group_orders(layout, "out", maps, groups, {k: widths[k][lvl] for k in others})
                    for k in order or ():
                        maps[k]["out"] = NeuronMap.from_permutation(order[k])
                    reordered = order is not None   # the level runs with its output's rows reordered
                    parts = None
                    if layout.parts:  # a concatenation: one transport per part, block diagonal
                        spans = [part_spans(net, lvl, layout) for net in nets]
                        # a part a grouped convolution writes: its groups in the anchor's order first
                        orders = [_group_orders(layout, p, maps, layout.unit_groups(p),
                                                {k: spans[k][j].stop - spans[k][j].start for k in others})
                                  for j, p in enumerate(layout.parts)]
                        parts = {k: [_Part(p, sk, s0, maps[k]["in"], layout.unit_groups(p),
                                           None if o is None else o[k])
                                     for p, sk, s0, o in zip(layout.parts, spans[k], spans[0], orders)]
                                 for k in others}
                        reordered = any(o is not None for o in orders)
                        for k in others if reordered else ():
                            maps[k]["out"] = concat_maps([NeuronMap.from_permutation(
                                np.arange(pt.mine.stop - pt.mine.start) if pt.order is None else pt.order)
                                for pt in parts[k]])
                    partial = {k: align_level(nets[k].levels[lvl], layout, lvl, maps[k]) for k in others}
                    mapped_outputs = _ends_affine(nets[0].levels[lvl]) and not reordered
                    # the rest of the stream reads the level output in model k's own order
                    rows = {k: maps[k]["out"].plan.argmax(0) for k in others} if reordered else None
                    for k, ms in self._transports(run, nets, stream, partial, lvl, members, None,
                                                  keep=mapped_outputs, parts=parts, groups=groups,
                                                  order=order, rows=rows).items():
                        outs[k][lvl] = ms[0] if order is None else _reordered(ms[0], order[k])
                for k in others:
                    maps[k]["out"] = outs[k][lvl]
                    params[k].append(align_level(nets[k].levels[lvl], layout, lvl, maps[k]))
                inner.append({sp.name: [maps[k][sp.name] for k in others] for sp in layout.internal})
                if lvl < n_levels - 1:
                    fns: Dict[int, Callable[[Tensor], Tensor]] = {0: anchor.levels[lvl]}
                    post: Dict[int, Callable[[Tensor], Tensor]] = {}
                    for k in others:
                        fns[k] = _aligned(nets[k].levels[lvl], params[k][lvl])
                        if mapped_outputs:
                            # the level ends in its affine layer: the aligned output is the partial
                            # output written in the anchor's basis (no second evaluation)
                            post[k] = _map_outputs(outs[k][lvl], nets[k].axes[lvl])  # type: ignore[arg-type]
                    stream.advance(fns, transforms=post)
        return outs, params, inner

    @staticmethod
    def _space_values(level: nn.Module, spaces: List[Space], call: Callable[[], Tensor], axis: str, h: Tensor,
                      params: Optional[Dict[str, Tensor]]) -> List[Tensor]:
        """The internal ``spaces``' values of ``level`` on ``h`` with ``params`` whose input and
        output sides, and the spaces aligned so far, are aligned to the anchor: a transformer level
        through its stages, which take any widths (:meth:`TransformerSpec.resized`); any other
        level by running it (``call``) with probes."""
        spec = describe_transformer(level)
        if spec is None:
            return capture_spaces(level, spaces, call, axis)
        values = spec.space_values(level, h, params)
        return [values[sp.name] for sp in spaces]

    def _transports(self, run: FusionRun, nets: List[LeveledNet], stream: LevelStream,
                    partial: Dict[int, Dict[str, Tensor]],
                    lvl: int, members: List[int], spaces: Optional[List[Space]], keep: bool = False,
                    parts: Optional[Dict[int, List["_Part"]]] = None,
                    groups: int = 0, order: Optional[Dict[int, np.ndarray]] = None,
                    rows: Optional[Dict[int, np.ndarray]] = None) -> Dict[int, List[NeuronMap]]:
        """Transport of level ``lvl``'s output (over its stream ``members``; a list of one map),
        or of its internal ``spaces`` (one unit: a space, or the spaces of one attention, whose
        heads move as units), from every model ``k`` (parameters ``partial[k]`` at ``lvl``) to
        the anchor, from one pass over the fusion set.  With ``keep``, the level outputs are handed
        to the stream as every model's next input (the anchor's as they are, the others' to be
        mapped).  ``parts[k]`` lists the parts of a concatenation (:class:`_Part`): each part is
        transported on its own (a part that is the level input keeps its map; a part a grouped
        convolution writes moves in its groups, its rows in the order given) and the map is their
        block diagonal.  ``groups`` > 0: the space is normalised by a GroupNorm of that many
        groups, or read or written by a grouped
        convolution of that many groups, which move as units like attention heads (with the
        importance scores inside them for a level output, uniform marginals for an inner space);
        with ``order`` every model ``k``'s neurons come in ``order[k]``, their groups in the
        anchor's order (a grouped convolution's output, :func:`_group_orders`), and group ``b``
        goes to group ``b``.  ``rows[k]``: the order in which model ``k``'s level runs with its
        output's rows (``rows[k][j]``: its neuron at position ``j``), if reordered; the later levels
        of the stream are run on the output back in model ``k``'s order and their outputs taken
        in ``rows[k]`` too, so that every member's cost compares the same neurons."""
        anchor = nets[0]
        n_stats = len(members) if spaces is None else len(spaces)
        stats = {k: [CrossMoments() for _ in range(n_stats)] for k in partial}
        aligned = {k: _aligned(nets[k].levels[lvl], partial[k]) for k in partial}   # once, not per batch
        with torch.no_grad():
            for b in stream:
                runs = {0: lambda h=b.inputs[0]: anchor.levels[lvl](h)}
                for k in partial:
                    runs[k] = (lambda h=b.inputs[k], f=aligned[k]: f(h))
                if spaces is not None:
                    z = {k: self._space_values(nets[k].levels[lvl], spaces, call, nets[k].axes[lvl],
                                               b.inputs[k], partial.get(k))
                         for k, call in runs.items()}
                    for k in partial:
                        for s, zk, za in zip(stats[k], z[k], z[0]):
                            s.update(zk, za)
                    continue
                chains: Dict[int, List[Tensor]] = {}
                for k, call in runs.items():
                    z = call()
                    if keep:
                        b.keep(k, z)
                    chain = [z]
                    perm = None if rows is None or k == 0 else torch.from_numpy(rows[k]).to(z.device)
                    h = z if perm is None else _take(z, torch.argsort(perm), nets[k].axes[lvl])
                    for m in members[1:]:  # rest of the stream, in model k's basis (not yet aligned)
                        h = nets[k].levels[m](h)
                        chain.append(h if perm is None else _take(h, perm, nets[k].axes[m]))
                    chains[k] = chain
                for k in partial:
                    for s, m, zk, za in zip(stats[k], members, chains[k], chains[0]):
                        s.update(flatten_neurons(zk, nets[k].axes[m]), flatten_neurons(za, anchor.axes[m]))
        result: Dict[int, List[NeuronMap]] = {}
        for k in partial:
            costs = []
            for s in stats[k]:
                d = self.reduce(s).sq_dist().cpu().numpy()
                costs.append(d if self.options.ground_metric == "sqeuclidean" else np.sqrt(d))
            if spaces is not None:  # importance is defined for level outputs only
                cost = costs[0]
                mu = np.full(cost.shape[0], 1.0 / cost.shape[0])
                nu = np.full(cost.shape[1], 1.0 / cost.shape[1])
            else:
                cost = sum(costs)  # type: ignore[assignment]
                mu = normalized(sum(normalized(run.importance_scores(nets[k])[m].numpy()) for m in members))
                nu = normalized(sum(normalized(run.importance_scores(anchor)[m].numpy()) for m in members))
                if order is not None:   # the rows come in the anchor's order of groups
                    mu = mu[order[k]]
            units = spaces[0].heads if spaces is not None and spaces[0].heads else groups
            if units:
                # attention heads, or the groups of a GroupNorm or a grouped convolution, matched
                # as units: one within-unit transport per space, between the units' shares of the
                # marginals (importance scores for a level output)
                plans, _ = head_structured_plans(costs if spaces is not None else [cost], units,
                                                 _inner_solver(self, lvl),
                                                 np.arange(units) if order is not None else None,
                                                 None if spaces is not None else (mu, nu))
                result[k] = [NeuronMap.from_plan(p, p.sum(0)) for p in plans]
                continue
            if parts is None:
                plan = self._solve(mu, nu, cost, lvl)
                result[k] = [NeuronMap.from_plan(plan, nu)]
            else:
                blocks = []
                for pt in parts[k]:
                    sk, s0 = pt.mine, pt.anchor
                    if pt.space == "in":
                        blocks.append(pt.given or NeuronMap.identity(sk.stop - sk.start))
                        continue
                    nu_p = normalized(nu[s0])
                    if pt.groups:   # a grouped convolution's part: its groups in the anchor's order
                        assert pt.order is not None
                        mu_p = normalized(mu[sk])[pt.order]
                        block, _ = head_structured_plans([cost[sk, s0]], pt.groups, _inner_solver(self, lvl),
                                                         np.arange(pt.groups), (mu_p, nu_p))
                        blocks.append(_reordered(NeuronMap.from_plan(block[0], nu_p), pt.order))
                        continue
                    blocks.append(NeuronMap.from_plan(self._solve(normalized(mu[sk]), nu_p, cost[sk, s0], lvl), nu_p))
                result[k] = [concat_maps(blocks)]
                plan = result[k][0].plan
            log.debug("otfusion model %d level %d%s: transport cost %.4g", k, lvl,
                      f" ({spaces[0].name})" if spaces is not None else "", float((plan * cost).sum()))
        return result

    @phase("grouping")
    def _solve(self, mu: np.ndarray, nu: np.ndarray, cost: np.ndarray, level: int) -> np.ndarray:
        import ot

        scale = float(cost.max())
        c = cost / scale if scale > 0 else cost
        limit = self.options.max_iter or SOLVER_ITERATIONS[self.options.solver]
        if self.options.solver == "exact":
            plan, info = ot.emd(mu, nu, c, numItermax=limit, log=True)
            if info.get("warning"):
                raise ConfigError(
                    f"exact OT did not converge at level {level} ({info['warning']}); raise "
                    "max_iter or use solver='sinkhorn'"
                )
        else:
            plan, info = ot.sinkhorn(mu, nu, c, self.options.reg, method="sinkhorn_log",
                                     numItermax=limit, stopThr=1e-9, warn=False, log=True)
            if info.get("niter", 0) >= limit - 1:
                warnings.warn(f"Sinkhorn stopped at max_iter={limit} before its tolerance (level {level}, "
                              f"marginal error {info['err'][-1] if info.get('err') else float('nan'):.2g}); "
                              "the plan is used as it is: raise reg or max_iter, or use solver='exact'",
                              RuntimeWarning, stacklevel=3)
        plan = np.asarray(plan, dtype=np.float64)
        if not np.isfinite(plan).all() or plan.sum() <= 0:
            raise ConfigError(
                f"the OT solver returned an invalid plan at level {level}; raise reg or use "
                "solver='exact'"
            )
        return plan
