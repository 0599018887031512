"""What structure a level has, for the methods that ask (:meth:`FusionMethod.check_level`).

Two questions a level answers about itself, each as ``None`` (yes) or a one-line reason (no):

* :func:`affine_reason`: is the level *affine in its parameters* after BatchNorm folding
  (``[parameter-free ops..., Linear|Conv2d]``), so that a closed-form least-squares fit can
  produce it from its input;
* :func:`alignment_reason`: can the level's neurons be aligned by one map per neuron space
  (:func:`neurofuse.levels._layout.level_layout`: chains and residual blocks of Linear /
  ungrouped Conv2d layers and per-channel normalisations).

The methods decide what to do with the answers; nothing here names a method.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..errors import IncompatibleModelsError
from ._auto import _AFFINE, _has_state
from ._bn import fold_batchnorm
from ._core import split_affine
from ._layout import level_layout

__all__ = ["affine_reason", "alignment_reason", "level_kind"]


def level_kind(net: nn.Module, index: int) -> str:
    """``"chain"``, ``"block"`` or ``"graph"`` as the automatic levels record it (``"chain"`` for
    declared and zoo levels, which say nothing)."""
    kinds = getattr(net, "kinds", None)
    return str(kinds[index]) if kinds else "chain"


def affine_reason(net: nn.Module, index: int) -> Optional[str]:
    """``None`` if level ``index`` of ``net`` is affine in its parameters after BatchNorm folding,
    else why not."""
    level, kind = net.levels[index], level_kind(net, index)  # type: ignore[index]
    if kind == "block":
        return "a residual block (skip connection) is not affine in its parameters"
    if kind == "graph":
        return "a sub-graph with several paths or direct parameters is not affine in its parameters"
    folded = fold_batchnorm(level)
    try:
        _, affine = split_affine(folded)
    except IncompatibleModelsError:
        kids = list(folded.children()) if isinstance(folded, nn.Sequential) else [folded]
        holders = [type(m).__name__ for m in kids if _has_state(m) and not isinstance(m, _AFFINE)]
        what = holders[0] if holders else type(folded).__name__
        return (f"its {what} holds parameters and is not folded into a Linear/Conv, so the level "
                "is not affine in its parameters")
    if isinstance(affine, nn.Conv2d) and affine.groups != 1:
        return (f"grouped/depthwise convolution (groups={affine.groups}): the closed-form refit "
                "solves one dense weight over all input channels")
    if isinstance(affine, nn.Conv2d) and (affine.padding_mode != "zeros" or isinstance(affine.padding, str)):
        return "convolution with non-zero or string padding: the closed-form refit unfolds zero-padded patches"
    return None


def alignment_reason(net: nn.Module, index: int) -> Optional[str]:
    """``None`` if the neurons of level ``index`` of ``net`` can be aligned by one map per neuron
    space, else why not."""
    level = net.levels[index]  # type: ignore[index]
    grouped = [m for m in level.modules() if isinstance(m, nn.Conv2d) and m.groups != 1]
    if grouped:
        return (f"grouped/depthwise convolution (groups={grouped[0].groups}): its output channels "
                "are tied to its input channels, which one map per side cannot align")
    try:
        level_layout(level, index)
    except IncompatibleModelsError as exc:
        return str(exc).split(";")[0].replace(f"level {index}: ", "").replace(f"level {index} ", "")
    return None
