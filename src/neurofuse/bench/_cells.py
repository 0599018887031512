"""Cells of a benchmark: what is computed (:func:`expected_cells`) and what is done (:func:`read_cells`).

Shared by the runner (:mod:`._runner`, which writes cell files) and the report (:mod:`._report`,
which reads them), so that neither imports the other's module to know what a cell is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import NeurofuseError
from ._config import BenchConfig

__all__ = ["Cell", "cell_path", "expected_cells", "read_cells", "read_json"]


@dataclass(frozen=True)
class Cell:
    """One result: a method with one importance score on one split and seed."""

    method: str
    importance: str
    split: int
    seed: int
    fusion_samples: int
    finetuned: bool = False
    sweep: bool = False
    #: fused width multiplier of a ``pareto`` cell (``None``: the method's default width)
    width: Optional[float] = None

    @property
    def cell_id(self) -> str:
        parts = [self.method, self.importance, f"n{self.split}", f"s{self.seed}"]
        if self.sweep:
            parts.append(f"f{self.fusion_samples}")
        if self.width is not None:
            parts.append(f"w{self.width:g}")
        if self.finetuned:
            parts.append("ft")
        return "__".join(parts)

    @property
    def label(self) -> str:
        imp = f"/{self.importance}" if self.importance != "uniform" or self._uses_importance() else ""
        extra = f", {self.fusion_samples} samples" if self.sweep else ""
        ft = " + fine-tuning" if self.finetuned else ""
        if self.width is not None:
            extra += f", width x{self.width:g}"
        return f"{self.method}{imp}{ft}, {self.split}-way, seed {self.seed}{extra}"

    def _uses_importance(self) -> bool:
        from ..methods import get_method

        try:
            return bool(get_method(self.method).uses_importance)
        except NeurofuseError:
            return False


def ensemble_method() -> str:
    """The registered method whose output is an ensemble (the end point of a pareto curve)."""
    from ..methods import get_method, list_methods

    return next(n for n in list_methods() if get_method(n).output_is_ensemble)


def cell_path(out: Path, cell: Cell) -> Path:
    return Path(out) / "cells" / f"{cell.cell_id}.json"


def _variants(methods: Sequence[str], importances: Sequence[str]) -> List[Tuple[str, str]]:
    from ..methods import get_method

    out = []
    for m in methods:
        if get_method(m).uses_importance:
            out.extend((m, imp) for imp in importances)
        else:
            out.append((m, "uniform"))
    return out


def expected_cells(cfg: BenchConfig) -> List[Cell]:
    """Every cell of a config, in the order they run (seed, then split, then method)."""
    cells: List[Cell] = []
    for seed in cfg.seeds:
        for split in cfg.splits:
            for m, imp in _variants(cfg.methods, cfg.importances):
                cells.append(Cell(m, imp, split, seed, cfg.fusion_samples))
            if cfg.finetune is not None:
                for m, imp in _variants(cfg.finetune.methods, cfg.importances):
                    cells.append(Cell(m, imp, split, seed, cfg.fusion_samples, finetuned=True))
            if cfg.sweep is not None:
                for m in cfg.sweep.methods:
                    for n in cfg.sweep.fusion_samples:
                        cells.append(Cell(m, cfg.sweep.importance, split, seed, n, sweep=True))
            if cfg.pareto is not None:
                # the ensemble (the curve's end point) and every width the models' neurons allow
                cells.append(Cell(ensemble_method(), "uniform", split, seed, cfg.fusion_samples,
                                  width=float(split)))
                for w in cfg.pareto.widths:
                    if w <= split:
                        cells.append(Cell(cfg.pareto.method, cfg.pareto.importance, split, seed,
                                          cfg.fusion_samples, width=float(w)))
    return cells


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON document in ``path``, or ``None`` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_cells(out: Path) -> List[Dict[str, Any]]:
    """Every complete cell file of an output directory (temporary files are ignored)."""
    docs = []
    for p in sorted((Path(out) / "cells").glob("*.json")):
        if p.name.startswith("."):
            continue
        d = read_json(p)
        if d and d.get("cell_id") == p.stem and d.get("status") in ("ok", "n/a"):
            docs.append(d)
    return docs


