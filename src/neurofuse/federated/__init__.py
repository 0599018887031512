"""Federated fusion with Flower (``pip install "neurofuse[federated]"``).

Flower's message API (flwr 1.42): :class:`FusionStrategy` subclasses
``flwr.serverapp.strategy.FedAvg`` and aggregates the clients' models with an :class:`Aggregation`:
a neurofuse method on the server's fusion set (:class:`MethodAggregation`), or a mode that wraps
or specialises one (:class:`StatisticsAggregation`: no data on the server, from the clients'
additive statistics, level by level (:func:`fuse_by_levels`) or per model for RegMean and Fisher
merging (:func:`merge_by_statistics`); :class:`ClassShareWeighting`: class-share
weights from the clients' label counts).  :func:`make_client_app` builds the ``ClientApp`` of zoo
models trained on a partition; :func:`run_federated` runs it all in Flower's simulation or
in-process.

>>> from neurofuse.federated import FusionStrategy            # doctest: +SKIP
>>> strategy = FusionStrategy("kf-linear", server_data=x_server, eval_data=(x_test, y_test))
>>> strategy.start(grid, num_rounds=1)                        # in a ServerApp's main
>>> no_data = FusionStrategy(ClassShareWeighting(StatisticsAggregation("kf-linear")))
"""

from ._flwr import FLOWER_ENV, require_flwr

require_flwr()

from ._data import ClientSetup, client_data, client_parts, dirichlet_alpha_split  # noqa: E402
from ._levels import IMPORTANCE_QUERY, LEVEL_QUERY, fuse_by_levels, level_methods, statistics_methods  # noqa: E402
from ._merge import MODEL_STATS_QUERY, answer_model_stats, merge_by_statistics, merge_methods  # noqa: E402
from ._queries import answer_query  # noqa: E402
from ._local import LocalGrid  # noqa: E402
from ._records import config_json, model_from_records, model_to_record, record_bytes  # noqa: E402
from ._aggregation import (Aggregation, ClassShareWeighting, ClientModel, MethodAggregation,  # noqa: E402
                           RoundContext, StatisticsAggregation, aggregation_from_spec)
from ._strategy import FusionStrategy, TooFewClientsError, labels_needed  # noqa: E402
from ._client import make_client_app  # noqa: E402
from ._run import (BACKENDS, INITS, REFERENCES, FederatedConfig, format_table, gap_closed,  # noqa: E402
                   make_server_app, plot_rounds, run_federated, run_local, simulate)

__all__ = [
    "Aggregation",
    "BACKENDS",
    "ClassShareWeighting",
    "ClientModel",
    "ClientSetup",
    "FLOWER_ENV",
    "FederatedConfig",
    "FusionStrategy",
    "IMPORTANCE_QUERY",
    "INITS",
    "LEVEL_QUERY",
    "LocalGrid",
    "MODEL_STATS_QUERY",
    "MethodAggregation",
    "REFERENCES",
    "RoundContext",
    "StatisticsAggregation",
    "TooFewClientsError",
    "aggregation_from_spec",
    "answer_model_stats",
    "answer_query",
    "client_data",
    "client_parts",
    "config_json",
    "dirichlet_alpha_split",
    "format_table",
    "fuse_by_levels",
    "gap_closed",
    "labels_needed",
    "level_methods",
    "make_client_app",
    "make_server_app",
    "merge_by_statistics",
    "merge_methods",
    "model_from_records",
    "model_to_record",
    "plot_rounds",
    "record_bytes",
    "require_flwr",
    "run_federated",
    "run_local",
    "simulate",
    "statistics_methods",
]
