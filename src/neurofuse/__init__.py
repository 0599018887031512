"""neurofuse: zero-shot fusion of trained neural networks by neuron interpolation.

>>> import neurofuse
>>> neurofuse.methods()  # doctest: +SKIP
['hf-linear', 'kf-linear', 'vanilla', 'ensemble', ...]
"""

import os as _os

# OpenMP threads that spin while waiting make torch 10-100x slower as soon as another process
# competes for the cores (measured: the digits demo took 199 s instead of 5 s beside one busy
# process).  Passive waiting costs nothing measurable when the machine is idle.  Only a default:
# a value the user set is kept, and it must be set before torch starts its thread pool.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import models  # noqa: E402,F401  (registers the zoo)
from ._fusion_set import FusionSet
from . import methods  # noqa: F811  (a package that is also callable: neurofuse.methods())
from .api import fuse
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    IncompatibleModelsError,
    NeurofuseError,
    OutputExistsError,
)
from .levels import LeveledNet, levels_from

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FusionSet",
    "IncompatibleModelsError",
    "LeveledNet",
    "NeurofuseError",
    "OutputExistsError",
    "__version__",
    "fuse",
    "levels_from",
    "methods",
]
