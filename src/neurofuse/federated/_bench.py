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
from typing import Any, Dict, List, Optional, Tuple

from .._io import write_text
from ..checkpoint import save_json
from ..errors import ConfigError
from ._data import ClientSetup
from ._run import INITS, FederatedConfig, format_table, plot_rounds, run_federated

__all__ = ["load_fl_config", "run_fl_bench", "FL_CONFIGS"]

FL_CONFIGS = Path(__file__).resolve().parent / "configs"


#: most bytes of a benchmark config file
MAX_CONFIG_BYTES = 1 << 20
_TOP_KEYS = ("name", "title", "description", "common", "scales")
_CELL_KEYS = ("dataset", "clients", "arch", "size", "server_samples", "lr", "seed", "alphas", "epochs",
              "inits", "one_shot", "multi_round")
_REQUIRED = ("dataset", "clients", "arch", "size", "server_samples", "alphas", "epochs", "one_shot")


def _fail(where: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {key}: {msg}")


def _object(where: str, key: str, v: Any, allowed: Any = None) -> Dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(where, key, f"expected a JSON object, got {type(v).__name__} {str(v)[:40]!r}")
    unknown = sorted(set(v) - set(allowed)) if allowed is not None else []
    if unknown:
        raise _fail(where, key, f"unknown key(s) {unknown}; valid: {sorted(allowed)}")
    return v


def _checked(where: str, key: str, check: Any, *args: Any, **kw: Any) -> Any:
    """``check(value, name, ...)`` of :mod:`neurofuse._validate`, its message prefixed by the file."""
    try:
        return check(*args, **kw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from None


def load_fl_config(name: str, scale: str) -> Dict[str, Any]:
    """The config ``name`` (``"fl"`` or a path to a .json file) at ``scale`` (its ``scales`` override
    the ``common`` settings), validated: a missing or unknown key, a wrong type or a value out of
    range is a one-line :class:`~neurofuse.errors.ConfigError` naming the file and the key."""
    from .._validate import check_choice, check_int, check_number, check_seed
    from ..data import list_datasets
    from ._data import MAX_CLIENTS

    p = Path(name)
    if not p.suffix == ".json":
        p = FL_CONFIGS / f"{name}.json"
    if not p.is_file():
        raise ConfigError(f"unknown federated benchmark {name!r}; shipped: "
                          f"{sorted(q.stem for q in FL_CONFIGS.glob('*.json'))}")
    where = p.name
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} is more than {MAX_CONFIG_BYTES} bytes; not a benchmark config")
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"cannot read config {p}: {getattr(exc, 'strerror', None) or exc}") from None
    doc = _object(where, "the file", doc, _TOP_KEYS)
    scales = _object(where, "scales", doc.get("scales"))
    if scale not in scales:
        raise ConfigError(f"benchmark {name!r} has no scale {scale!r}; choose one of {sorted(scales)}")
    common = _object(where, "common", doc.get("common", None) if "common" in doc else {}, _CELL_KEYS)
    cfg = {**common, **_object(where, f"scales.{scale}", scales[scale], _CELL_KEYS)}
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise _fail(where, missing[0], f"missing (give it in common or in scales.{scale})")
    _checked(where, "dataset", check_choice, cfg["dataset"], "dataset", list_datasets())
    _checked(where, "clients", check_int, cfg["clients"], "clients", 1, MAX_CLIENTS)
    _checked(where, "server_samples", check_int, cfg["server_samples"], "server_samples", 0)
    _checked(where, "epochs", check_int, cfg["epochs"], "epochs", 1)
    _checked(where, "lr", check_number, cfg.get("lr", 1e-3), "lr", 0.0, 10.0, lo_open=True)
    _checked(where, "seed", check_seed, cfg.get("seed", 0))
    alphas = cfg["alphas"]
    if not isinstance(alphas, list) or not alphas:
        raise _fail(where, "alphas", f"expected a non-empty list of numbers, got {alphas!r}")
    for i, a in enumerate(alphas):
        _checked(where, f"alphas[{i}]", check_number, a, "alpha", 0.0, lo_open=True)
    inits = cfg.get("inits", ["shared"])
    if not isinstance(inits, list) or not inits:
        raise _fail(where, "inits", f"expected a non-empty list of {list(INITS)}, got {inits!r}")
    for i, init in enumerate(inits):
        _checked(where, f"inits[{i}]", check_choice, init, "init", INITS)
    one = _object(where, "one_shot", cfg["one_shot"], ("method", "compare"))
    if not isinstance(one.get("method"), str):
        raise _fail(where, "one_shot.method", f"expected a method name, got {one.get('method')!r}")
    if not isinstance(one.get("compare", []), list):
        raise _fail(where, "one_shot.compare", f"expected a list of aggregations, got {one.get('compare')!r}")
    from ..methods import get_method
    from ._aggregation import aggregation_from_spec

    _checked(where, "one_shot.method", get_method, one["method"])
    for i, c in enumerate(one.get("compare", [])):
        _checked(where, f"one_shot.compare[{i}]", aggregation_from_spec, c)
    if cfg.get("multi_round") is not None:
        mr = _object(where, "multi_round", cfg["multi_round"], ("method", "rounds", "local_epochs"))
        if not isinstance(mr.get("method"), str):
            raise _fail(where, "multi_round.method", f"expected a method name, got {mr.get('method')!r}")
        _checked(where, "multi_round.rounds", check_int, mr.get("rounds"), "rounds", 1)
        _checked(where, "multi_round.local_epochs", check_int, mr.get("local_epochs"), "local_epochs", 1)
        _checked(where, "multi_round.method", get_method, mr["method"])
    if not isinstance(doc.get("name", p.stem), str) or not isinstance(doc.get("title", ""), str):
        raise _fail(where, "name", "name and title must be strings")
    cfg["name"], cfg["scale"], cfg["title"] = doc.get("name", p.stem), scale, doc.get("title", "")
    return cfg


def _setup(cfg: Dict[str, Any], alpha: float, epochs: int, data_dir: Optional[str]) -> ClientSetup:
    return ClientSetup(dataset=cfg["dataset"], num_clients=int(cfg["clients"]), partition="dirichlet",
                       alpha=float(alpha), arch=cfg["arch"], size=cfg["size"], epochs=int(epochs),
                       lr=float(cfg.get("lr", 1e-3)), seed=int(cfg.get("seed", 0)), data_dir=data_dir)


def _cells(cfg: Dict[str, Any], backend: str, data_dir: Optional[str], alphas: Optional[List[float]],
           parts: tuple, inits: Optional[List[str]] = None) -> List[Tuple[str, FederatedConfig]]:
    """Every cell's run, built (and so validated) before the first one starts.  The method runs
    plain (``class_shares=False``, not :class:`FederatedConfig`'s default): the class-share
    aggregations are rows of the config's ``compare``."""
    where = f"benchmark {cfg['name']!r}"
    cells = []
    for alpha in alphas or cfg["alphas"]:
        for init in (inits or cfg.get("inits", ["shared"])) if "one_shot" in parts else ():
            os_cfg = cfg["one_shot"]
            try:
                fc = FederatedConfig(clients=_setup(cfg, alpha, cfg["epochs"], data_dir),
                                     method=os_cfg["method"], rounds=1,
                                     server_samples=int(cfg["server_samples"]), server_labels=False,
                                     class_shares=False, compare=tuple(os_cfg.get("compare", ())), backend=backend,
                                     seed=int(cfg.get("seed", 0)), init=init)
            except ConfigError as exc:
                raise ConfigError(f"{where}: one_shot: {exc}") from None
            cells.append((f"one_shot-{init}-alpha{alpha}", fc))
        if "multi_round" in parts and cfg.get("multi_round"):
            mr = cfg["multi_round"]
            try:
                fc = FederatedConfig(clients=_setup(cfg, alpha, mr["local_epochs"], data_dir),
                                     method=mr["method"], rounds=int(mr["rounds"]),
                                     server_samples=int(cfg["server_samples"]), server_labels=False,
                                     class_shares=False, backend=backend,
                                     seed=int(cfg.get("seed", 0)))
            except ConfigError as exc:
                raise ConfigError(f"{where}: multi_round: {exc}") from None
            cells.append((f"multi_round-alpha{alpha}", fc))
    return cells


def run_fl_bench(name: str = "fl", scale: str = "full", out: Optional[Path] = None, *, backend: str = "local",
                 data_dir: Optional[str] = None, alphas: Optional[List[float]] = None,
                 parts: tuple = ("one_shot", "multi_round"), inits: Optional[List[str]] = None, log=print,
                 force: bool = False) -> Dict[str, Any]:
    """Run the cells of benchmark ``name`` (each one-shot alpha, then each multi-round alpha).

    The config and every cell's settings are validated, the dataset's limits checked and the
    outputs (``<cell>.json``, the multi-round plots, ``results.json``, ``report.md``) checked
    before the first cell starts: existing ones are replaced only with ``force``.
    """
    from .._io import check_outputs
    from ..data import resolve_data_dir

    cfg = load_fl_config(name, scale)
    out = Path(out or f"runs/bench/{Path(name).stem}-{scale}")
    cells = _cells(cfg, backend, data_dir, alphas, parts, inits)
    outputs: List[Tuple[Path, str]] = [(out, "dir")]
    for key, fc in cells:
        outputs.append((out / f"{key}.json", ".json"))
        if key.startswith("multi_round"):
            outputs.append((out / f"{key}.png", ".png"))
    outputs += [(out / "results.json", ".json"), (out / "report.md", ".md")]
    check_outputs(outputs, force, (), resolve_data_dir(data_dir).resolve())
    for _, fc in cells[:1]:
        fc.check_fits()
    out.mkdir(parents=True, exist_ok=True)
    done: Dict[str, Any] = {}
    for key, fc in cells:
        t = time.perf_counter()
        res = run_federated(fc)
        done[key] = res
        save_json(res, out / f"{key}.json", force=True)
        if key.startswith("multi_round"):
            plot_rounds(res, out / f"{key}.png",
                        title=f"{cfg['dataset']}, {cfg['clients']} clients, Dir({fc.clients.alpha})")
        log(f"[{cfg['name']}/{scale}] {key} ({time.perf_counter() - t:.0f} s)\n{format_table(res)}")
    doc = {"name": cfg["name"], "scale": scale, "config": cfg, "cells": done}
    save_json(doc, out / "results.json", force=True)
    lines = [f"# {cfg['title']} ({scale})", ""]
    for key, res in done.items():
        lines += [f"## {key}", "", "```", format_table(res), "```", ""]
    write_text(out / "report.md", "\n".join(lines))
    return doc
