"""Fusion methods behind one registry and one call (``FusionMethod.run(models, data)``).

A method is a :class:`FusionMethod` subclass registered with :func:`register_method`; its options
are a :class:`MethodOptions` dataclass whose fields declare their constraints (:func:`option`).
Every call returns a :class:`FusionResult`; what a method can do is asked of its class.
"""

from ._options import Anything, Boolean, Constraint, Interval, MethodOptions, NoOptions, OneOf, Optional_, option
from ._result import FusionResult, Step
from ._base import (FusionMethod, FusionRun, WidthSpec, get_method, list_methods, methods_by_order,
                    register_method, unregister_method)
from ._levelwise import HungarianLinearFusion, KMeansLinearFusion, LevelRun, LevelwiseFusion, LinearFusion
from ._simple import BaseModel, EnsembleFusion, VanillaAveraging
from ._otfusion import OTFusion, OTFusionOptions
from ._rebasin import GitRebasin, GitRebasinOptions
from ._kd import KDHead, KDHeadOptions
from ._distill import EnsembleDistillation, EnsembleDistillationOptions
from ._gradient import GRADIENT_PRESETS, GradientOptions, KMeansGradientFusion, LevelConfig
from ._describe import OptionInfo, format_levels, level_support, method_options
from ._weight_matching import WeightMatching, WeightMatchingOptions
from ._zipit import ZipIt, ZipItOptions
from ._cca import CCAMerge, CCAMergeOptions
from ._merge import StatisticsMerge
from ._regmean import AlignedRegMean, AlignedRegMeanOptions, RegMean, RegMeanOptions
from ._fisher import AlignedFisherMerging, AlignedFisherOptions, FisherMerging, FisherOptions

__all__ = [
    "AlignedFisherMerging",
    "AlignedFisherOptions",
    "AlignedRegMean",
    "AlignedRegMeanOptions",
    "Anything",
    "BaseModel",
    "Boolean",
    "CCAMerge",
    "CCAMergeOptions",
    "Constraint",
    "EnsembleDistillation",
    "EnsembleDistillationOptions",
    "EnsembleFusion",
    "FisherMerging",
    "FisherOptions",
    "FusionMethod",
    "FusionResult",
    "FusionRun",
    "GRADIENT_PRESETS",
    "GitRebasin",
    "GitRebasinOptions",
    "GradientOptions",
    "HungarianLinearFusion",
    "Interval",
    "KDHead",
    "KDHeadOptions",
    "KMeansGradientFusion",
    "KMeansLinearFusion",
    "LevelConfig",
    "LevelRun",
    "LevelwiseFusion",
    "LinearFusion",
    "MethodOptions",
    "NoOptions",
    "OTFusion",
    "OTFusionOptions",
    "OneOf",
    "OptionInfo",
    "Optional_",
    "RegMean",
    "RegMeanOptions",
    "StatisticsMerge",
    "Step",
    "VanillaAveraging",
    "WeightMatching",
    "WeightMatchingOptions",
    "WidthSpec",
    "ZipIt",
    "ZipItOptions",
    "format_levels",
    "get_method",
    "level_support",
    "list_methods",
    "method_options",
    "methods_by_order",
    "option",
    "register_method",
    "unregister_method",
]


class _MethodsModule(__import__("types").ModuleType):
    """``neurofuse.methods`` is both this package and the function the API promises:
    ``neurofuse.methods()`` lists the registry, ``neurofuse.methods.get_method(...)`` and
    ``import neurofuse.methods._otfusion`` keep working."""

    def __call__(self) -> "list[str]":
        return list_methods()


__import__("sys").modules[__name__].__class__ = _MethodsModule
