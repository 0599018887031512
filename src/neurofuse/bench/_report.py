"""``results.json`` and ``report.md`` from the cell files of a run, in the paper's layout.

Rows: Base models, Vanilla Averaging, Last-layer KD, Ensemble, OTFusion, Git Re-Basin, HF Linear,
KF Linear, KF Gradient (one row per importance score for the methods that use one); columns: the
splits (2-way, 4-way, ...).  A cell is the mean ± std (unbiased, as the paper's
``averaged_results.json``) over seeds of the test accuracy in percent; ``N/A`` where the method
does not apply (e.g. HF Linear and Git Re-Basin beyond two models), ``–`` where the cell has not
been computed (yet).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .._io import write_text
from ..errors import ConfigError
from ._cells import expected_cells, read_cells
from ._config import BenchConfig, FinetuneSpec, ParetoSpec, SweepSpec

__all__ = ["config_from_dict", "fmt_mean_std", "format_cell", "method_label", "row_order",
           "render_report", "summarise", "write_outputs", "write_report"]

#: the label of the base models' row
BASE_LABEL = "Base models"
NA = "N/A"
MISSING = "–"


def fmt_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"84.5 ± 1.2"`` (mean ± unbiased std of ``values * scale``); one value: ``"84.5"``."""
    vals = [float(v) * scale for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return MISSING
    mean = float(np.mean(vals))
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    std = float(np.std(vals, ddof=1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_cell(docs: Sequence[Mapping[str, Any]], field: str = "accuracy", scale: float = 100.0,
                digits: int = 1) -> str:
    """One table cell from the cell documents of its seeds: mean ± std, ``N/A`` or ``–``."""
    if not docs:
        return MISSING
    ok = [d[field] for d in docs if d.get("status") == "ok" and d.get(field) is not None]
    if not ok:
        return NA if all(d.get("status") == "n/a" for d in docs) else MISSING
    return fmt_mean_std(ok, scale, digits)


def format_base(docs: Sequence[Mapping[str, Any]]) -> str:
    """Base models, sorted by accuracy within each seed and averaged per rank (as the paper)."""
    if not docs:
        return MISSING
    accs = np.array([d["accuracies"] for d in docs], dtype=float) * 100  # [seeds, models]
    n = accs.shape[1]
    if n <= 4:
        return " / ".join(f"{v:.1f}" for v in accs.mean(axis=0))
    flat = accs.reshape(-1)
    return f"{flat.mean():.1f} (range {flat.min():.1f}–{flat.max():.1f})"


# ---------------------------------------------------------------------------------------------
# config round trip
# ---------------------------------------------------------------------------------------------
def config_from_dict(d: Mapping[str, Any]) -> BenchConfig:
    """Rebuild a :class:`BenchConfig` from :meth:`BenchConfig.to_dict` output."""
    d = dict(d)
    try:
        for k in ("splits", "seeds", "methods", "importances", "report", "figures"):
            d[k] = tuple(d[k])
        if d.get("finetune") is not None:
            f = d["finetune"]
            d["finetune"] = FinetuneSpec(tuple(f["methods"]), dict(f["settings"]), f.get("samples"))
        if d.get("sweep") is not None:
            s = d["sweep"]
            d["sweep"] = SweepSpec(tuple(s["methods"]), s["importance"], tuple(s["fusion_samples"]))
        if d.get("pareto") is not None:
            pa = d["pareto"]
            d["pareto"] = ParetoSpec(pa["method"], pa["importance"], tuple(pa["widths"]),
                                     bool(pa.get("class_shares", True)))
        return BenchConfig(**d)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"config.json of the run is not a benchmark config ({exc})") from None


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def _row_key(doc: Mapping[str, Any], uses_importance: bool) -> Tuple[str, str, bool]:
    return doc["method"], doc["importance"] if uses_importance else "", bool(doc.get("finetuned"))


def _method_class(method: str) -> Any:
    """The registered class of ``method``, or ``None`` (an unknown method in an old run)."""
    from ..methods import get_method, list_methods

    return get_method(method) if method in list_methods() else None


def _uses_importance(method: str) -> bool:
    cls = _method_class(method)
    return bool(cls is not None and cls.uses_importance)


def is_ensemble(method: str) -> bool:
    """Whether ``method``'s output is an ensemble (the reference of the pareto curves)."""
    cls = _method_class(method)
    return bool(cls is not None and cls.output_is_ensemble)


def method_label(method: str) -> str:
    """The method's label in tables (:meth:`FusionMethod.display_label`; unknown: the name)."""
    cls = _method_class(method)
    return cls.display_label() if cls is not None else method


def row_order(methods: Sequence[str]) -> List[str]:
    """``methods`` in table order (:attr:`FusionMethod.order`; unknown methods last)."""
    def key(m: str) -> Tuple[int, int]:
        cls = _method_class(m)
        return (cls.order if cls is not None else 10_000, list(methods).index(m))

    return sorted(dict.fromkeys(methods), key=key)


def row_label(method: str, importance: str, finetuned: bool) -> str:
    label = method_label(method)
    if importance:
        label += f" ({importance})"
    if finetuned:
        label += " + fine-tuning"
    return label


def _rows(cfg: BenchConfig, finetuned: bool) -> List[Tuple[str, str, bool]]:
    methods = list(cfg.finetune.methods) if finetuned and cfg.finetune else list(cfg.methods)
    rows = []
    for m in row_order(methods):
        if _uses_importance(m):
            rows.extend((m, imp, finetuned) for imp in cfg.importances)
        else:
            rows.append((m, "", finetuned))
    return rows


def summarise(cfg: BenchConfig, cells: Sequence[Mapping[str, Any]],
              bases: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``{row label: {"<n>-way": {"mean", "std", "n", "text", "seconds"}}}`` of the main table."""
    table = [c for c in cells if not c.get("sweep") and c.get("width") is None]
    out: Dict[str, Dict[str, Any]] = {}
    base_row = {}
    for split in cfg.splits:
        b = [d for d in bases if d["split"] == split]
        base_row[f"{split}-way"] = {"text": format_base(b), "n": len(b),
                                    "mean": float(np.mean([np.mean(d["accuracies"]) for d in b])) if b else None}
    out[BASE_LABEL] = base_row
    # the bar a fused model must clear to be worth having (mean over seeds of each seed's best)
    best_row = {}
    for split in cfg.splits:
        b = [d for d in bases if d["split"] == split]
        best = [d["accuracies"][0] for d in b if d.get("accuracies")]
        best_row[f"{split}-way"] = {"text": fmt_mean_std(best), "n": len(best),
                                    "mean": float(np.mean(best)) if best else None,
                                    "std": float(np.std(best, ddof=1)) if len(best) > 1 else None}
    out["Best base model"] = best_row
    rows = _rows(cfg, False) + (_rows(cfg, True) if cfg.finetune else [])
    for m, imp, ft in rows:
        row = {}
        for split in cfg.splits:
            docs = [c for c in table if _row_key(c, bool(imp)) == (m, imp, ft) and c["split"] == split]
            ok = [c["accuracy"] for c in docs if c.get("status") == "ok"]
            secs = [c["seconds"] for c in docs if c.get("status") == "ok"]
            row[f"{split}-way"] = {
                "text": format_cell(docs), "n": len(ok),
                "mean": float(np.mean(ok)) if ok else None,
                "std": float(np.std(ok, ddof=1)) if len(ok) > 1 else None,
                "seconds": float(np.mean(secs)) if secs else None,
                "status": "n/a" if docs and not ok and all(c.get("status") == "n/a" for c in docs)
                else ("ok" if ok else "missing"),
            }
        out[row_label(m, imp, ft)] = row
    return out


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _accuracy_section(cfg: BenchConfig, summary: Mapping[str, Mapping[str, Any]]) -> str:
    cols = [f"{s}-way" for s in cfg.splits]
    rows = [[label] + [summary[label][c]["text"] for c in cols] for label in summary]
    return ("## Test accuracy (%)\n\n" + _md_table(["Method"] + [c + " split" for c in cols], rows) +
            f"\n\nMean ± std over {len(cfg.seeds)} seed(s) {list(cfg.seeds)}; base models: sorted by "
            "accuracy within each seed, then averaged per rank (more than four: mean and range). "
            "N/A: the method does not apply; –: not computed.\n")


def _importance_section(cfg: BenchConfig, cells: Sequence[Mapping[str, Any]]) -> str:
    parts = ["## Importance scores (test accuracy %)\n"]
    methods = [m for m in row_order(cfg.methods) if _uses_importance(m)]
    for split in cfg.splits:
        rows = []
        for m in methods:
            r = [method_label(m)]
            for imp in cfg.importances:
                docs = [c for c in cells if c["method"] == m and c["importance"] == imp
                        and c["split"] == split and not c.get("sweep") and not c.get("finetuned")
                        and c.get("width") is None]
                r.append(format_cell(docs))
            rows.append(r)
        parts.append(f"### {split}-way split\n\n" + _md_table(["Method"] + list(cfg.importances), rows) + "\n")
    return "\n".join(parts)


def _runtime_section(cfg: BenchConfig, cells: Sequence[Mapping[str, Any]]) -> str:
    parts = ["## Runtime (seconds of fusion, importance scores included)\n"]
    for split in cfg.splits:
        rows = []
        for m in row_order(cfg.methods):
            r = [method_label(m)]
            imps = cfg.importances if _uses_importance(m) else ("uniform",)
            for imp in cfg.importances:
                if imp not in imps:
                    r.append(NA)
                    continue
                docs = [c for c in cells if c["method"] == m and c["importance"] == imp
                        and c["split"] == split and not c.get("sweep") and not c.get("finetuned")
                        and c.get("width") is None]
                r.append(format_cell(docs, "seconds", scale=1.0, digits=2))
            rows.append(r)
        parts.append(f"### {split} models, {cfg.fusion_samples} fusion samples\n\n" +
                     _md_table(["Method"] + [f"{imp} (s)" for imp in cfg.importances], rows) + "\n")
    return "\n".join(parts)


def _sweep_section(cfg: BenchConfig, cells: Sequence[Mapping[str, Any]]) -> str:
    assert cfg.sweep is not None
    parts = [f"## Runtime against fusion-set size ({cfg.sweep.importance} importance)\n"]
    for split in cfg.splits:
        rows = []
        for n in cfg.sweep.fusion_samples:
            r = [str(n)]
            for m in cfg.sweep.methods:
                docs = [c for c in cells if c.get("sweep") and c["method"] == m and c["split"] == split
                        and c["fusion_samples"] == n]
                r.append(f"{format_cell(docs, 'seconds', 1.0, 2)} s ({format_cell(docs)} %)")
            rows.append(r)
        header = ["Fusion samples"] + [f"{method_label(m)}: seconds (accuracy)" for m in cfg.sweep.methods]
        parts.append(f"### {split} models\n\n" + _md_table(header, rows) + "\n")
    return "\n".join(parts)


def _software_line(sw: Mapping[str, Any]) -> str:
    names = ["python", "neurofuse", "torch", "numpy", "scipy", "POT", "captum", "scikit-learn", "safetensors"]
    return "- Software: " + ", ".join(f"{k} {sw[k]}" for k in names if sw.get(k)) + \
        f"; {sw.get('torch_threads', '?')} torch threads; {sw.get('platform', '?')}"


def pareto_points(cfg: BenchConfig, cells: Sequence[Mapping[str, Any]], bases: Sequence[Mapping[str, Any]],
                  split: int) -> Dict[str, Any]:
    """The ``pareto`` curve of one split: ``{"curve": [(width, params, mean, std, n)], "ensemble":
    (params, mean, std, n) or None, "best_base", "mean_base"}`` (accuracies as fractions)."""
    def stats(docs: Sequence[Mapping[str, Any]]) -> Tuple[Optional[int], Optional[float], Optional[float], int]:
        ok = [d for d in docs if d.get("status") == "ok"]
        if not ok:
            return None, None, None, 0
        acc = [d["accuracy"] for d in ok]
        return (int(ok[0].get("params") or 0), float(np.mean(acc)),
                float(np.std(acc, ddof=1)) if len(acc) > 1 else None, len(acc))

    assert cfg.pareto is not None
    mine = [c for c in cells if c.get("width") is not None and c["split"] == split]
    curve = []
    for w in cfg.pareto.widths:
        if w > split:
            continue
        docs = [c for c in mine if c["method"] == cfg.pareto.method and c["width"] == float(w)]
        curve.append((float(w),) + stats(docs))
    ens = stats([c for c in mine if is_ensemble(c["method"])])
    b = [d for d in bases if d["split"] == split]
    return {"curve": curve, "ensemble": ens if ens[1] is not None else None,
            "best_base": float(np.mean([d["accuracies"][0] for d in b])) if b else None,
            "mean_base": float(np.mean([np.mean(d["accuracies"]) for d in b])) if b else None}


def _pareto_section(cfg: BenchConfig, cells: Sequence[Mapping[str, Any]], bases: Sequence[Mapping[str, Any]]) -> str:
    assert cfg.pareto is not None
    pa = cfg.pareto
    parts = [f"## Accuracy against parameters: {method_label(pa.method)} "
             f"({pa.importance} importance{', class shares' if pa.class_shares else ''}) at fused widths "
             f"{', '.join(f'x{w:g}' for w in pa.widths)}\n"]

    def pct(mean: Optional[float], std: Optional[float]) -> str:
        if mean is None:
            return "–"
        return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")

    for split in cfg.splits:
        pts = pareto_points(cfg, cells, bases, split)
        rows = [[f"x{w:g}", f"{p:,}" if p else "–", pct(m, sd)] for w, p, m, sd, _ in pts["curve"]]
        if pts["ensemble"] is not None:
            p, m, sd, _ = pts["ensemble"]
            rows.append([f"ensemble{' (class shares)' if pa.class_shares else ''}", f"{p:,}", pct(m, sd)])
        rows.append(["best base model", pts["curve"][0][1] and f"{pts['curve'][0][1]:,}" or "–",
                     pct(pts["best_base"], None)])
        rows.append(["mean base model", "", pct(pts["mean_base"], None)])
        parts.append(f"### {split} models\n\n" + _md_table(["Fused width", "Parameters", "Test accuracy %"], rows) + "\n")
    return "\n".join(parts)


def render_report(doc: Mapping[str, Any]) -> str:
    """``report.md`` from a ``results.json`` document."""
    cfg = config_from_dict(doc["config"])
    cells = doc["cells"]
    m = doc.get("machine", {})
    lines = [f"# {cfg.title} — scale `{cfg.scale}`", ""]
    if cfg.paper:
        lines += [f"Paper: {cfg.paper}", ""]
    if cfg.description:
        lines += [cfg.description, ""]
    lines += [
        f"- Command: `{doc.get('command') or 'neurofuse bench run ' + cfg.name + ' --scale ' + cfg.scale}`",
        f"- Data: {cfg.dataset}" + (f" (training set subsampled to {cfg.train_subsample}, class-balanced)"
                                    if cfg.train_subsample else "") +
        f", {cfg.partition} partition" + (f" (ratio {cfg.ratio})" if cfg.partition == "dirichlet" else "") +
        f", {cfg.fusion_samples} fusion samples from the training set",
        f"- Models: {cfg.arch} ({cfg.size}), epochs " + json.dumps(cfg.train["epochs"]) +
        f", checkpoint chosen on a {cfg.val_fraction:.0%} validation split of each model's data",
        f"- Machine: {m.get('processor', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')}"
        f" ({m.get('torch_threads', '?')} threads), device {m.get('device', '?')}"
        + (f" ({m['gpu']})" if m.get("gpu") else ""),
        *([_software_line(m["software"])] if m.get("software") else []),
        f"- Cells: {doc['n_done']} of {doc['n_expected']} done" +
        (f"; missing: {', '.join(doc['missing'][:12])}{' ...' if len(doc['missing']) > 12 else ''}"
         if doc["missing"] else ""),
        "",
    ]
    summary = doc["summary"]
    for section in cfg.report:
        if section == "accuracy":
            lines.append(_accuracy_section(cfg, summary))
        elif section == "importance":
            lines.append(_importance_section(cfg, cells))
        elif section == "runtime":
            lines.append(_runtime_section(cfg, cells))
        elif section == "sweep":
            lines.append(_sweep_section(cfg, cells))
        elif section == "pareto":
            lines.append(_pareto_section(cfg, cells, doc.get("base_models", [])))
    reasons: Dict[str, Tuple[List[int], str]] = {}
    for c in cells:
        if c.get("status") == "n/a":
            splits, _ = reasons.setdefault(c["method"], ([], c.get("reason", "")))
            if c["split"] not in splits:
                splits.append(c["split"])
    if reasons:
        lines.append("## Not applicable\n")
        lines += [f"- {method_label(mm)} ({', '.join(f'{s}-way' for s in sorted(sp))}): {r}"
                  for mm, (sp, r) in reasons.items()]
        lines.append("")
    figs = doc.get("figures") or []
    if figs:
        lines.append("## Figures\n")
        lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figs]
        lines.append("")
    return "\n".join(lines)


def _read(p: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_outputs(out: Path, cfg_doc: Optional[Mapping[str, Any]] = None, machine: Optional[Mapping[str, Any]] = None,
                  last_run: Optional[Mapping[str, Any]] = None, figures: Optional[List[str]] = None) -> Dict[str, Any]:
    """Collect the cell files of ``out`` into ``results.json``, ``report.md`` and the bar chart."""
    from ..checkpoint import save_json
    from ._figures import bars_figure

    out = Path(out)
    if cfg_doc is None:
        cfg_doc = _read(out / "config.json")
        if not cfg_doc or "config" not in cfg_doc:
            raise ConfigError(f"{out} is not a benchmark output directory (no readable config.json)")
    old = _read(out / "results.json") or {}
    cfg = config_from_dict(cfg_doc["config"])
    cells = read_cells(out)
    bases = []
    for p in sorted((out / "cells").glob("base__*.json")):
        d = _read(p)
        if d and "accuracies" in d:
            bases.append(d)
    wanted = {c.cell_id for c in expected_cells(cfg)}
    seeds, splits = set(cfg.seeds), set(cfg.splits)
    cells = [c for c in cells if c["cell_id"] in wanted]
    bases = [b for b in bases if b["seed"] in seeds and b["split"] in splits]
    done = {c["cell_id"] for c in cells}
    missing = [c.cell_id for c in expected_cells(cfg) if c.cell_id not in done]
    summary = summarise(cfg, cells, bases)
    figs = list(figures if figures is not None else old.get("figures", []))
    doc: Dict[str, Any] = {
        "benchmark": cfg.name, "scale": cfg.scale, "title": cfg.title, "paper": cfg.paper,
        "command": cfg_doc.get("command"), "device": cfg_doc.get("device"),
        "cache": cfg_doc.get("cache", old.get("cache")),
        "machine": dict(machine or old.get("machine", {})),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": cfg.to_dict(),
        "n_expected": len(wanted), "n_done": len(done), "missing": missing,
        "base_models": bases,
        "ensemble": [c for c in cells if is_ensemble(c["method"])],
        "cells": cells,
        "summary": summary,
        "last_run": dict(last_run or old.get("last_run", {})),
        "figures": figs,
    }
    if "bars" in cfg.figures and cfg.methods:
        p = bars_figure(cfg, summary, out / "accuracy_bars.png")
        if p is not None and str(p.name) not in [Path(f).name for f in figs]:
            figs.insert(0, p.name)
    if "pareto" in cfg.figures and cfg.pareto is not None:
        from ._figures import pareto_figure

        p = pareto_figure(cfg, [pareto_points(cfg, cells, bases, n) for n in cfg.splits], out / "pareto.png")
        if p is not None and str(p.name) not in [Path(f).name for f in figs]:
            figs.append(p.name)
    doc["figures"] = [Path(f).name for f in figs]
    save_json(doc, out / "results.json", force=True)
    write_report(out, doc)
    return doc


def write_report(out: Path, doc: Mapping[str, Any]) -> Path:
    """Render ``doc`` into ``<out>/report.md`` (written atomically and durably)."""
    return write_text(Path(out) / "report.md", render_report(doc))
