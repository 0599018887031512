r"""The memory of a fusion, known before it starts: an estimate, a budget, and a plan that fits it.

:func:`plan_memory` estimates the **working set** of a fusion — the bytes it needs beyond the base
models and the fusion set themselves — from the level shapes (one forward pass of a single zero
sample per model, no fusion data) and the method's algebra, and fits it into ``memory_budget``:

* level activations (every model's level outputs over the fusion set) are kept in memory up to
  what the budget leaves and spilled to temporary files beyond it (:class:`~neurofuse.levels.LevelStream`);
* the per-batch temporaries (design matrices, flattened outputs, float64 copies) shrink with the
  batch size, which is lowered until they fit;
* what cannot shrink — the per-level algebra (Gram matrix, eigendecomposition, cross statistics,
  K-means' distance tables) and the copies of the models a method makes — is what the estimate
  compares with the budget: a fusion that cannot fit is refused **before any forward pass over
  the fusion set**, with the estimate and its largest parts in the message.

The estimate is meant as an upper bound (every term at its largest level, float64 where the
engine uses it, plus :data:`RUNTIME` for the interpreter and allocator): on the fusions of
``benchmarks/scale.py`` (2-64 MLPs, 2-4 full-width VGG11s, ResNet-18s; kf-linear, otfusion,
vanilla) it was 1.07-3x the measured growth of the resident memory during the call above 100 MiB
(more on small fusions, where the fixed terms dominate).  Estimators are registered per method class
(:func:`estimated_by`, a class decorator) and found along the class's MRO; methods without one get
the generic estimate (model copies + level activations + per-level outer products).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, TypeVar, Union

import torch
from torch import nn

from ..approximation import is_conv1d
from ..errors import IncompatibleModelsError, MemoryBudgetError
from ..grouping import kmeans_memory
from ..levels import DEFAULT_MEMORY_BUDGET, LeveledNet, split_affine

if TYPE_CHECKING:  # pragma: no cover
    from .._fusion_set import FusionSet


class MethodLike(Protocol):
    """What the estimators read of a method (:class:`~neurofuse.methods.FusionMethod`, which
    imports this module)."""

    name: str
    needs_data: bool
    batch_size: int
    device: torch.device

__all__ = ["MemoryPlan", "Sizes", "available_memory", "estimate_memory", "estimated_by",
           "fisher_working_set", "linear_working_set", "plan_memory",
           "regmean_working_set"]

F32, F64 = 4, 8

Budget = Union[int, str, None]


@dataclass(frozen=True)
class LevelShape:
    """What the estimators need of one level: per-sample output size, rows per sample, the
    neurons of every model, and the design columns of its affine layer (0: none)."""

    size: int                 # elements of one sample's output
    positions: int            # rows per sample (H*W for conv, T for tokens, 1 for dense)
    widths: Tuple[int, ...]   # neurons of every model
    design: int               # columns of the fused level's design matrix (0: no Linear/Conv)
    #: a level that is not one affine layer (a transformer block, fitted sub-level by sub-level):
    #: the most outputs of one of its Linear/Conv layers (``design`` is then its widest input)
    inner_out: int = 0


@dataclass(frozen=True)
class MemoryPlan:
    """The working set of a fusion and how it is made to fit.

    Attributes
    ----------
    estimate : int
        Bytes of the working set at ``batch_size`` with ``stream_bytes`` of level activations in
        memory (beyond the models and the fusion set).
    parts : dict
        The estimate's terms, in bytes (``algebra``, ``batch``, ``stream``, ``models``).
    batch_size : int
        Rows of the fusion set per batch.
    stream_bytes : int or None
        Level activations the level stream keeps in memory (``None``: all of them).
    budget : int or None
        The budget the plan fits (``None``: unbounded).
    """

    estimate: int
    parts: Dict[str, int] = field(default_factory=dict)
    batch_size: int = 256
    stream_bytes: Optional[int] = DEFAULT_MEMORY_BUDGET
    budget: Optional[int] = None


@dataclass(frozen=True)
class Sizes:
    """What an estimator is given: the level shapes, fusion samples, batch size, number of
    models, the largest model's bytes and its largest tensor's bytes."""

    levels: List[LevelShape]
    samples: int
    batch: int
    models: int
    model_bytes: int
    tensor_bytes: int
    #: ``(design columns, outputs)`` of every Linear/Conv2d of model 0 (what per-layer merges read)
    layers: Tuple[Tuple[int, int], ...] = ()


Estimator = Callable[[MethodLike, Sizes], Dict[str, int]]
#: the interpreter's and allocator's own growth during a fusion (measured: 3-40 MiB on small ones)
RUNTIME = 32 * 2**20
_ESTIMATORS: Dict[type, Estimator] = {}
C = TypeVar("C", bound=type)


def estimated_by(fn: Estimator) -> Callable[[C], C]:
    """Class decorator: ``fn(method, sizes) -> {part: bytes}`` (:class:`Sizes`) estimates the
    working set of the class and its subclasses (without a closer one of their own).  The parts
    (``algebra``, ``batch``, ``models``...) add up; ``stream_total`` is every model's largest level
    over the fusion set, of which the plan keeps what the budget allows."""

    def deco(cls: C) -> C:
        _ESTIMATORS[cls] = fn
        return cls

    return deco


def _estimator(method: MethodLike) -> Estimator:
    for cls in type(method).__mro__:
        if cls in _ESTIMATORS:
            return _ESTIMATORS[cls]
    return _generic


def mib(n: float) -> str:
    """``n`` bytes as MiB or GiB text."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def available_memory(device: Union[str, torch.device] = "cpu") -> Optional[int]:
    """Bytes the device can still give: a CUDA device's free memory, else the host's
    ``MemAvailable`` (``None`` where it is not known)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _layer_shape(affine: nn.Module) -> Tuple[int, int]:
    """``(design columns, outputs)`` of a Linear, Conv2d or ``transformers`` Conv1D (weight
    ``[in, out]``; ``(0, 0)`` for anything else)."""
    bias = int(getattr(affine, "bias", None) is not None)
    if is_conv1d(affine):
        return int(affine.weight.shape[0]) + bias, int(affine.weight.shape[1])
    if isinstance(affine, nn.Conv2d):
        return affine.in_channels // affine.groups * math.prod(affine.kernel_size) + bias, affine.out_channels
    if isinstance(affine, nn.Linear):
        return affine.in_features + bias, affine.out_features
    return 0, 0


def _layers(model: nn.Module) -> Tuple[Tuple[int, int], ...]:
    return tuple(s for s in (_layer_shape(m) for m in model.modules()) if s[0])


def _design_columns(level: nn.Module) -> Tuple[int, int]:
    """``(design, inner_out)`` of a level (:class:`LevelShape`): its affine layer's design columns,
    or for a level that is no single affine layer the widest input and most outputs of its layers."""
    try:
        _, affine = split_affine(level)
    except IncompatibleModelsError:
        inner = _layers(level)
        return max((d for d, _ in inner), default=0), max((o for _, o in inner), default=0)
    return _layer_shape(affine)[0], 0


def level_shapes(models: Sequence[nn.Module]) -> List[LevelShape]:
    """The :class:`LevelShape` of every level of ``models`` (one zero sample through each)."""
    nets = [m for m in models if isinstance(m, LeveledNet)]
    if len(nets) != len(models) or not nets:
        return []
    shapes = [m.level_shapes() for m in nets]
    out = []
    for lvl, (shape, axis) in enumerate(zip(shapes[0], nets[0].axes)):
        size = math.prod(shape[1:])
        # models of other depths are the method's to refuse or fuse: the levels they have count
        have = [s[lvl] for s in shapes if lvl < len(s)]
        if axis == "conv":
            widths = tuple(s[1] for s in have)
            positions = size // max(1, shape[1])
        else:
            widths = tuple(s[-1] for s in have)
            positions = size // max(1, shape[-1])
        out.append(LevelShape(size, positions, widths, *_design_columns(nets[0].levels[lvl])))
    return out


def _sizes(models: Sequence[nn.Module], n: int, b: int) -> Sizes:
    params = [[p.numel() * p.element_size() for p in m.parameters()] for m in models]
    return Sizes(level_shapes(models), n, b, len(models), max((sum(p) for p in params), default=0),
                 max((max(p, default=0) for p in params), default=0), _layers(models[0]) if models else ())


def _stream_total(levels: Sequence[LevelShape], n: int, streams: int) -> int:
    """Bytes of one level's activations over the whole fusion set, all streams, at its largest."""
    return max((lv.size * n * F32 * streams for lv in levels), default=0)


def _batch_acts(levels: Sequence[LevelShape], b: int, streams: int) -> int:
    """A batch's level input and output for every stream, at the largest level."""
    return max((lv.size * b * F32 * streams for lv in levels), default=0) * 2


def _generic(method: MethodLike, z: Sizes) -> Dict[str, int]:
    """Without fusion data (weight averaging): the fused copy, the averaged state, per tensor every
    model's float64 copy stacked, and a model's worth per base model that the allocator keeps
    from those copies.  With data: one copy per base model and the fused one, per level and model
    a few ``[w, w]`` float64 statistics against one other model (alignment: moments, the cost,
    the plan), two batches of level activations per model and their float64 rows.  Calibrated
    on ``benchmarks/scale.py`` (MLPs, VGG11, ResNet-18: 0.9-3x the measured peak)."""
    if not method.needs_data:
        return {"models": (2 + z.models) * z.model_bytes + 4 * z.models * z.tensor_bytes}
    levels, b, k = z.levels, z.batch, z.models
    pairs = max((max(max(lv.widths), lv.inner_out) ** 2 * F64 * 6 * k for lv in levels), default=0)
    rows = max((lv.positions * b * sum(lv.widths) * F64 * 3 for lv in levels), default=0)
    return {"models": z.model_bytes * (k + 1), "algebra": pairs, "batch": _batch_acts(levels, b, k + 1) + rows,
            "stream_total": _stream_total(levels, z.samples, k + 1)}


def linear_working_set(method: MethodLike, z: Sizes) -> Dict[str, int]:
    """The closed form (:class:`~neurofuse.methods.LinearFusion`): per level the Gram matrix and
    its eigendecomposition (``d x d`` float64: the matrix, a symmetrised copy, the eigenvectors and
    LAPACK's workspace) or, with fewer rows than design columns, the rows themselves; the cross
    statistics and the features (``d x M`` float64 and their float32 copy); K-means on ``M``
    points; per batch the design matrix and the flattened outputs in float32 and float64."""
    levels, n, b = z.levels, z.samples, z.batch
    algebra = batch = 0
    for lvl, lv in enumerate(levels):
        d, m, rows = lv.design, max(sum(lv.widths), lv.inner_out * len(lv.widths)), n * lv.positions
        if d == 0:
            continue
        dual = rows < d
        gram = rows * d * F64 if dual else d * d * F64
        eig = (rows * rows * F64 * 4 + rows * d * F64) if dual else 4 * d * d * F64
        r = min(rows, d)
        cross = d * m * F64 * (1 if lvl else 0)
        feats = (r * m + 2 * d * m) * F64 + d * m * F32
        k = max(lv.widths)
        algebra = max(algebra, gram + cross + max(eig, feats + kmeans_memory(m, min(r, d), k)))
        br = b * lv.positions
        batch = max(batch, br * d * (F32 * 2 + F64) + br * m * (F32 * 2 + F64 * 2))
    streams = 1 + max((len(lv.widths) for lv in levels), default=1)
    return {"models": z.model_bytes * 2, "algebra": algebra, "batch": batch + _batch_acts(levels, b, streams),
            "stream_total": _stream_total(levels, n, streams)}


def _merged(method: MethodLike, z: Sizes, stats: Dict[str, int]) -> Dict[str, int]:
    """A merge from per-model statistics (``stats``: their terms) with the alignment first where
    the method aligns (:func:`_generic`'s terms of an alignment, one aligned copy per model)."""
    k = z.models
    parts = {"models": z.model_bytes * (k + 1), **stats}
    alignment = getattr(method, "alignment", "none")
    if alignment != "none":
        align = _generic(method, z) if alignment == "activations" else {}
        parts["models"] += z.model_bytes * k
        for key in ("algebra", "batch"):
            parts[key] = max(parts.get(key, 0), align.get(key, 0))
        parts["stream_total"] = align.get("stream_total", 0)
    return parts


def regmean_working_set(method: MethodLike, z: Sizes) -> Dict[str, int]:
    """RegMean (:class:`~neurofuse.methods.RegMean` and its aligned form): every model's ``[d, d]``
    float64 Gram matrix of every merged layer's inputs, all held until the merge, a few ``[d, d]``
    for the solve of the largest, per batch a level's input rows in float64."""
    grams = sum(d * d for d, _ in z.layers) * F64 * z.models
    solve = 3 * max((d * d for d, _ in z.layers), default=0) * F64
    rows = max((lv.positions * z.batch * lv.design * F64 for lv in z.levels), default=0)
    return _merged(method, z, {"algebra": grams + solve, "batch": rows + _batch_acts(z.levels, z.batch, 1)})


def fisher_working_set(method: MethodLike, z: Sizes) -> Dict[str, int]:
    """Fisher merging (:class:`~neurofuse.methods.FisherMerging` and its aligned form): every
    model's float32 Fisher sums (a model's worth each) and the vectorised per-sample gradients
    (:func:`neurofuse.approximation.fisher_sums`: 2^24 entries, their squares and autograd's)."""
    return _merged(method, z, {"algebra": z.models * z.model_bytes,
                               "batch": 3 * min(1 << 24, z.batch * z.model_bytes // F32) * F32 + _batch_acts(z.levels, z.batch, 1)})


def estimate_memory(method: MethodLike, models: Sequence[nn.Module], n_samples: int, batch_size: int,
                    stream_bytes: Optional[int]) -> Tuple[int, Dict[str, int]]:
    """``(bytes, parts)``: the working set of ``method`` fusing ``models`` on ``n_samples`` in
    batches of ``batch_size`` with at most ``stream_bytes`` of level activations in memory."""
    parts = _estimator(method)(method, _sizes(models, n_samples, batch_size))
    parts["runtime"] = RUNTIME
    total_stream = parts.pop("stream_total", 0)
    parts["stream"] = total_stream if stream_bytes is None else min(stream_bytes, total_stream)
    return sum(parts.values()), parts


def _describe(parts: Dict[str, int]) -> str:
    return ", ".join(f"{k} {mib(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)


def plan_memory(method: MethodLike, models: Sequence[nn.Module], data: Optional["FusionSet"],
                budget: Budget) -> MemoryPlan:
    """Fit the fusion into ``budget`` or refuse it, before any work on the fusion set.

    Parameters
    ----------
    method : FusionMethod
        The method (its estimator, batch size and fused widths).
    models : sequence of nn.Module
        The base models.
    data : FusionSet or None
        The fusion set (``None`` for methods that need none).
    budget : int, "auto" or None
        Bytes the working set may take (the batch size is lowered and level activations are
        spilled until it fits); ``"auto"``: keep :data:`~neurofuse.levels.DEFAULT_MEMORY_BUDGET`
        of level activations in memory and refuse only a fusion that the machine's available
        memory cannot hold; ``None``: no bound, nothing spilled, no check.

    Raises
    ------
    MemoryBudgetError
        If the estimate at batch size 1 with every activation spilled exceeds the budget.
    """
    n = 0 if data is None else len(data)
    b = method.batch_size if data is None else data.batch_size
    if budget is None:
        est, parts = estimate_memory(method, models, n, b, None)
        return MemoryPlan(est, parts, b, None, None)
    if budget == "auto":
        est, parts = estimate_memory(method, models, n, b, DEFAULT_MEMORY_BUDGET)
        avail = available_memory(method.device)
        if avail is not None and est > avail:
            raise MemoryBudgetError(
                f"fusing {len(models)} models with {method.name!r} needs an estimated {mib(est)} "
                f"({_describe(parts)}) but {method.device} has {mib(avail)} available; fuse fewer or "
                "smaller models, fewer fusion samples, or pass memory_budget=None to try anyway"
            )
        return MemoryPlan(est, parts, b, DEFAULT_MEMORY_BUDGET, None)
    fixed, fixed_parts = estimate_memory(method, models, n, 1, 0)
    if fixed > budget:
        raise MemoryBudgetError(
            f"fusing {len(models)} models with {method.name!r} needs at least an estimated "
            f"{mib(fixed)} ({_describe(fixed_parts)}) even at batch size 1 with every level "
            f"activation spilled to disk, more than memory_budget={budget} ({mib(budget)}); raise "
            "memory_budget, fuse fewer or smaller models, or use a method with less per-level algebra"
        )
    while b > 1 and estimate_memory(method, models, n, b, 0)[0] > budget:
        b = max(1, b // 2)
    est, parts = estimate_memory(method, models, n, b, 0)
    stream = max(0, budget - est)
    est, parts = estimate_memory(method, models, n, b, stream)
    return MemoryPlan(est, parts, b, stream, budget)
