"""Scale benchmark: seconds, CPU seconds, peak memory and phases of a fusion at the size of real models.

    python benchmarks/scale.py --out runs/scale --data-dir /work/shared/data            # plan "core"
    python benchmarks/scale.py --out runs/scale --src before=../before/src --src after=src
    python benchmarks/scale.py --out runs/scale --plan goal          # only the cells of the goal ratios
    python benchmarks/scale.py --out runs/scale --only vgg11-w1/n4   # cells whose id contains this
    python benchmarks/scale.py --out runs/scale --list               # the planned cells, run nothing
    python benchmarks/scale.py --out runs/scale --report-only        # report.md from results.json

Every measurement is one ``neurofuse.fuse(...)`` in a **fresh child process** started with
``PYTHONPATH=<src>`` (``--src LABEL=DIR``, repeatable, default ``current=src``), one torch/BLAS
thread (``--threads``), an address-space limit (``--mem-limit-gb``, ``RLIMIT_AS``: a blow-up fails
the child, not the machine) and a time limit (``--timeout``).  With several ``--src`` every cell
runs each tree back to back, alternating which goes first, so load from other processes hits
all alike: compare trees only by ratios taken in the same run.

What a child records
--------------------
* ``wall_s`` / ``cpu_s``: wall and process CPU seconds of the ``fuse`` call (the models and the
  fusion set are built before the clock starts; modules a method imports lazily are imported
  before it too).
* ``peak_mib`` / ``delta_mib``: the peak resident memory during the call (``VmHWM`` after resetting
  it through ``/proc/self/clear_refs``) and that peak minus the resident memory at the call: what
  the fusion needs beyond the models and the fusion set.
* ``phases``: exclusive wall seconds per phase from :class:`neurofuse._phases.PhaseTimer`
  (``statistics``, ``eigh``, ``solve``, ``grouping``, ``importance``, ``repair``, ``spill``, and
  ``forward``: every call of a level of any ``LeveledNet``, timed by forward hooks this script
  adds; ``other`` is the rest).  A tree without the timer reports no phases.
* ``floor_s`` / ``floor_cpu_s``: **the limit's forward part**, measured after the fusion in the
  same child: one forward pass of every base model over the fusion set (``torch.no_grad``, batches
  of 256), wall and CPU seconds.  ``cpu_s / floor_cpu_s`` says how far a method is from "one pass
  per model"; the phases say
  where the rest goes (the per-level algebra: ``statistics + eigh + solve + grouping``).

Models (``--train-steps``): the MLPs (the paper's 784-256-10, or deeper with ``depth``) are trained
briefly (``--mlp-steps`` Adam steps of 64 MNIST images, each model on its own slice) and cached
under ``<out>/models``; VGG, ResNet, ViT and BERT-shaped models have **random weights** (seeded
initialisation; BatchNorm with its initial statistics): the cost of a fusion depends on the
shapes, not on what the weights learnt (K-means and OT iteration counts excepted, which are small
shares here).  Inputs: MNIST (``--data-dir``), class-balanced draws of the training set
(``balanced_subset``, seed 0); conv and ViT models see the digits padded to 32x32 and repeated to
3 channels; BERT-shaped models see random token ids (32 per sample, vocabulary 30,522).

Outputs: ``<out>/results.json`` (every child's record, the arguments, versions, cores) and
``<out>/report.md`` (tables per axis with the growth exponents fitted by least squares on
log-log points, the goal ratios, phase shares), rewritten after every child; ``--plots DIR``
draws ``scale-*.png`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
PREIMPORT = ["ot", "scipy.linalg", "scipy.optimize"]
ALL = ("kf-linear", "hf-linear", "otfusion", "git-rebasin", "vanilla")
N_METHODS = ("kf-linear", "otfusion", "vanilla")      # methods that take N models
TWO = ("hf-linear", "git-rebasin")
#: kf-gradient with short fits on the big models (its default stops a level after at most 50 epochs)
SHORT_GRADIENT = {"preset": "default", "levels": {"epochs": 3}, "head": {"epochs": 3}}
#: one epoch per level on the transformer-shaped models (a ViT-S pass over 400 samples: ~40 CPU s)
ONE_EPOCH = {"preset": "default", "levels": {"epochs": 1}, "head": {"epochs": 1}}
VGG_LAYOUT = {11: "vgg11", 13: "vgg13", 16: "vgg16"}


# =============================================================================================
# the plan
# =============================================================================================
def _cell(family: str, n: int, method: str, *, width: float = 1.0, samples: int = 400, depth: int = 0,
          options: Optional[Dict[str, Any]] = None, tag: str = "short", axes: Sequence[str] = ()) -> Dict[str, Any]:
    name = {"mlp": f"mlp-d{depth or 1}", "vgg": f"vgg{depth or 11}-w{width:g}", "resnet": f"resnet{depth or 18}",
           "vit": "vit-s", "bert": "bert-base"}[family]
    cid = f"{name}/n{n}/s{samples}/{method}" + (f"/{tag}" if options else "")
    return {"id": cid, "family": family, "n": n, "method": method, "width": width, "samples": samples,
            "depth": depth, "options": options or {}, "axes": list(axes)}


def plan(name: str) -> List[Dict[str, Any]]:
    """The cells of plan ``name``: ``goal`` (the ratios of the issue), ``core`` (every axis),
    ``quick`` (a smoke run of a few seconds per cell)."""
    cells: List[Dict[str, Any]] = []
    add = cells.append
    if name == "quick":
        for m in ALL:
            add(_cell("mlp", 2, m, axes=["models"]))
        add(_cell("vgg", 2, "kf-linear", width=0.125, axes=["width"]))
        add(_cell("vgg", 2, "otfusion", width=0.125, axes=["width"]))
        return cells
    # number of models: the paper's MLP, full-width VGG11 and ResNet-18 at 3x32x32, 400 samples
    for n in (2, 4, 8, 16, 32, 64) if name == "core" else (32, 64):
        for m in ("kf-linear", "otfusion") + (("vanilla",) if name == "core" else ()):
            add(_cell("mlp", n, m, axes=["models"]))
    for n in (2, 4, 8):
        for m in ("kf-linear", "otfusion", "vanilla"):
            add(_cell("vgg", n, m, axes=["models", "goal"]))
            add(_cell("resnet", n, m, axes=["models", "goal"]))
    for m in TWO:
        add(_cell("mlp", 2, m, axes=["models"]))
        add(_cell("vgg", 2, m, axes=["models", "goal"]))
        add(_cell("resnet", 2, m, axes=["models", "goal"]))
    # the K-means restarts: 3 instead of 10 (93.63 against 93.70 % on held-out data at 8 MLPs)
    add(_cell("mlp", 32, "kf-linear", options={"n_init": 3}, tag="ninit3", axes=["models", "goal"]))
    if name == "goal":
        return cells
    # memory_budget: the working set held to 1 GiB (2 VGG11s) and 3 GiB (8 VGG11s)
    add(_cell("vgg", 2, "kf-linear", options={"memory_budget": 2**30}, tag="budget1g", axes=["memory"]))
    add(_cell("vgg", 8, "kf-linear", options={"memory_budget": 3 * 2**30}, tag="budget3g", axes=["memory"]))
    # a budget below the fixed part of the estimate: refused before any work, with the estimate
    add(_cell("vgg", 8, "kf-linear", options={"memory_budget": 256 * 2**20}, tag="budget256m", axes=["memory"]))
    add(_cell("resnet", 16, "otfusion", axes=["models", "memory"]))
    add(_cell("resnet", 16, "vanilla", axes=["models", "memory"]))
    add(_cell("mlp", 2, "kf-gradient", axes=["gradient"]))
    add(_cell("mlp", 8, "kf-gradient", axes=["gradient"]))
    add(_cell("vgg", 2, "kf-gradient", options=SHORT_GRADIENT, axes=["gradient"]))
    # width: VGG11 at 1/8 ... 1/2 (the full width is in the models axis), 2 models
    for w in (0.125, 0.25, 0.5):
        for m in ALL:
            add(_cell("vgg", 2, m, width=w, axes=["width"]))
    # fusion samples: 8 MLPs and 2 VGG11s at 1/4 width, 400 ... 40,000
    for s in (400, 4000, 40000):
        for m in ("kf-linear", "otfusion"):
            add(_cell("mlp", 8, m, samples=s, axes=["samples"]))
        for m in ALL:
            add(_cell("vgg", 2, m, width=0.25, samples=s, axes=["samples"]))
    # depth: MLPs with 1, 2, 4, 8 hidden layers of 256 (4 models); VGG11/13/16 at 1/4 width
    for d in (2, 4, 8):
        for m in ("kf-linear", "otfusion"):
            add(_cell("mlp", 4, m, depth=d, axes=["depth"]))
    for m in ("kf-linear", "otfusion"):
        add(_cell("mlp", 4, m, depth=1, axes=["depth"]))
        for d in (0, 13, 16):
            add(_cell("vgg", 2, m, width=0.25, depth=d, axes=["depth"]))
    # ridge="auto" (issue 23, the closed form's default) against ridge=0, side by side
    for kw in ({"family": "vgg", "width": 0.5}, {"family": "mlp", "n": 8}):
        fam = kw.pop("family")
        n = kw.pop("n", 2)
        add(_cell(fam, n, "kf-linear", axes=["ridge"], **kw))
        add(_cell(fam, n, "kf-linear", options={"ridge": 0.0}, tag="ridge0", axes=["ridge"], **kw))
    # transformer-shaped rows: the whole-model method and short kf-gradient fits
    for fam in ("vit", "bert"):
        add(_cell(fam, 2, "vanilla", axes=["big"]))
        add(_cell(fam, 2, "kf-gradient", options=ONE_EPOCH, tag="epoch1", axes=["big"]))
        add(_cell(fam, 2, "kf-linear", axes=["big"]))
    add(_cell("resnet", 2, "kf-gradient", options=SHORT_GRADIENT, axes=["big"]))
    # dedupe (the full-width VGG11 points of the width and depth axes are the models axis' cells)
    seen: Dict[str, Dict[str, Any]] = {}
    for c in cells:
        if c["id"] in seen:
            seen[c["id"]]["axes"] = sorted(set(seen[c["id"]]["axes"]) | set(c["axes"]))
        else:
            seen[c["id"]] = c
    return list(seen.values())


# =============================================================================================
# the child: one fusion
# =============================================================================================
def _proc_status() -> Dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "VmHWM")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def _mnist(data_dir: str, samples: int, image32: bool) -> Tuple[Any, Any]:
    import numpy as np
    import torch.nn.functional as F

    from neurofuse.data import balanced_subset, load_dataset

    ds = load_dataset("mnist", data_dir)
    y = ds.y_train.numpy()
    idx = balanced_subset(y, np.arange(len(y)), samples, seed=0)
    x = ds.x_train[idx]
    if image32:
        x = F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()
    return x, ds.y_train[idx]


def _models(spec: Dict[str, Any], out: Path) -> List[Any]:
    import torch

    fam, n, depth = spec["family"], spec["n"], spec["depth"]
    if fam == "mlp":
        from neurofuse.models import MLP

        models = []
        for s in range(n):
            m = MLP((1, 28, 28), 10, [256] * (depth or 1))
            m.load_state_dict(torch.load(out / "models" / f"mlp-d{depth or 1}-{s}.pt", weights_only=True))
            models.append(m.eval())
        return models
    built = []
    for s in range(n):
        torch.manual_seed(1000 + s)
        if fam == "vgg":
            from neurofuse.models import VGG

            m = VGG((3, 32, 32), 10, VGG_LAYOUT[depth or 11], width_multiplier=spec["width"])
        elif fam == "resnet":
            from neurofuse.models import ResNet

            m = ResNet((3, 32, 32), 10, depth=depth or 18, width_multiplier=spec["width"])
        elif fam == "vit":   # ViT-S widths and depth (hidden 384, 12 blocks, 6 heads, MLP 1536), patch 4
            from neurofuse.models import ViT

            m = ViT((3, 32, 32), 10, patch=4, hidden=384, depth=12, heads=6, mlp_hidden=1536)
        elif fam == "bert":  # BERT-base: hidden 768, 12 layers, 12 heads, MLP 3072, vocabulary 30,522
            from neurofuse.hf import tiny_model

            m = tiny_model("bert", (32,), 10, seed=1000 + s, hidden=768, layers=12, vocab_size=30522,
                           num_attention_heads=12, intermediate_size=3072)
        else:
            raise ValueError(fam)
        built.append(m.eval())
    return built


def _data(spec: Dict[str, Any], data_dir: str) -> Tuple[Any, Any]:
    import torch

    if spec["family"] == "bert":
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, 30522, (spec["samples"], 32), generator=g),
                torch.randint(0, 10, (spec["samples"],), generator=g))
    return _mnist(data_dir, spec["samples"], image32=spec["family"] != "mlp")


def _level_timer(phases: Any) -> Any:
    """Forward hooks on every level of every LeveledNet built from now on: phase ``forward``."""
    from neurofuse.levels import LeveledNet

    def pre(module: Any, args: Any) -> None:
        timer = phases._active
        if timer is not None:
            timer.push("forward")

    def post(module: Any, args: Any, output: Any) -> None:
        timer = phases._active
        if timer is not None and timer._stack and timer._stack[-1] == "forward":
            timer.pop()

    init = LeveledNet.__init__

    def wrapped(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        for level in self.levels:
            level.register_forward_pre_hook(pre)
            level.register_forward_hook(post)

    LeveledNet.__init__ = wrapped  # type: ignore[method-assign]
    return wrapped


def child(spec: Dict[str, Any]) -> Dict[str, Any]:
    import resource

    limit = int(spec["mem_limit_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import importlib

    import torch

    torch.set_num_threads(spec["threads"])
    for mod in PREIMPORT:
        importlib.import_module(mod)
    import neurofuse

    result: Dict[str, Any] = {"neurofuse_file": neurofuse.__file__}
    try:
        phases: Any = importlib.import_module("neurofuse._phases")
    except ImportError:
        phases = None
    if phases is not None:
        _level_timer(phases)
    out = Path(spec["out"])
    models = _models(spec, out)
    x, y = _data(spec, spec["data_dir"])
    result["params"] = sum(p.numel() for p in models[0].parameters())
    result["model_mib"] = sum(p.numel() * p.element_size() for m in models for p in m.parameters()) / 2**20
    # LAPACK and BLAS initialise on first use: not part of any fusion
    g = torch.randn(64, 64, dtype=torch.float64)
    torch.linalg.eigh(g @ g.T)
    options = dict(spec["options"])
    if spec["device"] != "cpu":
        options["device"] = spec["device"]
    before = _proc_status()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    result["rss_before_mib"] = before.get("VmRSS", 0) / 1024
    timer = phases.PhaseTimer(sync=spec["device"] != "cpu") if phases is not None else None
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with timer if timer is not None else contextlib.nullcontext():
            # the fused model is dropped at once: its memory is not part of the floor's run
            neurofuse.fuse(models, (x, y), method=spec["method"], progress=False, **options)
        result["status"] = "ok"
    except MemoryError as exc:
        result.update(status="memory", error=f"MemoryError: {exc}")
    except Exception as exc:  # a refusal or a failure: recorded, the run goes on
        refused = type(exc).__name__ in ("IncompatibleModelsError", "ConfigError", "MemoryBudgetError")
        result.update(status="refused" if refused else "error", error=f"{type(exc).__name__}: {exc}")
        if not refused:
            result["traceback"] = traceback.format_exc()[-2000:]
    result["wall_s"] = time.perf_counter() - t0
    result["cpu_s"] = time.process_time() - c0
    after = _proc_status()
    result["peak_mib"] = after.get("VmHWM", 0) / 1024
    result["delta_mib"] = result["peak_mib"] - result["rss_before_mib"]
    if timer is not None:
        result["phases"] = {k: round(v, 4) for k, v in timer.seconds.items()}
        result["phases_cpu"] = {k: round(v, 4) for k, v in timer.cpu.items()}
        result["phase_calls"] = dict(timer.calls)
    if result["status"] == "ok":
        bs = 256
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for m in models:
                m.to(spec["device"])
                for lo in range(0, len(x), bs):
                    m(x[lo:lo + bs].to(spec["device"]))
        if spec["device"] != "cpu":
            torch.cuda.synchronize()
        result["floor_s"] = time.perf_counter() - t0
        result["floor_cpu_s"] = time.process_time() - c0
    return result


# =============================================================================================
# the parent
# =============================================================================================
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _train_mlps(out: Path, cells: Sequence[Dict[str, Any]], data_dir: str, steps: int, src: str) -> None:
    """Train (once) and cache the MLPs the cells need: ``steps`` Adam steps of 64 images each,
    model ``s`` on its own slice of the MNIST training set."""
    need: Dict[int, int] = {}
    for c in cells:
        if c["family"] == "mlp":
            d = c["depth"] or 1
            need[d] = max(need.get(d, 0), c["n"])
    todo = [(d, s) for d, n in need.items() for s in range(n)
            if not (out / "models" / f"mlp-d{d}-{s}.pt").exists()]
    if not todo:
        return
    code = f"""
import sys, torch
torch.set_num_threads(1)
from neurofuse.data import load_dataset
from neurofuse.models import MLP
ds = load_dataset("mnist", {data_dir!r})
for d, s in {todo!r}:
    torch.manual_seed(s)
    m = MLP((1, 28, 28), 10, [256] * d)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    g = torch.Generator().manual_seed(s)
    idx = torch.randperm(60000, generator=g)[:64 * {steps}]
    for i in range(0, len(idx), 64):
        b = idx[i:i + 64]
        loss = torch.nn.functional.cross_entropy(m(ds.x_train[b]), ds.y_train[b])
        opt.zero_grad(); loss.backward(); opt.step()
    torch.save(m.state_dict(), {str(out / 'models')!r} + f"/mlp-d{{d}}-{{s}}.pt")
"""
    (out / "models").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _run_child(spec: Dict[str, Any], src: str, timeout: float, log: Path) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
    for v in THREAD_VARS:
        env[v] = str(spec["threads"])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        log.write_text(str(exc.stdout or "") + str(exc.stderr or ""))
        return {"status": "timeout", "wall_s": time.perf_counter() - t0}
    log.write_text(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-600:]
        status = "memory" if "MemoryError" in tail or "alloc" in tail.lower() else "crash"
        return {"status": status, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _versions() -> Dict[str, Any]:
    import numpy
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "cores": os.cpu_count(), "machine": platform.machine(), "node": platform.node()}


# =============================================================================================
# the report
# =============================================================================================
def fit_exponent(points: Sequence[Tuple[float, float]]) -> Optional[float]:
    """Slope of ``log y`` against ``log x`` by least squares (``None`` below 2 distinct x)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _best(runs: List[Dict[str, Any]], cid: str, src: str) -> Optional[Dict[str, Any]]:
    ok = [r for r in runs if r["id"] == cid and r["src"] == src and r.get("status") == "ok"]
    if ok:
        return min(ok, key=lambda r: r["wall_s"])
    other = [r for r in runs if r["id"] == cid and r["src"] == src]
    return other[-1] if other else None


def _fmt(r: Optional[Dict[str, Any]], key: str, digits: int = 2) -> str:
    if r is None:
        return ""
    if r.get("status") != "ok":
        return r.get("status", "?")
    v = r.get(key)
    return "" if v is None else f"{v:.{digits}f}"


PHASES = ("forward", "statistics", "eigh", "solve", "grouping", "importance", "repair", "spill", "other")


def report(results: Dict[str, Any]) -> str:
    runs = results["runs"]
    cells = results["cells"]
    srcs = results["srcs"]
    lines = [f"# Scale benchmark\n\nCommand: `{results['command']}`\n",
             f"Machine: {results['versions']}; threads per child: {results['threads']}; "
             f"device: {results['device']}; {len(runs)} runs.\n",
             "Seconds are wall seconds of the `fuse` call (min over repeats), CPU its process CPU "
             "seconds; peak / Δ are the peak resident MiB during the call and the peak minus the "
             "resident memory at the call; floor is the CPU seconds of one forward pass of every base "
             "model over the fusion set (the limit's forward part). On a shared machine compare CPU "
             "seconds: wall seconds include waiting for the cores.\n"]
    # one table per axis
    axes = [("models", "n", "models"), ("width", "width", "width"), ("samples", "samples", "samples"),
            ("depth", "depth", "depth"), ("gradient", "n", "kf-gradient"), ("big", "n", "big models"),
            ("memory", "n", "memory"), ("ridge", "n", "ridge='auto' against ridge=0")]
    for axis, key, title in axes:
        sel = [c for c in cells if axis in c["axes"]]
        if not sel:
            continue
        lines.append(f"\n## Axis: {title}\n")
        lines.append("| cell | src | status | s | CPU s | peak MiB | Δ MiB | floor CPU s | CPU / floor | phases (CPU s) |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
        for c in sel:
            for s in srcs:
                r = _best(runs, c["id"], s)
                if r is None:
                    continue
                ph = r.get("phases_cpu") or {}
                phs = ", ".join(f"{k} {ph[k]:.2f}" for k in PHASES if ph.get(k, 0) >= 0.005)
                ratio = (f"{r['cpu_s'] / r['floor_cpu_s']:.1f}" if r.get("status") == "ok" and r.get("floor_cpu_s")
                         else "")
                err = "" if r.get("status") == "ok" else " " + str(r.get("error", ""))[:90].replace("|", "/")
                lines.append(f"| {c['id']} | {s} | {r.get('status')}{err} | {_fmt(r, 'wall_s')} | "
                             f"{_fmt(r, 'cpu_s')} | {_fmt(r, 'peak_mib', 0)} | {_fmt(r, 'delta_mib', 0)} | "
                             f"{_fmt(r, 'floor_cpu_s')} | {ratio} | {phs} |")
        # fitted exponents along the axis
        groups: Dict[Tuple[Any, ...], List[Dict[str, Any]]] = {}
        for c in sel:
            other = tuple((k, c[k]) for k in ("family", "n", "width", "samples", "depth", "method") if k != key)
            if c["options"]:   # a variant (n_init=3, ridge=0, ...) is a curve of its own
                other += (("options", json.dumps(c["options"], sort_keys=True)),)
            groups.setdefault(other, []).append(c)
        exps = []
        for other, cs in groups.items():
            if len({c[key] for c in cs}) < 3 or axis in ("gradient", "big", "memory", "ridge"):
                continue
            for s in srcs:
                for metric in ("cpu_s", "delta_mib"):
                    pts = []
                    for c in cs:
                        r = _best(runs, c["id"], s)
                        if r and r.get("status") == "ok":
                            x = c[key] if key != "depth" else (c["depth"] or (11 if c["family"] == "vgg" else 1))
                            pts.append((float(x), float(max(r[metric], 1e-3))))
                    e = fit_exponent(pts)
                    if e is not None and len(pts) >= 3:
                        exps.append(f"| {dict(other)['family']} {', '.join(f'{k}={v}' for k, v in other if k != 'family')}"
                                    f" | {s} | {metric} | {e:.2f} | {len(pts)} |")
        if exps:
            lines.append(f"\nGrowth exponents along `{key}` (log-log least squares):\n")
            lines.append("| cells | src | quantity | exponent | points |")
            lines.append("|---|---|---|---:|---:|")
            lines.extend(exps)
    # ridge="auto" / ridge=0: the cost of the GCV (issue 23), cells of the same run
    ridge_pairs = [(c["id"][: -len("/ridge0")], c["id"]) for c in cells if c["id"].endswith("/ridge0")]
    if ridge_pairs:
        lines.append("\n## ridge='auto' / ridge=0 (same run, per src)\n")
        lines.append("| cell | src | CPU s auto | CPU s ridge=0 | ratio (CPU) | ratio (wall) | Δ MiB auto | Δ MiB ridge=0 |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for a, b in ridge_pairs:
            for s in srcs:
                ra, rb = _best(runs, a, s), _best(runs, b, s)
                if not (ra and rb and ra.get("status") == "ok" and rb.get("status") == "ok"):
                    continue
                lines.append(f"| {a} | {s} | {ra['cpu_s']:.2f} | {rb['cpu_s']:.2f} | {ra['cpu_s'] / rb['cpu_s']:.2f} | "
                             f"{ra['wall_s'] / rb['wall_s']:.2f} | {ra['delta_mib']:.0f} | {rb['delta_mib']:.0f} |")
    # the goal ratios
    lines.append("\n## Goal ratios (same run, per src)\n")
    lines.append("| pair | src | ratio (wall) | ratio (CPU) | goal |")
    lines.append("|---|---|---:|---:|---|")
    pairs = []
    for fam in ("vgg11-w1", "resnet18"):
        for n in (2, 4, 8):
            pairs.append((f"{fam}/n{n}/s400/kf-linear", f"{fam}/n{n}/s400/otfusion", 2.0))
        pairs.append((f"{fam}/n2/s400/hf-linear", f"{fam}/n2/s400/git-rebasin", 1.5))
    pairs.append(("mlp-d1/n32/s400/kf-linear", "mlp-d1/n32/s400/otfusion", 3.0))
    for a, b, goal in pairs:
        for s in srcs:
            ra, rb = _best(runs, a, s), _best(runs, b, s)
            if not ra or not rb:
                continue
            if ra.get("status") == "ok" and rb.get("status") == "ok":
                w, c = ra["wall_s"] / rb["wall_s"], ra["cpu_s"] / rb["cpu_s"]
                lines.append(f"| {a} / {b.split('/')[-1]} | {s} | {w:.2f} | {c:.2f} | <= {goal} "
                             f"{'met' if c <= goal else 'missed'} |")
            else:
                lines.append(f"| {a} / {b.split('/')[-1]} | {s} | {ra.get('status')} / {rb.get('status')} | | "
                             f"<= {goal} |")
    # before/after
    if len(srcs) > 1:
        lines.append(f"\n## {srcs[0]} / {srcs[-1]} (speed-up, wall and CPU; peak Δ MiB)\n")
        lines.append(f"| cell | {srcs[0]} s | {srcs[-1]} s | speed-up | CPU speed-up | Δ MiB {srcs[0]} | Δ MiB {srcs[-1]} |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for c in cells:
            ra, rb = _best(runs, c["id"], srcs[0]), _best(runs, c["id"], srcs[-1])
            if not (ra and rb and ra.get("status") == "ok" and rb.get("status") == "ok"):
                continue
            lines.append(f"| {c['id']} | {ra['wall_s']:.2f} | {rb['wall_s']:.2f} | {ra['wall_s'] / rb['wall_s']:.2f}x | "
                         f"{ra['cpu_s'] / rb['cpu_s']:.2f}x | {ra['delta_mib']:.0f} | {rb['delta_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def plots(results: Dict[str, Any], folder: Path) -> List[Path]:
    """``scale-models.png`` (seconds vs models, log-log, per family and method),
    ``scale-width.png``, ``scale-samples.png`` (seconds and peak Δ MiB)."""
    from neurofuse.plots import _pyplot, save_figure

    plt = _pyplot()
    runs, src = results["runs"], results["srcs"][-1]
    made = []
    for axis, key, fams in (("models", "n", ("mlp", "vgg", "resnet")), ("width", "width", ("vgg",)),
                            ("samples", "samples", ("mlp", "vgg"))):
        sel = [c for c in results["cells"] if axis in c["axes"]]
        if not sel:
            continue
        fig, axs = plt.subplots(1, 2, figsize=(11, 4))
        xs = set()
        for fam in fams:
            for method in ALL + ("kf-gradient",):
                cs = sorted((c for c in sel if c["family"] == fam and c["method"] == method), key=lambda c: c[key])
                pts = [(c[key], _best(runs, c["id"], src)) for c in cs]
                pts = [(x, r) for x, r in pts if r and r.get("status") == "ok"]
                if len(pts) < 2:
                    continue
                label = f"{fam} {method}"
                xs.update(p[0] for p in pts)
                axs[0].plot([p[0] for p in pts], [p[1]["wall_s"] for p in pts], marker="o", label=label)
                axs[1].plot([p[0] for p in pts], [max(p[1]["delta_mib"], 1) for p in pts], marker="o", label=label)
        for ax, ylab in zip(axs, ("seconds (1 thread)", "peak − RSS at call (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            # the measured values as the x ticks, written plainly (no overlapping minor labels)
            ax.set_xticks(sorted(xs), [f"{x:g}" for x in sorted(xs)])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_xlabel(key)
            ax.set_ylabel(ylab)
            ax.grid(True, which="both", alpha=0.3)
        axs[0].legend(fontsize=7)
        made.append(save_figure(fig, folder / f"scale-{axis}.png"))
    return made


# =============================================================================================
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--src", action="append", default=[], help="LABEL=DIR of a neurofuse src tree (repeatable)")
    p.add_argument("--plan", default="core", choices=["core", "goal", "quick"])
    p.add_argument("--only", nargs="*", default=[], help="cells whose id contains one of these")
    p.add_argument("--skip", nargs="*", default=[], help="cells whose id contains one of these are left out")
    p.add_argument("--data-dir", default=os.environ.get("NEUROFUSE_DATA", "/work/shared/data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--mem-limit-gb", type=float, default=12.0)
    p.add_argument("--mlp-steps", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--list", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--plots", default=None, help="folder for scale-*.png")
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec)))
        return 0
    out = Path(args.out)
    res_path = out / "results.json"
    if args.report_only:
        results = json.loads(res_path.read_text())
        _atomic_write(out / "report.md", report(results))
        if args.plots:
            plots(results, Path(args.plots))
        return 0
    srcs = dict(s.split("=", 1) for s in args.src) or {"current": "src"}
    cells = [c for c in plan(args.plan) if (not args.only or any(o in c["id"] for o in args.only))
             and not any(s in c["id"] for s in args.skip)]
    if args.list:
        for c in cells:
            print(c["id"], c["axes"])
        return 0
    results: Dict[str, Any] = {"command": " ".join(["python", "benchmarks/scale.py", *(argv or sys.argv[1:])]),
                               "versions": _versions(), "threads": args.threads, "device": args.device,
                               "srcs": list(srcs), "src_dirs": srcs, "cells": cells, "runs": []}
    if res_path.exists():   # resume: keep the runs of an earlier invocation with the same srcs
        old = json.loads(res_path.read_text())
        if old.get("srcs") == results["srcs"]:
            results["runs"] = old["runs"]
            known = {c["id"] for c in cells}
            results["cells"] = cells + [c for c in old["cells"] if c["id"] not in known]
    _train_mlps(out, cells, args.data_dir, args.mlp_steps, next(iter(srcs.values())))
    failed = 0
    for rep in range(args.repeats):
        for i, c in enumerate(cells):
            order = list(srcs.items())
            if (i + rep) % 2:
                order.reverse()
            for label, src in order:
                done = [r for r in results["runs"] if r["id"] == c["id"] and r["src"] == label]
                if len(done) > rep:
                    continue
                spec = dict(c, out=str(out.resolve()), data_dir=args.data_dir, threads=args.threads,
                            mem_limit_gb=args.mem_limit_gb, device=args.device)
                log = out / "logs" / f"{c['id'].replace('/', '_')}.{label}.{rep}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                r = _run_child(spec, src, args.timeout, log)
                r.update(id=c["id"], src=label, repeat=rep, started=t0, load=os.getloadavg()[0])
                results["runs"].append(r)
                failed += r.get("status") in ("error", "crash")
                print(f"{c['id']:42s} {label:8s} {r.get('status'):8s} {r.get('wall_s', 0):8.2f} s "
                      f"cpu {r.get('cpu_s', 0):8.2f} peak {r.get('peak_mib', 0):7.0f} MiB "
                      f"{str(r.get('error', ''))[:80]}", flush=True)
                _atomic_write(res_path, json.dumps(results, indent=1))
                _atomic_write(out / "report.md", report(results))
    if args.plots:
        plots(results, Path(args.plots))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
