"""Baselines that need no alignment: vanilla weight averaging and output ensembles."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, List, Optional

import torch
from torch import nn

from .._fusion_set import FusionSet
from ..errors import ConfigError, IncompatibleModelsError
from ..models.ensemble import Ensemble
from ._base import FusionMethod, register_method

__all__ = ["BaseModel", "EnsembleFusion", "VanillaAveraging"]


@register_method("vanilla")
class VanillaAveraging(FusionMethod):
    """Element-wise mean of every parameter and buffer (no alignment).

    The baseline every fusion paper reports (McMahan et al. 2017 call its weighted form FedAvg).
    Needs identical architectures.
    """

    summary = "vanilla weight averaging: same architecture, no alignment"
    needs_data = False

    def _fuse(self, models: List[nn.Module], data: Optional[FusionSet]) -> nn.Module:
        ref = models[0].state_dict()
        states = [m.state_dict() for m in models]
        for i, sd in enumerate(states[1:], start=1):
            if sd.keys() != ref.keys():
                raise IncompatibleModelsError(
                    f"vanilla averaging needs identical architectures: model {i} has different "
                    "parameters than model 0"
                )
            for k, v in sd.items():
                if v.shape != ref[k].shape:
                    raise IncompatibleModelsError(
                        f"vanilla averaging needs identical architectures: {k!r} has shape "
                        f"{list(v.shape)} in model {i} but {list(ref[k].shape)} in model 0"
                    )
        for i, sd in enumerate(states):
            for k, v in sd.items():
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise IncompatibleModelsError(
                        f"model {i} has NaN or infinite values in {k!r}; retrain or repair that "
                        "checkpoint before fusing")
        avg = {k: (torch.stack([sd[k].double() for sd in states]).mean(0).to(v.dtype)
                   if v.is_floating_point() else v.clone()) for k, v in ref.items()}
        fused = copy.deepcopy(models[0])
        fused.load_state_dict(avg)
        return fused


@dataclasses.dataclass(frozen=True)
class EnsembleOptions:
    """``class_weights``: optional ``[N, C]`` per-class weights of the members (class shares)."""

    class_weights: Optional[Any] = None


@register_method("ensemble")
class EnsembleFusion(FusionMethod):
    """Keep every model and average their softmax outputs (an upper reference, N times the cost)."""

    summary = "output ensemble: mean softmax (option: class-share weights); N x inference cost"
    Options = EnsembleOptions
    needs_data = False

    def _fuse(self, models: List[nn.Module], data: Optional[FusionSet]) -> nn.Module:
        for i, m in enumerate(models):
            for k, v in m.state_dict().items():
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise IncompatibleModelsError(
                        f"model {i} has NaN or infinite values in {k!r}; retrain or repair that "
                        "checkpoint before fusing")
        return Ensemble([copy.deepcopy(m) for m in models], self.options.class_weights)


@dataclasses.dataclass(frozen=True)
class BaseOptions:
    """``index``: which base model to return."""

    index: int = 0


@register_method("base")
class BaseModel(FusionMethod):
    """One of the base models itself (``index``), as the reference row of every comparison."""

    summary = "a base model itself (option index=i): the reference every fusion must beat"
    Options = BaseOptions
    needs_data = False
    listed_in_comparisons = False

    def _fuse(self, models: List[nn.Module], data: Optional[FusionSet]) -> nn.Module:
        i = self.options.index
        if not 0 <= i < len(models):
            raise ConfigError(f"index {i} is out of range for {len(models)} models")
        return copy.deepcopy(models[i])
