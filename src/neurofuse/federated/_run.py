"""Running a federated fusion: the ServerApp, the Ray simulation or the local grid, the results.

:func:`run_federated` is what ``neurofuse federate`` and the ``fl`` benchmark call: clients of a
:class:`ClientSetup` train on their partitions, a :class:`FusionStrategy` fuses their models every
round and scores the result on the test set, beside FedAvg and the output ensemble of the same
client models.  ``backend="simulation"`` runs Flower's simulation (Ray, one CPU per client,
offline, shut down afterwards); ``backend="local"`` runs the same ServerApp and ClientApp logic
in this process over a :class:`LocalGrid` (seconds instead of Ray's start-up, for small machines).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .._validate import check_choice, check_int, check_seed
from ..data import balanced_subset
from ..errors import ConfigError, NeurofuseError
from ..methods import get_method
from ..models import make_model
from ._client import make_client_app
from ._data import ClientSetup, _dataset
from ._local import LocalGrid
from ._aggregation import Aggregation, ClassShareWeighting, MethodAggregation, aggregation_from_spec
from ._strategy import FusionStrategy

__all__ = ["BACKENDS", "INITS", "REFERENCES", "FederatedConfig", "gap_closed", "make_server_app", "run_federated",
           "simulate", "run_local", "plot_rounds", "format_table"]

log = logging.getLogger("neurofuse")

BACKENDS = ("local", "simulation")
#: most federated rounds of one run
MAX_ROUNDS = 10_000
#: how the clients' first models start: ``"shared"``, one initial model the server sends (the
#: FL standard); ``"different"``, each client its own random initialisation (independently
#: trained models, neurofuse's case)
INITS = ("shared", "different")

#: the reference aggregations scored in every run, by role: FedAvg of the round's client models
#: (neurofuse's vanilla averaging weighted by the clients' sample counts) and their output ensemble
REFERENCES = (("fedavg", "vanilla"), ("ensemble", "ensemble"))
#: the row of FedAvg's own multi-round trajectory (``fedavg_run``)
FEDAVG_RUN = "fedavg-run"
#: rows that are references, not aggregations to compare with them
REFERENCE_ROWS = tuple(role for role, _ in REFERENCES) + (FEDAVG_RUN,)


def make_server_app(strategy: FusionStrategy, num_rounds: int, timeout: float = 3600) -> ServerApp:
    """A ``ServerApp`` whose main function runs ``strategy`` for ``num_rounds`` rounds."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid, num_rounds=num_rounds, timeout=timeout)

    return app


def run_local(server_app: ServerApp, client_app: ClientApp, num_clients: int) -> LocalGrid:
    """Run ``server_app`` against ``num_clients`` in-process clients (:class:`LocalGrid`)."""
    grid = LocalGrid(client_app, num_clients)
    server_app(grid, Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                             run_config={}))
    return grid


def simulate(server_app: ServerApp, client_app: ClientApp, num_clients: int, cpus_per_client: int = 1,
             num_cpus: Optional[int] = None) -> None:
    """Flower's simulation (``flwr.simulation.run_simulation``, Ray backend), offline.

    Telemetry, update checks and run-time dependency installation are off
    (:data:`neurofuse.federated.FLOWER_ENV`); each client gets ``cpus_per_client`` CPUs of
    ``num_cpus`` (default: all); Ray is shut down afterwards and the environment restored, so
    nothing is left running.
    """
    from flwr.simulation import run_simulation

    saved = os.environ.get("PYTHONPATH")  # Flower's Ray backend rewrites it for its workers
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
               "init_args": {"num_cpus": int(num_cpus or os.cpu_count() or 1), "include_dashboard": False,
                             "log_to_driver": False}}
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                       backend_config=backend)  # type: ignore[arg-type]
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """One federated run.

    Attributes
    ----------
    clients : ClientSetup
        Data, partition and local training of the clients.
    method : str
        The aggregation's fusion method (``"vanilla"`` is FedAvg).
    importance : str
        Importance score of the method.
    options : mapping
        The method's options.
    rounds : int
        Federated rounds (1: one-shot).
    no_server_data : bool
        Fuse from the clients' statistics (level by level, or per model for RegMean and Fisher
        merging), no server data.
    server_samples : int
        Size of the server's class-balanced fusion set (drawn from the training set).
    server_labels : bool
        Whether the server's fusion set has labels.
    class_shares : bool
        Weigh the clients' output neurons by their class shares, from the label counts each
        client sends (:class:`~neurofuse.federated.ClassShareWeighting`), where the method takes
        ``class_weights`` (kf-linear, hf-linear, kf-gradient, the ensemble; the other methods, FedAvg
        among them, fuse as they are).  On by default: on the validation protocol of
        ``benchmarks/recipe.py`` class shares beat plain kf-linear in 31 of 32 settings
        (docs/results.md, "The recipe, re-selected on validation").
    compare : sequence
        Aggregations of the same replies scored every round beside the method and the
        :data:`REFERENCES` (FedAvg, the ensemble): method names or mappings
        (:func:`~neurofuse.federated.aggregation_from_spec`, e.g. ``{"method": "kf-linear",
        "server_data": false, "class_shares": true}``).
    fedavg_run : bool
        With ``rounds > 1``, also run FedAvg for as many rounds (its own trajectory) for the
        comparison.
    backend : str
        ``"local"`` or ``"simulation"`` (Ray).
    seed : int
        Seed of the server's choices (initial model, fusion set, fusion).
    init : str
        ``"shared"``: round 1 sends every client one initial model (seeded by ``seed``);
        ``"different"``: round 1 sends none and every client starts from its own random
        initialisation (seeded by the clients' seed and its partition) (:data:`INITS`).
    """

    clients: ClientSetup = ClientSetup()
    method: str = "kf-linear"
    importance: str = "uniform"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rounds: int = 1
    no_server_data: bool = False
    server_samples: int = 400
    server_labels: bool = True
    class_shares: bool = True
    compare: Sequence[Any] = ()
    fedavg_run: bool = True
    backend: str = "local"
    seed: int = 0
    init: str = "shared"

    def __post_init__(self) -> None:
        from ..importance import importance_methods

        if not isinstance(self.clients, ClientSetup):
            raise ConfigError(f"clients must be a ClientSetup, got {type(self.clients).__name__}")
        check_choice(self.backend, "backend (--backend)", BACKENDS)
        check_choice(self.init, "init (--init)", INITS)
        check_int(self.rounds, "rounds (--rounds)", 1, MAX_ROUNDS)
        check_choice(self.importance, "importance (--importance)", importance_methods())
        check_int(self.server_samples, "server_samples (--server-samples)", 0)
        check_seed(self.seed)
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"options must be a mapping, got {type(self.options).__name__}")
        if isinstance(self.compare, (str, Mapping)):
            raise ConfigError(f"compare must be a list of aggregations, got {self.compare!r}")
        self.aggregation()   # an unknown method, or a mode that cannot work, fails here
        for c in self.compare:
            aggregation_from_spec(c)

    def aggregation(self) -> Aggregation:
        """The run's aggregation: the method, from the clients' statistics with
        ``no_server_data``, weighted by class shares with ``class_shares`` where the method takes
        ``class_weights``."""
        plain = aggregation_from_spec({"method": self.method, "server_data": not self.no_server_data,
                                       "importance": self.importance, "options": dict(self.options)})
        return ClassShareWeighting(plain) if self.class_shares and plain.takes_option("class_weights") else plain

    def check_fits(self) -> None:
        """The limits that need the dataset, checked before Flower starts."""
        self.clients.check_fits()
        n = len(_dataset(self.clients.dataset, self.clients.data_dir).y_train)
        if self.server_samples > n:
            raise ConfigError(f"server_samples (--server-samples) is {self.server_samples} but "
                              f"{self.clients.dataset} has {n} training samples; use at most {n}")


def _strategy(cfg: FederatedConfig, aggregation: Aggregation, compare: Sequence[Aggregation]) -> FusionStrategy:
    s = cfg.clients
    ds = _dataset(s.dataset, s.data_dir)
    server_data = None
    if any(a.needs_server_data for a in [aggregation, *compare]) and cfg.server_samples > 0:
        idx = balanced_subset(ds.y_train.numpy(), np.arange(len(ds.y_train)), cfg.server_samples,
                              seed=cfg.seed + 12345)
        server_data = (ds.x_train[idx], ds.y_train[idx]) if cfg.server_labels else ds.x_train[idx]
    initial = None
    if cfg.init == "shared":
        torch.manual_seed(cfg.seed)
        initial = make_model(s.arch, s.size, ds.input_shape, ds.num_classes)
    return FusionStrategy(
        aggregation, server_data=server_data, eval_data=(ds.x_test, ds.y_test), compare=compare,
        initial_model=initial, seed=cfg.seed, min_train_nodes=s.num_clients,
        min_available_nodes=s.num_clients)


#: samples of the dry run of :func:`_preflight`
PREFLIGHT_SAMPLES = 64


def _preflight(cfg: FederatedConfig) -> None:
    """Fuse two copies of the clients' initial model with the run's method and options on a few
    training samples, so that a method that cannot fuse the architecture (or an option it
    refuses) fails before any client trains, not after the first round."""
    from ..api import fuse

    s = cfg.clients
    ds = _dataset(s.dataset, s.data_dir)
    idx = balanced_subset(ds.y_train.numpy(), np.arange(len(ds.y_train)),
                          min(PREFLIGHT_SAMPLES, len(ds.y_train)), seed=cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = make_model(s.arch, s.size, ds.input_shape, ds.num_classes)
    twin = make_model(s.arch, s.size, ds.input_shape, ds.num_classes)
    twin.load_state_dict(model.state_dict())
    if cfg.no_server_data and get_method(cfg.method).supports_statistics:   # the level protocol's own check
        from ._levels import check_statistics_fusion

        check_statistics_fusion([model, twin], cfg.method, cfg.importance, cfg.options)
    fuse([model, twin], (ds.x_train[idx], ds.y_train[idx]), method=cfg.method,
         importance=cfg.importance, seed=cfg.seed, progress=False, **dict(cfg.options))


def _run_one(cfg: FederatedConfig, strategy: FusionStrategy) -> List[Dict[str, Any]]:
    client_app = make_client_app(cfg.clients)
    server_app = make_server_app(strategy, cfg.rounds)
    if cfg.backend == "local":
        run_local(server_app, client_app, cfg.clients.num_clients)
    else:
        simulate(server_app, client_app, cfg.clients.num_clients)
    if len(strategy.history) != cfg.rounds:
        raise NeurofuseError(f"the run ended after {len(strategy.history)} of {cfg.rounds} rounds; "
                             "see the log above for the client or server error")
    return strategy.history


def gap_closed(acc: float, fedavg: float, ensemble: float) -> Optional[float]:
    """Share of the FedAvg-to-ensemble accuracy gap that ``acc`` closes (None if the ensemble
    is not better than FedAvg: then there is no gap to close)."""
    gap = ensemble - fedavg
    return None if gap < 1e-12 else (acc - fedavg) / gap


def run_federated(cfg: FederatedConfig) -> Dict[str, Any]:
    """Run ``cfg`` and return its results (what ``results.json`` holds).

    Returns
    -------
    dict
        ``config``, ``runs`` (each strategy's per-round metrics: ``server-accuracy``,
        ``accuracy-<compare>``, ``fusion-seconds``, ``bytes-received``, ``bytes-sent``...),
        ``rounds`` (per round: the accuracy of the aggregation, of every comparison, of FedAvg
        (``fedavg``; ``fedavg-run``: its own trajectory) and of the ensemble, and the share of
        the FedAvg-to-ensemble gap each aggregation closes) and ``seconds``.
    """
    start = time.perf_counter()
    cfg.check_fits()   # every limit before Flower (or Ray) starts
    main = cfg.aggregation()
    refs = [MethodAggregation(method, label=role) for role, method in REFERENCES]
    compare = refs + [aggregation_from_spec(c) for c in cfg.compare]
    compare = [c for i, c in enumerate(compare) if c.label not in [d.label for d in compare[:i]]]
    strategy = _strategy(cfg, main, compare)
    _preflight(cfg)
    runs: Dict[str, List[Dict[str, Any]]] = {main.label: _run_one(cfg, strategy)}
    if cfg.rounds > 1 and cfg.fedavg_run:
        runs[FEDAVG_RUN] = _run_one(cfg, _strategy(cfg, refs[0], ()))
    rows = []
    for r, h in enumerate(runs[main.label], start=1):
        row: Dict[str, Any] = {"round": r, main.label: h.get("server-accuracy")}
        for c in compare:
            if c.label != main.label:
                row[c.label] = h.get(f"accuracy-{c.label}")
        if FEDAVG_RUN in runs:
            row[FEDAVG_RUN] = runs[FEDAVG_RUN][r - 1]["server-accuracy"]
        fedavg = row.get(FEDAVG_RUN, row.get("fedavg"))
        ens = row.get("ensemble")
        if fedavg is not None and ens is not None:
            row["gap_closed"] = {k: gap_closed(v, fedavg, ens) for k, v in row.items()
                                 if k not in ("round",) + REFERENCE_ROWS and isinstance(v, float)}
        rows.append(row)
    return {"config": _config_dict(cfg), "runs": runs, "rounds": rows,
            "seconds": time.perf_counter() - start}


def _config_dict(cfg: FederatedConfig) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["options"] = dict(cfg.options)
    d["compare"] = [c if isinstance(c, (str, Mapping)) else c.label for c in cfg.compare]
    return d


def format_table(results: Mapping[str, Any]) -> str:
    """One line per aggregation, one column per round: test accuracy (%) and, in brackets, the
    share of the FedAvg-to-ensemble gap it closes."""
    rows = results["rounds"]
    names = [k for k in rows[0] if k not in ("round", "gap_closed")]
    width = max(len(n) for n in names) + 2
    head = f"{'aggregation':<{width}}" + "".join(f"{'round ' + str(r['round']):>16}" for r in rows)
    lines = [head, "-" * len(head)]
    for name in names:
        cells = []
        for row in rows:
            v = row.get(name)
            g = (row.get("gap_closed") or {}).get(name)
            txt = "-" if v is None else f"{100 * v:.2f}" + ("" if g is None or name in REFERENCE_ROWS
                                                            else f" ({100 * g:.0f}%)")
            cells.append(f"{txt:>16}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    lines.append("test accuracy (%); in brackets: share of the FedAvg-to-ensemble gap closed")
    return "\n".join(lines)


def plot_rounds(results: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """Accuracy per round of every aggregation, FedAvg and the ensemble."""
    from ..plots import _pyplot, save_figure

    plt = _pyplot()
    rows = results["rounds"]
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for k in [k for k in rows[0] if k not in ("round", "gap_closed")]:
        ys = [100 * r[k] if r.get(k) is not None else np.nan for r in rows]
        style = {"ensemble": dict(color="#ff7f0e", ls="--"), FEDAVG_RUN: dict(color="#7f7f7f", ls=":"),
                 "fedavg": dict(color="#2ca02c", ls="-.")}.get(k, {})
        label = {"fedavg": "FedAvg of this run's client models", FEDAVG_RUN: "FedAvg (its own run)",
                 "ensemble": "ensemble of this run's client models"}.get(k, k)
        ax.plot(rounds, ys, marker="o", label=label, **style)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
