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


def _read_data_file(path: Path) -> Any:
    """A :class:`~neurofuse.data.Dataset` from a safetensors file with ``x_train``, ``y_train``
    (and optionally ``x_test``, ``y_test``)."""
    from safetensors.torch import load_file

    from ..data import Dataset

    if not path.is_file():
        raise DataError(f"--hf-data {path} does not exist")
    try:
        t = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read {path} as safetensors: {str(exc).splitlines()[0]}") from None
    missing = [k for k in ("x_train", "y_train") if k not in t]
    if missing:
        raise DataError(f"{path} has no tensor(s) {missing}; it needs x_train and y_train "
                        f"(and optionally x_test, y_test); it has {sorted(t)}")
    x_te = t.get("x_test", t["x_train"][:0])
    y_te = t.get("y_test", t["y_train"][:0])
    y = t["y_train"].long()
    n_cls = int(max(int(y.max()), int(y_te.max()) if y_te.numel() else 0)) + 1
    return Dataset(path.stem, t["x_train"], y, x_te, y_te.long(), n_cls, tuple(t["x_train"].shape[1:]))


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
    for flag, on in (("--distributed", a.distributed), ("--depth", a.depth), ("--repair", a.repair),
                     ("--head-weights", a.head_weights), ("--width", a.width is not None)):
        if on:
            raise ConfigError(f"{flag} does not apply to --hf: Hugging Face models are fused with "
                              "their config's widths and depth, without REPAIR or split.json")
    out = Path(a.out)
    inputs = [Path(p) for p in a.checkpoints]
    for p in inputs:
        if out.resolve() == p.resolve():
            raise ConfigError(f"--out {out} is one of the input folders; choose another --out")
    if out.exists() and not a.force:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"{out} exists; pass --force to overwrite")
    if a.hf_data:
        ds = _read_data_file(Path(a.hf_data))
    elif a.dataset:
        ds = load_dataset(a.dataset, a.data_dir)
    else:
        raise DataError("--hf needs fusion data: --dataset NAME (images) or --hf-data FILE.safetensors "
                        "(tensors x_train, y_train and optionally x_test, y_test)")
    sample = tuple(int(s) for s in ds.x_train.shape[1:])
    models: List[Any] = [load_pretrained(p, fallback_input_shape=sample) for p in inputs]
    shape = tuple(models[0].input_shape)
    for p, m in zip(inputs[1:], models[1:]):
        if tuple(m.input_shape) != shape:
            raise ConfigError(f"{p} takes inputs of shape {list(m.input_shape)} but {inputs[0]} "
                              f"takes {list(shape)}")
    ds = _fit_images(ds, shape)
    fusion = fusion_set(ds, a.fusion_samples, seed=a.seed)
    finetune, finetune_data = None, None
    if a.finetune:
        from ..finetune import FinetuneConfig

        finetune = FinetuneConfig(epochs=a.finetune, lr=a.finetune_lr, seed=a.seed, device=a.device)
        finetune_data = (ds.x_train, ds.y_train) if a.finetune_data == "train" else None
    fused = fuse(models, fusion, method=a.method, importance=a.importance, seed=a.seed,
                 progress=not a.no_progress, device=a.device, finetune=finetune,
                 finetune_data=finetune_data, **options)
    save_pretrained(fused, out, force=a.force, metadata={
        "method": a.method, "importance": a.importance, "seed": a.seed, "options": options,
        "finetune": a.finetune, "inputs": [str(p) for p in inputs], "data": a.hf_data or ds.name,
        "fusion_samples": int(fusion[0].shape[0])})
    label = f"{a.method}/{a.importance}" if get_method(a.method).uses_importance else a.method
    family = getattr(models[0], "family", "?")
    extra = f" + fine-tuned {a.finetune} epochs" if a.finetune else ""
    if ds.x_test.shape[0]:
        acc = evaluate(fused, ds.x_test, ds.y_test)["accuracy"]
        print(f"{out}: {label} of {len(models)} Hugging Face {family} models{extra}, "
              f"test accuracy {100 * acc:.2f}%")
    else:
        print(f"{out}: {label} of {len(models)} Hugging Face {family} models{extra} "
              "(no x_test in the data: not scored)")
    return 0
