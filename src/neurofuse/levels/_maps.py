"""Which tensors every neuron map of a leveled model moves, and along which axis.

An alignment method (``otfusion``, ``git-rebasin``) computes one map (a permutation or a transport)
per neuron space and writes a model's tensors in the anchor's basis with it; the closed form
groups the same spaces.  :func:`neuron_maps` lists, for any :class:`~neurofuse.levels.LeveledNet`,
every such map and the tensors it acts on, read from the level layouts
(:attr:`neurofuse.levels._layout.LevelLayout.tensors`): axis 0 of a tensor (its *rows*: output
channels, features, per-channel statistics) or axis 1 (its *columns*: input channels, per kernel
tap for a convolution, per spatial position for a linear layer after a flatten).  A level whose
output neurons are its input neurons (an identity skip, a depthwise convolution alone) has no map
of its own: the map of its *residual stream* moves it.  The map of a concatenation is the block
diagonal of its parts' maps.  :func:`format_maps` prints them, so that a user can check them
against the model.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..errors import IncompatibleModelsError
from ._layout import LevelLayout, level_layout, residual_heads, stream_members

__all__ = ["NeuronMapInfo", "format_maps", "neuron_maps"]

_AXIS0 = {"linear": "rows", "conv": "rows", "depthwise": "rows (depthwise: one kernel per channel)",
          "grouped": "rows", "last": "last axis", "linear_t": "columns (stored [in, out])"}


@dataclasses.dataclass(frozen=True)
class NeuronMapInfo:
    """One neuron map of a model.

    Attributes
    ----------
    level : int
        The level whose space the map is made for.
    space : str
        ``"out"`` (the level output), ``"out<b>"`` (part ``b`` of a concatenation) or ``"h<i>"``
        (an inner space of the level).
    tensors : tuple of str
        What the map moves, one entry per tensor: its name in the model and the axis
        (``"features.3.weight rows"``, ``"fc.weight columns (per position, 4 positions)"``).
    note : str
        What else to know (the levels of a residual stream, the parts of a concatenation, a map
        that stays the identity).
    """

    level: int
    space: str
    tensors: Tuple[str, ...]
    note: str = ""

    @property
    def name(self) -> str:
        return f"level {self.level} {self.space}-map"


def _layouts(net: nn.Module) -> List[Optional[LevelLayout]]:
    out: List[Optional[LevelLayout]] = []
    for i, lv in enumerate(net.levels):  # type: ignore[union-attr]
        try:
            out.append(level_layout(lv, i, grouped=True))
        except IncompatibleModelsError:
            out.append(None)
    return out


def neuron_maps(net: nn.Module) -> List[NeuronMapInfo]:
    """Every neuron map of ``net`` (a :class:`~neurofuse.levels.LeveledNet`) with the tensors it
    moves, in level order (see the module docstring).  Levels without a layout (attention, other
    sub-graphs: :func:`neurofuse.levels.alignment_reason`) contribute no tensors."""
    layouts = _layouts(net)
    n = len(layouts)
    tied = [lay is not None and lay.tied for lay in layouts]
    heads = residual_heads([lay if lay is not None else LevelLayout((), (), False) for lay in layouts])
    widths = net.level_widths()  # type: ignore[operator]
    keys: Dict[str, str] = dict(getattr(net, "model_keys", {}) or {})

    def home(i: int, space: str) -> Optional[Tuple[int, str]]:
        """The map that moves ``space`` of level ``i`` (``None``: the input, not mapped)."""
        if space == "in":
            return None if i == 0 else home(i - 1, "out")
        if space == "out" and tied[i]:
            return home(i, "in")
        return (i, space)

    entries: "OrderedDict[Tuple[int, str], List[str]]" = OrderedDict()
    conv_groups: Dict[Tuple[int, str], Tuple[int, str]] = {}   # space -> (groups, the other space)
    for i, lay in enumerate(layouts):
        if lay is None:
            continue
        for sp in lay.internal:
            entries.setdefault((i, sp.name), [])
        for p in lay.parts:
            if p != "in":
                entries.setdefault((i, p), [])
        if not tied[i]:
            entries.setdefault((i, "out"), [])
        state = net.levels[i].state_dict()  # type: ignore[index]
        for key, s0, s1, kind in lay.tensors:
            if kind == "grouped":
                g = net.levels[i].get_submodule(key.rpartition(".")[0]).groups  # type: ignore[index]
                for space, other in ((s0, s1), (s1, s0)):
                    where, there = home(i, space), home(i, other)
                    if where is not None:
                        conv_groups.setdefault(where, (g, "model input" if there is None else
                                                       f"level {there[0]} {there[1]}"))
            name = keys.get(f"levels.{i}.{key}", f"levels.{i}.{key}")
            t = state[key]
            axis0 = "" if t.dim() < 2 and kind != "last" else _AXIS0.get(kind, f"axis 0 ({kind})")
            for space, what in _blocks(s0, axis0):
                where = home(i, space)
                if where is not None:
                    entries.setdefault(where, []).append(f"{name} {what}".rstrip())
            if s1 is not None:
                for space, what in _blocks(s1, _columns(t, kind, s1, i, widths, lay)):
                    where = home(i, space)
                    if where is not None:
                        entries.setdefault(where, []).append(f"{name} {what}")
    out: List[NeuronMapInfo] = []
    order = sorted(entries, key=lambda e: (e[0], 2 if e[1] == "out" else 1 if e[1].startswith("out") else 0))
    for i, space in order:
        tensors = entries[(i, space)]
        note = []
        lay = layouts[i]
        if lay is None:
            note.append(f"level {i} has no layout, so its own tensors are not listed")
        if space == "out":
            members = stream_members(heads, heads[i])
            if len(members) > 1:
                note.append(f"residual stream of levels {members[0]}-{members[-1]}")
            if i == n - 1 or n - 1 in members:
                note.append("the identity: the output classes are not permuted")
            if lay is not None and lay.parts:
                names = [f"level {i - 1} out" if p == "in" else f"level {i} {p}" for p in lay.parts]
                note.append("block diagonal of " + ", ".join(names))
            groups = max((layouts[m].groups_of("out") for m in members if layouts[m] is not None), default=0)
        else:
            groups = lay.groups_of(space) if lay is not None else 0
        if groups:
            note.append(f"channels in {groups} GroupNorm groups, which move as units")
        if (i, space) in conv_groups:
            g, other = conv_groups[(i, space)]
            note.append(f"channels in {g} groups of a grouped convolution, matched as the {other} groups "
                        "are")
        out.append(NeuronMapInfo(i, space, tuple(_merge(tensors)), "; ".join(note)))
    return out


def _blocks(space: str, what: str) -> List[Tuple[str, str]]:
    """An axis over the concatenation ``"a+b+c"`` of spaces is moved block by block by each part's
    map: ``[(a, "rows (block 1 of 3)"), ...]``; a plain space is moved as a whole."""
    parts = space.split("+")
    if len(parts) == 1:
        return [(space, what)]
    return [(p, f"{what} (block {j + 1} of {len(parts)})".lstrip()) for j, p in enumerate(parts)]


def _columns(t, kind: str, space: str, level: int, widths: List[int], lay: LevelLayout) -> str:  # type: ignore[no-untyped-def]
    if kind in ("conv", "grouped"):
        taps = t.shape[2:]
        if kind == "grouped":
            return "columns, inside the row's group" + (f" (per {'x'.join(str(int(s)) for s in taps)} tap)"
                                                       if t[0, 0].numel() > 1 else "")
        return "columns" + (f" (per {'x'.join(str(int(s)) for s in taps)} tap)" if t[0, 0].numel() > 1 else "")
    if kind == "linear" and space == "in" and level > 0 and t.shape[1] != widths[level - 1] \
            and widths[level - 1] and t.shape[1] % widths[level - 1] == 0:
        return f"columns (per position, {t.shape[1] // widths[level - 1]} positions)"
    if kind == "linear_t":
        return "rows (stored [in, out])"
    return "columns" if kind == "linear" else f"axis 1 ({kind})"


def _merge(entries: List[str]) -> List[str]:
    """``a.weight, a.bias, a.running_mean`` -> ``a.{weight, bias, running_mean}`` (same axis)."""
    out: List[str] = []
    groups: "OrderedDict[Tuple[str, str], List[str]]" = OrderedDict()
    for e in entries:
        name, _, axis = e.partition(" ")
        mod, _, leaf = name.rpartition(".")
        groups.setdefault((mod, axis), []).append(leaf)
    for (mod, axis), leaves in groups.items():
        name = f"{mod}.{leaves[0]}" if len(leaves) == 1 else f"{mod}.{{{', '.join(leaves)}}}"
        out.append(f"{name} {axis}".rstrip())
    return out


def format_maps(net: nn.Module) -> str:
    """:func:`neuron_maps` as text, one line per map:
    ``level 3 out-map: a.weight rows, a.bias, b.weight columns (per 3x3 tap)``."""
    lines = []
    for m in neuron_maps(net):
        lines.append(f"{m.name}: {', '.join(m.tensors) or '(no tensors)'}" + (f"  [{m.note}]" if m.note else ""))
    return "\n".join(lines)
