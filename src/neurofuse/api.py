"""The public one-call API: ``neurofuse.fuse`` and ``neurofuse.methods``."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, List, Optional, Sequence, Union

from torch import nn

from ._fusion_set import as_fusion_set
from .distill import DistillConfig
from .distill import distill as distill_model
from .errors import ConfigError, DataError
from .finetune import FinetuneConfig
from .finetune import finetune as finetune_model
from .methods import FusionResult, Step, WidthSpec, get_method, list_methods
from ._validate import check_seed
from .repair import repair as repair_model

log = logging.getLogger("neurofuse")

__all__ = ["FusionResult", "fuse", "methods"]


def fuse(models: Sequence[nn.Module], data: Any = None, method: str = "kf-linear",
         importance: str = "uniform", width: WidthSpec = None, seed: int = 0,
         progress: bool = True, finetune: Union[None, int, FinetuneConfig] = None,
         finetune_data: Any = None, repair: bool = False, depth: Optional[str] = None,
         reference: Optional[int] = None, distill: Union[None, int, DistillConfig] = None,
         distill_data: Any = None, return_result: bool = False,
         **options: Any) -> Union[nn.Module, FusionResult]:
    """Fuse trained ``models`` into one model.

    Parameters
    ----------
    models : sequence of nn.Module
        The base models (zoo models or models with declared levels); the fused model has the
        first model's architecture (and, by default, its widths).
    data : tensor, (x, y) pair, TensorDataset or DataLoader
        The fusion set: a few (hundred) training samples, never test data.  Labels are needed
        by the attribution-based importance scores.
    method : str
        A name from :func:`methods`, e.g. ``"kf-linear"``, ``"hf-linear"``, ``"vanilla"``.
    importance : str
        ``"uniform"``, ``"conductance"`` or ``"deeplift"`` (methods that use importance only).
    width : None, int, float or list of int
        Fused width per level (see :class:`neurofuse.methods.FusionMethod`).
    seed : int
        Seed of every random choice (K-means seeding, data order).
    progress : bool
        Show progress bars.
    finetune : None, int or FinetuneConfig
        Fine-tune the fused model after fusion (and after ``repair``): an int is a number of
        epochs with the default :class:`~neurofuse.finetune.FinetuneConfig` (paper schedule,
        ``seed`` and ``device`` taken from this call), a config sets everything.  A stratified
        part of the fine-tuning data is held out to pick the best checkpoint.  The history is the
        result's ``"finetune"`` step.  Refused for output ensembles (nothing is fused).
    finetune_data : (x, y) pair, TensorDataset or DataLoader, optional
        Labelled *training* data to fine-tune on; default: the fusion set ``data``.
    repair : bool
        Run REPAIR after fusion (:func:`neurofuse.repair.repair`): re-estimate BatchNorm
        statistics on the fusion set and rescale every fused neuron to the mean and std of the
        base neurons it stands for (the result's correspondences).
    depth : None or "align"
        ``"align"`` fuses models of different depths (CLAFusion, Nguyen et al. 2023): every model's
        levels are aligned to a reference model's by dynamic programming on a CKA dissimilarity
        and the depths are balanced exactly (:func:`neurofuse.depth.align_models`); the fused
        model has the reference's depth.  Options ``depth_metric`` (``"cka"`` or ``"euclidean"``)
        and ``balance`` (``"add"``: identity levels into shallower models, the deepest is the
        reference; ``"merge"``: composite levels of deeper models, the shallowest is the
        reference — compression) tune it.  The alignment is the result's ``"depth"`` step.
    reference : int, optional
        With ``depth="align"``, the index of the model whose depth (and architecture) the fused
        model takes.
    distill : None, int or DistillConfig
        After fusion (and ``repair``, before ``finetune``), train the fused model toward the base
        models' ensemble on the fusion inputs, without labels (:func:`neurofuse.distill.distill`:
        temperature, mixup and shifts, early stopping on a held-out part of the fusion set); the
        teacher is weighted per class by the ``class_weights`` option when given.  An int is a
        number of epochs with the default :class:`~neurofuse.distill.DistillConfig` (``seed``
        and ``device`` from this call).  The history is the result's ``"distill"`` step.
    distill_data : tensor or array-like, optional
        Extra *unlabelled* training inputs to distill on, besides the fusion set.
    return_result : bool
        Return the whole :class:`~neurofuse.methods.FusionResult` (the model, one correspondence
        per hidden level, the per-level report, the method's extras and every step applied)
        instead of the model alone, as POT's ``log=True``.
    **options
        Method settings (its ``Options`` dataclass), e.g. ``n_init=10`` for ``kf-linear`` (more K-means restarts), or the
        common ``device="cuda"`` and ``batch_size=256``.

    Returns
    -------
    nn.Module or FusionResult
        The fused model, in eval mode (``return_result=True``: the result holding it).

    Examples
    --------
    >>> fused = neurofuse.fuse([m1, m2, m3], (x_fuse, y_fuse), method="kf-linear",
    ...                        importance="conductance")  # doctest: +SKIP
    """
    cls = get_method(method)
    check_seed(seed)
    if isinstance(finetune, bool) or not (finetune is None or isinstance(finetune, (int, FinetuneConfig))):
        raise ConfigError(f"finetune must be None, a number of epochs or a FinetuneConfig, got {finetune!r}")
    if isinstance(distill, bool) or not (distill is None or isinstance(distill, (int, DistillConfig))):
        raise ConfigError(f"distill must be None, a number of epochs or a DistillConfig, got {distill!r}")
    if cls.output_is_ensemble and (finetune is not None or repair or distill is not None):
        raise ConfigError(
            f"{method!r} keeps the models separate (an output ensemble): there is nothing to repair, "
            "distill or fine-tune; choose a fusion method"
        )
    if isinstance(distill, int):
        distill = DistillConfig(epochs=distill, seed=seed, device=str(options.get("device", "cpu")))
    if isinstance(finetune, int):
        finetune = FinetuneConfig(epochs=finetune, seed=seed, device=str(options.get("device", "cpu")))
    steps: List[Step] = []
    metric = options.pop("depth_metric", "cka")
    balance = options.pop("balance", "add")
    if depth is not None:
        if depth != "align":
            raise ConfigError(f"depth must be None or 'align', got {depth!r}")
        if data is None:
            raise DataError("depth='align' compares level outputs: pass the fusion data=(x, y)")
        from .depth import align_models

        start = time.perf_counter()
        models, alignment = align_models(list(models), as_fusion_set(data), reference=reference,
                                         metric=metric, balance=balance)
        steps.append(Step("depth", time.perf_counter() - start, {"alignment": alignment}))
    elif reference is not None:
        raise ConfigError("reference= is used with depth='align'; reorder the models to choose the "
                          "fused architecture otherwise")
    fusion = cls(importance=importance, width=width, seed=seed, progress=progress, **options)
    result = fusion.run(models, data)
    fused = result.model
    if repair:
        if data is None:
            raise DataError("repair needs the fusion data: pass data=(x, y)")
        start = time.perf_counter()
        fused = repair_model(fused, list(models), data, correspondences=result.correspondences or None,
                             batch_size=int(options.get("batch_size", 256)),
                             inner_correspondences=result.extras.get("inner_correspondences"))
        steps.append(Step("repair", time.perf_counter() - start))
    if distill is not None:
        if data is None:
            raise DataError("distillation trains on the fusion inputs: pass data=(x, y) or data=x")
        start = time.perf_counter()
        # with depth="align" these are the depth-balanced models: the same functions
        fused, history = distill_model(fused, list(models), as_fusion_set(data).x, distill,
                                       class_weights=options.get("class_weights"), extra=distill_data,
                                       progress=progress)
        steps.append(Step("distill", time.perf_counter() - start, {"history": history}))
    if finetune is not None:
        if finetune_data is None:
            log.warning("fine-tuning on the fusion set only (%s samples); pass finetune_data=(x, y) "
                        "to fine-tune on more training data", len(as_fusion_set(data)) if data is not None else 0)
        source = data if finetune_data is None else finetune_data
        if source is None:
            raise DataError("fine-tuning needs labelled training data: pass finetune_data=(x, y)")
        fs = as_fusion_set(source)
        if fs.y is None:
            raise DataError("fine-tuning needs labels: pass finetune_data=(x, y)")
        start = time.perf_counter()
        fused, history = finetune_model(fused, fs.x, fs.y, finetune, progress=progress)
        steps.append(Step("finetune", time.perf_counter() - start, {"history": history}))
    result = dataclasses.replace(result, model=fused, steps=tuple(steps))
    return result if return_result else result.model


def methods() -> List[str]:
    """Names of every registered fusion method."""
    return list_methods()
