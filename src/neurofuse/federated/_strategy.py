"""``FusionStrategy``: a Flower strategy that fuses the clients' models instead of averaging them.

A subclass of Flower's message-API ``FedAvg`` (``flwr.serverapp.strategy.FedAvg``, flwr 1.42) that
overrides ``aggregate_train``: the replies' models are rebuilt from the zoo config each client
sends (or a ``model_factory``), checked (failed replies, NaN/inf weights and incompatible models
are left out with a warning naming the client) and handed to an
:class:`~neurofuse.federated.Aggregation` (:mod:`neurofuse.federated._aggregation`): a neurofuse
method on the server's fusion set (``vanilla`` weighted by the clients' sample counts is FedAvg),
the same from the clients' statistics with no server data, or either weighted by class shares.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.result import Result
from torch import nn

from .._fusion_set import FusionSet, as_fusion_set
from ..errors import ConfigError, DataError, IncompatibleModelsError, NeurofuseError
from ..levels import check_same_levels
from ..methods import get_method
from ..models import build_model
from ..training import evaluate
from ._aggregation import Aggregation, AggregationSpec, ClientModel, RoundContext, aggregation_from_spec
from ._records import ModelFactory, client_name, config_json, model_from_records, model_to_record, record_bytes

__all__ = ["FusionStrategy", "TooFewClientsError", "labels_needed"]

log = logging.getLogger("neurofuse")


class TooFewClientsError(NeurofuseError):
    """Fewer usable client replies than the strategy's minimum."""


def labels_needed(method: str, importance: str) -> Optional[str]:
    """Why fusing with ``method`` / ``importance`` needs a *labelled* server fusion set, or None.

    Only the attribution importance scores (``conductance``, ``deeplift``: the attribution target
    is the true class) read labels; every fusion method itself, and FedDF-style distillation,
    uses the inputs alone.
    """
    get_method(method)
    if importance != "uniform":
        return f"importance {importance!r} attributes each sample to its true label"
    return None


def _signature(model: nn.Module) -> Tuple[Any, ...]:
    """What models must share to be fused level-wise (level count, axes, input, classes)."""
    return (getattr(model, "num_levels", None), tuple(getattr(model, "axes", ()) or ()),
            tuple(getattr(model, "input_shape", ()) or ()), getattr(model, "num_classes", None))


def _shapes(model: nn.Module) -> Tuple[Any, ...]:
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


class FusionStrategy(FedAvg):
    """Flower strategy whose aggregation is a neurofuse fusion.

    Parameters
    ----------
    aggregation : str or Aggregation
        A registered fusion method (``neurofuse.methods()``), fused on ``server_data`` with
        ``options`` and ``importance`` (``"vanilla"``, weighted by the clients' sample counts, is
        FedAvg), or an :class:`~neurofuse.federated.Aggregation` (a mode:
        :class:`~neurofuse.federated.StatisticsAggregation` fuses from the clients' statistics
        with no server data, :class:`~neurofuse.federated.ClassShareWeighting` wraps one).
    options : mapping, optional
        The method's options (``n_init``...), with a method name.
    importance : str
        Importance score, with a method name.
    server_data : tensor, (x, y) pair or FusionSet, optional
        The server's fusion set; inputs alone (unlabelled) suffice unless
        :func:`labels_needed` says otherwise.  Only for aggregations that fuse on server data.
    eval_data : (x, y) pair, optional
        Labelled data the server scores the fused model on after every round.
    model_factory : callable, optional
        Builds a client's (untrained) model from the ``ConfigRecord`` of its reply; default:
        :func:`neurofuse.models.build_model` of the zoo config JSON in ``config["model"]``.
    architecture : mapping, optional
        A zoo config whose level widths the fused model takes (methods with ``width``); default:
        the first client's architecture (clients are ordered by node id).
    compare : sequence
        Aggregations that also aggregate every round's replies, for the metrics only
        (``accuracy-<label>``); method names, :class:`~neurofuse.federated.Aggregation` objects
        or config mappings (:func:`~neurofuse.federated.aggregation_from_spec`).  The broadcast
        model is ``aggregation``'s.  Comparisons use default options.
    initial_model : nn.Module, optional
        The model sent in round 1 (its weights are the ``initial_arrays`` of :meth:`start`; its
        architecture travels in the train config, so clients rebuild it).
    seed : int
        Seed of the fusion.
    fusion_batch_size : int
        Rows per batch when the server streams its fusion set.
    **fedavg
        ``FedAvg`` arguments: ``fraction_train``, ``min_train_nodes`` (the minimum of usable
        replies), ``min_available_nodes``, ``weighted_by_key``, ... (``fraction_evaluate``
        defaults to 0: the server evaluates).

    Attributes
    ----------
    history : list of dict
        One entry per round: the metrics returned and the per-client notes.
    fused_model : nn.Module or None
        The last round's fused model.
    """

    def __init__(self, aggregation: Union[str, Aggregation] = "kf-linear", *,
                 options: Optional[Mapping[str, Any]] = None, importance: str = "uniform",
                 server_data: Any = None, eval_data: Any = None, model_factory: Optional[ModelFactory] = None,
                 architecture: Optional[Mapping[str, Any]] = None, compare: Sequence[AggregationSpec] = (),
                 initial_model: Optional[nn.Module] = None, seed: int = 0, fusion_batch_size: int = 256,
                 **fedavg: Any) -> None:
        fedavg.setdefault("fraction_evaluate", 0.0)
        super().__init__(**fedavg)
        if isinstance(aggregation, Aggregation) and (options or importance != "uniform"):
            raise ConfigError("give options and importance to the Aggregation itself, not to the strategy")
        self.aggregation = aggregation_from_spec(aggregation, options=options, importance=importance)
        comps = [aggregation_from_spec(c) for c in compare]
        self.compare = [c for c in comps if c.label != self.aggregation.label]
        self.model_factory = model_factory
        self.seed = int(seed)
        self.server_data: Optional[FusionSet] = None
        everything = [self.aggregation, *self.compare]
        if server_data is not None:
            self.server_data = as_fusion_set(server_data, fusion_batch_size)
            for agg in everything:
                why = labels_needed(agg.method, agg.importance) if agg.needs_server_data else None
                if why and self.server_data.y is None:
                    raise DataError(
                        f"{why}, but the server's fusion set has no labels: give it labels (x, y), use "
                        "importance='uniform', or fuse from the clients' statistics "
                        "(StatisticsAggregation: the clients compute the importance on their own "
                        "labelled data)")
        needs_server = [a.label for a in everything if a.needs_server_data]
        if needs_server and self.server_data is None:
            from ._levels import statistics_methods

            raise DataError(
                f"aggregation(s) {needs_server} fuse on a server fusion set: pass server_data=(x[, y]) "
                f"(a few hundred samples), or fuse from the clients' statistics with one of "
                f"{statistics_methods()}")
        self.eval_data = None
        if eval_data is not None:
            fs = as_fusion_set(eval_data)
            if fs.y is None:
                raise DataError("eval_data needs labels: pass (x, y)")
            self.eval_data = (fs.x, fs.y)
        self.width = None
        if architecture is not None:
            if not get_method(self.aggregation.method).supports_width:
                raise ConfigError(f"method {self.aggregation.method!r} keeps the first client's architecture; "
                                  "architecture= needs a method that chooses widths (e.g. kf-linear)")
            self.width = build_model(architecture).level_widths()[:-1]
        self.initial_model = initial_model
        self.global_config: Optional[str] = None if initial_model is None else config_json(initial_model)
        self.grid: Optional[Grid] = None
        self.timeout: Optional[float] = None
        self.history: List[Dict[str, Any]] = []
        self.fused_model: Optional[nn.Module] = None
        self._sent: Dict[int, int] = {}

    @property
    def method(self) -> str:
        """The fusion method of the main aggregation."""
        return self.aggregation.method

    # -- the round loop ---------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: Optional[ArrayRecord] = None, num_rounds: int = 1,
              timeout: float = 3600, train_config: Optional[ConfigRecord] = None,
              evaluate_config: Optional[ConfigRecord] = None, evaluate_fn: Any = None) -> Result:
        """Flower's round loop (``Strategy.start``), keeping ``grid`` for the no-server-data rounds.

        ``initial_arrays`` defaults to the weights of ``initial_model``, or to an empty record:
        then every client starts round 1 from its own initialisation.
        """
        self.grid = grid
        self.timeout = timeout
        if initial_arrays is None:
            initial_arrays = ArrayRecord() if self.initial_model is None else model_to_record(self.initial_model)
        return super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                             train_config=train_config, evaluate_config=evaluate_config,
                             evaluate_fn=evaluate_fn)

    def summary(self) -> None:
        super().summary()
        log.info("FusionStrategy: %s, %s", self.aggregation.label,
                 f"server fusion set of {len(self.server_data)} samples" if self.server_data else "no server data")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's messages, with the global model's architecture in ``config["model"]`` (clients
        of any width rebuild it and continue from it)."""
        config = ConfigRecord(dict(config))
        if self.global_config is not None and len(arrays) > 0:
            config["model"] = self.global_config
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self._sent[server_round] = sum(record_bytes(m.content) for m in msgs)
        return msgs

    # -- aggregation --------------------------------------------------------------------------
    def _usable(self, replies: List[Message]) -> Tuple[List[ClientModel], List[str]]:
        usable: List[ClientModel] = []
        dropped: List[str] = []
        for msg in replies:
            who = client_name(msg)
            if msg.has_error():
                log.warning("%s failed (%s); left out of round", who, msg.error.reason)
                dropped.append(f"{who}: failed ({msg.error.reason})")
                continue
            content = msg.content
            try:
                arrays = content.array_records.get(self.arrayrecord_key)
                if arrays is None or len(arrays) == 0:
                    raise IncompatibleModelsError(f"{who} sent no model weights")
                config = content.config_records.get(self.configrecord_key)
                model = model_from_records(arrays, config, self.model_factory, who)
                metrics = content.metric_records.get("metrics")
                n = float(metrics[self.weighted_by_key]) if metrics and self.weighted_by_key in metrics else 1.0
                if not np.isfinite(n) or n <= 0:
                    raise IncompatibleModelsError(f"{who} reports {n} examples")
                counts = None if config is None else config.get("label-counts")
            except NeurofuseError as exc:
                log.warning("%s left out: %s", who, exc)
                dropped.append(f"{who}: {exc}")
                continue
            usable.append(ClientModel(who, int(msg.metadata.src_node_id), model, n,
                                      [int(c) for c in counts] if isinstance(counts, list) else None))
        usable.sort(key=lambda u: u.node_id)
        if len(usable) > 1:
            # the architecture most clients share is the reference (ties: the first client's)
            same_shapes = get_method(self.method).same_architecture
            key = _shapes if same_shapes else _signature
            common = Counter(key(u.model) for u in usable).most_common(1)[0][0]
            ref = next(u for u in usable if key(u.model) == common)
            kept = []
            for u in usable:
                try:
                    if key(u.model) != common:
                        what = "the same weights and shapes (FedAvg)" if same_shapes else \
                            "the same levels, neuron axes, input shape and classes"
                        raise IncompatibleModelsError(f"its model does not have {what} as {ref.who}'s")
                    if not same_shapes and u is not ref:
                        check_same_levels([ref.model, u.model])
                except IncompatibleModelsError as exc:
                    log.warning("%s left out: incompatible with the other clients: %s", u.who, exc)
                    dropped.append(f"{u.who}: incompatible ({exc})")
                    continue
                kept.append(u)
            usable = kept
        return usable, dropped

    def _context(self, server_round: int) -> RoundContext:
        return RoundContext(server_round, self.server_data, self.grid, self.seed, self.timeout, self.width)

    def _accuracy(self, model: nn.Module) -> Optional[float]:
        if self.eval_data is None:
            return None
        return float(evaluate(model, *self.eval_data)["accuracy"])

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Fuse the usable replies' models with ``method``; return the fused weights and the
        round's metrics (``fusion-seconds``, ``server-accuracy``, ``bytes-received``,
        ``bytes-sent``, ``clients-used``, ``clients-dropped``, ``accuracy-<compare>``).

        Raises
        ------
        TooFewClientsError
            If fewer replies than ``min_train_nodes`` are usable.
        """
        replies = list(replies)
        usable, dropped = self._usable(replies)
        need = max(1, int(self.min_train_nodes), get_method(self.method).min_models)
        if len(usable) < need:
            raise TooFewClientsError(
                f"round {server_round}: {len(usable)} usable client replies of {len(replies)}, fewer "
                f"than the minimum {need} (min_train_nodes); left out: {dropped or 'none'}")
        received = sum(record_bytes(m.content) for m in replies if not m.has_error())
        ctx = self._context(server_round)
        start = time.perf_counter()
        fused, cost = self.aggregation.aggregate(usable, ctx)
        seconds = time.perf_counter() - start
        self.fused_model = fused
        self.global_config = config_json(fused) if hasattr(fused, "config") else None
        metrics: Dict[str, Any] = {
            "fusion-seconds": seconds,
            "bytes-received": int(received + cost.get("bytes_received", 0)),
            "bytes-sent": int(self._sent.get(server_round, 0) + cost.get("bytes_sent", 0)),
            "clients-used": len(usable),
            "clients-dropped": len(dropped),
            "num-examples": int(sum(u.num_examples for u in usable)),
        }
        if cost:
            metrics["protocol-rounds"] = int(cost["rounds"])
        acc = self._accuracy(fused)
        if acc is not None:
            metrics["server-accuracy"] = acc
        for other in self.compare:
            try:
                m, other_cost = other.aggregate(usable, ctx)
                a = self._accuracy(m)
                if a is not None:
                    metrics[f"accuracy-{other.label}"] = a
                if other_cost:  # the no-server-data protocol of a comparison: its traffic apart
                    metrics[f"bytes-sent-{other.label}"] = int(other_cost["bytes_sent"])
                    metrics[f"bytes-received-{other.label}"] = int(other_cost["bytes_received"])
            except NeurofuseError as exc:
                log.warning("round %d: comparison %r skipped: %s", server_round, other.label, exc)
        self.history.append({"round": server_round, **metrics, "dropped": dropped,
                             "clients": [u.who for u in usable]})
        log.info("round %d: fused %d client models with %s in %.2f s%s", server_round, len(usable),
                 self.aggregation.label, seconds, "" if acc is None else f", server accuracy {acc:.4f}")
        return model_to_record(fused), MetricRecord(metrics)
