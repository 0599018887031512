"""``neurofuse fuse --hf DIR1 DIR2 ... --out DIR`` and ``neurofuse methods --hf``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

__all__ = ["fuse_hf", "print_methods"]

log = logging.getLogger("neurofuse")


def print_methods() -> int:
    """Print which method fuses which Hugging Face family, with a one-line reason each."""
    from . import families, method_table

    print("Hugging Face families (neurofuse[hf]): " + "; ".join(families()))
    for family, row in method_table().items():
        print(f"\n{family}:")
        col = max(len(name) for name in row)
        for name, note in row.items():
            print(f"  {name:{col}s} {note}")
    print("\nfine-tuning after fusion (--finetune) applies to every fused model but an ensemble")
    return 0


#: most classes a --hf-data file's labels may name
MAX_CLASSES = 100_000


def _read_data_file(path: Path) -> Any:
    """A :class:`~neurofuse.data.Dataset` from a safetensors file with ``x_train``, ``y_train``
    (and optionally ``x_test``, ``y_test``), checked: labels are non-negative integers, one per
    sample, and there is at least one training sample."""
    from safetensors.torch import load_file

    from ..data import Dataset

    if not path.is_file():
        raise DataError(f"--hf-data {path} does not exist" if not path.exists() else
                        f"--hf-data {path} is not a file; give a .safetensors file")
    try:
        t = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read --hf-data {path} as safetensors ({str(exc).splitlines()[0][:120]}); "
                        "write it with safetensors.torch.save_file") from None
    missing = [k for k in ("x_train", "y_train") if k not in t]
    if missing:
        raise DataError(f"{path} has no tensor(s) {missing}; it needs x_train and y_train "
                        f"(and optionally x_test, y_test); it has {sorted(t)}")
    x_tr, y_tr = t["x_train"], t["y_train"]
    x_te = t.get("x_test", x_tr[:0])
    y_te = t.get("y_test", y_tr[:0])
    for xs, ys, split in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        if ys.dim() != 1 or ys.dtype.is_floating_point or ys.dtype == torch.bool or ys.is_complex():
            raise DataError(f"{path}: y_{split} must be a 1-D tensor of integer labels, got "
                            f"{str(ys.dtype).replace('torch.', '')} {list(ys.shape)}")
        if xs.dim() < 2 or xs.shape[0] != ys.shape[0]:
            raise DataError(f"{path}: x_{split} {list(xs.shape)} must hold one sample per label of "
                            f"y_{split} ({ys.shape[0]} labels)")
        if ys.numel() and (int(ys.min()) < 0 or int(ys.max()) >= MAX_CLASSES):
            raise DataError(f"{path}: y_{split} has label {int(ys.min()) if int(ys.min()) < 0 else int(ys.max())}; "
                            f"labels must be in [0, {MAX_CLASSES})")
        if xs.is_complex() or xs.dtype == torch.bool:
            raise DataError(f"{path}: x_{split} holds {str(xs.dtype).replace('torch.', '')} values; "
                            "give real numbers or token ids")
    if y_tr.numel() == 0:
        raise DataError(f"{path} has no training sample (x_train and y_train are empty)")
    if x_te.shape[1:] != x_tr.shape[1:] and x_te.numel():
        raise DataError(f"{path}: x_test samples have shape {list(x_te.shape[1:])} but x_train "
                        f"samples {list(x_tr.shape[1:])}")
    y = y_tr.long()
    n_cls = int(max(int(y.max()), int(y_te.max()) if y_te.numel() else 0)) + 1
    return Dataset(path.stem, x_tr, y, x_te, y_te.long(), n_cls, tuple(x_tr.shape[1:]))


def _check_inputs(ds: Any, models: List[Any], source: str) -> None:
    """The data must be what the models take: integer token ids below every model's vocabulary
    (an id out of range is an index error deep in the embedding), or real-valued images."""
    from ..models.ensemble import Ensemble
    from ._adapters import adapter_for

    nets = [n for m in models for n in (m.members if isinstance(m, Ensemble) else [m])]
    first = nets[0].hf_model
    kind = adapter_for(first).input_kind
    for name, x in (("x_train", ds.x_train), ("x_test", ds.x_test)):
        if kind == "tokens":
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise DataError(f"{source}: {name} holds {str(x.dtype).replace('torch.', '')} values but "
                                f"{type(first).__name__} takes integer token ids; give --hf-data with "
                                "integer x_train")
            vocab = min(int(getattr(n.hf_model.config, "vocab_size", 0) or 0) for n in nets)
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
                bad = int(x.min()) if int(x.min()) < 0 else int(x.max())
                raise DataError(f"{source}: {name} has token id {bad}, outside the models' vocabulary "
                                f"[0, {vocab}); tokenize the data with the models' tokenizer")
        elif not x.is_floating_point():
            raise DataError(f"{source}: {name} holds {str(x.dtype).replace('torch.', '')} values but "
                            f"{type(first).__name__} takes real-valued images; convert them to float")


def _fit_images(ds: Any, shape: Tuple[int, ...]) -> Any:
    """``ds`` with its images resized (bilinear) to the models' ``(C, H, W)`` when they differ."""
    from ..data import Dataset

    have = tuple(ds.x_train.shape[1:])
    if have == shape:
        return ds
    if len(have) != 3 or len(shape) != 3 or have[0] != shape[0]:
        raise DataError(f"the data has samples of shape {list(have)} but the models take "
                        f"{list(shape)}; pass data of the models' input shape")
    log.warning("resizing %s images from %s to the models' %s", ds.name, list(have[1:]), list(shape[1:]))

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False) if x.numel() else \
            x.new_zeros((0, *shape))

    return Dataset(ds.name, up(ds.x_train), ds.y_train, up(ds.x_test), ds.y_test, ds.num_classes, shape)


def fuse_hf(a: argparse.Namespace, options: Dict[str, Any]) -> int:
    """The ``fuse --hf`` command: the positional arguments are ``save_pretrained`` folders.

    ``options`` are the method's ``--option KEY=VALUE`` settings, parsed by :mod:`neurofuse.cli`.
    """
    from ..api import fuse
    from ..data import load_dataset
    from ..experiment import fusion_set
    from ..methods import get_method
    from ..training import evaluate
    from . import load_pretrained, require_transformers, save_pretrained

    if a.no_progress:   # transformers' own bars (loading and writing weights)
        require_transformers().utils.logging.disable_progress_bar()
    for flag, on in (("--distributed", a.distributed), ("--depth", a.depth),
                     ("--head-weights", a.head_weights), ("--width", a.width is not None)):
        if on:
            raise ConfigError(f"{flag} does not apply to --hf: Hugging Face models are fused with "
                              "their config's widths and depth, without split.json")
    from .._io import check_outputs

    out = Path(a.out)
    inputs = [Path(p) for p in a.checkpoints]
    data_root = None
    if a.dataset and not a.hf_data:
        from ..data import resolve_data_dir

        data_root = resolve_data_dir(a.data_dir).resolve()
    # the folder is replaced whole: it never is, holds or lies inside an input (checked before any work)
    check_outputs([(out, "folder")], a.force, inputs + ([Path(a.hf_data)] if a.hf_data else []),
                  data_root)
    if a.hf_data:
        ds = _read_data_file(Path(a.hf_data))
    elif a.dataset:
        ds = load_dataset(a.dataset, a.data_dir)
    else:
        raise DataError("--hf needs fusion data: --dataset NAME (images) or --hf-data FILE.safetensors "
                        "(tensors x_train, y_train and optionally x_test, y_test)")
    sample = tuple(int(s) for s in ds.x_train.shape[1:])
    from ._io import ENSEMBLE_FILE

    for p in inputs:
        if (Path(p) / ENSEMBLE_FILE).is_file():
            raise ConfigError(f"{p} is an ensemble folder ({ENSEMBLE_FILE}); fuse its members instead: "
                              f"{Path(p) / 'member_0'} {Path(p) / 'member_1'} ...")
    models: List[Any] = [load_pretrained(p, fallback_input_shape=sample) for p in inputs]
    shape = tuple(models[0].input_shape)
    for p, m in zip(inputs[1:], models[1:]):
        if tuple(m.input_shape) != shape:
            raise ConfigError(f"{p} takes inputs of shape {list(m.input_shape)} but {inputs[0]} "
                              f"takes {list(shape)}")
    _check_inputs(ds, models, a.hf_data or f"--dataset {ds.name}")
    ds = _fit_images(ds, shape)
    fusion = fusion_set(ds, a.fusion_samples, seed=a.seed)
    finetune, finetune_data = None, None
    if a.finetune:
        from ..finetune import FinetuneConfig

        finetune = FinetuneConfig(epochs=a.finetune, lr=a.finetune_lr, seed=a.seed, device=a.device)
        finetune_data = (ds.x_train, ds.y_train) if a.finetune_data == "train" else None
    fused = fuse(models, fusion, method=a.method, importance=a.importance, seed=a.seed,
                 progress=not a.no_progress, device=a.device, repair=a.repair, finetune=finetune,
                 finetune_data=finetune_data, **options)
    save_pretrained(fused, out, force=a.force, metadata={
        "method": a.method, "importance": a.importance, "seed": a.seed, "options": options,
        "repair": bool(a.repair), "finetune": a.finetune, "inputs": [str(p) for p in inputs], "data": a.hf_data or ds.name,
        "fusion_samples": int(fusion[0].shape[0])})
    label = f"{a.method}/{a.importance}" if get_method(a.method).uses_importance else a.method
    family = getattr(models[0], "family", "?")
    extra = (" + REPAIR" if a.repair else "") + (f" + fine-tuned {a.finetune} epochs" if a.finetune else "")
    if ds.x_test.shape[0]:
        acc = evaluate(fused, ds.x_test, ds.y_test)["accuracy"]
        print(f"{out}: {label} of {len(models)} Hugging Face {family} models{extra}, "
              f"test accuracy {100 * acc:.2f}%")
    else:
        print(f"{out}: {label} of {len(models)} Hugging Face {family} models{extra} "
              "(no x_test in the data: not scored)")
    return 0
