"""Running a benchmark: cached base models, one small JSON per finished cell, resumable.

Layout of an output directory::

    <out>/config.json                 the settings of the run (BenchConfig.to_dict())
    <cache>/<hash>/model_<i>.safetensors, meta.json
                                      base models of one (dataset, arch, size, split, seed,
                                      training settings, torch thread count); meta.json is written
                                      last, holds the sha256 of every model file and marks the
                                      entry complete; <cache> is --cache, by default <out>/cache
    <out>/cells/<cell id>.json        one finished cell (method x importance x split x seed
                                      [x fusion-set size] [x fine-tuning]); written to a temporary
                                      file and renamed, so a file that exists is complete
    <out>/results.json, report.md, *.png

A cell file is reused only when its ``key`` (a hash of everything that determines its result:
base models, method, importance, options, fusion set) matches, so changing a setting recomputes
exactly the cells it affects.  Base models are looked up only in the cache directory given
(``cache=``, ``--cache``; by default ``<out>/cache``): to share base models between tables at the
same scale, pass the same ``--cache`` to both runs (e.g. ``--cache runs/bench/cache-cpu``).  A cache
entry is keyed by its content: it is reused only when its ``meta.json`` names the same key and the
content hash of its files, every model file has the sha256 recorded there and names the same key
and its index in its own (digest-checked) metadata, and, when this output directory used the
entry before, the content is the one its results were computed with (``cells/base__*.json``
records it); the reuse is logged with the entry's path.  An entry that fails the check or cannot
be loaded (a corrupt or truncated file, one planted in a shared ``--cache``) is retrained and
rewritten, with a warning.

The thread count is part of the key because it changes the bits of training (and of
``kf-gradient``): reduction orders in torch's CPU kernels depend on it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import write_json
from ..errors import ConfigError, NeurofuseError
from ._cells import Cell, cell_path, expected_cells, read_cells, read_json
from ._config import BenchConfig
from ._figures import make_figures
from ._report import write_outputs

__all__ = ["CACHE_VERSION", "Cell", "STATS", "base_key", "cell_path", "expected_cells", "read_cells",
           "run_benchmark", "default_out", "machine_info", "software_versions"]

log = logging.getLogger("neurofuse")

#: bump when a change to training makes old cached base models invalid
CACHE_VERSION = 2
#: counters of the current process (tests and the CLI read them)
STATS: Dict[str, int] = {"trained_base_models": 0, "cache_hits": 0, "computed_cells": 0, "reused_cells": 0}

Event = Callable[[str, Dict[str, Any]], None]


def default_out(name: str, scale: str) -> Path:
    """``runs/bench/<name>-<scale>``."""
    return Path("runs") / "bench" / f"{Path(name).stem}-{scale}"


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# data and base models
# ---------------------------------------------------------------------------------------------
def load_data(cfg: BenchConfig, data_dir: Optional[str] = None):
    """The dataset of a config, with its training set subsampled when the config says so."""
    from ..data import balanced_subset, load_dataset

    ds = load_dataset(cfg.dataset, data_dir)
    if cfg.train_subsample is not None and cfg.train_subsample < len(ds.y_train):
        y = ds.y_train.numpy()
        idx = np.sort(balanced_subset(y, np.arange(len(y)), cfg.train_subsample, seed=0))
        ds = dataclasses.replace(ds, x_train=ds.x_train[idx], y_train=ds.y_train[idx])
    return ds


def base_key(cfg: BenchConfig, split: int, seed: int) -> Dict[str, Any]:
    """Everything that determines the base models of one split and seed (hashed for the cache).

    Includes ``torch.get_num_threads()``: the thread count changes the bits of CPU training.
    """
    return {"version": CACHE_VERSION, "dataset": cfg.dataset, "train_subsample": cfg.train_subsample,
            "arch": cfg.arch, "size": cfg.size, "n_models": split, "partition": cfg.partition,
            "ratio": cfg.ratio if cfg.partition == "dirichlet" else None, "seed": seed,
            "val_fraction": cfg.val_fraction, "train": cfg.train_config(split),
            "torch_threads": torch.get_num_threads()}


def _split_config(cfg: BenchConfig, split: int, seed: int):
    from ..experiment import SplitConfig

    tc = cfg.train_config(split)
    return SplitConfig(arch=cfg.arch, size=cfg.size, n_models=split, partition=cfg.partition,
                       ratio=cfg.ratio, seed=seed, epochs=tc["epochs"], lr=float(tc.get("lr", 1e-3)),
                       val_fraction=cfg.val_fraction)


@dataclass
class Base:
    models: List[nn.Module]
    parts: List[np.ndarray]
    class_shares: np.ndarray
    meta: Dict[str, Any]
    trained: bool


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_file(i: int) -> str:
    return f"model_{i}.safetensors"


def _canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists...), for comparing keys."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def content_hash(digests: Dict[str, str]) -> str:
    """The content hash of a cache entry: sha256 over its files' names and sha256s."""
    text = "".join(f"{name}\0{digests[name]}\n" for name in sorted(digests))
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_problem(d: Path, key: Dict[str, Any], split: int,
                   expect_content: Optional[str] = None) -> Optional[str]:
    """Why the cache entry ``d`` cannot be reused for ``key`` (``None``: it can).

    The entry is keyed by its content: ``meta.json`` must name the full ``key`` and the content
    hash of its files, every file must have the sha256 recorded there and carry, inside its own
    checked metadata, the same key and its model index (so files of another entry, or of a
    ``neurofuse train`` run, put there do not pass), and when this output directory used the
    entry before (``expect_content``), the content must be the one it used.
    """
    from .._tensorfile import DIGEST_KEY, SafetensorsHeader
    from ..checkpoint import read_config

    meta = read_json(d / "meta.json")
    if not meta:
        return "its meta.json is missing or unreadable"
    if meta.get("key") != _canonical(key) or meta.get("n_models") != split:
        return f"its meta.json describes another entry ({meta.get('hash')!r}, {meta.get('n_models')!r} models)"
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        return "its meta.json records no content hashes"
    if sorted(digests) != sorted(_model_file(i) for i in range(split)):
        return f"its meta.json lists other files ({sorted(digests)[:3]})"
    if meta.get("content") != content_hash(digests):
        return "its meta.json's content hash does not match its files' sha256s"
    if expect_content is not None and meta.get("content") != expect_content:
        return (f"its content ({str(meta.get('content'))[:12]}) is not what this output directory's "
                f"results were computed with ({expect_content[:12]}); it was replaced")
    for i in range(split):
        p = d / _model_file(i)
        if not p.is_file() or p.is_symlink():
            return f"{p.name} is missing or a link"
        if digests.get(p.name) != file_sha256(p):
            return f"{p.name} does not match its recorded sha256 (corrupt or modified)"
        try:
            own = read_config(p).get("metadata", {})
            signed = DIGEST_KEY in (SafetensorsHeader(p).meta or {})
        except NeurofuseError as exc:
            return " ".join(str(exc).split())
        if not signed or _canonical(own.get("cache_key")) != _canonical(key) or own.get("model_index") != i:
            return f"{p.name} is not base model {i} of this entry (its own metadata names another key)"
    return None


def _load_cached(d: Path, key: Dict[str, Any], split: int, expect_content: Optional[str] = None
                 ) -> Tuple[Optional[List[nn.Module]], Optional[str]]:
    """The verified models of a cache entry, or ``(None, reason)``."""
    from ..checkpoint import load_model

    problem = _cache_problem(d, key, split, expect_content)
    if problem is not None:
        return None, problem
    try:
        return [load_model(d / _model_file(i)).eval() for i in range(split)], None
    except NeurofuseError as exc:
        return None, " ".join(str(exc).split())


def get_base_models(cfg: BenchConfig, ds, split: int, seed: int, cache: Path, device: str,
                    progress: bool, emit: Event, expect_content: Optional[str] = None) -> Base:
    """The base models of one split and seed: from ``cache/<hash>`` if verified, else trained.

    A cache entry that exists but fails verification (content hash, loading) is retrained and
    rewritten, with a warning; it never aborts the benchmark.
    """
    from ..checkpoint import save_model
    from ..data import class_shares
    from ..experiment import split_parts, train_models_on_parts

    key = base_key(cfg, split, seed)
    h = _hash(key)
    scfg = _split_config(cfg, split, seed)
    parts = split_parts(ds, scfg)
    d = Path(cache) / h
    if d.exists():
        models, problem = _load_cached(d, key, split, expect_content)
        if models is not None:
            meta = read_json(d / "meta.json") or {}
            STATS["cache_hits"] += 1
            log.info("reusing base models %s from %s (sha256 verified)", h, d)
            emit("cache", {"split": split, "seed": seed, "hash": h, "path": str(d)})
            return Base(models, parts, class_shares(ds.y_train.numpy(), parts, ds.num_classes), meta, False)
        log.warning("cached base models in %s are unusable (%s); training them again", d, problem)
        try:
            (d / "meta.json").unlink()  # the entry is incomplete until it is rewritten
        except OSError:
            pass

    from ..models import zoo_architectures

    if cfg.arch not in zoo_architectures():
        raise ConfigError(f"benchmark {cfg.name!r} needs architecture {cfg.arch!r}, which is not registered "
                          f"in this neurofuse (available: {zoo_architectures()})")
    emit("train", {"split": split, "seed": seed, "hash": h, "epochs": scfg.epochs})
    start = time.perf_counter()
    extra = {k: v for k, v in cfg.train_config(split).items() if k not in ("epochs", "lr")}
    base = train_models_on_parts(ds, parts, scfg, progress=progress, device=device, train_options=extra)
    seconds = time.perf_counter() - start
    STATS["trained_base_models"] += split
    d.mkdir(parents=True, exist_ok=True)
    digests = {}
    for i, m in enumerate(base.models):
        p = save_model(m.cpu(), d / _model_file(i), force=True,
                       metadata={"cache_key": key, "model_index": i})
        digests[p.name] = file_sha256(p)
    meta = {"key": key, "hash": h, "n_models": split, "train_seconds": seconds,
            "train_samples": [int(len(p)) for p in parts],
            "val_accuracies": [hst.get("best_val_accuracy") for hst in base.histories],
            "best_epochs": [hst.get("best_epoch") for hst in base.histories],
            "device": device, "sha256": digests, "content": content_hash(digests)}
    write_json(d / "meta.json", meta)
    return Base([m.eval() for m in base.models], parts, base.class_shares, meta, True)


# ---------------------------------------------------------------------------------------------
# computing cells
# ---------------------------------------------------------------------------------------------
def _options(cfg: BenchConfig, method: str, base: Base) -> Dict[str, Any]:
    opts = copy.deepcopy(dict(cfg.method_options.get(method, {})))
    for k, v in list(opts.items()):
        if v == "class_shares":
            opts[k] = np.asarray(base.class_shares)
    return opts


def _cell_key(cfg: BenchConfig, cell: Cell, base_hash: str) -> str:
    key = {"base": base_hash, "method": cell.method, "importance": cell.importance,
           "fusion_samples": cell.fusion_samples, "options": cfg.method_options.get(cell.method, {}),
           "sweep": cell.sweep}
    if cell.width is not None and cfg.pareto is not None:
        key["pareto"] = {"width": cell.width, "class_shares": cfg.pareto.class_shares}
    if cell.finetuned and cfg.finetune is not None:
        key["finetune"] = {"settings": dict(cfg.finetune.settings), "samples": cfg.finetune.samples}
    return _hash(key)


def _finetune_data(cfg: BenchConfig, ds) -> Tuple[torch.Tensor, torch.Tensor]:
    from ..data import balanced_subset

    assert cfg.finetune is not None
    n = cfg.finetune.samples
    if n is None or n >= len(ds.y_train):
        return ds.x_train, ds.y_train
    y = ds.y_train.numpy()
    idx = np.sort(balanced_subset(y, np.arange(len(y)), n, seed=1))
    return ds.x_train[idx], ds.y_train[idx]


def compute_cell(cfg: BenchConfig, cell: Cell, ds, base: Base, device: str) -> Dict[str, Any]:
    """Fuse (and fine-tune) one cell and score it on the test set."""
    from ..experiment import fusion_set, run_methods
    from ..finetune import FinetuneConfig, finetune
    from ..methods import get_method
    from ..training import evaluate

    fusion = fusion_set(ds, cell.fusion_samples, seed=cell.seed)
    doc: Dict[str, Any] = {}
    cls = get_method(cell.method)
    if cell.finetuned and cls.output_is_ensemble:
        # the paper's fine-tuned ensemble: every base model fine-tuned alike, then ensembled
        from ..api import fuse

        assert cfg.finetune is not None
        x, y = _finetune_data(cfg, ds)
        ft_cfg = FinetuneConfig(seed=cell.seed, device=device, **dict(cfg.finetune.settings))
        start = time.perf_counter()
        tuned = []
        for m in base.models:
            t, _ = finetune(copy.deepcopy(m), x, y, ft_cfg, progress=False)
            tuned.append(t.eval())
        ens = fuse(tuned, fusion, method=cell.method, progress=False, **_options(cfg, cell.method, base))
        seconds = time.perf_counter() - start
        s = evaluate(ens, ds.x_test, ds.y_test)
        members = [evaluate(t, ds.x_test, ds.y_test)["accuracy"] for t in tuned]
        return {"status": "ok", "accuracy": s["accuracy"], "loss": s["loss"], "macro_f1": s["macro_f1"],
                "seconds": seconds, "finetuned_base_accuracies": members}
    opts = _options(cfg, cell.method, base)
    opts["device"] = device
    if cell.width is not None and cfg.pareto is not None:
        if cls.supports_width:
            opts["width"] = cell.width
        if cfg.pareto.class_shares:
            opts["class_weights"] = np.asarray(base.class_shares)
    if cell.finetuned:
        assert cfg.finetune is not None
        opts["finetune"] = FinetuneConfig(seed=cell.seed, device=device, **dict(cfg.finetune.settings))
        opts["finetune_data"] = _finetune_data(cfg, ds)
    key = cell.method if cell.importance == "uniform" else f"{cell.method}/{cell.importance}"
    # (a pareto cell's ``width`` goes to neurofuse.fuse with the options)
    results, skipped, fused = run_methods(base.models, fusion, ds, [(key, cell.method, cell.importance)],
                                          seed=cell.seed, progress=False, options={cell.method: opts})
    if key in skipped:
        doc = {"status": "n/a", "reason": " ".join(str(skipped[key]).split())}
    else:
        r = results[key]
        doc = {"status": "ok", "accuracy": r["accuracy"], "loss": r["loss"], "macro_f1": r["macro_f1"],
               "seconds": r["seconds"], "params": int(sum(p.numel() for p in fused[key].parameters()))}
    return doc


def base_cell(ds, base: Base, split: int, seed: int, h: str) -> Dict[str, Any]:
    from ..training import evaluate

    scores = [evaluate(m, ds.x_test, ds.y_test) for m in base.models]
    order = sorted(range(len(scores)), key=lambda i: -scores[i]["accuracy"])
    return {"split": split, "seed": seed, "cache": h, "content": base.meta.get("content"),
            "accuracies": [scores[i]["accuracy"] for i in order],
            "losses": [scores[i]["loss"] for i in order],
            "model_index": order,
            "val_accuracies": [base.meta.get("val_accuracies", [None] * split)[i] for i in order],
            "train_samples": [int(len(base.parts[i])) for i in order],
            "train_seconds": base.meta.get("train_seconds")}


#: distributions whose versions results.json records (name shown -> distribution name)
_SOFTWARE = {"torch": "torch", "numpy": "numpy", "scipy": "scipy", "POT": "pot", "captum": "captum",
             "scikit-learn": "scikit-learn", "safetensors": "safetensors"}


def software_versions() -> Dict[str, Any]:
    """Versions of Python, neurofuse and the libraries that change results, the torch thread
    count and the platform (``None`` for a library that is not installed)."""
    from importlib import metadata

    from .. import __version__

    info: Dict[str, Any] = {"python": sys.version.split()[0], "neurofuse": __version__}
    for shown, dist in _SOFTWARE.items():
        try:
            info[shown] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[shown] = None
    info["torch"] = torch.__version__  # the running build (e.g. "2.13.0+cpu")
    info["torch_threads"] = torch.get_num_threads()
    info["platform"] = platform.platform()
    return info


def machine_info(device: str) -> Dict[str, Any]:
    """The machine and the software of a run (``results.json["machine"]``)."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "device": device, "software": software_versions()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _check_runnable(cfg: BenchConfig, device: str) -> None:
    from ..models import zoo_architectures

    if cfg.arch not in zoo_architectures():
        raise ConfigError(f"benchmark {cfg.name!r} needs architecture {cfg.arch!r}, which is not registered "
                          f"in this neurofuse (available: {zoo_architectures()})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")


def run_benchmark(cfg: BenchConfig, out: Optional[Path] = None, *, device: Optional[str] = None,
                  data_dir: Optional[str] = None, progress: bool = True, on_event: Optional[Event] = None,
                  command: Optional[str] = None, cache: Optional[Path] = None) -> Dict[str, Any]:
    """Run (or resume) a benchmark and write ``results.json``, ``report.md`` and the figures.

    Returns the ``results.json`` document.  ``on_event(kind, info)`` is called with kind
    ``"train"`` / ``"cache"`` (base models trained / reused; ``info["path"]`` is the entry),
    ``"cell"`` (a cell finished or was reused; ``info["reused"]``), ``"figure"`` and ``"done"``.
    ``cache`` is the directory of cached base models (default ``<out>/cache``); no other
    directory is looked in.
    """
    from ..checkpoint import save_json

    out = Path(out) if out is not None else default_out(cfg.name, cfg.scale)
    cache = Path(cache) if cache is not None else out / "cache"
    device = device or cfg.device
    _check_runnable(cfg, device)

    def emit(kind: str, info: Dict[str, Any]) -> None:
        if on_event is not None:
            on_event(kind, info)
        else:
            log.info("%s %s", kind, info)

    t0 = time.perf_counter()
    run_stats = {"trained_base_models": 0, "computed_cells": 0, "reused_cells": 0}
    ds = load_data(cfg, data_dir)  # fails (one line) before anything is written
    out.mkdir(parents=True, exist_ok=True)
    save_json({"config": cfg.to_dict(), "command": command, "data_dir": data_dir, "device": device,
               "cache": str(cache)}, out / "config.json", force=True)
    cells = expected_cells(cfg)
    groups: Dict[Tuple[int, int], List[Cell]] = {}
    for c in cells:
        groups.setdefault((c.seed, c.split), []).append(c)
    bar = tqdm(total=len(cells), desc=f"{cfg.name}/{cfg.scale} cells", disable=not progress, unit="cell")
    try:
        for (seed, split), group in groups.items():
            h = _hash(base_key(cfg, split, seed))
            todo = []
            for c in group:
                doc = read_json(cell_path(out, c))
                if doc and doc.get("status") in ("ok", "n/a") and doc.get("key") == _cell_key(cfg, c, h):
                    STATS["reused_cells"] += 1
                    run_stats["reused_cells"] += 1
                    emit("cell", {**doc, "reused": True})
                    bar.update(1)
                else:
                    todo.append(c)
            bpath = out / "cells" / f"base__n{split}__s{seed}.json"
            bdoc = read_json(bpath)
            if not todo and bdoc and bdoc.get("cache") == h:
                continue
            known = bdoc.get("content") if bdoc and bdoc.get("cache") == h else None
            base = get_base_models(cfg, ds, split, seed, cache, device, progress, emit, known)
            if base.trained:
                run_stats["trained_base_models"] += split
            if not (bdoc and bdoc.get("cache") == h and bdoc.get("content") == base.meta.get("content")):
                bdoc = base_cell(ds, base, split, seed, h)
                save_json(bdoc, bpath, force=True)
                emit("base", bdoc)
            for c in todo:
                bar.set_postfix_str(c.cell_id)
                doc = compute_cell(cfg, c, ds, base, device)
                doc = {"cell_id": c.cell_id, "key": _cell_key(cfg, c, h), "method": c.method,
                       "importance": c.importance, "split": c.split, "seed": c.seed,
                       "fusion_samples": c.fusion_samples, "finetuned": c.finetuned, "sweep": c.sweep,
                       "width": c.width, "label": c.label, **doc}
                save_json(doc, cell_path(out, c), force=True)
                STATS["computed_cells"] += 1
                run_stats["computed_cells"] += 1
                emit("cell", {**doc, "reused": False})
                bar.update(1)
    finally:
        bar.close()
    run_stats["seconds"] = time.perf_counter() - t0
    figs = make_figures(cfg, out, ds=ds, device=device, progress=progress, emit=emit)
    doc = write_outputs(out, cfg_doc={"config": cfg.to_dict(), "command": command, "device": device,
                                      "cache": str(cache)},
                        machine=machine_info(device), last_run=run_stats, figures=figs)
    emit("done", {"out": str(out), **run_stats})
    return doc
