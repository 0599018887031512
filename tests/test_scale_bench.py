"""benchmarks/scale.py: the plan and the report (no fusion is run here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _scale():
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "benchmarks" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(cid, cpu, delta=100.0):
    return {"id": cid, "src": "current", "status": "ok", "wall_s": cpu, "cpu_s": cpu, "peak_mib": delta + 400,
            "delta_mib": delta, "floor_cpu_s": 0.1}


def test_fit_exponent_is_the_log_log_slope():
    scale = _scale()
    assert abs(scale.fit_exponent([(2, 4), (4, 16), (8, 64)]) - 2.0) < 1e-12
    assert scale.fit_exponent([(2, 4), (2, 5)]) is None


def test_core_plan_has_the_ridge0_cells_next_to_their_auto_cells():
    scale = _scale()
    cells = {c["id"]: c for c in scale.plan("core")}
    for auto in ("vgg11-w0.5/n2/s400/kf-linear", "mlp-d1/n8/s400/kf-linear"):
        assert "ridge" in cells[auto]["axes"] and cells[auto]["options"] == {}
        assert cells[auto + "/ridge0"]["options"] == {"ridge": 0.0}
        assert cells[auto + "/ridge0"]["axes"] == ["ridge"]


def test_report_gives_the_ridge_ratio_and_keeps_variants_out_of_the_exponent_fit():
    scale = _scale()
    cells = [c for c in scale.plan("core") if c["id"].startswith("mlp-d1/") and c["method"] == "kf-linear"]
    runs = []
    for c in cells:
        n = c["n"]
        # kf-linear cost ~ n^1, the n_init=3 variant at 32 models would break the slope if it were pooled
        cpu = 0.1 * n if not c["options"] else 1000.0
        runs.append(_run(c["id"], cpu))
    runs.append(_run("mlp-d1/n8/s400/kf-linear/ridge0", 0.4))
    res = {"command": "x", "versions": {}, "threads": 1, "device": "cpu", "srcs": ["current"],
           "cells": cells, "runs": runs}
    text = scale.report(res)
    assert "## ridge='auto' / ridge=0" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| mlp-d1/n8/s400/kf-linear | current | 0.80"))
    assert "| 2.00 |" in row
    fit = next(ln for ln in text.splitlines() if ln.startswith("| mlp ") and "cpu_s" in ln and "options" not in ln)
    assert "| 1.00 |" in fit
