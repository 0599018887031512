r"""Level layouts and neuron maps: how the parameters of a level follow its neurons.

This is the alignment machinery shared by every method that rewrites one model in another
model's neuron basis (OTFusion, Git Re-Basin): which tensors of a level belong to its input, its
output and its internal neurons (:class:`LevelLayout`, :func:`level_layout`), how residual levels
tie the neurons of several levels into one *residual stream* (:func:`residual_heads`, the
convention every architecture with skip connections follows: ``level.adds_input = True``, or a
block with ``branch`` and an ``nn.Identity`` ``shortcut``), and how a level's parameters are
written in another basis (:func:`align_level`).  A depthwise convolution stays in the space it
reads (its output channel ``c`` is its input channel ``c``); the output of a concatenation
(attribute ``branches``) is the concatenation of its parts' spaces, and its map the block
diagonal of theirs (:func:`concat_maps`).

Notation
--------
Model :math:`k` has :math:`n` neurons at a level, the anchor :math:`m`.  A transport map
:math:`T \in \mathbb{R}_{\ge 0}^{n\times m}` with row sums :math:`\mu` (model :math:`k`'s
marginal) and column sums :math:`\nu` (the anchor's marginal) moves model :math:`k`'s neurons onto
the anchor's.  With

.. math:: Q = \operatorname{diag}(1/\nu)\, T^\top \in \mathbb{R}^{m\times n}, \qquad
          P = T\, \operatorname{diag}(1/\nu) \in \mathbb{R}^{n\times m},

every row of :math:`Q` is a convex combination of model :math:`k`'s neurons (a barycentric
projection onto anchor neuron :math:`j`).  A level with weight :math:`W` (output neurons on the
rows, input neurons on the columns) is aligned as

.. math:: \widetilde W = Q\, W\, P_{\text{prev}}, \qquad \tilde b = Q\, b,

where :math:`P_{\text{prev}}` is the previous level's map (the identity at the input) and
:math:`Q` is the identity at the output level.  For a convolution the right product acts on the
input-channel axis of every kernel tap; for a linear layer after a flattened feature map (VGG's
classifier) it acts on the channel axis of every spatial position.  For a permutation (uniform
marginals, equal widths) :math:`Q = \Pi^\top` and :math:`P = \Pi`, so the aligned model computes
exactly the same function as the original.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import IncompatibleModelsError
from ._core import LeveledNet, flatten_neurons
from ._spaces import LevelLayout, Space, oriented
from ._transformer import describe as describe_transformer

__all__ = [
    "LevelLayout",
    "NeuronMap",
    "Space",
    "SpaceMaps",
    "activation_module",
    "align_level",
    "capture",
    "capture_spaces",
    "check_alignable",
    "check_grouped_alignment",
    "concat_maps",
    "group_assignment",
    "identity_ok",
    "is_depthwise",
    "level_adds_input",
    "level_layout",
    "level_paths",
    "next_activation",
    "normalized",
    "oriented",
    "output_unit_groups",
    "own_spaces",
    "part_spans",
    "residual_heads",
    "space_activation",
    "space_map",
    "space_sizes",
    "space_units",
    "stream_members",
]

_AFFINE = (nn.Linear, nn.Conv2d)
_CHANNEL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


def _permutes_with_channels(m: nn.Module) -> bool:
    """A per-channel normalisation (BatchNorm, InstanceNorm), a LayerNorm, or a ``GroupNorm`` of
    one group (every channel together, as a
    LayerNorm) or of one channel per group (each alone): any permutation of the channels commutes
    with it, its weight and bias following the channels."""
    return isinstance(m, _CHANNEL) or (isinstance(m, nn.GroupNorm) and m.num_groups in (1, m.num_channels))
#: element-wise non-linearities a level may start with (used for post-activation matching)
_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SiLU)


# ---------------------------------------------------------------------------------------------
# level layout: which tensors follow which neurons
# ---------------------------------------------------------------------------------------------
def space_sizes(level: nn.Module, layout: LevelLayout) -> Dict[str, int]:
    """The number of neurons of every space of ``layout`` (read from the level's tensors; the
    parts of a concatenation ``"a+b"`` from the other tensors, or split evenly)."""
    sd = level.state_dict()
    sizes: Dict[str, int] = {}
    composite: List[Tuple[str, int]] = []
    for key, s0, s1, kind in layout.tensors:
        t = oriented(sd[key], kind)
        n0 = int(t.shape[-1] if kind == "last" else t.shape[0])
        if "+" in s0:
            composite.append((s0, n0))
        else:
            sizes.setdefault(s0, n0)
        if s1 is not None and kind != "last" and t.dim() > 1:
            n1 = int(t.shape[1])
            if "+" in s1:
                composite.append((s1, n1))
            elif s1 != "in":  # the input's width is the previous level's (a flatten multiplies it)
                sizes.setdefault(s1, n1)
    for name, n in composite:
        parts = name.split("+")
        unknown = sorted({p for p in parts if p not in sizes})
        if not unknown:
            continue
        rest = n - sum(sizes[p] for p in parts if p in sizes)
        count = sum(1 for p in parts if p in unknown)
        for p in unknown:
            sizes[p] = rest // count
    return sizes


def level_adds_input(level: nn.Module) -> bool:
    """Whether a level declares an identity skip connection.

    Either ``level.adds_input = True`` (``output = level(input)`` already includes ``+ input``),
    or the residual-block protocol of :class:`neurofuse.models.resnet.BasicBlock`: attributes
    ``branch`` and ``shortcut`` with ``shortcut`` an ``nn.Identity``.
    """
    if getattr(level, "adds_input", False):
        return True
    return _is_block(level) and isinstance(getattr(level, "shortcut"), nn.Identity)


def _is_block(level: nn.Module) -> bool:
    return isinstance(getattr(level, "branch", None), nn.Module) and isinstance(
        getattr(level, "shortcut", None), nn.Module)


def _own_tensors(m: nn.Module) -> List[Tuple[str, Tensor]]:
    return list(m.named_parameters(recurse=False)) + [
        (n, b) for n, b in m.named_buffers(recurse=False) if b is not None]


def is_depthwise(m: nn.Module) -> bool:
    """Whether ``m`` is a depthwise convolution: a ``Conv2d`` whose every output channel reads its
    own input channel alone (``groups == in_channels == out_channels``)."""
    return isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels


def _is_concat(level: nn.Module) -> bool:
    return isinstance(getattr(level, "branches", None), nn.ModuleList)


def _grouped_reason(m: nn.Conv2d) -> str:
    what = (f"a depthwise convolution with a channel multiplier ({m.in_channels} -> {m.out_channels} channels, "
            f"groups={m.groups})" if m.groups == m.in_channels else
            f"a grouped convolution (groups={m.groups}, {m.in_channels // m.groups} input channels per group)")
    return (f"{what}, whose groups of channels must move as units (otfusion, git-rebasin, weight-matching, "
            "cca-merge, the align-then-merge methods, kf-linear and hf-linear move them)")


def _join(*names: str) -> str:
    """A dotted name of the non-empty ``names`` (a level that is one module has keys ``weight``)."""
    return ".".join(n for n in names if n)


def level_paths(level: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """The paths of a level as ``(name, module, space)``: the module of each path, its name in
    the level (``""`` for the level itself) and the space its output is (``"out"``, or the part
    ``"out<b>"`` of a concatenation).  A residual block's identity shortcut is left out."""
    if _is_block(level):
        paths = [("branch", level.branch, "out")]
        if not isinstance(level.shortcut, nn.Identity):
            paths.append(("shortcut", level.shortcut, "out"))
        return paths
    if _is_concat(level):
        return [(f"branches.{b}", m, f"out{b}") for b, m in enumerate(level.branches)]
    return [("", level, "out")]


#: parameter-free operations (``torch.fx`` targets) that move values between channels, take some of
#: them or move the channel axis (which the levels' neuron axis does not follow: a channels-last
#: ``permute`` around a ``Linear``): a map of the channels does not pass through them (ShuffleNet's
#: channel shuffle is ``view -> transpose -> view``, its split ``chunk``)
_CHANNEL_MOVES = frozenset({
    "transpose", "permute", "movedim", "moveaxis", "swapaxes", "swapdims", "chunk", "split",
    "tensor_split", "unbind", "narrow", "index_select", "gather", "roll", "flip", "unflatten",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "repeat", "expand", "tile", "cat", "stack"})


def channel_moving_op(level: nn.Module) -> Optional[str]:
    """The first parameter-free operation in ``level``'s traced glue (the automatic levels'
    ``torch.fx`` sub-graphs between layers) that can move values between channels (``None`` if
    none): one of :data:`_CHANNEL_MOVES`, or a ``view`` / ``reshape`` to other than two axes (a
    flatten to ``[batch, features]``, ``x.view(x.size(0), -1)`` or LeNet's ``x.view(-1, 16 * 5 * 5)``,
    feeds a head whose positions the alignment follows).  The
    check reads the operations, not the axes they act on, so it also refuses some that keep the
    channels (a transpose of the two spatial axes): a refusal, never a wrong map."""
    import torch.fx as fx

    for m in level.modules():
        if isinstance(m, (nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle, nn.Unflatten)) or (
                isinstance(m, nn.Flatten) and m.start_dim not in (1, -3, -2)):
            return type(m).__name__
        if not isinstance(m, fx.GraphModule):
            continue
        for n in m.graph.nodes:
            if n.op not in ("call_function", "call_method"):
                continue
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
            what = name if n.name == name else f"{name} ({n.name})"
            if name in _CHANNEL_MOVES:
                return what
            shape = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
            if name in ("view", "reshape") and len(shape) != 2:
                return f"{what} that is not a flatten to [batch, features]"
    return None


def level_layout(level: nn.Module, index: int, method: str = "otfusion", grouped: bool = False) -> LevelLayout:
    """Describe a level for alignment.

    A level is read as one or more *paths* of leaf modules in registration order: the level
    itself (a chain); for a residual block (attributes ``branch`` and ``shortcut``, computing
    ``branch(f(x)) + shortcut(f(x))`` with ``f`` parameter-free, as
    :class:`neurofuse.models.resnet.BasicBlock`), its ``branch`` and its ``shortcut`` (unless the
    shortcut is the identity, which ties the output neurons to the input neurons); for a
    concatenation (attribute ``branches``, an ``nn.ModuleList``, computing
    ``cat([b(f(x)) for b in branches])`` as :class:`neurofuse.levels.AutoConcat`), each branch,
    whose output is one *part* of the level output (``"out0"``, ``"out1"``, ...; ``"in"`` for a
    branch without a layer of its own that opens a space).  A path holds ``Linear`` / ungrouped
    ``Conv2d`` layers, depthwise convolutions, normalisations that commute with a permutation of
    the channels (``BatchNorm1d/2d``, ``LayerNorm`` over the neurons, ``GroupNorm`` of one group or
    of one channel per group), ``GroupNorm`` of several channels per group (its space's channels
    then move as groups: :attr:`LevelLayout.groups`) and parameter-free modules.  Its first layer
    that opens a space reads the level input, its last writes the level output (or its part) and each inner one opens
    an internal space; a depthwise convolution (:func:`is_depthwise`) and a normalisation stay in
    the space they read, so a chain of depthwise layers only is *tied*: its output is its input.

    With ``grouped=True`` (the closed form, which fits a grouped convolution group by group) a
    grouped convolution that is not depthwise opens a space like an ungrouped one; its weight's
    kind is ``"grouped"`` (``[out, in / groups, kh, kw]``: its output group ``b`` reads input group
    ``b``, so both spaces come in ``groups`` contiguous groups matched alike).

    Raises
    ------
    IncompatibleModelsError
        If the level has no affine layer, a grouped convolution that is not depthwise (unless
        ``grouped``) or another module with parameters.
    """
    spec = describe_transformer(level)
    if spec is not None:  # a transformer level: residual stream, attention heads, MLPs
        return spec.layout()
    reason = getattr(level, "not_alignable", None)
    if reason:  # set by the automatic levels on sub-graphs that are not chains or blocks
        raise IncompatibleModelsError(f"{reason}; {method!r} cannot align it (use 'kf-gradient')")
    moved = channel_moving_op(level)
    if moved:
        raise IncompatibleModelsError(
            f"level {index} has a parameter-free {moved}, which can move values between channels or "
            "move the channel axis: a map of the channels does not pass through it (use 'kf-gradient')")
    block, concat = _is_block(level), _is_concat(level)
    paths = level_paths(level)
    if block or concat:
        roots = ("branches",) if concat else ("branch", "shortcut")
        for n, m in level.named_modules():
            if n and n.split(".")[0] not in roots and _own_tensors(m):
                raise IncompatibleModelsError(
                    f"level {index} holds parameters outside its {' and '.join(roots)} ({n}); "
                    f"{method!r} cannot align it"
                )
    seen: Dict[int, str] = {}
    for n, m in level.named_modules(remove_duplicate=False):
        if _own_tensors(m) and seen.setdefault(id(m), n) != n:
            raise IncompatibleModelsError(
                f"level {index} runs {seen[id(m)]} more than once (shared weights, also as {n}); "
                f"{method!r} aligns each layer with one map per side (use 'kf-gradient')")
    for n, m in level.named_modules():
        if list(m.children()) and _own_tensors(m):
            raise IncompatibleModelsError(
                f"level {index}: {type(m).__name__} {n or '(the level)'} holds parameters of its own "
                f"next to its sub-modules; {method!r} aligns only Linear/Conv2d layers and "
                "per-channel normalisations (use 'kf-gradient' for such levels)"
            )
    tensors: List[Tuple[str, str, Optional[str], str]] = []
    internal: List[Space] = []
    finals: List[str] = []
    groups: Dict[str, int] = {}   # space -> GroupNorm groups of several channels
    conv_groups: List[Tuple[str, str, int]] = []   # (space, reads, groups) of grouped convolutions
    for prefix, root, end in paths:
        leaves = [(_join(prefix, n), m) for n, m in root.named_modules() if not list(m.children())]
        if not any(isinstance(m, _AFFINE) for _, m in leaves) and not (
                concat or isinstance(root, nn.Identity)):
            raise IncompatibleModelsError(
                f"level {index} has no Linear/Conv2d layer{' in ' + prefix if prefix else ''}; "
                f"{method!r} aligns levels that end at an affine layer"
            )
        n_open = sum(isinstance(m, _AFFINE) and not is_depthwise(m) for _, m in leaves)
        current, seen, open_space = "in", 0, None  # open_space: internal space still taking its point
        for name, m in leaves:
            if isinstance(m, _AFFINE):
                ungrouped = not (isinstance(m, nn.Conv2d) and m.groups != 1 and not is_depthwise(m))
                if not (ungrouped or grouped):
                    raise IncompatibleModelsError(
                        f"level {index} has {_grouped_reason(m)}; {method!r} aligns ungrouped and "
                        "depthwise convolutions (use one of those, or 'kf-gradient')"
                    )
                if is_depthwise(m):  # output channel c reads input channel c: it stays in the space
                    tensors.append((_join(name, "weight"), current, None, "depthwise"))
                    if m.bias is not None:
                        tensors.append((_join(name, "bias"), current, None, "vector"))
                    open_space = None
                    continue
                seen += 1
                out_space = end if seen == n_open else f"h{len(internal)}"
                kind = "linear" if not isinstance(m, nn.Conv2d) else "conv" if ungrouped else "grouped"
                tensors.append((_join(name, "weight"), out_space, current, kind))
                if not ungrouped:
                    conv_groups.append((out_space, current, int(m.groups)))
                if m.bias is not None:
                    tensors.append((_join(name, "bias"), out_space, None, "vector"))
                if out_space != end:
                    internal.append(Space(out_space, name, None))
                    open_space = len(internal) - 1
                else:
                    open_space = None
                current = out_space
                continue
            own = _own_tensors(m)
            if isinstance(m, nn.GroupNorm) and not _permutes_with_channels(m):   # with or without affine
                why = ("it normalises the level input" if current == "in" else
                       "it is in a concatenation" if concat else
                       "the space has another GroupNorm" if groups.get(current, m.num_groups) != m.num_groups
                       else None)
                if why:
                    raise IncompatibleModelsError(
                        f"level {index} has GroupNorm({m.num_groups}, {m.num_channels}) ('{name}'), which "
                        f"normalises groups of {m.num_channels // m.num_groups} channels together, and "
                        f"{why}; {method!r} cannot keep its groups together (use 'kf-gradient')")
                groups[current] = m.num_groups   # the space's channels move in groups
            if own:
                if not (_permutes_with_channels(m) or isinstance(m, nn.GroupNorm)):
                    raise IncompatibleModelsError(
                        f"level {index} holds a {type(m).__name__} with parameters; {method!r} aligns "
                        "only Linear/Conv2d layers and per-channel normalisations (use 'kf-gradient' "
                        "for such levels)"
                    )
                for pn, t in own:
                    if t.dim() == 0:
                        continue  # num_batches_tracked: a counter, copied from the anchor
                    if t.dim() != 1:
                        raise IncompatibleModelsError(
                            f"level {index}: {type(m).__name__} normalises over several axes; "
                            f"{method!r} aligns only per-channel normalisations"
                        )
                    tensors.append((_join(name, pn), current, None, "vector"))
                if open_space is not None:
                    sp = internal[open_space]
                    internal[open_space] = Space(sp.name, name, None)
            elif open_space is not None:
                sp = internal[open_space]
                internal[open_space] = Space(sp.name, sp.point, name)
                open_space = None
        finals.append(current)
    if concat:
        return LevelLayout(tuple(tensors), tuple(internal), False, tuple(finals), conv_groups=tuple(conv_groups))
    if len(set(finals)) > 1:
        raise IncompatibleModelsError(
            f"level {index} adds a path that keeps its input's neurons (depthwise layers only) to "
            f"one that does not; {method!r} cannot align it"
        )
    return LevelLayout(tuple(tensors), tuple(internal), level_adds_input(level) or finals[0] == "in",
                       groups=tuple(sorted(groups.items())), conv_groups=tuple(conv_groups))


def residual_heads(layouts: Sequence[LevelLayout]) -> List[int]:
    """For every level, the first level of its *residual stream* (``-1``: the network input).

    Levels tied by identity skip connections (:func:`level_adds_input`) share their output
    neurons with the level before them; a chain of such levels is one stream and is aligned with
    one transport map, computed from the activations of every level in the stream.
    """
    heads: List[int] = []
    for i, lay in enumerate(layouts):
        if lay.tied:
            heads.append(heads[i - 1] if i > 0 else -1)
        else:
            heads.append(i)
    return heads


def stream_members(heads: Sequence[int], head: int) -> List[int]:
    """The levels of the stream that starts at ``head`` (contiguous)."""
    return [i for i, h in enumerate(heads) if h == head]


def stream_groups(layouts: Sequence[LevelLayout], members: Sequence[int]) -> int:
    """The GroupNorm groups of the output space of the levels ``members`` (one residual stream,
    or one level): 0 if no GroupNorm of several channels per group normalises it.

    Raises
    ------
    IncompatibleModelsError
        If two of them normalise it in different groups.
    """
    found = {layouts[m].groups_of("out") for m in members} - {0}
    if len(found) > 1:
        raise IncompatibleModelsError(
            f"levels {list(members)} share one residual stream but their GroupNorms split it into "
            f"{sorted(found)} groups; one map cannot keep both groupings together (use 'kf-gradient')")
    if found and any(layouts[m].parts for m in members):
        raise IncompatibleModelsError(
            f"levels {list(members)} share one residual stream that a concatenation writes and a "
            f"GroupNorm normalises in {found.pop()} groups; one map cannot keep both the parts and the "
            "groups together (use 'kf-gradient')")
    return found.pop() if found else 0


def output_groups(levels: Sequence[nn.Module], index: int) -> int:
    """The groups of level ``index``'s output space over its whole residual stream (the levels
    tied to it by identity skips, before and after it): those of the GroupNorms that normalise it
    or of the grouped convolutions that read it (in the stream, or as the first layer of the next
    level) or write it (the last layer of a level or of a residual block); 0 if none.  A level
    whose layout cannot be read ends the stream.

    Raises
    ------
    IncompatibleModelsError
        As :func:`stream_groups`, if the stream's GroupNorms or a concatenation cannot be kept.
    """
    def layout(i: int) -> Optional[LevelLayout]:
        try:
            return level_layout(levels[i], i, grouped=True)
        except IncompatibleModelsError:
            return None

    found = {index: layout(index)}
    if found[index] is None:
        return 0
    start = index
    while start > 0 and found[start].tied:   # type: ignore[union-attr]
        found[start - 1] = layout(start - 1)
        if found[start - 1] is None:
            break
        start -= 1
    end, reader = index, None
    while end + 1 < len(levels):
        nxt = layout(end + 1)
        if nxt is None or not nxt.tied:
            reader = nxt   # the level that reads the stream's output
            break
        found[end + 1] = nxt
        end += 1
    members = [i for i in range(start, end + 1) if found.get(i) is not None]
    norm = stream_groups(found, members)   # type: ignore[arg-type]
    readers = [(i, found[i]) for i in members if i > start] + ([(end + 1, reader)] if reader is not None else [])
    conv = {levels[i].get_submodule(key.rpartition(".")[0]).groups for i, lay in readers
            for key, _, s1, kind in lay.tensors if kind == "grouped" and s1 == "in"}   # type: ignore[union-attr]
    conv |= {g for i in members for out, _, g in found[i].conv_groups if out == "out"}   # type: ignore[union-attr]
    if len(conv | {norm} - {0}) > 1:
        raise IncompatibleModelsError(
            f"levels {members} share one space that grouped convolutions or GroupNorms split into "
            f"{sorted(conv | {norm} - {0})} groups; one grouping cannot keep them all whole (use 'kf-gradient')")
    if conv and any(found[m].parts for m in members):   # type: ignore[union-attr]
        raise IncompatibleModelsError(
            f"level {index} writes a concatenation that a grouped convolution reads in {sorted(conv)[0]} "
            "groups; one grouping cannot keep both the parts and the groups whole (use 'kf-gradient')")
    return norm or (conv.pop() if conv else 0)


def activation_module(module: Optional[nn.Module]) -> nn.Module:
    """``module`` if it is an element-wise activation, ReLU otherwise."""
    return module if isinstance(module, _ACTIVATIONS) else nn.ReLU()


def next_activation(net: LeveledNet, level: int) -> nn.Module:
    """The non-linearity applied to ``level``'s output: none for a transformer's residual stream
    (the next level normalises it), else the first leaf module of the next level when it is an
    element-wise activation, ReLU otherwise."""
    spec = describe_transformer(net.levels[level])
    if spec is not None and spec.writes_stream:
        return nn.Identity()
    if level + 1 < net.num_levels:
        for m in net.levels[level + 1].modules():
            if len(list(m.children())) == 0:
                return activation_module(m)
    return nn.ReLU()


def output_unit_groups(levels: Sequence[nn.Module], index: int, layout: LevelLayout) -> int:
    """The groups in which an alignment moves level ``index``'s output channels (``layout`` laid
    out with ``grouped=True``): those of its stream (:func:`output_groups`), or of the grouped
    convolution that writes it (:func:`check_grouped_alignment` refuses the two disagreeing)."""
    return output_groups(levels, index) or layout.unit_groups("out")


def group_assignment(layout: LevelLayout, space: str, maps: "SpaceMaps", groups: int) -> Optional[np.ndarray]:
    """For a ``space`` written by a grouped convolution, the assignment of groups it keeps: that
    of the map of the space the convolution reads (output group ``a`` reads input group ``a``, so
    both move alike), ``sigma[b]`` = the group of the aligned model matched to anchor group ``b``
    (:func:`neurofuse.grouping.block_assignment`); the identity where that space has no map (the
    network input, a stream tied to it).  ``None`` for other spaces."""
    from ..grouping import block_assignment

    source = layout.group_source(space)
    if source is None or not groups:
        return None
    m = maps.get(source)
    return np.arange(groups) if m is None else block_assignment(m.plan, groups)


def check_grouped_alignment(levels: Sequence[nn.Module], index: int, layout: LevelLayout, method: str) -> None:
    """Refuse, before any work, a grouped convolution of level ``index`` (``layout`` laid out with
    ``grouped=True``) whose groups one map per space cannot keep: one whose spaces GroupNorms or
    other grouped convolutions split into other groups, or one that ends a residual block (its
    input's groups follow the stream's, :meth:`LevelLayout.group_source`) and reads a space that
    another grouped convolution writes (whose groups would have to follow that one's input too).
    The level output and input are checked over their residual streams (:func:`output_groups`)."""
    for space, reads, g in layout.conv_groups:
        others = {h for sp, rd, h in layout.conv_groups if {sp, rd} & {space, reads}} | {
            layout.groups_of(space), layout.groups_of(reads)}
        why = ("whose spaces GroupNorms or other grouped convolutions split into other groups"
               if others - {0, g} else
               "that ends a residual block and reads a space another grouped convolution writes"
               if space == "out" and layout.tied and reads != "in" and any(sp == reads for sp, _, _ in layout.conv_groups)
               else None)
        if why is None and space == "out" and output_groups(levels, index) not in (0, g):
            why = "that writes a stream that GroupNorms or grouped convolutions split into other groups"
        if why is None and reads == "in" and index > 0 and output_groups(levels, index - 1) not in (0, g):
            why = "that reads a stream that GroupNorms or grouped convolutions split into other groups"
        if why:
            raise IncompatibleModelsError(
                f"level {index} has a grouped convolution (groups={g}) {why}; {method!r} cannot "
                "keep its groups whole (use 'kf-gradient')")


def check_alignable(nets: Sequence[LeveledNet], method: str, grouped: bool = False
                    ) -> Tuple[List[LevelLayout], List[int]]:
    """Layouts and residual heads of the anchor, checked to be the same for every model.  With
    ``grouped`` (the alignments that move a grouped convolution's groups as units) grouped
    convolutions are laid out (:func:`level_layout`) and checked (:func:`check_grouped_alignment`)."""
    layouts = [level_layout(lv, i, method, grouped) for i, lv in enumerate(nets[0].levels)]
    for i, lay in enumerate(layouts):
        check_grouped_alignment(nets[0].levels, i, lay, method)
    for k, net in enumerate(nets[1:], start=1):
        for i, lv in enumerate(net.levels):
            lk = level_layout(lv, i, method, grouped)
            if lk.groups != layouts[i].groups:
                raise IncompatibleModelsError(
                    f"model {k} level {i} has GroupNorms of other groups than model 0's "
                    f"({dict(lk.groups) or 'none of several channels'} against "
                    f"{dict(layouts[i].groups) or 'none of several channels'}); {method!r} needs the "
                    "same architecture up to widths")
            if _structure(lk) != _structure(layouts[i]):
                raise IncompatibleModelsError(
                    f"model {k} level {i} has different layers or skip connections than model 0's; "
                    f"{method!r} needs the same architecture up to widths"
                )
    heads = residual_heads(layouts)
    for head in sorted(set(heads) - {-1}):   # the GroupNorms of every stream agree (before any work)
        stream_groups(layouts, stream_members(heads, head))
    return layouts, heads


def _structure(layout: LevelLayout) -> LevelLayout:
    """``layout`` without its probes' row offsets, which depend on the widths (the rows of a
    packed ``qkv`` of a wider model start later): what two models of one architecture share."""
    internal = tuple(dataclasses.replace(sp, probes=tuple(p[:3] + (None, None) + p[5:] for p in sp.probes))
                     for sp in layout.internal)
    return dataclasses.replace(layout, internal=internal)


def own_spaces(level: nn.Module, spaces: Sequence[Space]) -> List[Space]:
    """``spaces`` (of the anchor's layout) as ``level`` itself lays them out: a transformer
    level's probes read rows of its *own* packed projections, whose offsets depend on its widths."""
    spec = describe_transformer(level)
    if spec is None:
        return list(spaces)
    own = {sp.name: sp for sp in spec.layout().internal}
    return [own.get(sp.name, sp) for sp in spaces]


def space_units(spaces: Sequence[Space]) -> List[List[Space]]:
    """The internal spaces grouped into the units whose maps are solved together: the spaces of
    one attention (same ``unit``: one assignment of heads), every other space alone; in order."""
    units: List[List[Space]] = []
    for sp in spaces:
        if sp.unit and units and units[-1][0].unit == sp.unit:
            units[-1].append(sp)
        else:
            units.append([sp])
    return units


def space_activation(level: nn.Module, space: Space) -> nn.Module:
    """The non-linearity that follows an internal space: none for attention spaces (queries,
    keys, values), else its ``act`` module when that is an element-wise activation, ReLU
    otherwise."""
    if space.heads:
        return nn.Identity()
    mods = dict(level.named_modules())
    return activation_module(mods.get(space.act) if space.act else None)


def capture_spaces(level: nn.Module, spaces: Sequence[Space], run, axis: str) -> List[Tensor]:  # type: ignore[no-untyped-def]
    """The values of the internal ``spaces`` of ``level`` while ``run()`` executes (once), each
    as ``[rows, neurons]``: its point's output, or its probes' values stacked along the rows."""
    from ._transformer import tensor_of

    mods = dict(level.named_modules())
    spaces = own_spaces(level, spaces)
    store: Dict[Tuple[int, int], Tensor] = {}
    handles = []

    def point_hook(i):  # type: ignore[no-untyped-def]
        return lambda _m, _a, out: store.__setitem__((i, 0), out)

    def probe_hook(i, j, weight, bias, start, stop, transposed):  # type: ignore[no-untyped-def]
        def hook(_m, args):  # type: ignore[no-untyped-def]
            w = oriented(tensor_of(level, weight), "linear_t" if transposed else "linear")[start:stop]
            b = None if bias is None else tensor_of(level, bias)[start:stop]
            store[i, j] = torch.nn.functional.linear(args[0], w, b)
        return hook

    try:
        for i, sp in enumerate(spaces):
            if not sp.probes:
                handles.append(mods[sp.point].register_forward_hook(point_hook(i)))
            for j, (mod, *probe) in enumerate(sp.probes):
                handles.append(mods[mod].register_forward_pre_hook(probe_hook(i, j, *probe)))
        run()
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, sp in enumerate(spaces):
        if not sp.probes:
            if (i, 0) not in store:  # pragma: no cover - the layout names modules on the forward path
                raise IncompatibleModelsError(f"{sp.point} was not run by its level's forward")
            out.append(flatten_neurons(store[i, 0], axis))
            continue
        vals = [store.get((i, j)) for j in range(len(sp.probes))]
        if any(v is None for v in vals):  # pragma: no cover
            raise IncompatibleModelsError(f"the probes of space {sp.name} were not run by the level")
        out.append(torch.cat([v.reshape(-1, v.shape[-1]) for v in vals], 0))  # type: ignore[union-attr]
    return out


def capture(module: nn.Module, run) -> Tensor:  # type: ignore[no-untyped-def]
    """The output of ``module`` while ``run()`` executes (a forward hook)."""
    store: Dict[str, Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _i, o: store.__setitem__("z", o))
    try:
        run()
    finally:
        handle.remove()
    if "z" not in store:  # pragma: no cover - the layout names modules on the forward path
        raise IncompatibleModelsError(f"{type(module).__name__} was not run by its level's forward")
    return store["z"]


# ---------------------------------------------------------------------------------------------
# applying transport maps to parameters
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NeuronMap:
    r"""The two faces of a transport map ``T`` ``[n, m]`` with target marginal ``nu``.

    ``out`` is :math:`Q = \operatorname{diag}(1/\nu) T^\top` (``[m, n]``, rows sum to one):
    it writes a per-neuron quantity of model ``k`` in the anchor's basis.  ``inc`` is
    :math:`P = T \operatorname{diag}(1/\nu)` (``[n, m]``): it feeds anchor-basis inputs to a layer
    that expects model ``k``'s neurons.
    """

    out: Tensor
    inc: Tensor
    plan: np.ndarray
    #: for the map of a concatenation, its parts' maps (the diagonal blocks), in order
    parts: Tuple["NeuronMap", ...] = ()
    #: for a permutation, ``index[j]`` = the model-``k`` neuron at anchor neuron ``j``
    #: (``Q[j, index[j]] = 1``): the map is then applied by indexing instead of a product
    index: Optional[Tensor] = None

    @classmethod
    def from_plan(cls, plan: np.ndarray, nu: np.ndarray) -> "NeuronMap":
        p = torch.from_numpy(np.asarray(plan, dtype=np.float64) / np.asarray(nu, dtype=np.float64)[None, :])
        return cls(out=p.T.contiguous(), inc=p, plan=np.asarray(plan, dtype=np.float64))

    @classmethod
    def identity(cls, n: int) -> "NeuronMap":
        """The identity map of ``n`` neurons (e.g. the network input, which every model shares)."""
        return cls.from_permutation(np.arange(n))

    @classmethod
    def from_permutation(cls, perm: np.ndarray) -> "NeuronMap":
        """The map of a permutation of ``n`` neurons: uniform marginals, ``Q[j, perm[j]] = 1``."""
        index = torch.as_tensor(np.asarray(perm), dtype=torch.long)
        n = len(index)
        q = torch.zeros(n, n, dtype=torch.float64)
        q[torch.arange(n), index] = 1.0
        return cls(out=q, inc=q.T.contiguous(), plan=q.T.numpy() / n, index=index)


def concat_maps(maps: Sequence[NeuronMap]) -> NeuronMap:
    """The map of a concatenation: the block diagonal of its parts' maps (in order); indexed when
    every part is a permutation."""
    from scipy.linalg import block_diag

    index = None
    if all(m.index is not None for m in maps):
        offsets = np.cumsum([0] + [m.out.shape[0] for m in maps[:-1]])
        index = torch.cat([m.index + int(o) for m, o in zip(maps, offsets)])  # type: ignore[operator]
    return NeuronMap(out=torch.block_diag(*[m.out for m in maps]),
                     inc=torch.block_diag(*[m.inc for m in maps]),
                     plan=block_diag(*[m.plan for m in maps]), parts=tuple(maps), index=index)


def part_spans(net: LeveledNet, index: int, layout: LevelLayout) -> List[slice]:
    """Where every part of a concatenation level (:attr:`LevelLayout.parts`) lies in the level
    output of ``net``: one ``slice`` of its neurons per part."""
    if index:
        in_width = net.level_widths()[index - 1]
    else:
        shape = net.input_shape
        in_width = shape[0] if len(shape) == 3 else shape[-1]
    spans, start = [], 0
    for w in layout.part_widths(net.levels[index].state_dict(), in_width):
        spans.append(slice(start, start + w))
        start += w
    return spans


def _map_out(t: Tensor, m: NeuronMap) -> Tensor:
    """Rows of ``t`` (axis 0 = neurons) written in the target basis: ``Q @ t``."""
    if m.index is not None:
        return t.index_select(0, m.index.to(t.device))
    return torch.tensordot(m.out.to(t.device), t, dims=([1], [0]))


def _map_last(t: Tensor, m: NeuronMap) -> Tensor:
    """The last axis of ``t`` (neurons) written in the target basis: ``t @ Q^T``."""
    if m.index is not None:
        return t.index_select(-1, m.index.to(t.device))
    return t @ m.out.to(t.device).T


def space_map(maps: "SpaceMaps", space: Optional[str]) -> Optional[NeuronMap]:
    """The map of ``space`` in ``maps``; a concatenation ``"a+b"`` gets the block diagonal of its
    parts' maps (``None`` if any part has none)."""
    if space is None:
        return None
    if "+" not in space:
        return maps.get(space)
    parts = [maps.get(p) for p in space.split("+")]
    if any(p is None for p in parts):
        return None
    return concat_maps(parts)  # type: ignore[arg-type]


def _map_in(w: Tensor, m: NeuronMap, kind: str, level: int) -> Tensor:
    """Input axis (1) of an affine weight fed with target-basis inputs: ``w @ P`` per tap."""
    p = m.inc.to(w.device)
    n = p.shape[0]
    index = None if m.index is None else m.index.to(w.device)
    if kind == "conv":
        if w.shape[1] != n:
            raise IncompatibleModelsError(
                f"level {level}: the convolution takes {w.shape[1]} channels but its input has "
                f"{n} neurons"
            )
        return w.index_select(1, index) if index is not None else torch.einsum("oikl,ij->ojkl", w, p)
    if kind == "grouped":
        return _map_in_grouped(w, m, level)
    d_in = w.shape[1]
    if d_in == n:
        return w.index_select(1, index) if index is not None else w @ p
    if d_in % n == 0:  # Linear after Flatten of [C, H, W]: channel-major, one map per position
        w3 = w.reshape(w.shape[0], n, d_in // n)
        if index is not None:
            return w3.index_select(1, index).reshape(w.shape[0], -1)
        return torch.einsum("ois,ij->ojs", w3, p).reshape(w.shape[0], -1)
    raise IncompatibleModelsError(
        f"level {level}: the linear layer takes {d_in} inputs, not a multiple of the previous "
        f"level's {n} neurons"
    )


def _map_in_grouped(w: Tensor, m: NeuronMap, level: int) -> Tensor:
    r"""Input axis of a grouped convolution's weight ``[out, in / g, kh, kw]`` fed with
    target-basis inputs.  Its output group :math:`a` reads input group :math:`a` only, so ``m``
    must move the input's groups as units (:func:`neurofuse.grouping.block_assignment`): group
    :math:`a`'s rows take the block :math:`P_{a\sigma^{-1}(a)}` of ``m``, and stay where they are
    (the map of the output, which keeps the same assignment of groups, moves them next)."""
    from ..grouping import block_assignment

    n, per = m.inc.shape[0], w.shape[1]
    if n % per:
        raise IncompatibleModelsError(
            f"level {level}: the grouped convolution takes {per} channels per group but its input "
            f"has {n} neurons")
    g = n // per
    if w.shape[0] % g:
        raise IncompatibleModelsError(
            f"level {level}: the grouped convolution's {w.shape[0]} outputs do not split into {g} groups")
    try:
        sigma = block_assignment(m.plan, g)
    except ValueError as exc:
        raise IncompatibleModelsError(f"level {level}: a grouped convolution's input map: {exc}") from None
    target = np.empty(g, dtype=np.int64)
    target[sigma] = np.arange(g)          # target[a]: the anchor group that model group a goes to
    rows, d0 = w.shape[0] // g, m.inc.shape[1] // g
    out = []
    for a in range(g):
        wa, b = w[a * rows:(a + 1) * rows], int(target[a])
        if m.index is not None:
            cols = m.index[b * d0:(b + 1) * d0].to(w.device) - a * per
            out.append(wa.index_select(1, cols))
        else:
            block = m.inc[a * per:(a + 1) * per, b * d0:(b + 1) * d0].to(w.device)
            out.append(torch.einsum("oikl,ij->ojkl", wa, block))
    return torch.cat(out, 0)


SpaceMaps = Dict[str, Optional[NeuronMap]]


def align_level(level: nn.Module, layout: LevelLayout, index: int, maps: SpaceMaps) -> Dict[str, Tensor]:
    """State dict of ``level`` with every neuron space in ``maps`` written in the anchor's basis.

    ``maps`` gives a :class:`NeuronMap` per space (``"in"``, ``"out"``, internal names); a
    missing or ``None`` space is left as it is (identity, or not aligned yet).  The parts of a
    concatenation take the blocks of its ``"out"`` map (:func:`concat_maps`) unless given.  The arithmetic
    is done in float64 and cast back to each tensor's dtype.
    """
    spec = {key: (s0, s1, kind) for key, s0, s1, kind in layout.tensors}
    whole = maps.get("out")
    if layout.parts and whole is not None and whole.parts:  # a concatenation: its parts' maps
        maps = {**{p: m for p, m in zip(layout.parts, whole.parts) if p != "in"}, **maps}
    result: Dict[str, Tensor] = {}
    for key, v in level.state_dict().items():
        if not v.is_floating_point() or key not in spec:
            result[key] = v.clone()
            continue
        s0, s1, kind = spec[key]
        m_in, m_out = space_map(maps, s1), space_map(maps, s0)
        # permutations move values exactly: no float64 round trip
        exact = all(m is None or m.index is not None for m in (m_in, m_out))
        t = oriented(v if exact else v.double(), kind)     # [out, in]
        linear = "linear" if kind == "linear_t" else kind
        if m_in is not None:
            t = _map_in(t, m_in, linear, index)
        if m_out is not None:
            t = _map_last(t, m_out) if kind == "last" else _map_out(t, m_out)
        if m_in is None and m_out is None:
            result[key] = v.clone()
            continue
        result[key] = oriented(t, kind).to(v.dtype)
    return result


def identity_ok(widths: Sequence[List[int]], level: int, why: str) -> None:
    """Raise unless every model has the anchor's width at ``level`` (identity transport)."""
    w = [bw[level] for bw in widths]
    if len(set(w)) != 1:
        raise IncompatibleModelsError(
            f"level {level} has widths {w} but must be aligned by the identity ({why}); give the "
            "models equal widths there"
        )


def normalized(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    return s / s.sum()
