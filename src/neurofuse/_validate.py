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

__all__ = ["is_int", "is_number"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a ``bool``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number (Python or numpy int or float), not a ``bool``."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)) and math.isfinite(float(value)))
