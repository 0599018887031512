"""Federated fusion with Flower (``pip install "neurofuse[federated]"``).

Flower's message API (flwr 1.42): :class:`FusionStrategy` subclasses
``flwr.serverapp.strategy.FedAvg`` and aggregates the clients' models with any neurofuse method;
:func:`fuse_by_levels` fuses with no data on the server, level by level from the clients'
additive statistics; :func:`make_client_app` builds the ``ClientApp`` of zoo models trained on a
partition; :func:`run_federated` runs it all in Flower's simulation or in-process.

>>> from neurofuse.federated import FusionStrategy            # doctest: +SKIP
>>> strategy = FusionStrategy("kf-linear", server_data=x_server, eval_data=(x_test, y_test))
>>> strategy.start(grid, num_rounds=1)                        # in a ServerApp's main
"""

from ._flwr import FLOWER_ENV, require_flwr

require_flwr()

from ._data import ClientSetup, client_data, client_parts, dirichlet_alpha_split  # noqa: E402
from ._levels import IMPORTANCE_QUERY, LEVEL_QUERY, answer_query, fuse_by_levels, level_methods  # noqa: E402
from ._local import LocalGrid  # noqa: E402
from ._records import config_json, model_from_records, model_to_record, record_bytes  # noqa: E402
from ._strategy import FusionStrategy, TooFewClientsError, labels_needed  # noqa: E402
from ._client import make_client_app  # noqa: E402
from ._run import (BACKENDS, FederatedConfig, format_table, gap_closed, make_server_app,  # noqa: E402
                   plot_rounds, run_federated, run_local, simulate)

__all__ = [
    "BACKENDS",
    "ClientSetup",
    "FLOWER_ENV",
    "FederatedConfig",
    "FusionStrategy",
    "IMPORTANCE_QUERY",
    "LEVEL_QUERY",
    "LocalGrid",
    "TooFewClientsError",
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
    "model_from_records",
    "model_to_record",
    "plot_rounds",
    "record_bytes",
    "require_flwr",
    "run_federated",
    "run_local",
    "simulate",
]
