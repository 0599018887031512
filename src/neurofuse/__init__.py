"""neurofuse: zero-shot fusion of trained neural networks by neuron interpolation.

>>> import neurofuse
>>> neurofuse.methods()  # doctest: +SKIP
['hf-linear', 'kf-linear', 'vanilla', 'ensemble', ...]
"""

from . import models  # noqa: F401  (registers the zoo)
from ._fusion_set import FusionSet
from . import methods  # noqa: F811  (a package that is also callable: neurofuse.methods())
from .api import fuse
from .grouping import Correspondence
from .methods import FusionResult
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
    "Correspondence",
    "DataError",
    "FusionResult",
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
