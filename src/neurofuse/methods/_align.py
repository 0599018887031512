r"""Aligning models to an anchor before they are merged, and the bookkeeping the aligning methods share.

"Align, then merge": every model :math:`k \ge 1` is rewritten in model 0's neuron basis (a
function-preserving permutation of its hidden neurons), after which any merge that assumes a
shared initialisation (a plain, RegMean or Fisher-weighted average) can be applied.  Two
alignments are offered (:data:`ALIGNMENTS`):

``"activations"``
    Git Re-Basin activation matching, the project's :class:`~neurofuse.methods.GitRebasin`
    (:meth:`~neurofuse.methods.GitRebasin.match_levels`, uniform importance), model by model
    against model 0; needs the fusion data.
``"weights"``
    Git Re-Basin weight matching (:func:`neurofuse.grouping.weight_matching`), no data.

Both give, per model, one :class:`~neurofuse.levels._layout.NeuronMap` per neuron space of every
level (``"in"``, ``"out"``, internal spaces), applied with
:func:`~neurofuse.levels._layout.align_level`.  What each fused neuron stands for is recorded as
one :class:`~neurofuse.grouping.Correspondence` per hidden level (:func:`correspondence`).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .._fusion_set import FusionSet
from ..errors import ConfigError, IncompatibleModelsError
from ..grouping import Correspondence, MatchedTensor, weight_matching
from ..levels import LeveledNet, alignment_reason, check_same_levels, traits_reason
from ..levels._layout import (LevelLayout, NeuronMap, Space, SpaceMaps, align_level, check_alignable, oriented,
                              output_unit_groups, stream_members)
from ._base import FusionRun
from ._rebasin import GitRebasin

__all__ = ["ALIGNMENTS", "LayoutAlignment", "PermutationSpec", "align_models", "aligned_state", "apply_maps",
           "average_states", "check_equal_widths", "check_same_state", "correspondence", "inner_correspondences",
           "merge_inputs",
           "out_correspondence", "permutation_spec", "record_levels", "weight_maps"]

#: the ways of aligning models before a merge ("none": merge as they are)
ALIGNMENTS = ("none", "activations", "weights")
#: layout structures weight matching does not handle (:func:`neurofuse.levels.layout_traits`): a
#: concatenation's output is one block of neurons per part, which one permutation of the whole
#: level output (the objective's group) would mix
WEIGHT_MATCHING_UNSUPPORTED: FrozenSet[str] = frozenset({"parts"})


class LayoutAlignment:
    """Mixin of the methods that align a level by one map per neuron space: they fuse a level
    whose layout :func:`neurofuse.levels.alignment_reason` accepts and that has none of their
    :attr:`unsupported_traits` (:func:`neurofuse.levels.layout_traits`)."""

    fuses_levels = True
    #: whether the method moves a grouped convolution's groups as units (else it refuses them)
    aligns_grouped = False
    #: layout structures the method does not handle (``"transformer"``, ``"depthwise"``, ``"parts"``)
    unsupported_traits: FrozenSet[str] = frozenset()
    #: for a trait in :attr:`unsupported_traits`, what in the method stands in the way
    trait_reasons: Mapping[str, str] = MappingProxyType({})

    @classmethod
    def check_level(cls, net: nn.Module, index: int) -> Optional[str]:
        return alignment_reason(net, index, cls.aligns_grouped) or traits_reason(net, index, cls.unsupported_traits,
                                                              cls.name, cls.trait_reasons)  # type: ignore[attr-defined]


LevelMaps = List[SpaceMaps]

#: why the merges that are no permutation (ZipIt!, CCA Merge) do not align a transformer level
NOT_PERMUTATION_IN_TRANSFORMER = ("the paper gives no rule for attention heads: {what} would mix neurons of "
                                  "different heads, and a head's queries and keys need maps that keep "
                                  "their products")


def input_part_maps(maps: Sequence[Sequence[SpaceMaps]], models: Sequence[int], lvl: int, width: int,
                    shared: "Callable[[int], NeuronMap]") -> List[NeuronMap]:
    """The maps of a concatenation's part that is the level input, for each model of ``models``:
    the input's own ``"out"`` maps, or ``shared(width)`` where the input is the shared model input
    (or is tied to it)."""
    out = []
    for k in models:
        prev = maps[k][lvl - 1]["out"] if lvl else None
        out.append(prev if prev is not None else shared(width))
    return out


def check_equal_widths(nets: Sequence[LeveledNet], method: str) -> List[List[int]]:
    """Every model's level widths, refused unless all equal model 0's."""
    widths = [m.level_widths() for m in nets]
    for k, w in enumerate(widths[1:], start=1):
        if w != widths[0]:
            raise IncompatibleModelsError(
                f"{method!r} needs models of equal widths, got {widths[0][:-1]} (model 0) and "
                f"{w[:-1]} (model {k}); use 'zipit', 'otfusion' or 'kf-linear' for different widths"
            )
    return widths


# ---------------------------------------------------------------------------------------------
# permutation groups of a leveled network (weight matching)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PermutationSpec:
    """Which permutation group every neuron space of every level belongs to.

    Attributes
    ----------
    groups : list of dict
        Per level, ``{space: group or None}`` for ``"in"``, ``"out"`` and the internal spaces;
        ``None`` is a space that is not permuted (the input, the output, a residual stream tied
        to either).  The levels of one residual stream share one group.
    sizes : list of int
        Neurons per group; groups are numbered in forward order (the order the first sweep of
        :func:`~neurofuse.grouping.weight_matching` visits them).
    """

    groups: List[Dict[str, Optional[int]]]
    sizes: List[int]
    #: ``((group, ...), heads)``: groups whose neurons come in ``heads`` heads that move as units
    #: together (an attention's query/key and value/output spaces)
    units: List[Tuple[Tuple[int, ...], int]] = dataclasses.field(default_factory=list)
    #: groups whose unit keeps its heads in place (a grouped convolution that reads the network
    #: input, whose groups are not permuted): only the neurons inside each head move
    fixed: Tuple[int, ...] = ()


def _space_size(layout: LevelLayout, sp: Space, sd: Dict[str, Tensor]) -> int:
    """Neurons of internal space ``sp``: the rows of a tensor of its own, else of one of its probes
    (a part of a packed projection, e.g. the queries of a ``qkv``)."""
    for k, s0, _, kd in layout.tensors:
        if s0 == sp.name:
            return int(oriented(sd[k], kd).shape[0])
    _, weight, _, start, stop, transposed = sp.probes[0]
    rows = int(oriented(sd[weight], "linear_t" if transposed else "linear").shape[0])
    return (rows if stop is None else int(stop)) - int(start)


def permutation_spec(net: LeveledNet, layouts: Sequence[LevelLayout], heads: Sequence[int],
                     widths: Sequence[int]) -> PermutationSpec:
    """The :class:`PermutationSpec` of ``net`` (level ``widths``) from its level layouts and
    residual heads."""
    n_levels = net.num_levels
    sizes: List[int] = []
    units: List[Tuple[Tuple[int, ...], int]] = []
    out_group: List[Optional[int]] = []
    groups: List[Dict[str, Optional[int]]] = []
    grouped: Dict[int, int] = {}            # permutation group -> the groups its channels move in
    linked: List[Tuple[int, int]] = []      # the spaces a grouped convolution reads and writes
    for lvl in range(n_levels):  # groups are numbered in forward order: internal spaces first
        layout = layouts[lvl]
        spaces: Dict[str, Optional[int]] = {"in": out_group[lvl - 1] if lvl else None}
        sd = net.levels[lvl].state_dict()
        by_unit: Dict[str, Tuple[List[int], int]] = {}   # an attention's spaces, its head count
        for sp in layout.internal:
            if sp.heads:
                by_unit.setdefault(sp.unit, ([], int(sp.heads)))[0].append(len(sizes))
            elif layout.unit_groups(sp.name):
                grouped[len(sizes)] = layout.unit_groups(sp.name)
            spaces[sp.name] = len(sizes)
            sizes.append(_space_size(layout, sp, sd))
        units += [(tuple(gs), h) for gs, h in by_unit.values()]
        head = heads[lvl]
        if lvl == n_levels - 1 or head == -1 or n_levels - 1 in stream_members(heads, head):
            g: Optional[int] = None
        elif head < lvl:
            g = out_group[head]
        else:
            g = len(sizes)
            sizes.append(widths[lvl])
            count = output_unit_groups(net.levels, lvl, layout)   # type: ignore[arg-type]
            if count:
                grouped[g] = count
        out_group.append(g)
        spaces["out"] = g
        groups.append(spaces)
        for space, reads, _ in layout.conv_groups:
            ends = (spaces.get(space), spaces.get(reads))
            if ends[0] is not None:
                linked.append(ends)   # type: ignore[arg-type]
    found, fixed = _group_units(grouped, linked)
    return PermutationSpec(groups, sizes, units + found, fixed)


def _group_units(grouped: Dict[int, int], linked: List[Tuple[int, Optional[int]]]
                 ) -> Tuple[List[Tuple[Tuple[int, ...], int]], Tuple[int, ...]]:
    """The units of the permutation groups whose channels move in groups (a GroupNorm's, a
    grouped convolution's): the groups that grouped convolutions link (the space one reads and
    the space it writes share their assignment of groups) are one unit; and the groups of the
    units linked to a space that is not permuted (``None``: the network input), whose groups stay
    in place."""
    root = {g: g for g in grouped}

    def find(g: int) -> int:
        while root[g] != g:
            g = root[g]
        return g

    anchored = set()
    for a, b in linked:
        if b is None:
            anchored.add(a)
        else:
            root[find(a)] = find(b)
    members: Dict[int, List[int]] = {}
    for g in sorted(grouped):
        members.setdefault(find(g), []).append(g)
    fixed = tuple(g for gs in members.values() if any(m in anchored for m in gs) for g in gs)
    return [(tuple(gs), grouped[gs[0]]) for gs in members.values()], fixed


def _as_3d(t: Tensor, kind: str, n_in: Optional[int], level: int) -> Tensor:
    """``[d0, d1, rest]`` view of a layout tensor (vector, conv weight, linear weight, a tensor
    whose last axis is the space: an embedding table, a CLS token, a position embedding; a
    grouped convolution's ``[d0, d1 / groups, rest]``)."""
    t = oriented(t, kind)
    if kind == "vector":
        return t.reshape(-1, 1, 1)
    if kind == "last":
        return t.reshape(-1, t.shape[-1]).T.reshape(t.shape[-1], 1, -1)
    if kind in ("conv", "depthwise", "grouped"):   # a depthwise kernel [C, 1, k, k]: axis 1 is no space;
        return t.reshape(t.shape[0], t.shape[1], -1)    # a grouped one [out, in / g, k, k] (MatchedTensor.groups)
    if n_in is None or t.shape[1] == n_in:
        return t.reshape(t.shape[0], t.shape[1], 1)
    if t.shape[1] % n_in == 0:  # Linear after Flatten of [C, H, W]: channel-major
        return t.reshape(t.shape[0], n_in, -1)
    raise IncompatibleModelsError(f"level {level}: the linear layer takes {t.shape[1]} inputs, not a "
                                  f"multiple of the previous level's {n_in} neurons")


def _matched_tensors(spec: PermutationSpec, layouts: Sequence[LevelLayout], a: LeveledNet,
                     b: LeveledNet) -> List[MatchedTensor]:
    out: List[MatchedTensor] = []
    for lvl, layout in enumerate(layouts):
        pa, pb = dict(a.levels[lvl].named_parameters()), dict(b.levels[lvl].named_parameters())
        spaces = spec.groups[lvl]
        for key, s0, s1, kind in layout.tensors:
            if key not in pa:  # running statistics are not part of the objective
                continue
            g1 = spaces.get(s1) if s1 is not None else None
            n_in = spec.sizes[g1] if g1 is not None else None
            g = a.levels[lvl].get_submodule(key.rpartition(".")[0]).groups if kind == "grouped" else 0
            ta, tb = (_as_3d(t.detach(), kind, n_in, lvl) for t in (pa[key], pb[key]))
            start = 0                  # a packed tensor ("qk0+qk0+vo0"): one term per part
            for part in s0.split("+"):
                g0 = spaces.get(part)
                n = spec.sizes[g0] if g0 is not None else ta.shape[0] - start
                if g0 is not None or g1 is not None:
                    out.append(MatchedTensor(ta[start:start + n], tb[start:start + n], g0, g1, g))
                start += n
    return out


def _level_maps(spec: PermutationSpec, perms: Sequence[np.ndarray]) -> LevelMaps:
    maps = [NeuronMap.from_permutation(p) for p in perms]
    return [{space: (None if g is None else maps[g]) for space, g in spaces.items()} for spaces in spec.groups]


def weight_maps(anchor: LeveledNet, other: LeveledNet, layouts: Sequence[LevelLayout], spec: PermutationSpec,
                *, max_sweeps: int = 100, seed: int = 0) -> LevelMaps:
    """Per level, the maps that write ``other`` in ``anchor``'s basis, by weight matching."""
    with torch.no_grad():
        result = weight_matching(_matched_tensors(spec, layouts, anchor, other), spec.sizes,
                                 max_sweeps=max_sweeps, seed=seed, units=spec.units, fixed=spec.fixed)
    return _level_maps(spec, result.perms)


# ---------------------------------------------------------------------------------------------
# applying maps, averaging, correspondences
# ---------------------------------------------------------------------------------------------
def aligned_state(net: LeveledNet, layouts: Sequence[LevelLayout], maps: Optional[LevelMaps]) -> Dict[str, Tensor]:
    """``net``'s state dict with every level written in the anchor's basis (``maps[level]``;
    ``None``: as it is)."""
    state = net.state_dict()
    if maps is not None:
        for lvl, layout in enumerate(layouts):
            for key, value in align_level(net.levels[lvl], layout, lvl, maps[lvl]).items():
                state[f"levels.{lvl}.{key}"] = value
    return state


def apply_maps(net: LeveledNet, layouts: Sequence[LevelLayout], maps: LevelMaps) -> LeveledNet:
    """A copy of ``net`` with every level written in the anchor's basis (``maps[level]``)."""
    out = net.clone()
    out.load_state_dict(aligned_state(net, layouts, maps))
    return out


def average_states(like: LeveledNet, states: Sequence[Dict[str, Tensor]]) -> LeveledNet:
    """A copy of ``like`` holding the mean of every floating-point tensor of ``states`` (in
    float64, cast back; counters such as ``num_batches_tracked`` are the first state's)."""
    avg = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            acc = v.double()
            for s in states[1:]:
                acc = acc + s[k]
            avg[k] = (acc / len(states)).to(v.dtype)
        else:
            avg[k] = v.clone()
    out = like.clone()
    out.load_state_dict(avg)
    return out


def correspondence(blocks: Sequence[np.ndarray]) -> Correspondence:
    """Which base neurons each fused neuron stands for, from one ``[n_fused, n_k]`` block per
    model (a permutation, a merge matrix, a linear map), by magnitude.

    Hard (stored as a label per base neuron) when every base neuron enters at most one fused
    neuron, as for permutations and ZipIt!'s merges; soft (the dense matrix of absolute values)
    otherwise, as for CCA maps."""
    mats = [np.abs(np.asarray(b, dtype=np.float64)) for b in blocks]
    widths = [m.shape[1] for m in mats]
    if all(((m > 0).sum(0) <= 1).all() for m in mats):
        joint = np.concatenate(mats, axis=1)
        labels = np.where(joint.max(0) > 0, joint.argmax(0), -1)
        return Correspondence.hard(labels, widths, joint.shape[0], joint.max(0))
    return Correspondence.from_blocks(mats)


def out_correspondence(maps: Sequence[Optional[LevelMaps]], widths: Sequence[Sequence[int]]) -> List[Correspondence]:
    """Per hidden level, the :func:`correspondence` of the ``"out"`` maps of every model
    (``maps[k] = None`` or a ``None`` map: the identity)."""
    result = []
    for lvl in range(len(widths[0]) - 1):
        blocks = []
        for k, mk in enumerate(maps):
            m = None if mk is None else mk[lvl].get("out")
            blocks.append(np.eye(widths[0][lvl], widths[k][lvl]) if m is None else m.out.numpy())
        result.append(correspondence(blocks))
    return result


def inner_correspondences(maps: Sequence[Optional[LevelMaps]]) -> Dict[int, Dict[str, Correspondence]]:
    """Per level, the :func:`correspondence` of every internal space (an attention's heads, an
    MLP's hidden neurons) that every model's maps move: what REPAIR rescales inside transformer
    levels (:func:`neurofuse.repair.repair`, ``inner_correspondences``)."""
    anchor = next((mk for mk in maps if mk is not None), None)
    if anchor is None:
        return {}
    out: Dict[int, Dict[str, Correspondence]] = {}
    for lvl, spaces in enumerate(anchor):
        for name, m in spaces.items():
            if name in ("in", "out") or m is None:
                continue
            ms = [None if mk is None else mk[lvl].get(name) for mk in maps]
            if all(x is not None for x in ms[1:]):
                n = m.out.shape[0]
                out.setdefault(lvl, {})[name] = correspondence(
                    [np.eye(n) if x is None else x.out.numpy() for x in ms])
    return out


def record_levels(run: FusionRun, correspondences: Optional[Sequence[Correspondence]]) -> None:
    """Record one correspondence per hidden level in ``run`` (``None``: nothing to record)."""
    for lvl, c in enumerate(correspondences or ()):
        run.record(lvl, c)


def align_models(nets: Sequence[LeveledNet], layouts: Sequence[LevelLayout], heads: Sequence[int], how: str,
                 data: Optional[FusionSet], *, seed: int = 0, device: str = "cpu", batch_size: int = 256,
                 memory_budget: Optional[int] = None) -> Tuple[List[LeveledNet], List[Optional[LevelMaps]]]:
    """Every model written in model 0's basis (``how`` in :data:`ALIGNMENTS`) and the maps used
    (``None`` for model 0 and with ``how="none"``).  Activation matching runs a fresh
    :class:`~neurofuse.methods.GitRebasin` call per model (uniform importance)."""
    if how not in ALIGNMENTS:
        raise ConfigError(f"align must be one of {list(ALIGNMENTS)}, got {how!r}")
    maps: List[Optional[LevelMaps]] = [None] * len(nets)
    if how == "none":
        return list(nets), maps
    out = [nets[0]]
    if how == "weights":
        for lvl in range(nets[0].num_levels):
            why = traits_reason(nets[0], lvl, WEIGHT_MATCHING_UNSUPPORTED, "align='weights'")
            if why:
                raise IncompatibleModelsError(f"cannot align level {lvl} by weight matching: {why}; "
                                              "use align='activations'")
        spec = permutation_spec(nets[0], layouts, heads, check_equal_widths(nets, "align='weights'")[0])
    for k in range(1, len(nets)):
        if how == "weights":
            mk = weight_maps(nets[0], nets[k], layouts, spec, seed=seed)
        else:
            if data is None:
                raise ConfigError("align='activations' matches activations on the fusion set: pass data, "
                                  "or use align='weights'")
            matcher = GitRebasin(progress=False, seed=seed, device=device, batch_size=batch_size,
                                 memory_budget=memory_budget)
            pair = [nets[0], nets[k]]
            outs, inner, _ = matcher.match_levels(matcher.Run(matcher, pair, data), pair, layouts, heads)
            mk = [{"in": outs[lvl - 1] if lvl else None, "out": outs[lvl], **inner[lvl]}
                  for lvl in range(len(layouts))]
        maps[k] = mk
        out.append(apply_maps(nets[k], layouts, mk))
    return out, maps


def check_same_state(models: Sequence[nn.Module], method: str) -> None:
    """Refuse models whose state dicts differ in keys or shapes (merging without alignment)."""
    ref = models[0].state_dict()
    for i, m in enumerate(models[1:], start=1):
        sd = m.state_dict()
        if sd.keys() != ref.keys():
            raise IncompatibleModelsError(f"{method!r} needs identical architectures: model {i} has "
                                          "different parameters than model 0")
        for k, v in sd.items():
            if v.shape != ref[k].shape:
                raise IncompatibleModelsError(
                    f"{method!r} needs identical architectures: {k!r} has shape {list(v.shape)} in "
                    f"model {i} but {list(ref[k].shape)} in model 0; for models of different widths "
                    "use 'zipit', 'otfusion' or 'kf-linear'")


def merge_inputs(models: Sequence[nn.Module], data: Optional[FusionSet], how: str, method: str, *,
                 seed: int = 0, device: str = "cpu", batch_size: int = 256,
                 memory_budget: Optional[int] = None
                 ) -> Tuple[List[nn.Module], Optional[List[Correspondence]], Dict[int, Dict[str, Correspondence]]]:
    """The models a merge that assumes a shared initialisation combines, and what each fused
    neuron stands for.

    ``how="none"``: the models as they are (any modules of identical state-dict shapes: the
    paper's setting of fine-tuned copies of one model); otherwise every model aligned to model 0
    (:func:`align_models`; leveled models of equal widths).  The correspondences (``None`` for
    models that are not :class:`~neurofuse.levels.LeveledNet`) give, per hidden level, each
    model's neuron merged into fused neuron ``j``; the last item, those of the internal spaces the
    alignment moved (:func:`inner_correspondences`; empty without an alignment).
    """
    if how not in ALIGNMENTS:
        raise ConfigError(f"align must be one of {list(ALIGNMENTS)}, got {how!r}")
    if how == "none":
        check_same_state(models, method)
        if not all(isinstance(m, LeveledNet) for m in models):
            return list(models), None, {}
    nets = check_same_levels(models)
    widths = check_equal_widths(nets, method)
    if how == "none":
        return list(nets), out_correspondence([None] * len(nets), widths), {}
    layouts, heads = check_alignable(nets, method, grouped=True)
    aligned, maps = align_models(nets, layouts, heads, how, data, seed=seed, device=device,
                                 batch_size=batch_size, memory_budget=memory_budget)
    return list(aligned), out_correspondence(maps, widths), inner_correspondences(maps)
