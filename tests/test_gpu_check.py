"""benchmarks/gpu_check.py in its dry mode: the GPU check cannot rot on a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import neurofuse

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_collects_the_gpu_tests_and_runs_the_benchmark_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONPATH=str(Path(neurofuse.__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["dry"] and res["device"]["device"] == "cpu"
    tests = res["tests"]
    assert tests["status"] == "ok" and tests["collected_only"]
    assert "test_gpu.py" in tests["summary"] or "collected" in tests["summary"] or "tests" in tests["summary"]
    bench = res["bench"]
    assert bench["models"] == 2 and bench["kf_linear_best_s"] > 0
    run = bench["runs"]["kf-linear"][0]
    assert {"statistics", "grouping", "solve"} <= set(run["phases"])
    assert bench["host_transfers"]["matrices"] == []       # kf-linear keeps every matrix on the device
    if "otfusion" in bench["runs"]:
        assert "seconds" in bench["runs"]["otfusion"][0]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kf_linear_best_s"] == bench["kf_linear_best_s"]


def test_gpu_check_without_cuda_says_to_use_dry(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    env = dict(os.environ, PYTHONPATH=str(Path(neurofuse.__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "g.json")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dry" in proc.stderr
