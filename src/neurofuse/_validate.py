"""The type predicates every typed config of neurofuse validates its fields with.

Settings dataclasses (:class:`~neurofuse.training.TrainConfig`,
:class:`~neurofuse.finetune.FinetuneConfig`, :class:`~neurofuse.approximation._gradient.LevelConfig`,
the methods' ``Options``) check each field in ``__post_init__`` with these and raise a one-line
:class:`~neurofuse.errors.ConfigError` naming the field and the bad value.  ``bool`` is never
accepted as a number (``True`` is an ``int`` to Python, but ``epochs=True`` is a mistake).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from .errors import ConfigError

__all__ = ["MAX_SEED", "check_choice", "check_int", "check_number", "check_seed", "is_int", "is_number"]

#: The largest seed neurofuse accepts: ``[0, 2**32 - 1]`` is the range that every generator it
#: seeds takes (``numpy.random.seed`` takes no more; ``torch.Generator`` and ``default_rng`` more).
MAX_SEED = 2**32 - 1


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a ``bool``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number (Python or numpy int or float), not a ``bool``."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)) and math.isfinite(float(value)))


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` as an ``int`` if it is an integer in ``[0, MAX_SEED]``; else a ``ConfigError``."""
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be an integer in [0, {MAX_SEED}], got {value!r}")
    return int(value)


def check_int(value: Any, name: str, lo: int = 0, hi: Optional[int] = None) -> int:
    """``value`` as an ``int`` if it is an integer in ``[lo, hi]``; else a ``ConfigError`` naming
    ``name``, the value and the range."""
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name} must be an integer {rng}, got {value!r}")
    return int(value)


def check_number(value: Any, name: str, lo: float = 0.0, hi: float = math.inf, *,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a ``float`` if it is a finite number in the interval; else a ``ConfigError``."""
    if not is_number(value) or value < lo or value > hi or (lo_open and value == lo) \
            or (hi_open and value == hi):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{name} must be a finite number in {rng}, got {value!r}")
    return float(value)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else a ``ConfigError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {list(choices)}")
    return value
