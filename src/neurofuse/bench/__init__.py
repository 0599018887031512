"""Benchmarks that reproduce the paper's tables and figures (``neurofuse bench``).

Each experiment is a declarative JSON config shipped in ``neurofuse/bench/configs/`` with three
scales (``smoke``: seconds on digits; ``cpu``: minutes on MNIST on a laptop; ``full``: the paper's
models and budgets, for a GPU).  :func:`run_benchmark` trains the base models once per
(split, seed) and caches them by a hash of their settings, writes every finished cell to its own
JSON file (so a killed run resumes), and writes ``results.json``, ``report.md`` and figures.

>>> from neurofuse.bench import load_config, run_benchmark
>>> cfg = load_config("table1", "smoke")                       # doctest: +SKIP
>>> doc = run_benchmark(cfg, "runs/bench/table1-smoke")        # doctest: +SKIP
"""

from ._config import (FIGURES, SCALES, SECTIONS, BenchConfig, FinetuneSpec, SweepSpec, config_dir,
                      list_configs, load_config, parse_config)
from ._cells import Cell, expected_cells
from ._report import config_from_dict, fmt_mean_std, format_cell, render_report, write_outputs
from ._runner import STATS, default_out, machine_info, run_benchmark, software_versions

__all__ = ["BenchConfig", "Cell", "FIGURES", "FinetuneSpec", "SCALES", "SECTIONS", "STATS", "SweepSpec",
           "config_dir", "config_from_dict", "default_out", "expected_cells", "fmt_mean_std", "format_cell",
           "list_configs", "load_config", "machine_info", "parse_config", "render_report", "run_benchmark",
           "software_versions", "write_outputs"]
