"""Reading the tensor files neurofuse accepts, safely: the layer below checkpoints and interop.

The format of a file is recognised by its content, not its name (:func:`file_format`): a
``.bin`` or ``.ckpt`` that ``torch.save`` wrote is read as PyTorch, a ``.pt`` holding safetensors
as safetensors.  ``.safetensors`` files are read with :mod:`safetensors` (the header first,
without the tensor data, then the data, checked against the sha256 that neurofuse writes into the
metadata); PyTorch zip files only with ``torch.load(..., weights_only=True)``, so no pickled code
runs, and only after their zip directory is checked (:func:`check_torch_zip`): every entry
stored uncompressed, as ``torch.save`` writes them, inside the file, and no more data than the
caller's architecture needs, so a small file cannot make the loader allocate gigabytes.  The old
(pre-1.6) PyTorch format, whose storages are allocated at sizes the file claims, is not read.
Every failure is a one-line :class:`~neurofuse.errors.CheckpointError` naming the file and what to
do.  :mod:`neurofuse.checkpoint` (neurofuse's own checkpoints) and :mod:`neurofuse.interop` (other
libraries' state dicts) both read through here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Set

import torch
from torch import Tensor

from .errors import CheckpointError

__all__ = ["DIGEST_KEY", "METADATA_KEY", "SafetensorsHeader", "check_exists", "check_torch_zip",
           "corrupt_error", "data_bytes", "digest", "file_format", "first_line", "load_torch", "read_torch"]

log = logging.getLogger("neurofuse")

#: safetensors metadata key that holds the JSON document
METADATA_KEY = "neurofuse"
#: safetensors metadata key that holds the sha256 of the document and the tensor data
DIGEST_KEY = "neurofuse.sha256"
#: how much more data than its architecture needs a PyTorch file may hold (a training checkpoint
#: with Adam's two moments holds three times the weights)
DATA_FACTOR = 4
#: data any file may hold beyond that (the pickle, small extra entries)
DATA_SLACK = 1 << 20

_ZIP_MAGIC = b"PK\x03\x04"
_WARNED: Set[str] = set()
_WARNED_LOCK = threading.Lock()


def file_format(path: Path) -> str:
    """What ``path`` holds, judged by its first bytes: ``"safetensors"``, ``"torch"`` (a zip file as
    ``torch.save`` writes), ``"legacy-torch"`` (a pickle: PyTorch before 1.6) or ``"unknown"``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    if head[:4] == _ZIP_MAGIC:
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:1] == b"\x80":
        return "legacy-torch"
    return "unknown"


def format_error(path: Path, kind: str) -> CheckpointError:
    """The error for a file that is neither safetensors nor a PyTorch zip file."""
    if kind == "legacy-torch":
        return CheckpointError(
            f"{path} is in the old PyTorch format (before 1.6), which neurofuse does not read (its "
            "storages are allocated at sizes the file claims); load it with torch and re-save it "
            "with torch.save(state_dict, path) or as safetensors")
    return CheckpointError(
        f"{path}: file is corrupt or truncated, or of a format neurofuse does not read (it reads "
        "safetensors and torch.save zip files, recognised by content, not by name); re-save or "
        "re-download it")


def data_bytes(tensors: Mapping[str, Any]) -> int:
    """Bytes of the tensors of a state dict (meta tensors included: nothing is read)."""
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors.values() if isinstance(t, Tensor))


def check_torch_zip(path: Path, max_bytes: Optional[int] = None) -> int:
    """Check a PyTorch zip file's directory before ``torch.load`` allocates what it claims.

    Every entry must be stored (uncompressed, as ``torch.save`` writes it) and lie inside the
    file, so that no entry can claim more memory than the file's size; with ``max_bytes`` (what
    the caller's architecture needs, times :data:`DATA_FACTOR`, plus :data:`DATA_SLACK`) the
    entries together may hold no more.  Returns the entries' total size.
    """
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise corrupt_error(path, exc) from None
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: entry {info.filename!r} is compressed, which torch.save never does (a "
                "compressed entry can claim gigabytes); re-save the file with torch.save")
        if info.file_size != info.compress_size or info.header_offset + info.file_size > size:
            raise corrupt_error(path, ValueError(f"entry {info.filename!r} claims {info.file_size} "
                                                 f"bytes beyond the file's {size}"))
        total += int(info.file_size)
    if max_bytes is not None and total > max_bytes:
        raise CheckpointError(
            f"{path} holds {total} bytes of data, more than the {max_bytes} the architecture allows "
            f"({DATA_FACTOR} x its weights); it is the checkpoint of a larger model (or hostile): "
            "check the architecture")
    return total


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

    def nbytes(self) -> int:
        """Bytes of the tensor data the header declares."""
        sizes = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                 "BF16": 2, "I16": 2, "U16": 2}
        total = 0
        for shape, dtype in self.tensors.values():
            n = 1
            for d in shape:
                n *= int(d)
            total += n * sizes.get(dtype.upper(), 1)
        return total

    def read(self, max_bytes: Optional[int] = None) -> Dict[str, Tensor]:
        """The tensors, checked against the stored sha256 (when the file has one); with
        ``max_bytes``, refused before any data is read when the header declares more."""
        from safetensors import safe_open

        if max_bytes is not None and self.nbytes() > max_bytes:
            raise CheckpointError(
                f"{self.path} holds {self.nbytes()} bytes of tensors, more than the {max_bytes} "
                "the architecture allows; it is the checkpoint of a larger model (or hostile): "
                "check the architecture")
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as fh:
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as exc:  # safetensors raises several types for bad files
            raise corrupt_error(self.path, exc) from None
        meta = self.meta or {}
        stored = meta.get(DIGEST_KEY)
        if stored is None:
            if METADATA_KEY in meta:   # a neurofuse file from before the digest: say so once
                key = str(self.path.resolve())
                with _WARNED_LOCK:
                    first = key not in _WARNED
                    _WARNED.add(key)
                if first:
                    log.warning("%s has no sha256 in its metadata (saved by an older neurofuse): its "
                                "data is loaded unverified; re-save it to protect it", self.path)
        elif digest(meta.get(METADATA_KEY, ""), tensors) != stored:
            raise CheckpointError(
                f"{self.path}: checksum mismatch: its tensor data or metadata changed after it was "
                "saved (bit rot, a partial copy or tampering); re-save or re-download it"
            )
        return tensors


def load_torch(path: Path, max_bytes: Optional[int] = None) -> Any:
    """The object of a PyTorch zip file, after :func:`check_torch_zip`, with
    ``torch.load(..., weights_only=True)``; every failure a one-line :class:`CheckpointError`."""
    kind = file_format(path)
    if kind != "torch":
        raise format_error(path, kind)
    check_torch_zip(path, max_bytes)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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


def is_state_dict(obj: Any) -> bool:
    """Whether ``obj`` is a non-empty mapping of names to tensors."""
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor)
                                            for k, v in obj.items())


def read_torch(path: Path, max_bytes: Optional[int] = None) -> Dict[str, Tensor]:
    """The state dict of a PyTorch zip file (a ``{"state_dict": ...}`` wrapper is unwrapped)."""
    obj = load_torch(path, max_bytes)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not is_state_dict(obj):
        raise CheckpointError(
            f"{path} does not hold a state dict (a mapping of names to tensors); re-save it with "
            "torch.save(model.state_dict(), path)"
        )
    return dict(obj)
