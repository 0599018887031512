"""How a round's client models become one model: :class:`Aggregation` and the modes that wrap it.

:class:`FusionStrategy` runs Flower's round loop; what it does with the usable replies of a round
is one :class:`Aggregation` (and, for reference, the comparison aggregations).  The aggregation
is a small strategy object with one verb, :meth:`Aggregation.aggregate`; a *mode* is an
aggregation that wraps or specialises another, as Flower's differential-privacy wrappers wrap a
strategy:

* :class:`MethodAggregation` fuses the client models with a neurofuse method on the server's
  fusion set (``"vanilla"`` with the clients' sample counts as weights is FedAvg);
* :class:`StatisticsAggregation` fuses from the clients' additive statistics, with no sample on
  the server: level by level (:func:`neurofuse.federated.fuse_by_levels`, kf-linear) or from each
  model's statistics (:func:`neurofuse.federated.merge_by_statistics`, RegMean, Fisher merging);
* :class:`ClassShareWeighting` wraps any aggregation whose method takes ``class_weights`` and
  weighs each client's output neurons by its share of every class, from the label counts the
  clients report (what the clients then send besides their model: one count per class).

Adding a mode is one class here; the strategy is not edited.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from torch import nn

from .._fusion_set import FusionSet
from ..api import fuse
from ..errors import ConfigError, DataError
from ..methods import get_method

__all__ = ["Aggregation", "ClassShareWeighting", "ClientModel", "MethodAggregation", "RoundContext",
           "StatisticsAggregation", "aggregation_from_spec"]

log = logging.getLogger("neurofuse")


@dataclasses.dataclass
class ClientModel:
    """One usable client reply: who sent it, its model, its sample count and label counts."""

    who: str
    node_id: int
    model: nn.Module
    num_examples: float
    label_counts: Optional[List[int]] = None


@dataclasses.dataclass
class RoundContext:
    """What an aggregation may use besides the replies: the round, the server's fusion set (or
    none), the Flower grid (for the statistics protocol), the seed, the reply timeout and the
    fused widths the strategy asks for."""

    server_round: int
    server_data: Optional[FusionSet]
    grid: Any = None
    seed: int = 0
    timeout: Optional[float] = None
    width: Optional[List[int]] = None


class Aggregation(ABC):
    """How the usable replies of a round become one model (the verb :meth:`aggregate`)."""

    #: the fusion method it runs
    method: str

    @property
    @abstractmethod
    def label(self) -> str:
        """Its name in metrics and tables (``accuracy-<label>``)."""

    @property
    def needs_server_data(self) -> bool:
        """Whether it fuses on a server fusion set."""
        return bool(get_method(self.method).needs_data)

    @property
    def importance(self) -> str:
        """The importance score its method uses."""
        return "uniform"

    def takes_option(self, name: str) -> bool:
        """Whether its method has the option ``name``."""
        return name in {f.name for f in dataclasses.fields(get_method(self.method).Options)}

    @abstractmethod
    def aggregate(self, replies: Sequence[ClientModel], ctx: RoundContext,
                  extra: Optional[Mapping[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
        """The model of ``replies`` and the protocol cost beyond the round's own messages
        (``rounds``, ``bytes_sent``, ``bytes_received``; empty when there is none).  ``extra``
        are method options a wrapping mode adds."""


class MethodAggregation(Aggregation):
    """Fuse the client models with ``method`` on the server's fusion set.

    Parameters
    ----------
    method : str
        A registered fusion method (``neurofuse.methods()``); ``"vanilla"`` is FedAvg (its
        ``weights`` are the clients' sample counts).
    options : mapping, optional
        The method's options (``n_init``, ...), as for :func:`neurofuse.fuse`.
    importance : str
        Importance score, for methods that use one.
    label : str, optional
        The name in metrics (default: ``method``).
    """

    def __init__(self, method: str, options: Optional[Mapping[str, Any]] = None, importance: str = "uniform",
                 label: Optional[str] = None) -> None:
        cls = get_method(method)
        if importance != "uniform" and not cls.uses_importance:
            raise ConfigError(f"method {method!r} does not use importance scores; use importance='uniform'")
        self.method = method
        self.options = dict(options or {})
        self._importance = importance
        self._label = label or method

    @property
    def label(self) -> str:
        return self._label

    @property
    def importance(self) -> str:
        return self._importance

    def method_options(self, replies: Sequence[ClientModel], ctx: RoundContext,
                       extra: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """The options of one call: this aggregation's, the wrapping modes', the clients' sample
        counts as ``weights`` where the method takes them, and the strategy's fused widths."""
        opts = {**self.options, **dict(extra or {})}
        if self.takes_option("weights"):
            opts.setdefault("weights", [r.num_examples for r in replies])
        if ctx.width is not None and get_method(self.method).supports_width:
            opts.setdefault("width", ctx.width)
        return opts

    def aggregate(self, replies: Sequence[ClientModel], ctx: RoundContext,
                  extra: Optional[Mapping[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
        opts = self.method_options(replies, ctx, extra)
        if self.needs_server_data and ctx.server_data is None:
            raise DataError(f"{self.label!r} fuses on a server fusion set, and the server has none")
        width = opts.pop("width", None)
        model = fuse([r.model for r in replies], ctx.server_data, method=self.method,
                     importance=self.importance, width=width, seed=ctx.seed, progress=False, **opts)
        return model, {}


class StatisticsAggregation(MethodAggregation):
    """Fuse from the clients' additive statistics, with no sample on the server.

    A method that fuses level by level from statistics
    (:attr:`~neurofuse.methods.FusionMethod.supports_statistics`: kf-linear, hf-linear) takes one
    extra query round per level (:func:`neurofuse.federated.fuse_by_levels`; an attribution
    importance score is computed by the clients on their own labelled data).  A merge from each
    model's statistics (:attr:`~neurofuse.methods.FusionMethod.supports_model_statistics`:
    RegMean's Gram matrices, Fisher merging's Fisher) takes one
    (:func:`neurofuse.federated.merge_by_statistics`), with each model's statistics from its own
    client's data (``scope="own"``, the default) or from every client's (``scope="all"``)."""

    def __init__(self, method: str, options: Optional[Mapping[str, Any]] = None, importance: str = "uniform",
                 label: Optional[str] = None, scope: Optional[str] = None) -> None:
        from ._levels import statistics_methods
        from ._merge import SCOPES, _merger

        cls = get_method(method)
        if not (cls.supports_statistics or cls.supports_model_statistics):
            raise ConfigError(
                f"method {method!r} needs the samples themselves; with no data on the server use one "
                f"of {statistics_methods()}")
        merges = cls.supports_model_statistics
        if not merges and scope not in (None, "all"):
            raise ConfigError(f"{method!r} fuses level by level from every client's statistics: scope "
                              f"must be 'all', got {scope!r}")
        self.scope = scope or ("own" if merges else "all")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
        what = "all clients' statistics" if merges and self.scope == "all" else "client statistics"
        super().__init__(method, options, importance, label or f"{method} ({what})")
        if merges:
            _merger(method, self.options)  # options that need server data fail here

    @property
    def needs_server_data(self) -> bool:
        return False

    def aggregate(self, replies: Sequence[ClientModel], ctx: RoundContext,
                  extra: Optional[Mapping[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
        from ._levels import fuse_by_levels

        if ctx.grid is None:
            raise ConfigError("fusing from the clients' statistics needs the grid: run the strategy "
                              "with start(grid, ...)")
        opts = self.method_options(replies, ctx, extra)
        nodes, models, tag = [r.node_id for r in replies], [r.model for r in replies], f"round-{ctx.server_round}/"
        if get_method(self.method).supports_model_statistics:
            from ._merge import merge_by_statistics

            return merge_by_statistics(ctx.grid, nodes, models, self.method, ctx.seed, opts, ctx.timeout, tag,
                                       scope=self.scope)
        return fuse_by_levels(ctx.grid, nodes, models, self.method, self.importance, ctx.seed, opts,
                              ctx.timeout, tag)


class ClassShareWeighting(Aggregation):
    """Wraps ``inner``: its method's ``class_weights`` become each client's share of every class,
    from the label counts the clients report (``config["label-counts"]``).

    Parameters
    ----------
    inner : Aggregation
        The aggregation to weigh; its method must take ``class_weights``.
    """

    def __init__(self, inner: Aggregation) -> None:
        if not inner.takes_option("class_weights"):
            takes = [n for n in _methods_with("class_weights")]
            raise ConfigError(f"class-share weighting needs a method with class_weights ({takes}); "
                              f"{inner.method!r} has none")
        self.inner = inner
        self.method = inner.method

    @property
    def label(self) -> str:
        return f"{self.inner.label} + class shares"

    @property
    def needs_server_data(self) -> bool:
        return self.inner.needs_server_data

    @property
    def importance(self) -> str:
        return self.inner.importance

    def aggregate(self, replies: Sequence[ClientModel], ctx: RoundContext,
                  extra: Optional[Mapping[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
        missing = [r.who for r in replies if r.label_counts is None]
        if missing:
            raise DataError(f"class-share weighting needs every client's label counts; {missing} sent "
                            "none (config['label-counts'])")
        counts = np.asarray([r.label_counts for r in replies], dtype=np.float64)
        totals = counts.sum(0)
        shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        return self.inner.aggregate(replies, ctx, {**dict(extra or {}), "class_weights": shares})


def _methods_with(option: str) -> List[str]:
    from ..methods import list_methods

    return [n for n in list_methods()
            if option in {f.name for f in dataclasses.fields(get_method(n).Options)}]


AggregationSpec = Union[str, Mapping[str, Any], Aggregation]


def aggregation_from_spec(spec: AggregationSpec, *, options: Optional[Mapping[str, Any]] = None,
                          importance: str = "uniform") -> Aggregation:
    """An :class:`Aggregation` from a config entry.

    ``spec`` is an aggregation (returned as is), a method name (fused on the server's data), or a
    mapping ``{"method": NAME, "server_data": true|false, "class_shares": true|false,
    "importance": ..., "options": {...}, "label": ..., "scope": "own"|"all"}`` (``server_data:
    false`` fuses from the clients' statistics, ``scope`` says whose for a merge from per-model
    statistics; ``class_shares: true`` wraps it in :class:`ClassShareWeighting`).
    ``options`` and ``importance`` apply where the spec gives none.
    """
    if isinstance(spec, Aggregation):
        return spec
    if isinstance(spec, str):
        return MethodAggregation(spec, options, importance)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("method"), str):
        raise ConfigError(f"an aggregation is a method name or a mapping with 'method', got {spec!r}")
    known = {"method", "server_data", "class_shares", "importance", "options", "label", "scope"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"unknown aggregation key(s) {unknown}; valid: {sorted(known)}")
    for key in ("server_data", "class_shares"):
        if not isinstance(spec.get(key, False), bool):
            raise ConfigError(f"aggregation key {key!r} must be true or false, got {spec[key]!r}")
    opts = spec.get("options", options)
    if opts is not None and not isinstance(opts, Mapping):
        raise ConfigError(f"aggregation 'options' must be a mapping, got {opts!r}")
    imp = spec.get("importance", importance)
    agg: Aggregation
    if spec.get("server_data", True):
        if "scope" in spec:
            raise ConfigError("aggregation key 'scope' says whose statistics a merge uses: give it with "
                              "'server_data': false")
        agg = MethodAggregation(spec["method"], opts, imp, spec.get("label"))
    else:
        agg = StatisticsAggregation(spec["method"], opts, imp, spec.get("label"), spec.get("scope"))
    return ClassShareWeighting(agg) if spec.get("class_shares", False) else agg
