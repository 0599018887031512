"""The ``pareto`` benchmark: partial fusion, accuracy against parameter count."""

from __future__ import annotations

import json

import torch

from neurofuse.bench import expected_cells, load_config
from neurofuse.cli import main


def test_pareto_cells_stop_at_the_sum_of_the_widths():
    cfg = load_config("pareto", "full")
    for split in cfg.splits:
        widths = sorted(c.width for c in expected_cells(cfg) if c.split == split and c.method == "kf-linear"
                        and c.seed == cfg.seeds[0])
        assert widths[0] == 1.0 and widths[-1] == split and all(w <= split for w in widths)


def test_smoke_pareto_writes_the_curve_the_table_and_the_figure(tmp_path):
    out = tmp_path / "pareto-smoke"
    threads = torch.get_num_threads()
    try:
        rc = main(["bench", "run", "pareto", "--scale", "smoke", "--out", str(out), "--no-progress",
                   "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["n_done"] == doc["n_expected"] and not doc["missing"]
    fused = sorted((c["width"], c["params"], c["accuracy"]) for c in doc["cells"] if c["method"] == "kf-linear")
    assert [w for w, _, _ in fused] == [1.0, 1.25, 1.5, 2.0]
    params = [p for _, p, _ in fused]
    assert params == sorted(params) and params[-1] > params[0]
    ens = [c for c in doc["cells"] if c["method"] == "ensemble"]
    assert ens and ens[0]["params"] == 2 * params[0]        # two base models of x1's size
    report = (out / "report.md").read_text()
    for row in ["| x1 |", "| x2 |", "| ensemble (class shares) |", "| best base model |", "| mean base model |"]:
        assert row in report
    assert (out / "pareto.png").stat().st_size > 10_000 and "pareto.png" in report
