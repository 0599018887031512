"""The ``fl`` benchmark: one-shot and multi-round federated fusion on Dirichlet(alpha) clients.

The config (``configs/fl.json``) names a dataset, the client count, the alphas, the clients'
initialisations (``inits``: ``"shared"``, one initial model for all, the FL standard;
``"different"``, each client its own), the local training, the one-shot aggregations (every one
applied to the *same* client models of a cell) and the multi-round comparison (shared
initialisation).  Each cell's results go to ``<out>/<cell>.json`` (``one_shot-<init>-alpha<a>``,
``multi_round-alpha<a>``); ``results.json`` and ``report.md`` gather them with each
aggregation's share of the FedAvg-to-ensemble gap.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .._io import write_text
from ..checkpoint import save_json
from ..errors import ConfigError
from ._data import ClientSetup
from ._run import FederatedConfig, format_table, plot_rounds, run_federated

__all__ = ["load_fl_config", "run_fl_bench", "FL_CONFIGS"]

FL_CONFIGS = Path(__file__).resolve().parent / "configs"


def load_fl_config(name: str, scale: str) -> Dict[str, Any]:
    """The config ``name`` (``"fl"`` or a path to a .json file) at ``scale`` (its ``scales`` override
    the ``common`` settings)."""
    p = Path(name)
    if not p.suffix == ".json":
        p = FL_CONFIGS / f"{name}.json"
    if not p.is_file():
        raise ConfigError(f"unknown federated benchmark {name!r}; shipped: "
                          f"{sorted(q.stem for q in FL_CONFIGS.glob('*.json'))}")
    doc = json.loads(p.read_text(encoding="utf-8"))
    if scale not in doc.get("scales", {}):
        raise ConfigError(f"benchmark {name!r} has no scale {scale!r}; choose one of {sorted(doc['scales'])}")
    cfg = {**doc["common"], **doc["scales"][scale]}
    cfg["name"], cfg["scale"], cfg["title"] = doc["name"], scale, doc.get("title", "")
    return cfg


def _setup(cfg: Dict[str, Any], alpha: float, epochs: int, data_dir: Optional[str]) -> ClientSetup:
    return ClientSetup(dataset=cfg["dataset"], num_clients=int(cfg["clients"]), partition="dirichlet",
                       alpha=float(alpha), arch=cfg["arch"], size=cfg["size"], epochs=int(epochs),
                       lr=float(cfg.get("lr", 1e-3)), seed=int(cfg.get("seed", 0)), data_dir=data_dir)


def run_fl_bench(name: str = "fl", scale: str = "full", out: Optional[Path] = None, *, backend: str = "local",
                 data_dir: Optional[str] = None, alphas: Optional[List[float]] = None,
                 parts: tuple = ("one_shot", "multi_round"), inits: Optional[List[str]] = None,
                 log=print) -> Dict[str, Any]:
    """Run the cells of benchmark ``name``: for each alpha, the one-shot cell of every
    initialisation (``inits``, default the config's), then the multi-round cell."""
    cfg = load_fl_config(name, scale)
    out = Path(out or f"runs/bench/{name}-{scale}")
    out.mkdir(parents=True, exist_ok=True)
    cells: Dict[str, Any] = {}
    for alpha in alphas or cfg["alphas"]:
        for init in (inits or cfg.get("inits", ["shared"])) if "one_shot" in parts else ():
            os_cfg = cfg["one_shot"]
            fc = FederatedConfig(clients=_setup(cfg, alpha, cfg["epochs"], data_dir), method=os_cfg["method"],
                                 rounds=1, server_samples=int(cfg["server_samples"]), server_labels=False,
                                 compare=tuple(os_cfg["compare"]), backend=backend, seed=int(cfg.get("seed", 0)),
                                 init=init)
            key = f"one_shot-{init}-alpha{alpha}"
            t = time.perf_counter()
            res = run_federated(fc)
            cells[key] = res
            save_json(res, out / f"{key}.json", force=True)
            log(f"[{name}/{scale}] {key} ({time.perf_counter() - t:.0f} s)\n{format_table(res)}")
        if "multi_round" in parts and cfg.get("multi_round"):
            mr = cfg["multi_round"]
            fc = FederatedConfig(clients=_setup(cfg, alpha, mr["local_epochs"], data_dir), method=mr["method"],
                                 rounds=int(mr["rounds"]), server_samples=int(cfg["server_samples"]),
                                 server_labels=False, backend=backend,
                                 seed=int(cfg.get("seed", 0)))
            key = f"multi_round-alpha{alpha}"
            t = time.perf_counter()
            res = run_federated(fc)
            cells[key] = res
            save_json(res, out / f"{key}.json", force=True)
            plot_rounds(res, out / f"{key}.png", title=f"{cfg['dataset']}, {cfg['clients']} clients, Dir({alpha})")
            log(f"[{name}/{scale}] {key} ({time.perf_counter() - t:.0f} s)\n{format_table(res)}")
    doc = {"name": name, "scale": scale, "config": cfg, "cells": cells}
    save_json(doc, out / "results.json", force=True)
    lines = [f"# {cfg['title']} ({scale})", ""]
    for key, res in cells.items():
        lines += [f"## {key}", "", "```", format_table(res), "```", ""]
    write_text(out / "report.md", "\n".join(lines))
    return doc
