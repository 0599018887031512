"""The fusion-method interface: one verb, ``fuse(models, data)``, for every method.

Like Flower's ``Strategy``, a method is a small abstract surface around a template method:
:meth:`FusionMethod.fuse` validates the models and the data and calls :meth:`FusionMethod._fuse`,
the one method a new algorithm overrides.  Method-specific settings are a typed, validated
``Options`` dataclass per method.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Type, TypeVar, Union

import numpy as np
import torch
from torch import Tensor, nn

from .._fusion_set import FusionSet, as_fusion_set
from .._registry import Registry
from .._validate import MAX_SEED, check_seed
from ..errors import ConfigError, DataError, IncompatibleModelsError
from ..grouping import OUTPUT_WEIGHTS, output_weights
from ..importance import importance_methods, importance_sums
from ..levels import DEFAULT_MEMORY_BUDGET, LevelStream
from ..levels._core import check_weights
from ..stats import AdditiveStats, ImportanceSums
from ._memory import check_budget, plan_memory

__all__ = ["MAX_SEED", "FusionMethod", "NoOptions", "WidthSpec", "check_output_weights", "get_method", "list_methods",
           "register_method"]

log = logging.getLogger("neurofuse")

WidthSpec = Union[None, int, float, Sequence[int]]

_METHODS: Registry[Type["FusionMethod"]] = Registry("fusion method")
F = TypeVar("F", bound=Type["FusionMethod"])
S = TypeVar("S", bound=AdditiveStats)


def register_method(name: str) -> Callable[[F], F]:
    """Class decorator registering a :class:`FusionMethod` subclass under ``name``."""

    def deco(cls: F) -> F:
        cls.name = name
        _METHODS.register(name)(cls)
        return cls

    return deco


def get_method(name: str) -> Type["FusionMethod"]:
    """The method class registered as ``name``."""
    return _METHODS.get(name)


def list_methods() -> List[str]:
    """Names of the registered fusion methods, in registration order."""
    return _METHODS.names()


def _check_option_types(options_cls: type, values: Dict[str, Any], method: str) -> None:
    """Refuse option values of the wrong simple type (int, float, bool, str, Optional of those)."""
    hints = typing.get_type_hints(options_cls)
    for name, value in values.items():
        hint = hints.get(name)
        allowed = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
        if value is None and type(None) in allowed:
            continue
        simple = [t for t in allowed if t in (int, float, bool, str)]
        if not simple or len(simple) != len([t for t in allowed if t is not type(None)]):
            continue  # a richer type (sequence, mapping, config object): the dataclass validates it
        ok = any(
            (t is bool and isinstance(value, bool))
            or (t is int and isinstance(value, int) and not isinstance(value, bool))
            or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(float(value)))
            or (t is str and isinstance(value, str))
            for t in simple
        )
        if not ok:
            want = " or ".join(t.__name__ for t in simple)
            raise ConfigError(f"option {name!r} of method {method!r} must be {want}, got {value!r}")


def check_output_weights(value: Any) -> None:
    """Refuse an ``output_weights`` option that is not one of :data:`neurofuse.grouping.OUTPUT_WEIGHTS`."""
    if value not in OUTPUT_WEIGHTS:
        raise ConfigError(f"output_weights must be one of {list(OUTPUT_WEIGHTS)}, got {value!r}")


def _float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the first floating-point parameter of ``model`` (None if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A method without settings of its own."""


class FusionMethod(ABC):
    """Base class of every fusion method.

    Parameters
    ----------
    importance : str
        Neuron importance score (see :func:`neurofuse.importance.importance_methods`); methods
        that do not use importance accept only ``"uniform"``.
    width : None, int, float or sequence of int
        Fused width per level (every level but the output): ``None`` keeps the first model's
        widths, an int sets every level, a float multiplies the first model's widths, a list
        gives each level.  Only methods with ``supports_width`` accept anything but ``None``.
    seed : int
        Seed of every random choice the method makes.
    progress : bool
        Show progress bars.
    device : str
        Where the computation runs (``"cpu"``, ``"cuda"``).
    batch_size : int
        Rows per batch when streaming the fusion set.
    memory_budget : int, "auto" or None
        Bytes the fusion's working set may take beyond the models and the fusion set (level
        activations, per-batch temporaries, per-level algebra): the batch size is lowered and
        level activations are spilled to temporary files until the estimate fits, and a fusion
        that cannot fit is refused before any work on the fusion set, with the estimate
        (:class:`~neurofuse.errors.MemoryBudgetError`; see :mod:`neurofuse.methods._memory`).
        ``"auto"`` (default): :data:`neurofuse.levels.DEFAULT_MEMORY_BUDGET` of level
        activations in memory, refused only beyond the machine's available memory; ``None``:
        no bound and nothing spilled.
    distributed : bool
        Fuse with ``torch.distributed``: every process (rank) streams its own shard of the
        fusion set, the statistics of every level are summed over the ranks
        (:meth:`neurofuse.stats.AdditiveStats.all_reduce`) and every rank solves the same level,
        so all ranks end with the same fused model.  The process group must be initialised
        (see :mod:`neurofuse.distributed`).  Only methods with ``supports_distributed``.
    **options
        Fields of the method's ``Options`` dataclass.
    """

    name: ClassVar[str] = "?"
    #: one-line description and citation, shown by ``neurofuse methods``
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    uses_importance: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True
    supports_width: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[Optional[int]] = None
    #: the methods suggested when more than ``max_models`` models are given
    for_more_models: ClassVar[str] = "'kf-linear'"
    #: whether ``neurofuse demo`` and the benchmarks run it as one of the compared methods
    listed_in_comparisons: ClassVar[bool] = True
    #: whether the method reduces everything it reads from the data to additive statistics, so
    #: that it can run on shards of the fusion set in several processes (``distributed=True``)
    supports_distributed: ClassVar[bool] = False

    def __init__(self, *, importance: str = "uniform", width: WidthSpec = None, seed: int = 0,
                 progress: bool = True, device: str = "cpu", batch_size: int = 256,
                 memory_budget: Union[int, str, None] = "auto", distributed: bool = False,
                 **options: Any) -> None:
        if importance not in importance_methods():
            raise ConfigError(f"unknown importance {importance!r}; choose one of {importance_methods()}")
        if importance != "uniform" and not self.uses_importance:
            raise ConfigError(f"method {self.name!r} does not use importance scores; use importance='uniform'")
        if width is not None and not self.supports_width:
            raise ConfigError(f"method {self.name!r} keeps the first model's widths; do not pass width "
                              "(use 'kf-linear' or 'kf-gradient' to choose fused widths)")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        check_budget(memory_budget)
        if distributed and not self.supports_distributed:
            raise ConfigError(
                f"method {self.name!r} cannot run distributed (it needs every fusion sample in one "
                f"process); distributed methods: {[n for n in list_methods() if get_method(n).supports_distributed]}"
            )
        fields = {f.name for f in dataclasses.fields(self.Options)}
        unknown = set(options) - fields
        if unknown:
            raise ConfigError(
                f"unknown option(s) {sorted(unknown)} for method {self.name!r}; valid: {sorted(fields) or 'none'}"
            )
        check_seed(seed)
        _check_option_types(self.Options, options, self.name)
        self.options = self.Options(**options)
        self.importance = importance
        self.width = width
        self.seed = int(seed)
        self.progress = progress
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.memory_budget = memory_budget
        self.distributed = bool(distributed)

    # -- template -------------------------------------------------------------------------
    def fuse(self, models: Sequence[nn.Module], data: Any = None) -> nn.Module:
        """Fuse ``models`` using ``data`` (the fusion set) and return the fused model."""
        if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)):
            raise IncompatibleModelsError(
                f"models must be a list of models, got a {type(models).__name__}; pass [model_a, model_b, ...]"
            )
        models = list(models)
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise IncompatibleModelsError(
                    f"model {i} is a {type(m).__name__}, not a torch nn.Module; pass trained models "
                    "(e.g. from neurofuse.models or neurofuse.checkpoint.load_model)"
                )
        lo = max(1, self.min_models)
        if len(models) < lo:
            need = f"fuses exactly {lo}" if self.max_models == lo else f"needs at least {lo}"
            raise IncompatibleModelsError(f"method {self.name!r} {need} models, got {len(models)}")
        if self.max_models is not None and len(models) > self.max_models:
            raise IncompatibleModelsError(
                f"method {self.name!r} fuses at most {self.max_models} models, got {len(models)}; "
                f"use {self.for_more_models} for N models"
            )
        dtypes = [_float_dtype(m) for m in models]
        for i, dt in enumerate(dtypes):
            if dt != dtypes[0]:
                raise IncompatibleModelsError(
                    f"model {i} has {dt} weights but model 0 has {dtypes[0]}; convert them to one "
                    "dtype (e.g. model.float()) before fusing"
                )
        for i, m in enumerate(models):
            check_weights(m, i)
        for m in models:   # a model may refuse methods that do not apply to it (neurofuse.hf)
            check = getattr(m, "check_method", None)
            if callable(check):
                check(self.name)
        fset: Optional[FusionSet] = None
        if self.needs_data or data is not None:
            fset = as_fusion_set(data, self.batch_size)
            shape = getattr(models[0], "input_shape", None)
            if shape is not None:
                fset.check_input_shape(shape)
            num_classes = getattr(models[0], "num_classes", None)
            fset.check_labels(num_classes)
            if (self.needs_data and isinstance(num_classes, int) and len(fset) < num_classes):
                raise DataError(
                    f"the fusion set has {len(fset)} samples but the models have {num_classes} "
                    f"classes; method {self.name!r} estimates its statistics from the fusion set "
                    f"and needs at least one sample per class: pass at least {num_classes} "
                    "samples (e.g. --fusion-samples 400)"
                )
            if dtypes[0] is not None and fset.x.dtype != dtypes[0]:
                log.info("fusion inputs are %s, the models %s: converting the inputs",
                         fset.x.dtype, dtypes[0])
                fset = dataclasses.replace(fset, x=fset.x.to(dtypes[0]))
            if self.distributed:
                from ..distributed import shard_fusion_set

                fset = shard_fusion_set(fset)
        plan = plan_memory(self, models, fset, self.memory_budget)   # refuses before any work
        if fset is not None and plan.batch_size != fset.batch_size:
            log.info("memory_budget: batches of %d samples (estimate %d bytes)", plan.batch_size, plan.estimate)
            fset = dataclasses.replace(fset, batch_size=plan.batch_size)
        self._stream_bytes = plan.stream_bytes
        # the caller's models are moved and put in eval mode only for the duration of the call
        state = [(m.training, next(iter(m.parameters()), torch.empty(0)).device) for m in models]
        try:
            models = [m.to(self.device).eval() for m in models]
            log.info("fusing %d models with %s (importance=%s)", len(models), self.name, self.importance)
            fused = self._fuse(models, fset)
        finally:
            for m, (training, device) in zip(models, state):
                m.to(device).train(training)
        return fused.eval()

    @abstractmethod
    def _fuse(self, models: List[nn.Module], data: Optional[FusionSet]) -> nn.Module:
        """Produce the fused model.  ``data`` is ``None`` only when ``needs_data`` is false."""

    # -- helpers shared by level-wise methods ----------------------------------------------
    def reduce(self, stats: S) -> S:
        """The statistics of the whole fusion set from this process's ``stats``: summed over the
        ranks when fusing distributed, unchanged otherwise.  Every method calls it on what it
        accumulated before it solves."""
        return stats.all_reduce() if self.distributed else stats

    def stream(self, data: FusionSet, n: int) -> LevelStream:
        """A :class:`~neurofuse.levels.LevelStream` of ``n`` networks over ``data``."""
        budget = self.__dict__.get("_stream_bytes", DEFAULT_MEMORY_BUDGET if self.memory_budget == "auto"
                                   else self.memory_budget)
        return LevelStream(data, n, self.device, memory_budget=budget)

    def importance_scores(self, net: nn.Module, data: FusionSet) -> List[Tensor]:
        """Importance scores of every level of ``net`` (float64, on the CPU), computed once per
        model for all levels (:func:`neurofuse.importance.importance_sums`) and cached."""
        cache: Dict[int, List[Tensor]] = self.__dict__.setdefault("_importance_cache", {})
        key = id(net)
        if key not in cache:
            sums, n = importance_sums(net, data, self.importance, self.device)
            stats = ImportanceSums(len(sums))
            stats.update([s.double().cpu() for s in sums], n)
            cache[key] = [s.cpu() for s in self.reduce(stats).scores()]
        return cache[key]

    def output_level_weights(self, models: Sequence[nn.Module], data: Optional[FusionSet]) -> np.ndarray:
        """``[N, C]`` weight of every model in every fused class at the output level, each column
        summing to one (:func:`neurofuse.grouping.output_weights`): the options' ``class_weights``
        times, with ``output_weights="importance"``, the importance of each model's output
        neurons (raw scores, so that one class is compared across models)."""
        widths = [m.level_widths()[-1] for m in models]  # type: ignore[operator]
        if len(set(widths)) != 1:
            raise IncompatibleModelsError(f"output levels have different class counts {widths}")
        scores = None
        if getattr(self.options, "output_weights", "mean") == "importance" and self.importance != "uniform":
            cached = self.__dict__.get("_importance_cache", {})
            if data is None and not all(id(m) in cached for m in models):
                raise ConfigError("output_weights='importance' needs the fusion data for the scores; "
                                  "pass data or use output_weights='mean'")
            scores = torch.stack([self.importance_scores(m, data)[-1] for m in models]).numpy()
        return output_weights(len(models), widths[0], getattr(self.options, "class_weights", None), scores)

    def set_importance_scores(self, net: nn.Module, scores: Sequence[Tensor]) -> None:
        """Use ``scores`` (one ``[width]`` tensor per level) as ``net``'s importance scores
        instead of computing them from the fusion set: e.g. scores merged from statistics that
        federated clients computed on their own labelled data (:mod:`neurofuse.federated`)."""
        cache: Dict[int, List[Tensor]] = self.__dict__.setdefault("_importance_cache", {})
        cache[id(net)] = [torch.as_tensor(s).double().cpu() for s in scores]

    def resolve_widths(self, base_widths: Sequence[int]) -> List[int]:
        """Fused widths of every level (the last stays the class count) from ``self.width``."""
        hidden = list(base_widths[:-1])
        w = self.width
        if w is None:
            out = hidden
        elif isinstance(w, bool):
            raise ConfigError(f"width must be an int, a float or a list, got {w!r}")
        elif isinstance(w, int):
            out = [w] * len(hidden)
        elif isinstance(w, float):
            if not math.isfinite(w) or w <= 0:
                raise ConfigError(f"width multiplier must be positive, got {w}")
            out = [max(1, int(round(h * w))) for h in hidden]
        elif isinstance(w, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in w):
            out = [int(x) for x in w]
            if len(out) != len(hidden):
                raise ConfigError(
                    f"width lists {len(out)} levels but the models have {len(hidden)} levels "
                    "before the output"
                )
        else:
            raise ConfigError(f"width must be an int, a float multiplier or a list of ints, got {w!r}")
        for i, x in enumerate(out):
            if x < 1:
                raise ConfigError(f"fused width of level {i} must be at least 1, got {x}")
        return out + [base_widths[-1]]
