"""The type predicates every typed config of neurofuse validates its fields with.

Settings dataclasses (:class:`~neurofuse.training.TrainConfig`,
:class:`~neurofuse.finetune.FinetuneConfig`, :class:`~neurofuse.approximation._gradient.LevelConfig`,
the methods' ``Options``) check each field in ``__post_init__`` with these and raise a one-line
:class:`~neurofuse.errors.ConfigError` naming the field and the bad value.  ``bool`` is never
accepted as a number (``True`` is an ``int`` to Python, but ``epochs=True`` is a mistake).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["MAX_SEED", "check_seed", "is_int", "is_number"]

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
