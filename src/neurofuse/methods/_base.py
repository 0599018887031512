"""The fusion-method interface: one verb, ``run(models, data)``, for every method.

Like Flower's ``Strategy``, a method is a small abstract surface around a template method:
:meth:`FusionMethod.run` validates the models and the data, makes a fresh :class:`FusionRun`
(the call's state) and calls :meth:`FusionMethod._fuse`, the one method a new algorithm
overrides; it returns a :class:`~neurofuse.methods.FusionResult` (``fuse`` returns its model).
Method-specific settings are a typed ``Options`` dataclass per method whose fields declare their
constraints (:mod:`neurofuse.methods._options`); what a method can do is asked of its class.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import numpy as np
import torch
from torch import Tensor, nn

from .._fusion_set import FusionSet, as_fusion_set
from .._registry import Registry
from .._validate import MAX_SEED, check_seed
from ..errors import ConfigError, DataError, IncompatibleModelsError
from ..grouping import Correspondence, output_weights
from ..importance import importance_methods, importance_sums
from ..levels import DEFAULT_MEMORY_BUDGET, LevelStream, check_weights
from ..stats import AdditiveStats, ImportanceSums
from ._memory import MemoryPlan, plan_memory
from ._options import COMMON_OPTIONS, NoOptions, check_value
from ._result import FusionResult

__all__ = ["MAX_SEED", "FusionMethod", "FusionRun", "NoOptions", "WidthSpec", "get_method", "list_methods",
           "methods_by_order", "register_method", "unregister_method"]

log = logging.getLogger("neurofuse")

WidthSpec = Union[None, int, float, Sequence[int]]

_UNPLANNED = object()
#: bytes of level activations the memory plan of the call in progress leaves the level streams
#: (per call, not on the method instance: a method fusing inside another's call plans its own)
_STREAM_BYTES: contextvars.ContextVar[object] = contextvars.ContextVar("neurofuse_stream_bytes", default=_UNPLANNED)

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


def unregister_method(name: str) -> None:
    """Remove method ``name`` from the registry (e.g. a method a test registered)."""
    _METHODS.unregister(name)


def methods_by_order() -> List[str]:
    """The registered methods in the order of tables (:attr:`FusionMethod.order`, then name order)."""
    names = list_methods()
    return sorted(names, key=lambda n: (get_method(n).order, names.index(n)))


def _float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the first floating-point parameter of ``model`` (None if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


class FusionMethod(ABC):
    """Base class of every fusion method.

    A method instance holds its configuration only; everything one call learns (correspondences,
    the per-level report, transport plans, histories) lives in the :class:`FusionRun` that
    :meth:`run` makes fresh for that call and returns as a :class:`FusionResult`, so one instance
    used twice gives what two fresh instances give (scikit-learn's ``fit`` contract).  What a
    method can do is asked of its class (captum's capability questions):
    :attr:`output_is_ensemble`, :attr:`supports_statistics`, :attr:`supports_width`,
    :meth:`check_level`, ...; callers never branch on a method's name.

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
    #: the name in tables and plots (e.g. ``"KF Linear"``); default: :attr:`name`
    label: ClassVar[str] = ""
    #: where the method's rows stand in tables (ascending; the paper's order for its methods)
    order: ClassVar[int] = 100
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
    #: whether the method fuses from additive level statistics alone, so that a server with no
    #: sample of its own can fuse from statistics its clients compute (:mod:`neurofuse.federated`);
    #: such a method implements :meth:`setup`, ``level_statistics`` and ``solve_level``
    supports_statistics: ClassVar[bool] = False
    #: whether the method reads the data only through additive statistics of each model it merges
    #: (RegMean's Gram matrices, Fisher merging's Fisher sums), so that a server with no sample
    #: merges the sums its clients compute (:mod:`neurofuse.federated`); such a method is a
    #: :class:`~neurofuse.methods.StatisticsMerge` (``merge_inputs``, ``model_statistics``,
    #: ``merge``)
    supports_model_statistics: ClassVar[bool] = False
    #: whether the result keeps every model and combines their outputs (nothing is fused: nothing
    #: to repair, distil or fine-tune, and no correspondence)
    output_is_ensemble: ClassVar[bool] = False
    #: whether the models must have identical parameter shapes (element-wise averaging)
    same_architecture: ClassVar[bool] = False
    #: whether the method fuses level by level, so that :meth:`check_level` says which levels of a
    #: :class:`~neurofuse.levels.LeveledNet` it can fuse (whole-model methods fuse any level)
    fuses_levels: ClassVar[bool] = False
    #: whose levels :meth:`check_level` must accept: ``"all"`` the models' (alignment reads every
    #: model's layers) or ``"first"`` model 0's only (the fused model takes its architecture and
    #: the other models' levels only provide targets)
    checks_models: ClassVar[str] = "all"
    #: the per-call state type :meth:`run` makes (level-wise methods use a subclass)
    Run: ClassVar[type]

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
                              f"(use one of {[n for n in list_methods() if get_method(n).supports_width]} "
                              "to choose fused widths)")
        for key, value in (("batch_size", batch_size), ("memory_budget", memory_budget)):
            check_value(key, value, COMMON_OPTIONS[key])
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
        self.options = self.Options(**options)
        self.importance = importance
        self.width = width
        self.seed = int(seed)
        self.progress = progress
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.memory_budget = memory_budget
        self.distributed = bool(distributed)

    # -- capabilities -----------------------------------------------------------------------
    @classmethod
    def display_label(cls) -> str:
        """The method's name in tables and plots."""
        return cls.label or cls.name

    @classmethod
    def check_level(cls, net: nn.Module, index: int) -> Optional[str]:
        """Why this method cannot fuse level ``index`` of the leveled model ``net``, in one line,
        or ``None`` if it can.  Whole-model methods fuse every level (the default)."""
        return None

    @classmethod
    def check_models(cls, models: Sequence[nn.Module]) -> None:
        """Refuse, before any work, models with a level :meth:`check_level` refuses: the error
        names the level and the reason."""
        if not cls.fuses_levels:
            return
        for i, m in enumerate(models[:1] if cls.checks_models == "first" else models):
            levels = getattr(m, "levels", None)
            if levels is None or not callable(getattr(m, "level_widths", None)):
                continue   # not a LeveledNet: check_same_levels says so with its own message
            names = getattr(m, "level_names", None) or [type(lv).__name__ for lv in levels]
            for lvl in range(len(levels)):
                why = cls.check_level(m, lvl)
                if why is not None:
                    able = [n for n in methods_by_order() if get_method(n).fuses_levels and all(
                        get_method(n).check_level(m, j) is None for j in range(len(levels)))]
                    raise IncompatibleModelsError(
                        f"method {cls.name!r} cannot fuse level {lvl} ({names[lvl]}) of model {i} "
                        f"({type(m).__name__}): {why}; level-wise methods that fuse every level of "
                        f"it: {able or 'none'} (whole-model methods: "
                        f"{[n for n in methods_by_order() if not get_method(n).fuses_levels]})")

    # -- template -------------------------------------------------------------------------
    def fuse(self, models: Sequence[nn.Module], data: Any = None) -> nn.Module:
        """Fuse ``models`` using ``data`` (the fusion set) and return the fused model
        (``self.run(models, data).model``)."""
        return self.run(models, data).model

    def run(self, models: Sequence[nn.Module], data: Any = None) -> FusionResult:
        """Fuse ``models`` using ``data`` (the fusion set) and return the :class:`FusionResult`:
        the model and everything the call learnt.  Each call starts from a fresh
        :class:`FusionRun`."""
        models = self._checked_models(models)
        self.check_models(models)
        fset = self._fusion_set(models, data)
        plan = plan_memory(self, models, fset, self.memory_budget)   # refuses before any work
        if fset is not None and plan.batch_size != fset.batch_size:
            log.info("memory_budget: batches of %d samples (estimate %d bytes)", plan.batch_size, plan.estimate)
            fset = dataclasses.replace(fset, batch_size=plan.batch_size)
        # the caller's models are moved and put in eval mode only for the duration of the call
        state = [(m.training, next(iter(m.parameters()), torch.empty(0)).device) for m in models]
        start = time.perf_counter()
        try:
            models = [m.to(self.device).eval() for m in models]
            log.info("fusing %d models with %s (importance=%s)", len(models), self.name, self.importance)
            call = self.Run(self, models, fset)
            call.memory = plan
            token = _STREAM_BYTES.set(plan.stream_bytes)
            try:
                fused = self._fuse(call).eval()
            finally:
                _STREAM_BYTES.reset(token)
        finally:
            for m, (training, device) in zip(models, state):
                m.to(device).train(training)
        return call.result(fused, time.perf_counter() - start)

    def _checked_models(self, models: Sequence[nn.Module]) -> List[nn.Module]:
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
        return models

    def _fusion_set(self, models: List[nn.Module], data: Any) -> Optional[FusionSet]:
        if not (self.needs_data or data is not None):
            return None
        fset = as_fusion_set(data, self.batch_size)
        shape = getattr(models[0], "input_shape", None)
        if shape is not None:
            fset.check_input_shape(shape)
        for m in models:   # inputs a model's levels do not describe (a Hugging Face model's padding)
            check = getattr(m, "check_inputs", None)
            if callable(check):
                check(fset.x)
        num_classes = getattr(models[0], "num_classes", None)
        fset.check_labels(num_classes)
        if (self.needs_data and isinstance(num_classes, int) and len(fset) < num_classes):
            raise DataError(
                f"the fusion set has {len(fset)} samples but the models have {num_classes} "
                f"classes; method {self.name!r} estimates its statistics from the fusion set "
                f"and needs at least one sample per class: pass at least {num_classes} "
                "samples (e.g. --fusion-samples 400)"
            )
        dtype = _float_dtype(models[0])
        if dtype is not None and fset.x.dtype != dtype:
            log.info("fusion inputs are %s, the models %s: converting the inputs", fset.x.dtype, dtype)
            fset = dataclasses.replace(fset, x=fset.x.to(dtype))
        if self.distributed:
            from ..distributed import shard_fusion_set

            fset = shard_fusion_set(fset)
        return fset

    @abstractmethod
    def _fuse(self, run: "FusionRun") -> nn.Module:
        """Produce the fused model from ``run.models`` and ``run.data`` (``None`` only when
        ``needs_data`` is false), recording what the call learns in ``run``
        (:meth:`FusionRun.record`, ``run.report``, ``run.extras``)."""

    # -- helpers shared by level-wise methods ----------------------------------------------
    def reduce(self, stats: S) -> S:
        """The statistics of the whole fusion set from this process's ``stats``: summed over the
        ranks when fusing distributed, unchanged otherwise.  Every method calls it on what it
        accumulated before it solves."""
        return stats.all_reduce() if self.distributed else stats

    def stream(self, data: FusionSet, n: int) -> LevelStream:
        """A :class:`~neurofuse.levels.LevelStream` of ``n`` networks over ``data``."""
        return LevelStream(data, n, self.device, memory_budget=self.stream_bytes())

    def stream_bytes(self) -> Optional[int]:
        """Bytes of level activations a level stream keeps in memory: what the memory plan of the
        call in progress left them (:func:`neurofuse.methods._memory.plan_memory`), outside a
        call what ``memory_budget`` implies (``None``: all)."""
        planned = _STREAM_BYTES.get()
        if planned is not _UNPLANNED:
            return planned  # type: ignore[return-value]
        return DEFAULT_MEMORY_BUDGET if self.memory_budget == "auto" else self.memory_budget  # type: ignore[return-value]

    def output_level_weights(self, run: "FusionRun", models: Sequence[nn.Module]) -> np.ndarray:
        """``[N, C]`` weight of every model in every fused class at the output level, each column
        summing to one (:func:`neurofuse.grouping.output_weights`): the options' ``class_weights``
        times, with ``output_weights="importance"``, the importance of each model's output
        neurons (raw scores, so that one class is compared across models)."""
        widths = [m.level_widths()[-1] for m in models]  # type: ignore[operator]
        if len(set(widths)) != 1:
            raise IncompatibleModelsError(f"output levels have different class counts {widths}")
        scores = None
        if getattr(self.options, "output_weights", "mean") == "importance" and self.importance != "uniform":
            if run.data is None and not all(run.has_importance(m) for m in models):
                raise ConfigError("output_weights='importance' needs the fusion data for the scores; "
                                  "pass data or use output_weights='mean'")
            scores = torch.stack([run.importance_scores(m)[-1] for m in models]).numpy()
        return output_weights(len(models), widths[0], getattr(self.options, "class_weights", None), scores)

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
            out = [int(round(h * w)) for h in hidden]
            if min(out, default=1) < 1:   # not silently one neuron per level
                i = out.index(min(out))
                raise ConfigError(f"width multiplier {w:g} gives level {i} {hidden[i] * w:.3g} neurons "
                                  f"(of {hidden[i]}); use a multiplier of at least "
                                  f"{0.5 / min(hidden):.3g}, or an int width")
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


class FusionRun:
    """The state of one fusion call, made fresh by :meth:`FusionMethod.run` and handed to its
    hooks (the method instance keeps configuration only).

    Attributes
    ----------
    method : FusionMethod
        The configured method.
    models : list of nn.Module
        The base models (on the fusion device, in eval mode).
    data : FusionSet or None
        The fusion set (``None`` for methods that need no data, or when fusing from statistics).
    correspondences : dict of int to Correspondence
        Per hidden level, which base neurons each fused neuron stands for (:meth:`record`).
    report : list of dict
        One entry per fitted level (what the method measured there).
    extras : dict
        Anything else the call produced (transport plans, permutations, training history).
    """

    def __init__(self, method: FusionMethod, models: Sequence[nn.Module], data: Optional[FusionSet]) -> None:
        self.method = method
        self.models = list(models)
        self.data = data
        self.correspondences: Dict[int, Correspondence] = {}
        self.report: List[Dict[str, Any]] = []
        self.extras: Dict[str, Any] = {}
        #: the call's memory plan (:func:`neurofuse.methods._memory.plan_memory`): its estimate,
        #: batch size and the level activations kept in memory
        self.memory: Optional[MemoryPlan] = None
        self._importance: Dict[int, List[Tensor]] = {}

    # -- importance ---------------------------------------------------------------------------
    def importance_scores(self, net: nn.Module) -> List[Tensor]:
        """Importance scores of every level of ``net`` (float64, on the CPU), computed once per
        model for all levels (:func:`neurofuse.importance.importance_sums`) and kept for this call."""
        key = id(net)
        if key not in self._importance:
            if self.data is None:
                raise ConfigError(f"importance {self.method.importance!r} needs the fusion data; pass data=(x, y)")
            sums, n = importance_sums(net, self.data, self.method.importance, self.method.device)
            stats = ImportanceSums(len(sums))
            stats.update([s.double().cpu() for s in sums], n)
            self._importance[key] = [s.cpu() for s in self.method.reduce(stats).scores()]
        return self._importance[key]

    def set_importance_scores(self, net: nn.Module, scores: Sequence[Tensor]) -> None:
        """Use ``scores`` (one ``[width]`` tensor per level) as ``net``'s importance scores in this
        call instead of computing them from the fusion set: e.g. scores merged from statistics
        that federated clients computed on their own labelled data (:mod:`neurofuse.federated`)."""
        self._importance[id(net)] = [torch.as_tensor(s).double().cpu() for s in scores]

    def has_importance(self, net: nn.Module) -> bool:
        """Whether ``net``'s importance scores are known to this call."""
        return id(net) in self._importance

    # -- what the call learns -----------------------------------------------------------------
    def record(self, level: int, correspondence: Correspondence) -> None:
        """Which base neurons each fused neuron of hidden level ``level`` stands for."""
        self.correspondences[level] = correspondence

    def result(self, model: nn.Module, seconds: float = 0.0) -> FusionResult:
        """The call's :class:`FusionResult` for the fused ``model``.

        A method that builds one network records a correspondence for every hidden level; where
        it recorded none (a method that keeps model 0's neuron order, e.g. plain averaging), fused
        neuron ``j`` stands for neuron ``j`` of every model of the fused width there.  A model
        that is not one leveled network but fuses the models' first levels (a multi-head model,
        ZipIt!'s partial zipping) has the correspondences of the levels recorded, from level 0 on.
        """
        corrs: Tuple[Correspondence, ...] = ()
        fuses = not self.method.output_is_ensemble and all(
            callable(getattr(m, "level_widths", None)) for m in self.models)
        if fuses and callable(getattr(model, "level_widths", None)):
            fused_w = model.level_widths()  # type: ignore[operator]
            base_w = [m.level_widths() for m in self.models]  # type: ignore[operator]
            if all(len(w) == len(fused_w) for w in base_w):
                corrs = tuple(self.correspondences.get(lvl) or Correspondence.same_index(
                    [w[lvl] for w in base_w], fused_w[lvl]) for lvl in range(len(fused_w) - 1))
        elif fuses and sorted(self.correspondences) == list(range(len(self.correspondences))):
            corrs = tuple(self.correspondences[lvl] for lvl in range(len(self.correspondences)))
        return FusionResult(model=model, method=self.method.name, correspondences=corrs,
                            report=tuple(dict(r) for r in self.report), extras=dict(self.extras),
                            seconds=float(seconds))


FusionMethod.Run = FusionRun
