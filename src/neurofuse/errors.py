"""Exceptions raised by neurofuse.

Every error that a user can cause (bad models, bad data, bad settings, bad files) is a subclass of
:class:`NeurofuseError` and carries a one-line message that says what is wrong and what to do.
The command-line interface prints that line and exits non-zero instead of a traceback.
"""

from __future__ import annotations

__all__ = [
    "NeurofuseError",
    "IncompatibleModelsError",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "OutputExistsError",
    "MemoryBudgetError",
]


class NeurofuseError(ValueError):
    """Base class of every user-facing neurofuse error."""


class IncompatibleModelsError(NeurofuseError):
    """The models cannot be fused as asked (level counts, shapes, widths, NaN weights...)."""


class DataError(NeurofuseError):
    """Data is missing, corrupt, empty or of the wrong shape."""


class ConfigError(NeurofuseError):
    """A setting is out of range or unknown."""


class CheckpointError(NeurofuseError):
    """A checkpoint file is missing, corrupt, truncated or not a neurofuse checkpoint."""


class OutputExistsError(NeurofuseError):
    """An output path exists and would be overwritten (pass ``force=True`` / ``--force``)."""


class MemoryBudgetError(ConfigError):
    """A fusion's estimated working set exceeds ``memory_budget`` (or the machine's available
    memory); raised before any work on the fusion set, with the estimate."""
