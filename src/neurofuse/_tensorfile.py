"""Reading the tensor files neurofuse accepts, safely: the layer below checkpoints and interop.

``.safetensors`` files are read with :mod:`safetensors` (the header first, without the tensor data,
then the data, checked against the sha256 that neurofuse writes into the metadata); PyTorch
``.pt`` / ``.pth`` files only with ``torch.load(..., weights_only=True)``, so no pickled code runs.
Every failure is a one-line :class:`~neurofuse.errors.CheckpointError` naming the file and what to
do.  :mod:`neurofuse.checkpoint` (neurofuse's own checkpoints) and :mod:`neurofuse.interop` (other
libraries' state dicts) both read through here.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from .errors import CheckpointError

__all__ = ["DIGEST_KEY", "METADATA_KEY", "SafetensorsHeader", "check_exists", "corrupt_error", "digest",
           "first_line", "read_torch"]

log = logging.getLogger("neurofuse")

#: safetensors metadata key that holds the JSON document
METADATA_KEY = "neurofuse"
#: safetensors metadata key that holds the sha256 of the document and the tensor data
DIGEST_KEY = "neurofuse.sha256"


def digest(header: str, tensors: Mapping[str, Tensor]) -> str:
    """sha256 of the metadata document and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(header.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def first_line(exc: BaseException) -> str:
    """First line of an exception message, shortened, for one-line error messages."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 120 else first[:117] + "..."


def corrupt_error(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: file is corrupt or truncated ({first_line(exc)}); re-save or re-download it"
    )


def check_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the checkpoint file")


class SafetensorsHeader:
    """What a safetensors file declares, read without reading the tensor data."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                self.meta: Optional[Mapping[str, str]] = fh.metadata()
                self.tensors: Dict[str, tuple[list[int], str]] = {}
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    self.tensors[name] = ([int(d) for d in sl.get_shape()], str(sl.get_dtype()))
        except Exception as exc:  # safetensors raises several types for bad files
            raise corrupt_error(path, exc) from None

    def read(self) -> Dict[str, Tensor]:
        """The tensors, checked against the stored sha256 (when the file has one)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as fh:
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as exc:  # safetensors raises several types for bad files
            raise corrupt_error(self.path, exc) from None
        meta = self.meta or {}
        stored = meta.get(DIGEST_KEY)
        if stored is None:
            log.debug("%s has no sha256 in its metadata (saved by an older neurofuse); its data "
                      "is not verified", self.path)
        elif digest(meta.get(METADATA_KEY, ""), tensors) != stored:
            raise CheckpointError(
                f"{self.path}: checksum mismatch: its tensor data or metadata changed after it was "
                "saved (bit rot, a partial copy or tampering); re-save or re-download it"
            )
        return tensors


def read_torch(path: Path) -> Dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and runtime errors for bad files
        message = str(exc).lower()
        if "weights only load failed" in message and "global" in message:
            raise CheckpointError(
                f"{path} contains pickled Python objects other than tensors and is not loaded "
                "(neurofuse reads .pt files with weights_only=True); re-save it as a plain state "
                "dict with torch.save(model.state_dict(), path)"
            ) from None
        if "weights only load failed" in message:  # torch's long advice hides the real cause
            raise CheckpointError(
                f"{path}: file is corrupt or truncated (not a readable PyTorch state dict); "
                "re-save or re-download it"
            ) from None
        raise corrupt_error(path, exc) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path} does not hold a state dict (a mapping of names to tensors); re-save it with "
            "torch.save(model.state_dict(), path)"
        )
    return dict(obj)
