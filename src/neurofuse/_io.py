"""Atomic, durable file writes: the one way neurofuse writes an output file.

Every writer here follows the same protocol, so that a file that exists is complete and survives
a crash or power loss once the call returns:

1. write the content to a *uniquely named* temporary file in the target's directory
   (``.<name>.<random>.tmp``: hidden, and never matched by a ``*.json`` / ``*.png`` glob), so two
   writers of the same path never share a temporary file;
2. flush it and :func:`os.fsync` it (the data is on disk before it gets the final name);
3. give it the permission bits a plain ``open(path, "w")`` would: those of the file it replaces,
   else ``0o666`` minus the process umask (a temporary file from :func:`tempfile.mkstemp` is
   ``0o600``, which would make checkpoints unreadable to the group);
4. :func:`os.replace` it over the target (atomic on POSIX and Windows);
5. :func:`os.fsync` the directory, so the rename itself is durable (POSIX; skipped where a
   directory cannot be opened, e.g. Windows).

On any error the temporary file is removed and the target is left as it was.  These helpers do
not decide *whether* a path may be written (existing files, inputs): callers check that first.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

__all__ = [
    "atomic_write",
    "default_file_mode",
    "write_bytes",
    "write_figure",
    "write_json",
    "write_safetensors",
    "write_text",
]

PathLike = Union[str, "os.PathLike[str]"]

_UMASK_LOCK = threading.Lock()


def default_file_mode() -> int:
    """Permission bits of a new plain file: ``0o666`` without the bits of the process umask."""
    with _UMASK_LOCK:  # os.umask can only be read by setting it; restore it at once
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # Windows, or a file system that refuses: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_parents(directory: Path) -> None:
    """Create ``directory`` and its missing parents, making each new entry durable."""
    missing = []
    d = directory
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    if not missing:
        return
    directory.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):
        _fsync_dir(d.parent)


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically and durably with ``write(tmp)``, which creates the file ``tmp``.

    Parameters
    ----------
    path : str or path-like
        The target file; missing parent directories are created (and made durable).
    write : callable
        ``write(tmp)`` writes the whole content to the path ``tmp`` (an existing empty file in
        the target's directory), e.g. ``lambda tmp: safetensors.torch.save_file(t, tmp)``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    out = Path(path)
    _make_parents(out.parent)
    try:
        mode = out.stat().st_mode & 0o7777 if out.is_file() else default_file_mode()
    except OSError:
        mode = default_file_mode()
    hidden = out.name if out.name.startswith(".") else f".{out.name}"
    fd, name = tempfile.mkstemp(prefix=f"{hidden}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(out.parent)
    return out


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()

    return atomic_write(path, write)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and durably, encoded with ``encoding``."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: PathLike, obj: Any, *, default: Optional[Callable[[Any], Any]] = None,
               indent: Optional[int] = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically and durably.

    The text is built before the file is touched, so an object that cannot be serialised raises
    :class:`TypeError` / :class:`ValueError` and leaves ``path`` alone.
    """
    text = json.dumps(obj, indent=indent, default=default, sort_keys=sort_keys) + "\n"
    return write_text(path, text)


def write_safetensors(path: PathLike, tensors: Mapping[str, Any],
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write torch ``tensors`` (and string ``metadata``) as a ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    meta = dict(metadata) if metadata is not None else None

    def write(tmp: Path) -> None:
        save_file(dict(tensors), str(tmp), metadata=meta)
        _sort_safetensors_metadata(tmp)

    return atomic_write(path, write)


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header of a ``.safetensors`` file with its metadata keys sorted, in place.

    safetensors serialises the metadata map in hash order, which changes from process to
    process, so the same tensors and metadata would give different bytes (and file hashes) on
    every save.  Reordering keeps the header's length (padded with spaces, as safetensors pads),
    so the tensor data does not move."""
    import json

    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        raw = fh.read(n)
        head = json.loads(raw)
        meta = head.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        head["__metadata__"] = dict(sorted(meta.items()))
        ordered = {"__metadata__": head.pop("__metadata__"), **head}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > n:   # cannot happen for a reordering; keep the file as written
            return
        fh.seek(8)
        fh.write(text + b" " * (n - len(text)))


def write_figure(fig: Any, path: PathLike, *, dpi: int = 120, close: bool = True) -> Path:
    """Save a matplotlib figure to ``path`` atomically (format from the suffix, default PNG).

    The temporary file has a unique name, so two figures written to one directory at once never
    collide; the figure is closed afterwards unless ``close`` is false.
    """
    out = Path(path)
    fmt = out.suffix.lstrip(".").lower() or "png"
    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    finally:
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
