"""Speed benchmark of the fusion engine: two versions of neurofuse side by side, in one run.

    python benchmarks/speed.py --before /work/ref-before/src --after src --out runs/speed
    python benchmarks/speed.py --before /work/ref-before/src --after src --out runs/speed-quick --quick
    python benchmarks/speed.py ... --threads 1            # torch/BLAS threads of every child
    python benchmarks/speed.py ... --skip-slow            # skip the old kf-linear on untrained MLPs
    python benchmarks/speed.py ... --vgg-sizes 400 4000 40000 --vgg-full-width
    python benchmarks/speed.py ... --only mlp8/kf-linear        # only cells whose id contains this
    python benchmarks/speed.py ... --list                       # print the planned cells, run nothing
    python benchmarks/speed.py --report-only --out runs/speed   # rebuild report.md from results.json

``--before`` and ``--after`` are two ``src`` directories (e.g. a checkout of the old commit and the
working tree).  Every measurement is one fusion in a **fresh child process** started with
``PYTHONPATH=<src dir>`` (which wins over the venv's editable install; the child checks which
``neurofuse`` it imported), so the two versions never share an interpreter.  Runs are interleaved:
for every repeat, every cell runs both versions back to back, alternating which goes first, so
machine load drifts hit both alike; speed-ups are ratios of numbers taken in the same run.

What is measured
----------------
1. **Models** (trained once by the parent with the ``--after`` code, cached as safetensors
   checkpoints under ``<out>/models/``; children load them with their own ``load_model``):
   MNIST MLPs 784-256-10 on a Dirichlet (ratio 0.2) 2/4/8-way split of the 60 000 training images
   (3 epochs); 8 *untrained* MLPs of the same shape (the worst case for K-means); VGG11 at 1/8
   width, 2/4 models on a Dirichlet split of a 10 000-image class-balanced subset (5 epochs, about
   70% test accuracy: enough for speed); full-width VGG11 (2 models) with ``--vgg-full-width``.
   Fusion sets: class-balanced draws (``balanced_subset``, seed 0) from the training set, stored
   as ``.npy`` under ``<out>/data/`` so a child loads only what it fuses.
2. **Seconds per method** (wall clock of ``neurofuse.fuse(...)`` only, plus its CPU time):
   kf-linear, hf-linear (2 models), otfusion, git-rebasin (2 models), kf-gradient (``levels`` and
   ``head`` epochs = ``--gradient-epochs``) on 2/4/8 MLPs, 8 untrained MLPs and 2/4 VGG-tiny, 400
   samples, uniform importance; kf-linear also with conductance (and on 2 MLPs every method that
   uses importance, for the pass counts).  Report: min over repeats, after/before speed-up
   (before s / after s), kf-linear/otfusion and hf-linear/git-rebasin ratios per version.
   Modules a method imports lazily (POT, captum) are imported before the clock starts.
3. **Forward passes over the fusion set per model**: the child wraps ``LeveledNet.__init__`` so
   the first level (``levels[0]``) of every model built — the loaded base models and any model
   the method creates — gets a forward hook that adds up the rows it processes.  Rows / fusion-set
   size = passes.  Reported per base model (max and list), for the returned fused model when its
   first level was observed, and for any other model (intermediate copies).  Integrated-gradient importance (conductance) runs ``n_steps``
   rows per sample, so it shows up as many passes.  Single-row calls (``level_shapes()`` probes one
   zero row) are counted apart as ``probe_calls``.  Copies made with ``deepcopy`` keep the hook; a
   pickled model (e.g. sent to a worker process) loses it, so passes in other processes are not
   counted.
4. **Seconds and peak resident memory vs fusion-set size** (``--sizes``; ``--vgg-sizes`` for VGG):
   8 MLPs (the largest MLP set) and 4 VGG-tiny with kf-linear and otfusion, 2 MLPs with hf-linear
   and git-rebasin.  Just before ``fuse`` the child records VmRSS and ``ru_maxrss``, then resets
   the kernel's high-water mark (``/proc/self/clear_refs`` = 5), so VmHWM after the call is the
   peak *during* the fusion (``peak_reset`` tells whether the reset worked; otherwise the peak is
   the process's lifetime peak).  ``ru_maxrss`` is recorded too (``ru_maxrss_kib``) but not used:
   the kernel carries the high-water mark of the forked parent image over ``exec``, so a child's
   ``ru_maxrss`` is at least the parent's RSS at spawn time.  Report: before, peak, peak - before (MiB, median over
   repeats), peak(largest)/peak(smallest) for both peak and peak - before (target <= 1.5), and
   seconds per 1 000 samples (linear scaling keeps it flat).
5. **OMP_WAIT_POLICY**: kf-linear on 4 MLPs with the ``--after`` code, child environment without
   the variable vs ``OMP_WAIT_POLICY=PASSIVE`` (interleaved).  Every child records the variable
   before and after ``import neurofuse``: if the import still sets it (the old code does, with
   ``os.environ.setdefault``), the "absent" case is PASSIVE too, and the report says so.  The
   other sections give children the parent's original environment (as the user started it).
6. **Outputs**: ``<out>/results.json`` (every run: status, seconds, CPU seconds, memory, pass
   counts, load average, the child's neurofuse file and OMP values; versions of python, torch,
   numpy; git commit, dirty flag and a content hash of each src dir; threads; cores; arguments) and
   ``<out>/report.md`` (Markdown tables), both written atomically after every child; child logs in
   ``<out>/logs/``.  A method that raises in a child is recorded with its error message and the run
   goes on; a child that dies is recorded as a crash; the exit status is 1 if any run errored or
   crashed (timeouts and skips are recorded, not failures).

Timeouts and slow cells: every child has ``--timeout`` seconds (default 400; recorded as
``timeout``).  A (cell, version) that timed out, or took longer than ``--long`` seconds, is not
repeated.  ``--skip-slow`` skips the ``--before`` kf-linear runs on untrained MLPs (about 221 s
for 8 with the old code).

``--quick`` (smoke run, about 3 minutes on 2 cores): 2 and 4 trained MLPs, conductance on 2 MLPs
only, sizes 400 and 4 000 on 2 MLPs, OMP check on 2 MLPs, 1 repeat, kf-gradient with 2 epochs; no
VGG unless ``--vgg``, no untrained MLPs unless ``--untrained N`` (kf-linear only).  ``--threads N`` (default: all cores) calls ``torch.set_num_threads(N)`` in
each child and sets ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS`` to N in its
environment unless they are already set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

# captured before anything imports neurofuse (whose old versions set it with os.environ.setdefault)
_ORIG_ENV = dict(os.environ)

FUSION_SIZE = 400
CONDUCTANCE = "conductance"
#: modules a method imports lazily: imported by the child before the clock starts
PREIMPORT = {"otfusion": ["ot"]}
PREIMPORT_ALWAYS = ["scipy.linalg", "scipy.optimize"]
PREIMPORT_IMPORTANCE = ["captum.attr"]
TWO_MODEL_METHODS = ("hf-linear", "git-rebasin")
IMPORTANCE_METHODS = ("kf-linear", "hf-linear", "otfusion", "git-rebasin", "kf-gradient")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# =============================================================================================
# small helpers (both processes)
# =============================================================================================
def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")


def _proc_status() -> Dict[str, int]:
    """VmRSS / VmHWM of this process in KiB (Linux)."""
    out: Dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "VmHWM")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


# =============================================================================================
# child: one fusion
# =============================================================================================
def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: Dict[str, Any] = {"status": "error", "pid": os.getpid()}
    out = Path(spec["result"])
    try:
        result["omp_before_import"] = os.environ.get("OMP_WAIT_POLICY")
        import neurofuse  # first, before torch: the old code sets OMP_WAIT_POLICY at import

        result["omp_after_import"] = os.environ.get("OMP_WAIT_POLICY")
        result["neurofuse_file"] = neurofuse.__file__
        src = os.path.realpath(spec["src"])
        if not os.path.realpath(neurofuse.__file__).startswith(src + os.sep):
            raise RuntimeError(f"imported neurofuse from {neurofuse.__file__}, expected it under {src}")
        import resource

        import numpy as np
        import torch

        torch.set_num_threads(int(spec["threads"]))
        result.update(torch=torch.__version__, numpy=np.__version__, threads=torch.get_num_threads(),
                      neurofuse_version=getattr(neurofuse, "__version__", None))
        import importlib

        for mod in spec.get("preimport", []):
            try:
                importlib.import_module(mod)
            except Exception as exc:  # noqa: BLE001 - a missing optional module is not our failure
                result.setdefault("preimport_failed", {})[mod] = repr(exc)

        counter = _PassCounter(torch) if spec.get("count", True) else None
        if counter is not None:
            counter.install(neurofuse)
        models = [_load_model(neurofuse, torch, p) for p in spec["models"]]
        if counter is not None:
            for m in models:
                counter.hook(m)
        x = torch.from_numpy(np.load(spec["x"]))
        y = torch.from_numpy(np.load(spec["y"]))
        n = int(x.shape[0])
        result["n_samples"] = n
        import gc

        gc.collect()
        before = _proc_status()
        result["rss_before_kib"] = before.get("VmRSS")
        result["maxrss_before_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["vmhwm_before_kib"] = before.get("VmHWM")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak RSS (VmHWM, ru_maxrss) to the current RSS
            result["peak_reset"] = _proc_status().get("VmHWM", 1 << 62) <= before.get("VmRSS", 0) * 1.05 + 1024
        except OSError:
            result["peak_reset"] = False
        result["loadavg_before"] = os.getloadavg()[0]
        t_cpu, t0 = time.process_time(), time.perf_counter()
        try:
            fused = neurofuse.fuse(models, data=(x, y), method=spec["method"],
                                   importance=spec["importance"], progress=False, seed=0,
                                   **spec.get("options", {}))
        except Exception as exc:  # noqa: BLE001 - record it, the benchmark goes on
            result["seconds"] = time.perf_counter() - t0
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc()[-4000:]
            _write_json(out, result)
            return 0
        result["seconds"] = time.perf_counter() - t0
        result["cpu_seconds"] = time.process_time() - t_cpu
        # ru_maxrss also holds the high-water mark of the forked parent image the child exec'd
        # from (the kernel keeps it across exec), so VmHWM, this process's own, is the peak
        result["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["vmhwm_kib"] = _proc_status().get("VmHWM")
        result["peak_kib"] = result["vmhwm_kib"] if result["vmhwm_kib"] is not None else result["ru_maxrss_kib"]
        result["loadavg_after"] = os.getloadavg()[0]
        if counter is not None:
            result["passes"] = counter.report(models, fused, n)
        result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - setup failed: still a result, with the reason
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
        result["stage"] = "setup"
    _write_json(out, result)
    return 0


def _load_model(neurofuse: Any, torch: Any, path: str) -> Any:
    """The child's own ``load_model``; if its checkpoint format differs, rebuild from the config."""
    try:
        from neurofuse.checkpoint import load_model

        return load_model(path).eval()
    except Exception:  # noqa: BLE001
        from safetensors.torch import load_file

        cfg = json.loads(Path(path + ".json").read_text())
        model = getattr(neurofuse.models, cfg["class"])(**cfg["kwargs"])
        model.load_state_dict(load_file(path))
        return model.eval()


class _NoopHook:
    """What a pickled counting hook becomes (e.g. in a worker process): it counts nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class _Hook:
    """The forward hook: shared by deep copies (so copies keep counting into the same counter),
    pickled as a no-op (so models can still be sent to other processes)."""

    def __init__(self, counter: "_PassCounter") -> None:
        self.counter = counter

    def __call__(self, module: Any, inputs: Any, output: Any) -> None:
        self.counter._hook(module, inputs, output)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Hook":
        return self

    def __reduce__(self) -> Tuple[Any, Tuple[()]]:
        return (_NoopHook, ())


class _PassCounter:
    """Rows processed by the first level of every LeveledNet (base models, fused, copies)."""

    def __init__(self, torch: Any) -> None:
        import weakref

        self._torch = torch
        self._weakref = weakref
        self.rows: Dict[int, int] = {}
        self.calls: Dict[int, int] = {}
        self.refs: Dict[int, Any] = {}
        self.hook_fn = _Hook(self)
        self.probes = 0

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        x = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
        rows = int(x.shape[0]) if self._torch.is_tensor(x) and x.dim() > 0 else 0
        key = id(module)
        ref = self.refs.get(key)
        if ref is None or ref() is not module:  # new module (or an id reused after a free)
            if ref is not None:  # keep the dead one's rows under a unique key
                self.rows[-len(self.rows) - 1] = self.rows.pop(key, 0)
                self.calls[-len(self.calls) - 1] = self.calls.pop(key, 0)
            self.refs[key] = self._weakref.ref(module)
            self.rows[key] = 0
            self.calls[key] = 0
        if rows == 1:  # a shape probe (level_shapes() runs one zero row), counted apart
            self.probes += 1
            return
        self.rows[key] += rows
        self.calls[key] += 1

    def hook(self, model: Any) -> None:
        levels = getattr(model, "levels", None)
        if levels is None or len(levels) == 0:
            return
        first = levels[0]
        if not getattr(first, "_speedbench_hooked", False):
            first.register_forward_hook(self.hook_fn)
            first._speedbench_hooked = True

    def install(self, neurofuse: Any) -> None:
        cls = getattr(neurofuse, "LeveledNet", None)
        if cls is None:
            return
        original = cls.__init__
        counter = self

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            try:
                counter.hook(self)
            except Exception:  # noqa: BLE001 - counting must never break the method
                pass

        cls.__init__ = __init__

    def report(self, models: Sequence[Any], fused: Any, n: int) -> Dict[str, Any]:
        base_ids = [id(m.levels[0]) for m in models]
        base = [self.rows.get(k, 0) / n for k in base_ids]
        base_calls = [self.calls.get(k, 0) for k in base_ids]
        fused_levels = getattr(fused, "levels", None)
        fused_id = id(fused_levels[0]) if fused_levels is not None and len(fused_levels) else None
        fused_seen = fused_id is not None and fused_id in self.rows and fused_id not in base_ids
        other = sum(v for k, v in self.rows.items() if k not in base_ids and k != fused_id)
        return {"base": base, "base_max": max(base) if base else None, "base_calls": base_calls,
                "fused": (self.rows[fused_id] / n) if fused_seen else None,
                "fused_observed": bool(fused_seen), "other": other / n, "probe_calls": self.probes}


# =============================================================================================
# parent
# =============================================================================================
def _src_info(src: Path) -> Dict[str, Any]:
    info: Dict[str, Any] = {"path": str(src)}

    def git(*a: str) -> Optional[str]:
        try:
            r = subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True, timeout=30)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    info["commit"] = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".")
    info["dirty"] = None if status is None else bool(status)
    h = hashlib.sha256()
    pkg = src / "neurofuse"
    for p in sorted(pkg.rglob("*.py")) if pkg.is_dir() else []:
        h.update(str(p.relative_to(src)).encode())
        h.update(p.read_bytes())
    info["tree_sha256"] = h.hexdigest()[:16]
    return info


def _import_after(after: Path) -> Any:
    sys.path.insert(0, str(after))
    import neurofuse

    if not os.path.realpath(neurofuse.__file__).startswith(os.path.realpath(after) + os.sep):
        raise SystemExit(f"the parent imported neurofuse from {neurofuse.__file__}, not from {after}")
    return neurofuse


def _save(neurofuse: Any, model: Any, path: Path, kwargs: Dict[str, Any], meta: Dict[str, Any]) -> None:
    from neurofuse.checkpoint import save_model

    save_model(model, path, force=True, metadata=meta)
    _write_json(Path(str(path) + ".json"), {"class": type(model).__name__, "kwargs": kwargs})


def _prepare_models(a: argparse.Namespace, out: Path, sets: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Train (or reuse) every model set; returns {name: {"paths": [...], ...}}."""
    neurofuse = _import_after(a.after)
    import numpy as np
    import torch
    from neurofuse.data import balanced_subset, load_dataset, partition
    from neurofuse.models import MLP, VGG
    from neurofuse.training import TrainConfig, evaluate, train_model

    torch.set_num_threads(a.threads)
    ds = None
    info: Dict[str, Any] = {}
    for name, s in sets.items():
        key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12]
        d = out / "models" / f"{name}-{key}"
        paths = [d / f"model{i}.safetensors" for i in range(s["n"])]
        done = d / "done.json"
        if done.exists() and all(p.exists() for p in paths):
            info[name] = json.loads(done.read_text())
            print(f"[models] {name}: cached in {d}")
            continue
        if ds is None:
            ds = load_dataset("mnist", data_dir=a.data_dir)
        t0 = time.perf_counter()
        y = ds.y_train.numpy()
        pool = np.arange(len(y))
        if s.get("subset"):
            pool = balanced_subset(y, pool, s["subset"], seed=0)
        parts = [pool] * s["n"] if s["n"] == 1 else [pool[p] for p in partition(y[pool], s["n"], "dirichlet", seed=0)]
        accs = []
        for i in range(s["n"]):
            torch.manual_seed(1000 * s["n"] + i)
            if s["arch"] == "mlp":
                kwargs = {"input_shape": list(ds.input_shape), "num_classes": 10, "hidden": [256]}
                model = MLP(**kwargs)
            else:
                kwargs = {"input_shape": list(ds.input_shape), "num_classes": 10,
                          "width_multiplier": s["width"]}
                model = VGG(**kwargs)
            if s["epochs"] > 0:
                idx = torch.from_numpy(parts[i])
                train_model(model, ds.x_train[idx], ds.y_train[idx],
                            config=TrainConfig(epochs=s["epochs"], lr=s["lr"], seed=i,
                                               batch_size=s.get("batch_size", 64),
                                               warmup_epochs=0))
            model.eval()
            acc = evaluate(model, ds.x_test, ds.y_test)["accuracy"]
            accs.append(acc)
            _save(neurofuse, model, paths[i], kwargs, {"set": name, "index": i, "test_accuracy": acc})
        info[name] = {"paths": [str(p) for p in paths], "spec": s, "test_accuracy": accs,
                      "train_seconds": time.perf_counter() - t0,
                      "part_sizes": [int(len(p)) for p in parts]}
        _write_json(done, info[name])
        print(f"[models] {name}: trained {s['n']} in {info[name]['train_seconds']:.1f} s, "
              f"test accuracy {', '.join(f'{x:.3f}' for x in accs)}")
    return info


def _prepare_data(a: argparse.Namespace, out: Path, sizes: Sequence[int]) -> Dict[int, Dict[str, str]]:
    import numpy as np

    from neurofuse.data import balanced_subset, load_dataset

    res: Dict[int, Dict[str, str]] = {}
    ds = None
    for n in sorted(set(sizes)):
        px, py = out / "data" / f"fusion{n}_x.npy", out / "data" / f"fusion{n}_y.npy"
        if not (px.exists() and py.exists()):
            if ds is None:
                ds = load_dataset("mnist", data_dir=a.data_dir)
            y = ds.y_train.numpy()
            idx = balanced_subset(y, np.arange(len(y)), n, seed=0)
            px.parent.mkdir(parents=True, exist_ok=True)
            for p, arr in ((px, ds.x_train[idx].numpy()), (py, y[idx])):
                tmp = p.with_name(f".{p.name}.tmp.npy")
                np.save(tmp, np.ascontiguousarray(arr))
                os.replace(tmp, p)
        res[n] = {"x": str(px), "y": str(py)}
    return res


# ---------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------
def _cell(sections: Sequence[str], mset: str, method: str, importance: str = "uniform",
          size: int = FUSION_SIZE, env: Optional[str] = None) -> Dict[str, Any]:
    cid = f"{mset}/{method}/{importance}/{size}" + (f"/omp={env}" if env else "")
    return {"id": cid, "sections": list(sections), "set": mset, "method": method,
            "importance": importance, "size": size, "env": env}


def _plan(a: argparse.Namespace) -> Tuple[Dict[str, Dict[str, Any]], List[Dict[str, Any]]]:
    mlp_n = [2, 4] if a.quick else [2, 4, 8]
    sets: Dict[str, Dict[str, Any]] = {}
    for n in mlp_n:
        sets[f"mlp{n}"] = {"arch": "mlp", "n": n, "epochs": 3, "lr": 1e-3}
    n_untrained = a.untrained if a.untrained is not None else (0 if a.quick else 8)
    if n_untrained:
        sets[f"untrained{n_untrained}"] = {"arch": "mlp", "n": n_untrained, "epochs": 0, "lr": 0.0}
    vgg = a.vgg if a.vgg is not None else not a.quick
    if vgg:
        for n in [2, 4]:
            sets[f"vgg{n}"] = {"arch": "vgg", "n": n, "width": 0.125, "epochs": 5, "lr": 2e-3,
                               "batch_size": 32, "subset": 10000}
    if a.vgg_full_width:
        sets["vggfull2"] = {"arch": "vgg", "n": 2, "width": 1.0, "epochs": 1, "lr": 1e-3, "subset": 10000}

    cells: List[Dict[str, Any]] = []
    main = ["seconds", "passes"]
    for name, s in sets.items():
        n, untrained = s["n"], s["epochs"] == 0
        methods = ["kf-linear", "hf-linear", "otfusion", "git-rebasin", "kf-gradient"]
        if untrained and a.quick:
            methods = ["kf-linear"]
        for m in methods:
            if m in TWO_MODEL_METHODS and n != 2:
                continue
            cells.append(_cell(main, name, m))
        if not a.quick or name == "mlp2":
            cells.append(_cell(main, name, "kf-linear", CONDUCTANCE))
    # conductance for every importance method on the smallest MLP set (pass counts)
    if not a.quick:
        for m in IMPORTANCE_METHODS:
            if m != "kf-linear":
                cells.append(_cell(["passes"], "mlp2", m, CONDUCTANCE))
    # sizes
    big_mlp = "mlp2" if a.quick else f"mlp{max(mlp_n)}"
    sweep = [(big_mlp, "kf-linear"), (big_mlp, "otfusion"), ("mlp2", "hf-linear"), ("mlp2", "git-rebasin")]
    if vgg:
        sweep += [("vgg4", "kf-linear"), ("vgg4", "otfusion")]
    for mset, m in sweep:
        for size in (a.vgg_sizes if mset.startswith("vgg") else a.sizes):
            c = next((c for c in cells if c["id"] == f"{mset}/{m}/uniform/{size}"), None)
            if c is not None:
                c["sections"].append("memory")
            else:
                cells.append(_cell(["memory"], mset, m, size=size))
    # OMP_WAIT_POLICY (after code only, two env variants)
    omp_set = "mlp2" if a.quick else "mlp4"
    for env in ("absent", "PASSIVE"):
        cells.append(_cell(["omp"], omp_set, "kf-linear", env=env))
    return sets, cells


def _versions_of(cell: Dict[str, Any]) -> List[str]:
    return ["after"] if cell["env"] else ["before", "after"]


def _child_env(a: argparse.Namespace, src: Path, env_variant: Optional[str]) -> Dict[str, str]:
    env = dict(_ORIG_ENV)
    env["PYTHONPATH"] = str(src)
    env.pop("PYTHONHOME", None)
    for v in THREAD_VARS:
        env.setdefault(v, str(a.threads))
    if env_variant == "absent":
        env.pop("OMP_WAIT_POLICY", None)
    elif env_variant:
        env["OMP_WAIT_POLICY"] = env_variant
    return env


def _run_child(a: argparse.Namespace, out: Path, cell: Dict[str, Any], version: str, repeat: int,
               models: Dict[str, Any], data: Dict[int, Dict[str, str]]) -> Dict[str, Any]:
    src = a.before if version == "before" else a.after
    tag = cell["id"].replace("/", "_") + f"__{version}__r{repeat}"
    spec_path, res_path, log_path = (out / "tmp" / f"{tag}.spec.json", out / "tmp" / f"{tag}.result.json",
                                     out / "logs" / f"{tag}.log")
    for p in (res_path,):
        if p.exists():
            p.unlink()
    options: Dict[str, Any] = {}
    if cell["method"] == "kf-gradient":
        options = {"levels": {"epochs": a.gradient_epochs}, "head": {"epochs": a.gradient_epochs}}
    preimport = list(PREIMPORT_ALWAYS) + PREIMPORT.get(cell["method"], [])
    if cell["importance"] != "uniform":
        preimport += PREIMPORT_IMPORTANCE
    spec = {"src": str(src), "models": models[cell["set"]]["paths"], "x": data[cell["size"]]["x"],
            "y": data[cell["size"]]["y"], "method": cell["method"], "importance": cell["importance"],
            "options": options, "threads": a.threads, "preimport": preimport,
            "count": "memory" not in cell["sections"] or "passes" in cell["sections"],
            "result": str(res_path)}
    _write_json(spec_path, spec)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rec: Dict[str, Any] = {"cell": cell["id"], "version": version, "repeat": repeat,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "options": options}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", str(spec_path)],
                                env=_child_env(a, src, cell["env"]), stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(out), start_new_session=True)
        try:
            rc = proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = None
    rec["child_wall_seconds"] = time.perf_counter() - t0
    if rc is None:
        rec.update(status="timeout", seconds=None, error=f"no result within --timeout {a.timeout} s")
    elif res_path.exists():
        rec.update(json.loads(res_path.read_text()))
        rec["returncode"] = rc
    else:
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        rec.update(status="crash", returncode=rc, error=f"child exited with {rc} and no result", log_tail=tail)
    return rec


# ---------------------------------------------------------------------------------------------
# summaries and report
# ---------------------------------------------------------------------------------------------
def _runs_of(results: Dict[str, Any], cell_id: str, version: str) -> List[Dict[str, Any]]:
    return [r for r in results["runs"] if r["cell"] == cell_id and r["version"] == version]


def _agg(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    ok = [r for r in runs if r.get("status") == "ok"]
    statuses = sorted({r.get("status", "?") for r in runs})
    res: Dict[str, Any] = {"n": len(ok), "status": "ok" if ok else (statuses[0] if statuses else "missing")}
    if not ok:
        err = next((r.get("error") for r in runs if r.get("error")), None)
        res["error"] = err
        return res
    res["seconds"] = min(r["seconds"] for r in ok)
    res["seconds_median"] = statistics.median(r["seconds"] for r in ok)
    if all(r.get("cpu_seconds") is not None for r in ok):
        res["cpu_seconds"] = min(r["cpu_seconds"] for r in ok)
    for k in ("rss_before_kib", "peak_kib"):
        vals = [r[k] for r in ok if r.get(k) is not None]
        if vals:
            res[k] = statistics.median(vals)
    if "peak_kib" in res and "rss_before_kib" in res:
        res["delta_kib"] = statistics.median(r["peak_kib"] - r["rss_before_kib"] for r in ok
                                             if r.get("peak_kib") is not None and r.get("rss_before_kib") is not None)
    res["peak_reset"] = all(r.get("peak_reset") for r in ok)
    counted = [r["passes"] for r in ok if r.get("passes")]
    if counted:
        res["passes"] = counted[0]
    res["omp_after_import"] = ok[0].get("omp_after_import")
    res["omp_before_import"] = ok[0].get("omp_before_import")
    return res


def _summarise(results: Dict[str, Any]) -> Dict[str, Any]:
    summ: Dict[str, Any] = {}
    for cell in results["cells"]:
        summ[cell["id"]] = {v: _agg(_runs_of(results, cell["id"], v)) for v in _versions_of(cell)}
    return summ


def _fmt(x: Optional[float], nd: int = 2, suffix: str = "") -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}{suffix}"
    return f"{x:.{nd}f}{suffix}"


def _sec(agg: Dict[str, Any]) -> str:
    if agg.get("status") != "ok":
        return agg.get("status", "–")
    return _fmt(agg["seconds"])


def _ratio(num: Dict[str, Any], den: Dict[str, Any], key: str = "seconds") -> Optional[float]:
    if num.get(key) is None or den.get(key) is None or not den[key]:
        return None
    return num[key] / den[key]


def _mib(kib: Optional[float]) -> Optional[float]:
    return None if kib is None else kib / 1024.0


def _report(results: Dict[str, Any]) -> str:
    meta, summ = results["meta"], results["summary"]
    cells = {c["id"]: c for c in results["cells"]}
    L: List[str] = []
    src = meta["sources"]
    L += ["# Fusion-engine speed benchmark", "",
          f"Generated {meta.get('finished') or meta.get('updated')} "
          f"({'quick' if meta['args'].get('quick') else 'full'} mode, "
          f"{meta['args']['repeats']} repeat(s), {meta['threads']} thread(s), {meta['cores']} cores, "
          f"torch {meta['torch']}, numpy {meta['numpy']}, python {meta['python']}).", "",
          "| Side | src | commit | dirty | content hash |", "|---|---|---|---|---|"]
    for side in ("before", "after"):
        s = src[side]
        L.append(f"| {side} | `{s['path']}` | {(s['commit'] or '–')[:10]} | {s['dirty']} | {s['tree_sha256']} |")
    L += ["", "Seconds are the minimum over repeats of the wall clock of `neurofuse.fuse` alone (fresh "
          "process per run, before/after interleaved); speed-up = before / after.  Memory is the "
          "median over repeats.", ""]

    def status_line(agg: Dict[str, Any]) -> str:
        return "" if agg.get("status") == "ok" else f"{agg.get('status')}: {(agg.get('error') or '')[:80]}"

    # -- seconds -----------------------------------------------------------------------------
    L += ["## Seconds per method (400 samples)", "",
          "| Models | Method | Importance | before s | after s | speed-up | before CPU s | after CPU s | note |",
          "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for cid, c in cells.items():
        if "seconds" not in c["sections"]:
            continue
        b, af = summ[cid]["before"], summ[cid]["after"]
        note = "; ".join(x for x in (status_line(b) and "before " + status_line(b),
                                     status_line(af) and "after " + status_line(af)) if x)
        L.append(f"| {c['set']} | {c['method']} | {c['importance']} | {_sec(b)} | {_sec(af)} | "
                 f"{_fmt(_ratio(b, af), 1, 'x')} | {_fmt(b.get('cpu_seconds'))} | {_fmt(af.get('cpu_seconds'))} | {note} |")
    L += ["", "Ratios between methods (same code, same run; < 1 means the first is faster):", "",
          "| Models | kf-linear / otfusion (before) | kf-linear / otfusion (after) | "
          "hf-linear / git-rebasin (before) | hf-linear / git-rebasin (after) |", "|---|---:|---:|---:|---:|"]
    for mset in results["sets"]:
        def r(m1: str, m2: str, v: str) -> Optional[float]:
            c1, c2 = summ.get(f"{mset}/{m1}/uniform/{FUSION_SIZE}"), summ.get(f"{mset}/{m2}/uniform/{FUSION_SIZE}")
            return _ratio(c1[v], c2[v]) if c1 and c2 else None
        if summ.get(f"{mset}/kf-linear/uniform/{FUSION_SIZE}") is None:
            continue
        L.append(f"| {mset} | {_fmt(r('kf-linear', 'otfusion', 'before'))} | {_fmt(r('kf-linear', 'otfusion', 'after'))} | "
                 f"{_fmt(r('hf-linear', 'git-rebasin', 'before'))} | {_fmt(r('hf-linear', 'git-rebasin', 'after'))} |")
    # goals
    L += ["", "Goals (after code):", "", "| Goal | Models | Value | Met |", "|---|---|---:|---|"]
    for mset in results["sets"]:
        if not mset.startswith(("mlp", "untrained")):
            continue
        k = summ.get(f"{mset}/kf-linear/uniform/{FUSION_SIZE}")
        o = summ.get(f"{mset}/otfusion/uniform/{FUSION_SIZE}")
        if k:
            sp = _ratio(k["before"], k["after"])
            L.append(f"| kf-linear speed-up >= 20x | {mset} | {_fmt(sp, 1, 'x')} | "
                     f"{'–' if sp is None else ('yes' if sp >= 20 else 'no')} |")
        if k and o:
            q = _ratio(k["after"], o["after"])
            L.append(f"| kf-linear <= 3x otfusion | {mset} | {_fmt(q)} | {'–' if q is None else ('yes' if q <= 3 else 'no')} |")
    for mset in results["sets"]:
        h, g = summ.get(f"{mset}/hf-linear/uniform/{FUSION_SIZE}"), summ.get(f"{mset}/git-rebasin/uniform/{FUSION_SIZE}")
        if h and g:
            q = _ratio(h["after"], g["after"])
            L.append(f"| hf-linear <= 2x git-rebasin | {mset} | {_fmt(q)} | {'–' if q is None else ('yes' if q <= 2 else 'no')} |")

    # -- passes ------------------------------------------------------------------------------
    L += ["", "## Forward passes over the fusion set per model", "",
          "Rows processed by `levels[0]` / fusion-set size.  `base` = the most passes of any base "
          "model (all of them if they differ), `fused` = the returned model (– if its first level "
          "was not observed), `other` = every other model built during the fusion, summed.  Single-row "
          "calls (shape probes) are not counted.  Limit: 1 pass per base model.", "",
          "| Models | Method | Importance | before base | after base | before fused | after fused | "
          "before other | after other | after <= 1 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]

    def base_str(p: Optional[Dict[str, Any]]) -> str:
        if not p:
            return "–"
        vals = p["base"]
        if vals and max(vals) - min(vals) > 1e-9:
            return "max " + _fmt(max(vals)) + " (" + ", ".join(_fmt(v) for v in vals) + ")"
        return _fmt(p["base_max"])

    for cid, c in cells.items():
        if "passes" not in c["sections"]:
            continue
        b, af = summ[cid]["before"].get("passes"), summ[cid]["after"].get("passes")
        ok = "–" if not af else ("yes" if af["base_max"] <= 1.0 + 1e-9 else "no")
        L.append(f"| {c['set']} | {c['method']} | {c['importance']} | {base_str(b)} | {base_str(af)} | "
                 f"{_fmt(b and b['fused'])} | {_fmt(af and af['fused'])} | {_fmt(b and b['other'])} | "
                 f"{_fmt(af and af['other'])} | {ok} |")

    # -- memory ------------------------------------------------------------------------------
    L += ["", "## Seconds and peak resident memory vs fusion-set size", "",
          "MiB; `RSS at call` = RSS just before `fuse` (fusion set and models loaded), `peak` = peak "
          "RSS during `fuse` (high-water mark reset before the call), `Δ` = peak − RSS at call.  "
          "`before`/`after` name the code versions.", "",
          "| Models | Method | Samples | before s | after s | speed-up | before s/1k | after s/1k | "
          "before RSS at call | before peak | before Δ | after RSS at call | after peak | after Δ |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for cid, c in cells.items():
        if "memory" in c["sections"]:
            groups.setdefault((c["set"], c["method"]), []).append(c)
    for (mset, m), cs in groups.items():
        for c in sorted(cs, key=lambda c: c["size"]):
            b, af = summ[c["id"]]["before"], summ[c["id"]]["after"]
            per = [(_fmt(x["seconds"] * 1000 / c["size"], 3) if x.get("seconds") is not None else "–") for x in (b, af)]
            L.append(f"| {mset} | {m} | {c['size']} | {_sec(b)} | {_sec(af)} | {_fmt(_ratio(b, af), 1, 'x')} | "
                     f"{per[0]} | {per[1]} | {_fmt(_mib(b.get('rss_before_kib')), 0)} | {_fmt(_mib(b.get('peak_kib')), 0)} | "
                     f"{_fmt(_mib(b.get('delta_kib')), 0)} | {_fmt(_mib(af.get('rss_before_kib')), 0)} | "
                     f"{_fmt(_mib(af.get('peak_kib')), 0)} | {_fmt(_mib(af.get('delta_kib')), 0)} |")
    L += ["", "Scaling, largest over smallest size (target: peak ratio <= 1.5; time per sample about flat):", "",
          "| Models | Method | Sizes | before peak ratio | after peak ratio | before Δ ratio | after Δ ratio | "
          "before s/1k ratio | after s/1k ratio | after peak <= 1.5 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for (mset, m), cs in groups.items():
        cs = sorted(cs, key=lambda c: c["size"])
        if len(cs) < 2:
            continue
        lo, hi = cs[0], cs[-1]
        vals = []
        for v in ("before", "after"):
            a0, a1 = summ[lo["id"]][v], summ[hi["id"]][v]
            pr = _ratio(a1, a0, "peak_kib")
            dr = _ratio(a1, a0, "delta_kib")
            tr = None
            if a0.get("seconds") and a1.get("seconds") is not None:
                tr = (a1["seconds"] / hi["size"]) / (a0["seconds"] / lo["size"])
            vals.append((pr, dr, tr))
        met = "–" if vals[1][0] is None else ("yes" if vals[1][0] <= 1.5 else "no")
        L.append(f"| {mset} | {m} | {lo['size']}→{hi['size']} | {_fmt(vals[0][0])} | {_fmt(vals[1][0])} | "
                 f"{_fmt(vals[0][1])} | {_fmt(vals[1][1])} | {_fmt(vals[0][2])} | {_fmt(vals[1][2])} | {met} |")
    if any(not summ[c["id"]][v].get("peak_reset", True) for cs in groups.values() for c in cs
           for v in ("before", "after") if summ[c["id"]][v].get("status") == "ok"):
        L += ["", "Note: the peak could not be reset in some runs: their peak is the process's lifetime peak."]

    # -- OMP -----------------------------------------------------------------------------------
    L += ["", "## OMP_WAIT_POLICY (after code, kf-linear)", "",
          "| Models | Environment | after s | CPU s | value after `import neurofuse` |", "|---|---|---:|---:|---|"]
    omp = [c for c in cells.values() if "omp" in c["sections"]]
    for c in omp:
        af = summ[c["id"]]["after"]
        L.append(f"| {c['set']} | {'absent' if c['env'] == 'absent' else 'OMP_WAIT_POLICY=' + c['env']} | "
                 f"{_sec(af)} | {_fmt(af.get('cpu_seconds'))} | {af.get('omp_after_import') or 'unset'} |")
    absent = next((summ[c["id"]]["after"] for c in omp if c["env"] == "absent"), None)
    passive = next((summ[c["id"]]["after"] for c in omp if c["env"] == "PASSIVE"), None)
    if absent and passive:
        q = _ratio(absent, passive)
        L += ["", f"absent / PASSIVE = {_fmt(q)}."]
        if absent.get("status") == "ok":
            if absent.get("omp_after_import") == "PASSIVE":
                L.append("The after code still sets `OMP_WAIT_POLICY=PASSIVE` at import: the 'absent' "
                         "case is the same as PASSIVE.")
            else:
                L.append("The after code leaves `OMP_WAIT_POLICY` alone at import: 'absent' runs with "
                         "the OpenMP default.")

    # -- failures ------------------------------------------------------------------------------
    bad = [r for r in results["runs"] if r.get("status") not in ("ok",)]
    if bad:
        L += ["", "## Runs that did not finish", "", "| Cell | Version | Repeat | Status | Message |", "|---|---|---:|---|---|"]
        for r in bad:
            msg = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:160]
            L.append(f"| {r['cell']} | {r['version']} | {r['repeat']} | {r.get('status')} | {msg} |")
    L += ["", "## Models", "", "| Set | Models | Test accuracy | Training samples per model |", "|---|---:|---|---|"]
    for name, m in results.get("models", {}).items():
        acc = ", ".join(f"{x:.3f}" for x in m.get("test_accuracy", []))
        L.append(f"| {name} | {len(m['paths'])} | {acc} | {', '.join(str(x) for x in m.get('part_sizes', []))} |")
    return "\n".join(L) + "\n"


def _save_results(out: Path, results: Dict[str, Any]) -> None:
    results["meta"]["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    results["summary"] = _summarise(results)
    _write_json(out / "results.json", results)
    _atomic_write_text(out / "report.md", _report(results))


def _parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Fusion-engine speed benchmark: two src dirs side by side.")
    ap.add_argument("--before", type=Path, help="src dir of the old code (holds neurofuse/)")
    ap.add_argument("--after", type=Path, help="src dir of the new code; also trains the models")
    ap.add_argument("--out", type=Path, default=Path("runs/speed"))
    ap.add_argument("--quick", action="store_true", help="smoke run: ~3 minutes on 2 cores")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every child")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="MLP fusion-set sizes (default 400 4000 40000; quick 400 4000)")
    ap.add_argument("--vgg-sizes", type=int, nargs="+", default=None, help="VGG fusion-set sizes (default 400 4000)")
    ap.add_argument("--vgg", dest="vgg", action="store_true", default=None, help="VGG-tiny sets (default on; off in --quick)")
    ap.add_argument("--no-vgg", dest="vgg", action="store_false")
    ap.add_argument("--vgg-full-width", action="store_true", help="also 2 full-width VGG11 (slow on CPU)")
    ap.add_argument("--untrained", type=int, default=None, help="number of untrained MLPs (default 8; quick 0: none)")
    ap.add_argument("--gradient-epochs", type=int, default=None, help="kf-gradient epochs per level (default 5; quick 2)")
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per child")
    ap.add_argument("--long", type=float, default=60.0, help="a run longer than this is not repeated")
    ap.add_argument("--skip-slow", action="store_true", help="skip the before kf-linear on untrained MLPs")
    ap.add_argument("--only", nargs="+", default=None, help="run only cells whose id contains one of these")
    ap.add_argument("--data-dir", default=os.environ.get("NEUROFUSE_DATA", "/work/shared/data"))
    ap.add_argument("--report-only", action="store_true", help="rebuild report.md from <out>/results.json")
    ap.add_argument("--list", action="store_true", help="print the planned cells and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child or a.report_only:
        return a
    if a.before is None or a.after is None:
        ap.error("--before and --after are required")
    a.before, a.after = a.before.resolve(), a.after.resolve()
    for p in (a.before, a.after):
        if not (p / "neurofuse" / "__init__.py").exists():
            ap.error(f"{p} holds no neurofuse/__init__.py; give a src directory")
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.sizes = a.sizes or ([400, 4000] if a.quick else [400, 4000, 40000])
    a.vgg_sizes = a.vgg_sizes or [400, 4000]
    a.gradient_epochs = a.gradient_epochs or (2 if a.quick else 5)
    if a.threads < 1:
        ap.error("--threads must be >= 1")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = _parse(argv)
    if a.child:
        return _child(a.child)
    out: Path = a.out.resolve()
    if a.report_only:
        results = json.loads((out / "results.json").read_text())
        _atomic_write_text(out / "report.md", _report(results))
        print((out / "report.md").read_text())
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    sets, cells = _plan(a)
    if a.only:
        cells = [c for c in cells if any(s in c["id"] for s in a.only)]
        sets = {k: v for k, v in sets.items() if any(c["set"] == k for c in cells)}
    if a.list:
        for c in cells:
            print(f"{c['id']:<44} {'+'.join(_versions_of(c)):<13} {', '.join(c['sections'])}")
        print(f"{len(cells)} cells, {sum(len(_versions_of(c)) for c in cells) * a.repeats} runs at most")
        return 0
    print(f"[plan] {len(cells)} cells, {sum(len(_versions_of(c)) for c in cells) * a.repeats} runs at most, "
          f"{a.threads} thread(s), out {out}")
    models = _prepare_models(a, out, sets)
    data = _prepare_data(a, out, [c["size"] for c in cells] + [FUSION_SIZE])
    import numpy as np
    import torch

    results: Dict[str, Any] = {
        "meta": {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                 "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                 "platform": platform.platform(), "cores": os.cpu_count(), "threads": a.threads,
                 "sources": {"before": _src_info(a.before), "after": _src_info(a.after)},
                 "omp_wait_policy_at_start": _ORIG_ENV.get("OMP_WAIT_POLICY"),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")},
        "sets": sets, "models": models, "fusion_sets": {str(k): v for k, v in data.items()},
        "cells": cells, "runs": [],
    }
    stop: Dict[str, str] = {}  # (cell, version) -> why it is not run again
    for cell in cells:
        if a.skip_slow and cell["set"].startswith("untrained") and cell["method"] == "kf-linear":
            stop[f"{cell['id']}|before"] = "skipped (--skip-slow)"
    n_done = 0
    for rep in range(a.repeats):
        for ci, cell in enumerate(cells):
            versions = _versions_of(cell)
            if (rep + ci) % 2:
                versions = versions[::-1]
            for v in versions:
                key = f"{cell['id']}|{v}"
                if key in stop:
                    if rep == 0:
                        results["runs"].append({"cell": cell["id"], "version": v, "repeat": rep,
                                                "status": "skipped", "error": stop[key]})
                    continue
                rec = _run_child(a, out, cell, v, rep, models, data)
                results["runs"].append(rec)
                n_done += 1
                st = rec.get("status")
                if st == "ok":
                    p = rec.get("passes") or {}
                    extra = f", base passes {_fmt(p.get('base_max'))}" if p else ""
                    print(f"[{rep + 1}/{a.repeats}] {cell['id']:<42} {v:<6} {rec['seconds']:8.2f} s  "
                          f"peak {_fmt(_mib(rec.get('peak_kib')), 0)} MiB{extra}", flush=True)
                else:
                    print(f"[{rep + 1}/{a.repeats}] {cell['id']:<42} {v:<6} {st.upper()}: "
                          f"{(rec.get('error') or '')[:200]}", flush=True)
                if st == "timeout":
                    stop[key] = "timed out in an earlier repeat"
                elif st == "ok" and rec["seconds"] > a.long:
                    stop[key] = f"ran {rec['seconds']:.0f} s > --long {a.long:.0f} s: not repeated"
                elif st in ("error", "crash"):
                    stop[key] = f"{st} in an earlier repeat"
                _save_results(out, results)
    results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    results["meta"]["total_seconds"] = time.perf_counter() - t_start
    _save_results(out, results)
    print()
    print((out / "report.md").read_text())
    failed = [r for r in results["runs"] if r.get("status") in ("error", "crash")]
    print(f"[done] {n_done} runs in {time.perf_counter() - t_start:.0f} s; "
          f"{len(failed)} errored or crashed; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
