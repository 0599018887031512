"""Baselines that need no alignment: vanilla weight averaging and output ensembles."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import ConfigError, IncompatibleModelsError
from ..grouping import Correspondence
from ..models.ensemble import Ensemble
from ._base import FusionMethod, FusionRun, register_method
from ._options import Anything, Interval, MethodOptions, option

__all__ = ["BaseModel", "EnsembleFusion", "VanillaAveraging", "average_states"]


def _positive_weights(value: Any) -> bool:
    try:
        w = [float(v) for v in value]
    except (TypeError, ValueError):
        return False
    return len(w) > 0 and all(v > 0 and v < float("inf") for v in w)


@dataclasses.dataclass(frozen=True)
class VanillaOptions(MethodOptions):
    """``weights``: optional positive weight of every model (e.g. its number of training
    samples: FedAvg's weighted mean); default: the plain mean."""

    weights: Optional[Any] = option(None, Anything("null or a list of positive numbers, one per model",
                                                   lambda v: v is None or _positive_weights(v)))


def average_states(models: List[nn.Module], weights: Optional[Any] = None) -> Dict[str, Any]:
    """The (weighted) element-wise mean of the models' floating-point parameters and buffers
    (other tensors from model 0), in float64 then cast back; refuses different architectures and
    non-finite values with an error naming the tensor."""
    ref = models[0].state_dict()
    states = [m.state_dict() for m in models]
    for i, sd in enumerate(states[1:], start=1):
        if sd.keys() != ref.keys():
            raise IncompatibleModelsError(
                f"averaging needs identical architectures: model {i} has different parameters than model 0")
        for k, v in sd.items():
            if v.shape != ref[k].shape:
                raise IncompatibleModelsError(
                    f"averaging needs identical architectures: {k!r} has shape {list(v.shape)} in "
                    f"model {i} but {list(ref[k].shape)} in model 0")
    for i, sd in enumerate(states):
        for k, v in sd.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise IncompatibleModelsError(
                    f"model {i} has NaN or infinite values in {k!r}; retrain or repair that "
                    "checkpoint before fusing")
    if weights is None:
        w = torch.full((len(models),), 1.0 / len(models), dtype=torch.float64)
    else:
        w = torch.as_tensor([float(v) for v in weights], dtype=torch.float64)
        if w.numel() != len(models):
            raise ConfigError(f"weights must give one number per model ({len(models)}), got {w.numel()}")
        w = w / w.sum()
    return {k: (sum(wi * sd[k].double() for wi, sd in zip(w, states)).to(v.dtype)
                if v.is_floating_point() else v.clone()) for k, v in ref.items()}

@register_method("vanilla")
class VanillaAveraging(FusionMethod):
    """Element-wise mean of every parameter and buffer (no alignment).

    The baseline every fusion paper reports (McMahan et al. 2017 call its weighted form FedAvg).
    Needs identical architectures.
    """

    summary = "vanilla weight averaging (option weights: FedAvg's weighted mean): same architecture, no alignment"
    label = "Vanilla Averaging"
    order = 10
    Options = VanillaOptions
    needs_data = False
    same_architecture = True

    def _fuse(self, run: FusionRun) -> nn.Module:
        fused = copy.deepcopy(run.models[0])
        fused.load_state_dict(average_states(run.models, self.options.weights))
        return fused


@dataclasses.dataclass(frozen=True)
class EnsembleOptions(MethodOptions):
    """``class_weights``: optional ``[N, C]`` per-class weights of the members (class shares)."""

    class_weights: Optional[Any] = option(None, Anything("null or an [N, C] array of non-negative weights"))


@register_method("ensemble")
class EnsembleFusion(FusionMethod):
    """Keep every model and average their softmax outputs (an upper reference, N times the cost)."""

    summary = "output ensemble: mean softmax (option: class-share weights); N x inference cost"
    label = "Ensemble"
    order = 30
    Options = EnsembleOptions
    needs_data = False
    output_is_ensemble = True

    def _fuse(self, run: FusionRun) -> nn.Module:
        models = run.models
        for i, m in enumerate(models):
            for k, v in m.state_dict().items():
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise IncompatibleModelsError(
                        f"model {i} has NaN or infinite values in {k!r}; retrain or repair that "
                        "checkpoint before fusing")
        return Ensemble([copy.deepcopy(m) for m in models], self.options.class_weights)


@dataclasses.dataclass(frozen=True)
class BaseOptions(MethodOptions):
    """``index``: which base model to return."""

    index: int = option(0, Interval(int, 0))


@register_method("base")
class BaseModel(FusionMethod):
    """One of the base models itself (``index``), as the reference row of every comparison."""

    summary = "a base model itself (option index=i): the reference every fusion must beat"
    label = "Base model"
    order = 0
    Options = BaseOptions
    needs_data = False
    listed_in_comparisons = False

    def _fuse(self, run: FusionRun) -> nn.Module:
        models, i = run.models, self.options.index
        if not 0 <= i < len(models):
            raise ConfigError(f"index {i} is out of range for {len(models)} models")
        record_single_model(run, models[i], i)
        return copy.deepcopy(models[i])


def record_single_model(run: FusionRun, model: nn.Module, index: int) -> None:
    """Record that every fused neuron is the same neuron of model ``index`` alone (a method whose
    fused body is that model's), at every hidden level of leveled models."""
    if not callable(getattr(model, "level_widths", None)) or \
            not all(callable(getattr(m, "level_widths", None)) for m in run.models):
        return
    base = [m.level_widths() for m in run.models]
    own = model.level_widths()
    for lvl in range(len(own) - 1):
        run.record(lvl, Correspondence.same_index([w[lvl] for w in base], own[lvl], models=[index]))
