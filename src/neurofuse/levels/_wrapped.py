"""The :class:`~neurofuse.levels.LeveledNet` over a user's own modules, shared with the model.

:func:`~neurofuse.levels.levels_from` builds a :class:`DeclaredNet` from declared levels and
:func:`~neurofuse.levels.auto_levels` an :class:`~neurofuse.levels.AutoNet` (a ``DeclaredNet``) from
a traced graph; both live on top of this module.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

from torch import Tensor, nn

from ..errors import ConfigError
from ._core import LeveledNet

__all__ = ["MAX_INPUT_ELEMENTS", "DeclaredNet", "Fn", "check_input_shape", "check_not_shared"]

#: most elements one input sample may have (a 3 x 2048 x 2048 image has 12.6 million): the level
#: checks run the model on a few random samples of this shape
MAX_INPUT_ELEMENTS = 1 << 24


class Fn(nn.Identity):
    """Wraps a parameter-free callable (``torch.relu``, ``F.max_pool2d``, a lambda) as a module.

    It derives from ``nn.Identity`` (a parameter-free op for
    :func:`~neurofuse.levels.split_affine`), so a level ``[Fn(F.relu), conv]`` stays affine in its
    parameters and the closed-form methods can fit it.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def check_input_shape(input_shape: Any) -> Tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints with at most :data:`MAX_INPUT_ELEMENTS`
    elements; else a one-line :class:`~neurofuse.errors.ConfigError` naming the shape."""
    try:
        shape = tuple(int(s) for s in input_shape)
        if any(float(s) != int(s) for s in input_shape):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"input_shape must be a list of positive ints such as (3, 32, 32), got "
                          f"{input_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"input_shape must be a list of positive ints such as (3, 32, 32), got {list(shape)}")
    n = 1
    for d in shape:
        n *= d
    if n > MAX_INPUT_ELEMENTS:
        raise ConfigError(f"input_shape {list(shape)} has {n} elements per sample, more than "
                          f"{MAX_INPUT_ELEMENTS}; give the shape of one sample (C, H, W), not of a batch")
    return shape


def check_not_shared(levels: Sequence[nn.Module], model: nn.Module) -> None:
    """Refuse levels that share a parameter or buffer (a module ``model.forward`` applies twice).

    Fusion fits every level on its own; two levels holding one tensor would each overwrite it,
    and the fused model computes neither (a fusion to chance with no error).  The message names
    the model's module and the two levels.
    """
    owner = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is not None:
                owner.setdefault(id(t), (mname or type(model).__name__, pname))
    seen = {}
    for i, lv in enumerate(levels):
        tensors = {id(t) for t in lv.parameters()} | {id(b) for b in lv.buffers() if b is not None}
        for t in tensors:
            if t in seen and seen[t] != i:
                mod, pname = owner.get(t, ("?", "?"))
                raise ConfigError(
                    f"module {mod!r} (its {pname!r}) is used by levels {seen[t]} and {i}: "
                    "model.forward applies it more than once, or two modules share their weights; "
                    "fusion fits each level on its own and cannot keep one tensor for both: give "
                    "each use its own module, or declare levels that keep both uses in one level")
            seen[t] = i


class DeclaredNet(LeveledNet):
    """A user model seen as a sequence of declared levels (built by :func:`levels_from`).

    The levels are the user's own modules (shared with the original model, not copied), so
    ``DeclaredNet`` and the model hold the same parameters.  Fusion methods clone it before
    changing weights.  It cannot change its widths (:meth:`with_widths`) and has no zoo
    ``config()``; save the fused model's ``state_dict`` and declare the levels again to reload.
    """

    arch = "declared"

    def __init__(self, levels: Sequence[nn.Module], axes: Sequence[str], input_shape: Sequence[int],
                 num_classes: int, names: Sequence[str], source: str = "model") -> None:
        super().__init__(levels, axes, input_shape, num_classes)
        self.level_names: List[str] = list(names)
        self.source = source

    def with_widths(self, widths: Sequence[int]) -> "LeveledNet":
        raise ConfigError(
            "declared models keep their widths: fuse them with width=None, or build the model "
            "from the zoo (neurofuse.models) to change widths"
        )

    def config(self) -> Dict[str, Any]:
        raise NotImplementedError(
            "declared models have no zoo config; save their state_dict and declare the levels again"
        )

    def extra_repr(self) -> str:
        return f"source={self.source}, levels={self.level_names}, axes={self.axes}"
