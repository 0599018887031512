"""Fusion methods behind one registry and one call (``FusionMethod.fuse(models, data)``)."""

from ._base import FusionMethod, WidthSpec, get_method, list_methods, register_method
from ._levelwise import HungarianLinearFusion, KMeansLinearFusion, LevelwiseFusion, LinearFusion
from ._simple import EnsembleFusion, VanillaAveraging

__all__ = [
    "EnsembleFusion",
    "FusionMethod",
    "HungarianLinearFusion",
    "KMeansLinearFusion",
    "LevelwiseFusion",
    "LinearFusion",
    "VanillaAveraging",
    "WidthSpec",
    "get_method",
    "list_methods",
    "register_method",
]
