"""What structure a level has, for the methods that ask (:meth:`FusionMethod.check_level`).

Two questions a level answers about itself, each as ``None`` (yes) or a one-line reason (no):

* :func:`affine_reason`: can a closed-form least-squares fit produce the level from its input,
  one layer at a time after BatchNorm folding (:func:`neurofuse.levels._steps.closed_form_steps`:
  every layer with parameters a ``Linear`` / ``Conv2d``, a grouped one fitted group by group);
* :func:`alignment_reason`: can the level's neurons be aligned by one map per neuron space
  (:func:`neurofuse.levels._layout.level_layout`: chains, residual blocks and concatenations of
  Linear / ungrouped or depthwise Conv2d layers and per-channel normalisations; with
  ``grouped=True`` grouped convolutions too, whose spaces move in their groups).

The methods decide what to do with the answers; nothing here names a method.
"""

from __future__ import annotations

from typing import FrozenSet, Mapping, Optional

from torch import nn

from ..errors import IncompatibleModelsError
from ._auto import _AFFINE, _has_state
from ._bn import fold_batchnorm
from ._layout import check_grouped_alignment, is_depthwise, level_layout, output_groups
from ._steps import closed_form_steps

__all__ = ["affine_reason", "alignment_reason", "level_kind"]


def level_kind(net: nn.Module, index: int) -> str:
    """``"chain"``, ``"block"`` or ``"graph"`` as the automatic levels record it (``"chain"`` for
    declared and zoo levels, which say nothing)."""
    kinds = getattr(net, "kinds", None)
    return str(kinds[index]) if kinds else "chain"


def _token_groupnorm(net: nn.Module, index: int) -> Optional[str]:
    """Why a level on tokens with a GroupNorm is refused (``None`` if it has none): GroupNorm
    takes axis 1 as its channels, which on ``[B, T, C]`` is the tokens, not the neurons."""
    axes = getattr(net, "axes", None)
    if axes and axes[index] == "token" and any(isinstance(m, nn.GroupNorm) for m in net.levels[index].modules()):  # type: ignore[index]
        return ("its GroupNorm reads tokens [B, T, C], whose axis 1 (its channels) is the tokens, not "
                "the neurons, so its weights do not follow a map of the neurons")
    return None


def _reason(exc: Exception, index: int) -> str:
    """The one-line reason of a refusal, without the level number (the caller names the level)."""
    return str(exc).split(";")[0].replace(f"level {index}: ", "").replace(f"level {index} ", "it ")


def affine_reason(net: nn.Module, index: int) -> Optional[str]:
    """``None`` if the closed form fits level ``index`` of ``net`` after BatchNorm folding, else
    why not.

    The closed form fits a level one layer at a time (:func:`neurofuse.levels._steps.closed_form_steps`):
    chains, residual blocks and concatenations whose every layer with parameters is a ``Linear`` or
    a ``Conv2d`` (zero padding; a grouped one fitted group by group) after folding, each path ending in its last
    layer (or, outside a residual block, in an element-wise activation; the model's last level may
    end in a softmax or log-softmax).
    """
    level, kind = net.levels[index], level_kind(net, index)  # type: ignore[index]
    tokens = _token_groupnorm(net, index)
    if tokens:
        return tokens
    if kind == "graph":
        return "a sub-graph with several paths or direct parameters is not affine in its parameters"
    folded = fold_batchnorm(level)
    if getattr(level, "not_alignable", None):  # the level says it is no chain, block or concatenation
        kids = list(folded.children()) if isinstance(folded, nn.Sequential) else [folded]
        holders = [type(m).__name__ for m in kids if _has_state(m) and not isinstance(m, _AFFINE)]
        what = holders[0] if holders else type(folded).__name__
        return (f"its {what} holds parameters and is not folded into a Linear/Conv, so the level "
                "is not affine in its parameters")
    try:
        _, steps = closed_form_steps(folded, index, last=index == len(net.levels) - 1)  # type: ignore[arg-type]
        groups = output_groups(net.levels, index)  # type: ignore[arg-type]
        for s in steps:
            if s.kind == "grouped" and s.space.startswith("out") and groups not in (0, s.groups):
                raise IncompatibleModelsError(
                    f"its grouped convolution (groups={s.groups}) {s.modules[0]!r} writes a stream that "
                    f"GroupNorms split into {groups} groups; one grouping cannot keep both whole")
    except IncompatibleModelsError as exc:
        return _reason(exc, index)
    return None


def alignment_reason(net: nn.Module, index: int, grouped: bool = False) -> Optional[str]:
    """``None`` if the neurons of level ``index`` of ``net`` can be aligned by one map per neuron
    space, else why not; with ``grouped``, for an alignment that moves the groups of a grouped
    convolution as units (``otfusion``, ``git-rebasin``, ``weight-matching``)."""
    tokens = _token_groupnorm(net, index)
    if tokens:
        return tokens
    try:
        layout = level_layout(net.levels[index], index, grouped=grouped)  # type: ignore[index]
        check_grouped_alignment(net.levels, index, layout, "the alignment")  # type: ignore[arg-type]
    except IncompatibleModelsError as exc:
        return _reason(exc, index)
    return None


#: what each :func:`layout_traits` name stands for, in a refusal
TRAITS = {
    "transformer": "a transformer's residual stream and attention heads (heads move as units)",
    "depthwise": "a depthwise convolution, whose channels are tied to its input's",
    "parts": "a concatenation of branches, whose map is one block per part",
    "groups": "a GroupNorm whose groups of channels must move as units",
}


#: the alignments that handle each trait, named in a refusal
HANDLED_BY = {
    "transformer": "otfusion, git-rebasin and weight-matching",
    "depthwise": "otfusion, git-rebasin and weight-matching",
    "parts": "otfusion, git-rebasin, zipit and cca-merge",
    "groups": "otfusion, git-rebasin, weight-matching, zipit, cca-merge, the align-then-merge methods, kf-linear and hf-linear",
}


def layout_traits(net: nn.Module, index: int) -> FrozenSet[str]:
    """The structures of level ``index``'s alignment layout that not every alignment handles
    (names of :data:`TRAITS`); empty for a level that cannot be aligned at all."""
    level = net.levels[index]  # type: ignore[index]
    try:
        layout = level_layout(level, index, grouped=True)
    except IncompatibleModelsError:
        return frozenset()
    found = set()
    if any(sp.heads for sp in layout.internal) or any(kind == "last" for _, _, _, kind in layout.tensors):
        found.add("transformer")
    if any(is_depthwise(m) for m in level.modules()):
        found.add("depthwise")
    if layout.parts:
        found.add("parts")
    if layout.groups:
        found.add("groups")
    return frozenset(found)


def traits_reason(net: nn.Module, index: int, unsupported: FrozenSet[str], method: str,
                  why: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Why ``method``, which does not handle the layout ``unsupported`` traits, cannot align
    level ``index`` (``None`` if it can, as far as the traits go); ``why[trait]``, if given, says
    what in the method stands in the way."""
    found = sorted(layout_traits(net, index) & unsupported)
    if not found:
        return None
    who = method if "'" in method else repr(method)
    because = f": {why[found[0]]}" if why and found[0] in why else ""
    return f"it has {TRAITS[found[0]]}, which {who} does not handle{because} ({HANDLED_BY[found[0]]} do)"
