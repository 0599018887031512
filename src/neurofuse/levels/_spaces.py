"""The vocabulary of level layouts: a level's neuron spaces and which of its tensors follow them.

Plain data, below both the layouts of ordinary levels (:mod:`neurofuse.levels._layout`) and
those of transformer levels (:mod:`neurofuse.levels._transformer`), which both build them.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from torch import Tensor

__all__ = ["LevelLayout", "Space", "oriented"]


@dataclasses.dataclass(frozen=True)
class Space:
    """An internal neuron space of a level (the output of one of its inner affine layers).

    ``point`` names the module (relative to the level) whose output is the space's
    pre-activation; ``act`` the parameter-free module applied next (``None`` if none).

    Transformer layouts (:mod:`neurofuse.levels._transformer`) add: ``heads`` > 0 when the
    space's neurons come in that many equal heads that move as units (attention); spaces with the
    same ``unit`` share one assignment of heads (a head's ``qk`` and ``vo`` spaces); ``probes``
    say how the space's values are read when no module outputs them alone: each
    ``(module, weight, bias, start, stop, transposed)`` is rows ``[start, stop)`` of the affine
    map ``(weight, bias)`` (its weight stored ``[in, out]`` when ``transposed``) applied to the
    *input* of ``module`` (e.g. the queries and the keys, rows of a packed ``qkv``), and the
    space's values are those of all its probes (one neuron's queries and keys are one vector).
    """

    name: str
    point: str
    act: Optional[str]
    heads: int = 0
    unit: str = ""
    probes: Tuple[Tuple[str, str, Optional[str], int, Optional[int], bool], ...] = ()


@dataclasses.dataclass(frozen=True)
class LevelLayout:
    """Which tensors of a level (state-dict keys relative to the level) follow which neurons.

    Neuron spaces are ``"in"`` (the level input = the previous level's output), ``"out"`` (the
    level output) and the level's internal spaces (``"h0"``, ``"h1"``, ...).  A space name
    ``"a+b+c"`` is the concatenation of spaces along the axis (a packed ``qkv`` weight's rows are
    ``"qk0+qk0+vo0"``); its map is the block diagonal of its parts' maps.

    Attributes
    ----------
    tensors : tuple of (key, space0, space1, kind)
        ``space0`` is the space of axis 0, ``space1`` that of axis 1 for affine weights
        (``None`` otherwise), ``kind`` is ``"linear"``, ``"conv"``, ``"vector"``, ``"last"``
        (a tensor whose *last* axis runs over ``space0``: a CLS token ``[1, 1, C]``, a position
        embedding ``[1, T, C]``, an embedding table ``[V, C]``) or ``"linear_t"`` (an affine
        weight stored ``[in, out]``, GPT-2's ``Conv1D``: ``space0`` runs along its axis 1 and
        ``space1`` along its axis 0; :func:`oriented` gives the ``[out, in]`` view).
    internal : tuple of Space
        Internal spaces, in forward order.
    tied : bool
        The level's output neurons are its input neurons (an identity skip, or depthwise layers
        only): ``"out"`` *is* ``"in"``.
    parts : tuple of str
        For a concatenation, the spaces whose concatenation (in this order) is ``"out"``: a
        branch's own space ``"out<b>"``, or ``"in"`` for a branch that keeps its input's neurons.
        The map of the level output is then the block diagonal of its parts' maps
        (:func:`~neurofuse.levels._layout.concat_maps`).  Empty for other levels.
    groups : tuple of (space, count)
        Spaces normalised by a ``GroupNorm`` of ``count`` groups of several channels: their
        channels come in ``count`` equal contiguous groups that must move as units (as attention
        heads do).  Empty for other levels.
    conv_groups : tuple of (space, reads, count)
        For every grouped convolution that is not depthwise (laid out with ``grouped=True``): the
        space it writes, the space it reads and its groups.  Both spaces come in ``count`` equal
        contiguous groups and output group ``b`` reads input group ``b``, so a map of ``space``
        must move its groups as the map of ``reads`` moves its own (:meth:`group_source`).
        Empty for other levels.
    """

    tensors: Tuple[Tuple[str, str, Optional[str], str], ...]
    internal: Tuple[Space, ...]
    tied: bool
    parts: Tuple[str, ...] = ()
    groups: Tuple[Tuple[str, int], ...] = ()
    conv_groups: Tuple[Tuple[str, str, int], ...] = ()

    def groups_of(self, space: str) -> int:
        """The number of GroupNorm groups of ``space`` (0: its channels move freely)."""
        return dict(self.groups).get(space, 0)

    def unit_groups(self, space: str) -> int:
        """The groups in which a map of ``space`` moves its channels: a GroupNorm's, or those of
        a grouped convolution that writes or reads it (0: its channels move freely)."""
        conv = [g for out, reads, g in self.conv_groups if space in (out, reads)]
        return conv[0] if conv else self.groups_of(space)

    def group_source(self, space: str) -> Optional[str]:
        """The space whose assignment of groups the map of ``space`` keeps: the one read by the
        grouped convolution that writes ``space``; in a level tied to its residual stream, whose
        map is fixed before the level, ``"out"`` for the inner space read by a grouped
        convolution that ends the block (its input groups must go where its output groups go).
        ``None`` if neither (the output of a tied level: the stream's map)."""
        if self.tied:
            if space == "out":
                return None
            if space != "in" and any(out == "out" and reads == space for out, reads, _ in self.conv_groups):
                return "out"
        return next((reads for out, reads, _ in self.conv_groups if out == space), None)

    def keys_in(self, space: str) -> List[str]:
        """Keys whose axis 0 runs over ``space``."""
        return [k for k, s0, _, _ in self.tensors if s0 == space]

    def part_widths(self, state: Dict[str, Tensor], in_width: int) -> List[int]:
        """Width of every part (:attr:`parts`) of a concatenation, from the level's ``state``
        dict and the width ``in_width`` of its input."""
        out = []
        for p in self.parts:
            rows = [oriented(state[k], kind).shape[0] for k, s0, _, kind in self.tensors
                    if s0 == p and kind in ("linear", "linear_t", "conv", "grouped")]
            out.append(int(in_width if p == "in" else rows[-1]))
        return out


def oriented(t: Tensor, kind: str) -> Tensor:
    """A layout tensor with the space of its axis 0 first: the ``[out, in]`` view of a
    ``"linear_t"`` weight (stored ``[in, out]``), ``t`` itself otherwise."""
    return t.T if kind == "linear_t" else t
