"""Fusion with no data on the server: the level-wise statistics protocol over a Flower grid.

Level-wise closed-form fusion (kf-linear, hf-linear) reads the data only through additive
statistics (:class:`neurofuse.approximation.LinearStats`; :mod:`neurofuse.stats`): at level
:math:`\\ell` the Gram and cross moments of the fused model's level inputs and the base models'
level outputs.  So the server can fuse without a sample of its own:

1. (only for an attribution importance score) every client returns the importance sums of
   every base model on its labelled data (:class:`neurofuse.stats.ImportanceSums`);
2. for each level :math:`\\ell = 0..L-1`, one round: the server sends every client model and the
   fused model so far (its levels :math:`< \\ell` are final), each client streams its own data
   through them and returns only the level's statistics (``LinearStats.state()``); the server
   merges them (:meth:`~neurofuse.stats.AdditiveStats.merge`), groups the level's neurons and
   solves the level (:meth:`neurofuse.methods.LinearFusion.solve_level`) and moves on.

``L`` levels take ``L`` rounds (``L + 1`` with importance); no sample leaves a client.  The fused
model equals fusing centrally on the union of the clients' data, up to the order of
floating-point sums.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from .._fusion_set import FusionSet
from ..approximation import LinearStats
from ..errors import ConfigError, NeurofuseError
from ..importance import importance_sums
from ..methods import FusionMethod, get_method, list_methods
from ..stats import ImportanceSums
from ._records import (client_name, config_json, model_from_records, model_to_record, record_bytes,
                       state_from_record, state_to_record)

__all__ = ["LEVEL_QUERY", "IMPORTANCE_QUERY", "answer_level_query", "fuse_by_levels", "level_methods",
           "statistics_methods"]

log = logging.getLogger("neurofuse")

#: message types of the protocol (Flower's ``"query.<action>"`` form)
LEVEL_QUERY = f"{MessageType.QUERY}.level_stats"
IMPORTANCE_QUERY = f"{MessageType.QUERY}.importance_sums"


def level_methods() -> List[str]:
    """Methods that can fuse with no data on the server from additive level statistics."""
    return [n for n in list_methods() if get_method(n).supports_statistics]


def statistics_methods() -> List[str]:
    """Methods that can fuse with no data on the server: from additive level statistics
    (:func:`fuse_by_levels`) or from each model's additive statistics
    (:func:`neurofuse.federated.merge_by_statistics`)."""
    return [n for n in list_methods()
            if get_method(n).supports_statistics or get_method(n).supports_model_statistics]


def data_free_methods() -> List[str]:
    """Methods that need no fusion data at all."""
    return [n for n in list_methods() if not get_method(n).needs_data]


def _method(name: str) -> type:
    cls = get_method(name)
    if not cls.supports_statistics:
        raise ConfigError(
            f"method {name!r} cannot fuse level by level without server data (it needs the samples "
            f"themselves); with no data on the server use one of {statistics_methods()}, or one of "
            f"{data_free_methods()}, which need no data")
    return cls


def _jsonable(options: Mapping[str, Any]) -> str:
    def conv(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, torch.Tensor):
            return v.tolist()
        return v

    return json.dumps({k: conv(v) for k, v in options.items()}, sort_keys=True)


def _base_content(models: Sequence[nn.Module], method: str, importance: str,
                  options: Mapping[str, Any]) -> Dict[str, Any]:
    recs: Dict[str, Any] = {f"model-{i}": model_to_record(m) for i, m in enumerate(models)}
    cfg = {"method": method, "importance": importance, "options": _jsonable(options),
           "models": [config_json(m) for m in models]}
    return {"records": recs, "config": cfg}


def _send(grid: Any, nodes: Sequence[int], content: Callable[[int], RecordDict], message_type: str,
          timeout: Optional[float], group: str) -> "tuple[List[Message], int, int]":
    msgs = []
    sent = 0
    for node in nodes:
        rd = content(int(node))
        sent += record_bytes(rd)
        msgs.append(Message(content=rd, message_type=message_type, dst_node_id=int(node), group_id=group))
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    ok: List[Message] = []
    received = 0
    for r in replies:
        if r.has_error():
            log.warning("%s failed in %s (%s); its data is left out of the fusion", client_name(r),
                        message_type, r.error.reason)
            continue
        received += record_bytes(r.content)
        ok.append(r)
    if not ok:
        raise NeurofuseError(f"no client answered the {message_type} round: cannot fuse without data")
    return ok, sent, received


def check_one_pass(fusion: Any, fused: Any) -> None:
    """Refuse (``ConfigError``) models with a level that one round of level statistics does not
    carry: one fitted layer by layer (a residual block, a depthwise convolution, a concatenation)
    or stage by stage (a transformer level)."""
    stepped = [lvl for lvl in range(fused.num_levels) if not fusion.one_pass(fused.levels[lvl])]
    if stepped:
        raise ConfigError(
            f"level {stepped[0]} of these models is fitted one layer at a time (a residual block, a "
            "depthwise convolution, a concatenation, a LayerNorm after or before a Linear, or a "
            "transformer "
            "block), which one round of level "
            "statistics per level does not carry; fuse them where the fusion data is, or aggregate "
            "with 'fedavg'")


def check_statistics_fusion(models: Sequence[nn.Module], method: str, importance: str = "uniform",
                            options: Optional[Mapping[str, Any]] = None) -> None:
    """What :func:`fuse_by_levels` checks before its first query, without a query: a method with
    no statistics protocol or models it cannot carry raise ``ConfigError``."""
    cls = _method(method)
    opts = dict(options or {})
    width = opts.pop("width", None)
    fusion: Any = cls(importance=importance, width=width, progress=False, **opts)
    _, fused, _ = fusion.setup(fusion.Run(fusion, [m.cpu().eval() for m in models], None))
    check_one_pass(fusion, fused)


def fuse_by_levels(grid: Any, nodes: Sequence[int], models: Sequence[nn.Module], method: str = "kf-linear",
                   importance: str = "uniform", seed: int = 0, options: Optional[Mapping[str, Any]] = None,
                   timeout: Optional[float] = None, round_tag: str = "") -> "tuple[nn.Module, Dict[str, Any]]":
    """Fuse ``models`` level by level from statistics that the clients ``nodes`` compute.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        Where the queries go (a simulation's grid, a deployment's, or :class:`LocalGrid`).
    nodes : sequence of int
        Node ids of the clients whose data the fusion uses.
    models : sequence of nn.Module
        The client models (zoo models); the fused model has model 0's architecture.
    method : str
        A closed-form level-wise method (:func:`level_methods`).
    importance : str
        ``"uniform"``, or an attribution score computed by the clients on their own labelled data.
    seed : int
        Seed of the grouping.
    options : mapping, optional
        The method's options (``n_init``, ``width``, ``class_weights``...).
    timeout : float, optional
        Seconds to wait for the replies of one round.

    Returns
    -------
    (nn.Module, dict)
        The fused model and the protocol's cost: ``rounds``, ``bytes_sent``, ``bytes_received``.
    """
    cls = _method(method)
    opts = dict(options or {})
    width = opts.pop("width", None)
    fusion: Any = cls(importance=importance, width=width, seed=seed, progress=False, **opts)
    models = [m.cpu().eval() for m in models]
    run = fusion.Run(fusion, models, None)
    nets, fused, widths = fusion.setup(run)
    check_one_pass(fusion, fused)
    base = _base_content(models, method, importance, {**opts, **({"width": width} if width is not None else {})})
    cost = {"rounds": 0, "bytes_sent": 0, "bytes_received": 0}

    def content(extra: Dict[str, Any], records: Optional[Dict[str, ArrayRecord]] = None) -> Callable[[int], RecordDict]:
        def make(_node: int) -> RecordDict:
            rd = RecordDict({**base["records"], **(records or {})})
            rd["config"] = ConfigRecord({**base["config"], **extra})
            return rd
        return make

    def account(sent: int, received: int) -> None:
        cost["rounds"] += 1
        cost["bytes_sent"] += sent
        cost["bytes_received"] += received

    if importance == "uniform":
        for net in nets:
            s = ImportanceSums(net.num_levels)
            s.update([torch.ones(w, dtype=torch.float64) for w in net.level_widths()], 1)
            run.set_importance_scores(net, s.scores())
    else:
        replies, sent, received = _send(grid, nodes, content({}), IMPORTANCE_QUERY, timeout,
                                        f"{round_tag}importance")
        account(sent, received)
        for i, net in enumerate(nets):
            total: Optional[ImportanceSums] = None
            for r in replies:
                s = ImportanceSums.from_state(state_from_record(r.content["stats"], f"m{i}/"))
                total = s if total is None else total.merge(s)
            assert total is not None
            run.set_importance_scores(net, total.scores())
    for lvl in range(fused.num_levels):
        fused_rec = model_to_record(fused)
        replies, sent, received = _send(grid, nodes, content({"level": lvl}, {"fused": fused_rec}),
                                        LEVEL_QUERY, timeout, f"{round_tag}level-{lvl}")
        account(sent, received)
        stats: Optional[LinearStats] = None
        for r in replies:
            s = LinearStats.from_state(state_from_record(r.content["stats"]))
            stats = s if stats is None else stats.merge(s)
        assert stats is not None
        fusion.solve_level(run, lvl, nets, fused, stats, widths[lvl])
        log.info("level %d solved from %d clients' statistics (%d rows)", lvl, len(replies), stats.rows)
    return fused.eval(), cost


def _client_fusion(cfg: ConfigRecord, content: RecordDict) -> "tuple[FusionMethod, list, nn.Module, list]":
    method = str(cfg["method"])
    opts = json.loads(str(cfg["options"]))
    width = opts.pop("width", None)
    cls = _method(method)
    fusion: Any = cls(importance="uniform", width=width, progress=False, **opts)
    models = [model_from_records(content[f"model-{i}"], ConfigRecord({"model": c}), who=f"model {i}")
              for i, c in enumerate(cfg["models"])]  # type: ignore[arg-type]
    nets, fused, widths = fusion.setup(fusion.Run(fusion, models, None))
    return fusion, nets, fused, widths


def answer_level_query(message: Message, data: FusionSet) -> RecordDict:
    """A client's reply to a query of this protocol, computed on its own ``data`` (which never
    leaves).

    ``query.level_stats``: the level's :class:`~neurofuse.approximation.LinearStats` state;
    ``query.importance_sums``: every model's :class:`~neurofuse.stats.ImportanceSums` state.
    """
    kind = message.metadata.message_type
    content = message.content
    cfg = content["config"]
    fusion, nets, fused, _ = _client_fusion(cfg, content)
    if kind == IMPORTANCE_QUERY:
        imp = str(cfg["importance"])
        if data.y is None:
            raise NeurofuseError(f"importance {imp!r} needs labels, and this client's data has none")
        out: Dict[str, torch.Tensor] = {}
        for i, net in enumerate(nets):
            sums, n = importance_sums(net, data, imp)
            s = ImportanceSums(len(sums))
            s.update(sums, n)
            out.update({f"m{i}/{k}": v for k, v in s.state().items()})
        stats_rec = state_to_record(out)
    elif kind == LEVEL_QUERY:
        fused.load_state_dict(content["fused"].to_torch_state_dict())
        lvl = int(cfg["level"])
        with torch.no_grad(), fusion.stream(data, 1 + len(nets)) as stream:
            for prev in range(lvl):
                stream.advance({0: fused.levels[prev], **{i: m.levels[prev] for i, m in enumerate(nets, 1)}})
            stats = fusion.level_statistics(lvl, nets, fused, stream)
        stats_rec = state_to_record(stats.state())
    else:
        raise ConfigError(f"unknown query {kind!r}")
    return RecordDict({"stats": stats_rec, "metrics": MetricRecord({"num-examples": len(data)})})
