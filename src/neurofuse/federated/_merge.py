"""Merging with no data on the server: each model's additive statistics from the clients' data.

RegMean and Fisher merging (:class:`neurofuse.methods.StatisticsMerge`) read the data only through
one additive statistic per model: the Gram matrices :math:`X^\top X` of every linear layer's
inputs (:class:`neurofuse.approximation.LayerGrams`), the sums of squared per-sample gradients
(:class:`neurofuse.approximation.FisherSums`).  The server prepares the models (as they are, or
aligned onto model 0 by weight matching, which needs no data), one query round
(``query.model_stats``) brings their statistics, and the server merges
(:meth:`~neurofuse.methods.StatisticsMerge.merge`).  No sample leaves a client.  Two scopes
(:data:`SCOPES`):

``"own"`` (default)
    every client returns the statistics of *its own* model on its own data (the server sends it
    only that model): the methods as their papers and federated uses define them (RegMean's
    Gram matrices and Fisher merging's Fisher on each model's own training data, FedFisher's
    and RegMean-for-FL's client statistics), each model weighted by its client's sample count;
``"all"``
    every client returns the statistics of *every* model on its data (the server sends all of
    them) and the server adds them up (:meth:`~neurofuse.stats.AdditiveStats.merge`): the merge a
    server holding the union of the clients' data would compute (equal to the method run
    centrally on that union, up to the order of floating-point sums), as kf-linear's level
    protocol does.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from .._fusion_set import FusionSet
from ..errors import ConfigError
from ..methods import get_method, list_methods
from ._levels import _base_content, _send
from ._records import model_from_records, state_from_record, state_to_record

__all__ = ["MODEL_STATS_QUERY", "SCOPES", "answer_model_stats", "merge_by_statistics", "merge_methods"]

log = logging.getLogger("neurofuse")

#: message type of the protocol (Flower's ``"query.<action>"`` form)
MODEL_STATS_QUERY = f"{MessageType.QUERY}.model_stats"
#: whose statistics a model is merged with: its own client's data, or every client's
SCOPES = ("own", "all")


def merge_methods() -> List[str]:
    """Methods that merge from additive statistics of each model (no server data)."""
    return [n for n in list_methods() if get_method(n).supports_model_statistics]


def _merger(method: str, options: Mapping[str, Any], seed: int = 0) -> Any:
    cls = get_method(method)
    if not cls.supports_model_statistics:
        raise ConfigError(f"method {method!r} does not merge from per-model statistics; use one of {merge_methods()}")
    fusion = cls(seed=seed, progress=False, **dict(options))
    fusion.check_statistics_only()
    return fusion


def merge_by_statistics(grid: Any, nodes: Sequence[int], models: Sequence[nn.Module], method: str = "regmean",
                        seed: int = 0, options: Optional[Mapping[str, Any]] = None,
                        timeout: Optional[float] = None, round_tag: str = "",
                        scope: str = "own") -> "tuple[nn.Module, Dict[str, Any]]":
    """Merge ``models`` from the statistics that the clients ``nodes`` compute on their data.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        Where the query goes (a simulation's grid, a deployment's, or :class:`LocalGrid`).
    nodes : sequence of int
        Node ids of the clients whose data the merge uses; with ``scope="own"``, ``nodes[i]``
        trained ``models[i]``.
    models : sequence of nn.Module
        The client models (zoo models of one architecture).
    method : str
        A method of :func:`merge_methods` (``"regmean"``, ``"fisher"``, their ``-aligned``
        forms with ``align="weights"``).
    seed : int
        Seed of the method (weight matching's).
    options : mapping, optional
        The method's options.
    timeout : float, optional
        Seconds to wait for the replies.
    scope : str
        ``"own"`` or ``"all"`` (see the module notes).  With ``"own"``, a model whose client does
        not answer is left out of the merge.

    Returns
    -------
    (nn.Module, dict)
        The merged model and the protocol's cost: ``rounds``, ``bytes_sent``, ``bytes_received``.
    """
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "own" and len(nodes) != len(models):
        raise ConfigError(f"scope='own' pairs every model with the client that trained it: got {len(models)} "
                          f"models and {len(nodes)} clients")
    opts = dict(options or {})
    fusion = _merger(method, opts, seed)
    run = fusion.Run(fusion, [m.cpu().eval() for m in models], None)
    nets = fusion.merge_inputs(run)
    index = {int(n): i for i, n in enumerate(nodes)}
    every = _base_content(nets, method, "uniform", opts)
    own = [_base_content([net], method, "uniform", opts) for net in nets] if scope == "own" else []

    def content(node: int) -> RecordDict:
        base = own[index[node]] if own else every
        rd = RecordDict(dict(base["records"]))
        rd["config"] = ConfigRecord(dict(base["config"]))
        return rd

    replies, sent, received = _send(grid, nodes, content, MODEL_STATS_QUERY, timeout, f"{round_tag}model-stats")
    if scope == "own":
        answered = {index[int(r.metadata.src_node_id)]: r for r in replies}
        kept = sorted(answered)
        if len(kept) < len(nets):
            log.warning("%s: models %s left out of the merge (their clients sent no statistics)", method,
                        sorted(set(range(len(nets))) - set(kept)))
        nets = [nets[i] for i in kept]
        stats = [fusion.ModelStats.from_state(state_from_record(answered[i].content["stats"], "m0/"))
                 for i in kept]
    else:
        stats = []
        for i in range(len(nets)):
            total = None
            for r in replies:
                s = fusion.ModelStats.from_state(state_from_record(r.content["stats"], f"m{i}/"))
                total = s if total is None else total.merge(s)
            stats.append(total)
    if not nets:
        raise ConfigError(f"{method}: no model is left to merge")
    merged = fusion.merge(run, nets, stats)
    log.info("%s merged from %d clients' statistics (scope %s)", method, len(replies), scope)
    return merged.eval(), {"rounds": 1, "bytes_sent": sent, "bytes_received": received}


def answer_model_stats(message: Message, data: FusionSet) -> RecordDict:
    """A client's reply to ``query.model_stats``: every model's statistics over its own ``data``
    (which never leaves)."""
    content = message.content
    cfg = content["config"]
    fusion = _merger(str(cfg["method"]), json.loads(str(cfg["options"])))
    out: Dict[str, Any] = {}
    for i, c in enumerate(cfg["models"]):  # type: ignore[arg-type]
        net = model_from_records(content[f"model-{i}"], ConfigRecord({"model": c}), who=f"model {i}")
        out.update({f"m{i}/{k}": v for k, v in fusion.model_statistics(net, data).state().items()})
    return RecordDict({"stats": state_to_record(out), "metrics": MetricRecord({"num-examples": len(data)})})
