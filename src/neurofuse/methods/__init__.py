"""Fusion methods behind one registry and one call (``FusionMethod.fuse(models, data)``)."""

from ._base import FusionMethod, WidthSpec, get_method, list_methods, register_method
from ._levelwise import HungarianLinearFusion, KMeansLinearFusion, LevelwiseFusion, LinearFusion
from ._simple import BaseModel, EnsembleFusion, VanillaAveraging
from ._otfusion import OTFusion, OTFusionOptions
from ._rebasin import GitRebasin, GitRebasinOptions
from ._kd import KDHead, KDHeadOptions
from ._distill import EnsembleDistillation, EnsembleDistillationOptions
from ._gradient import GRADIENT_PRESETS, GradientOptions, KMeansGradientFusion, LevelConfig
from ._describe import OptionInfo, method_options
from ._weight_matching import WeightMatching, WeightMatchingOptions
from ._zipit import ZipIt, ZipItOptions
from ._cca import CCAMerge, CCAMergeOptions
from ._regmean import AlignedRegMean, AlignedRegMeanOptions, RegMean, RegMeanOptions
from ._fisher import AlignedFisherMerging, AlignedFisherOptions, FisherMerging, FisherOptions

__all__ = [
    "AlignedFisherMerging",
    "AlignedFisherOptions",
    "AlignedRegMean",
    "AlignedRegMeanOptions",
    "BaseModel",
    "CCAMerge",
    "CCAMergeOptions",
    "GitRebasin",
    "GitRebasinOptions",
    "KDHead",
    "KDHeadOptions",
    "OTFusion",
    "OTFusionOptions",
    "EnsembleDistillation",
    "EnsembleDistillationOptions",
    "EnsembleFusion",
    "FisherMerging",
    "FisherOptions",
    "FusionMethod",
    "GRADIENT_PRESETS",
    "GradientOptions",
    "HungarianLinearFusion",
    "KMeansGradientFusion",
    "KMeansLinearFusion",
    "LevelConfig",
    "LevelwiseFusion",
    "LinearFusion",
    "OptionInfo",
    "RegMean",
    "RegMeanOptions",
    "VanillaAveraging",
    "WeightMatching",
    "WeightMatchingOptions",
    "WidthSpec",
    "ZipIt",
    "ZipItOptions",
    "get_method",
    "list_methods",
    "method_options",
    "register_method",
]


class _MethodsModule(__import__("types").ModuleType):
    """``neurofuse.methods`` is both this package and the function the API promises:
    ``neurofuse.methods()`` lists the registry, ``neurofuse.methods.get_method(...)`` and
    ``import neurofuse.methods._otfusion`` keep working."""

    def __call__(self) -> "list[str]":
        return list_methods()


__import__("sys").modules[__name__].__class__ = _MethodsModule
