"""``neurofuse demo``: train base models on a partition, fuse with every method, compare."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .checkpoint import save_json
from .data import load_dataset
from .errors import OutputExistsError
from .experiment import SplitConfig, fusion_set, method_variants, run_methods, train_base_models
from .methods import get_method
from .plots import accuracy_bars
from .training import evaluate

__all__ = ["DemoConfig", "format_table", "run_demo"]

log = logging.getLogger("neurofuse")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo` (see ``neurofuse demo --help``)."""

    out: str = "runs/demo"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    split: SplitConfig = SplitConfig()
    fusion_samples: int = 400
    methods: Optional[List[str]] = None
    importances: Optional[List[str]] = None
    force: bool = False
    progress: bool = True
    device: str = "cpu"
    finetune: Optional[int] = None
    distill: int = 100


#: the recommended zero-shot pipeline and its distilled form, run beside every method:
#: ``(row, method, importance, distill)``, all with the models' class shares as class weights
#: (uniform importance: conductance adds nothing on top of class shares, benchmarks/recipe.py)
PIPELINE = (("kf-linear+cs", "kf-linear", "uniform", False),
            ("kf-linear+cs+distill", "kf-linear", "uniform", True))
#: the rows :func:`pipeline_rows` adds: the class-share ensemble, then :data:`PIPELINE`
PIPELINE_PLAN = (("ensemble+cs", "ensemble", "uniform", False),) + PIPELINE


def run_demo(cfg: DemoConfig) -> Dict[str, Any]:
    """Run the demo and write ``results.json`` and ``accuracy.png`` under ``cfg.out``."""
    out = Path(cfg.out)
    targets = [out / "results.json", out / "accuracy.png"]
    if not cfg.force:
        for t in targets:
            if t.exists():
                raise OutputExistsError(f"{t} exists; pass --force to overwrite or choose another --out")
    t0 = time.perf_counter()
    variants = list(method_variants(cfg.methods, cfg.importances))  # unknown names fail before training
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    base = train_base_models(ds, cfg.split, progress=cfg.progress, device=cfg.device)
    base_scores = [evaluate(m, ds.x_test, ds.y_test) for m in base.models]
    fusion = fusion_set(ds, cfg.fusion_samples, seed=cfg.split.seed)
    results, skipped, fused = run_methods(base.models, fusion, ds, variants, seed=cfg.split.seed,
                                          progress=cfg.progress)
    results.update(pipeline_rows(base.models, fusion, ds, base.class_shares, cfg.split.seed, cfg.distill,
                                 cfg.device))
    method_of = {**{key: method for key, method, _ in variants}, **{row[0]: row[1] for row in PIPELINE_PLAN}}
    ensembles = {key for key, method in method_of.items() if get_method(method).output_is_ensemble}
    if cfg.finetune:
        fused = {k: m for k, m in fused.items() if k not in ensembles}  # nothing to fine-tune
        results.update(finetune_rows(fused, ds, cfg.finetune, cfg.split.seed, cfg.device, cfg.progress))
    doc: Dict[str, Any] = {
        "dataset": ds.name,
        "partition": cfg.split.partition,
        "n_models": cfg.split.n_models,
        "seed": cfg.split.seed,
        "arch": cfg.split.arch,
        "size": cfg.split.size,
        "fusion_samples": int(fusion[0].shape[0]),
        "base_models": [
            {"accuracy": s["accuracy"], "loss": s["loss"], "macro_f1": s["macro_f1"],
             "train_samples": int(len(p))}
            for s, p in zip(base_scores, base.parts)
        ],
        "methods": results,
        "skipped": skipped,
        "class_shares": np.round(base.class_shares, 4).tolist(),
        "seconds_total": time.perf_counter() - t0,
    }
    save_json(doc, out / "results.json", force=True)
    accuracy_bars([s["accuracy"] for s in base_scores],
                  {k: v["accuracy"] for k, v in results.items()}, out / "accuracy.png", ensembles=ensembles,
                  title=f"{ds.name}, {cfg.split.arch}, {cfg.split.n_models} models, {cfg.split.partition}")
    return doc


def pipeline_rows(models: List[Any], fusion: Any, ds: Any, shares: np.ndarray, seed: int,
                  distill_epochs: int, device: str = "cpu") -> Dict[str, Dict[str, float]]:
    """The rows of :data:`PIPELINE` (and ``ensemble+cs``): fusion with the class shares as class
    weights, then, for the ``+distill`` row, :func:`neurofuse.distill.distill` toward the
    class-share ensemble for up to ``distill_epochs`` epochs (no labels)."""
    from .api import fuse

    rows: Dict[str, Dict[str, float]] = {}
    for key, method, imp, distill in PIPELINE_PLAN:
        start = time.perf_counter()
        kw: Dict[str, Any] = {"distill": distill_epochs} if distill else {}
        fused = fuse(models, fusion, method=method, importance=imp, seed=seed, progress=False,
                     device=device, class_weights=shares, **kw)
        s = evaluate(fused, ds.x_test, ds.y_test)
        rows[key] = {"accuracy": s["accuracy"], "loss": s["loss"], "macro_f1": s["macro_f1"],
                     "seconds": time.perf_counter() - start}
    return rows


def finetune_rows(fused: Dict[str, Any], ds: Any, epochs: int, seed: int, device: str = "cpu",
                  progress: bool = True) -> Dict[str, Dict[str, float]]:
    """Fine-tune every fused model on the training split: rows ``<key>+ft``.

    ``seconds`` is the fine-tuning time; the checkpoint is chosen on a validation split held out
    from the training data (:func:`neurofuse.finetune.finetune`).
    """
    from .finetune import FinetuneConfig, finetune

    rows: Dict[str, Dict[str, float]] = {}
    cfg = FinetuneConfig(epochs=epochs, seed=seed, device=device)
    for key, model in fused.items():
        start = time.perf_counter()
        tuned, _ = finetune(model, ds.x_train, ds.y_train, cfg, progress=False)
        s = evaluate(tuned, ds.x_test, ds.y_test)
        rows[f"{key}+ft"] = {"accuracy": s["accuracy"], "loss": s["loss"], "macro_f1": s["macro_f1"],
                             "seconds": time.perf_counter() - start}
    return rows


def format_table(doc: Dict[str, Any]) -> str:
    """The demo's results as a plain-text table (accuracy %, loss, macro-F1, fusion seconds)."""
    rows = [("model / method", "acc %", "loss", "F1 %", "seconds")]
    for i, b in enumerate(doc["base_models"]):
        rows.append((f"base model {i} ({b['train_samples']} samples)", f"{100 * b['accuracy']:.1f}",
                     f"{b['loss']:.3f}", f"{100 * b['macro_f1']:.1f}", ""))
    accs = [b["accuracy"] for b in doc["base_models"]]
    rows.append(("best base model", f"{100 * max(accs):.1f}", "", "", ""))
    rows.append(("mean base model", f"{100 * float(np.mean(accs)):.1f}", "", "", ""))
    for k, r in doc["methods"].items():
        rows.append((k, f"{100 * r['accuracy']:.1f}", f"{r['loss']:.3f}", f"{100 * r['macro_f1']:.1f}",
                     f"{r['seconds']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    seen = set()
    for k, why in doc.get("skipped", {}).items():
        method = k.split("/")[0]
        if method not in seen:
            seen.add(method)
            lines.append(f"{method}: n/a ({why})")
    return "\n".join(lines)
