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

On any error the temporary file is removed and the target is left as it was.

A *folder* output (a Hugging Face ``save_pretrained`` folder, the models of ``neurofuse train``) is
written the same way by :func:`write_folder`: into a uniquely named sibling temporary folder,
every file and the folder fsynced, then swapped with the target in one step (``renameat2`` with
``RENAME_EXCHANGE`` where the kernel has it, else the old folder is first renamed aside), and
the old folder removed only after the new one is in place.  A crash at any point leaves the old
output (under its name, or under the hidden name it was moved to) or the new one, never neither.
The folder gets a manifest, :data:`MANIFEST` (the files it holds), so that a later ``--force``
replaces it only while it holds nothing else: a folder neurofuse did not write, or one a user
put files into since, is never removed.

:func:`check_outputs` is the one check every command runs on its outputs before any work: an
output file is never an input, and an output folder never is, contains or lies inside an input
(nor the data directory, nor the working directory).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ConfigError, OutputExistsError

__all__ = [
    "MANIFEST",
    "atomic_write",
    "check_folder_replaceable",
    "check_outputs",
    "default_file_mode",
    "inside",
    "same_file",
    "write_bytes",
    "write_figure",
    "write_folder",
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
    _fsync_path(directory)


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory; a no-op where it cannot be opened (Windows directories) or
    the file system refuses."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
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


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------
#: the manifest :func:`write_folder` leaves in every folder it writes (the files it holds)
MANIFEST = ".neurofuse-output.json"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _files_of(folder: Path) -> List[str]:
    """The files under ``folder`` (relative, POSIX form, sorted), the manifest left out."""
    out = []
    for p in folder.rglob("*"):
        if p.is_file() or p.is_symlink():
            rel = p.relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries ``a`` and ``b`` in one step (Linux ``renameat2``); False where
    the platform or the file system cannot."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0


def _empty_dir(path: Path) -> bool:
    """Whether ``path`` is a real (not symlinked) directory with nothing in it."""
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def check_folder_replaceable(path: PathLike) -> None:
    """Raise :class:`~neurofuse.errors.OutputExistsError` unless the existing folder ``path`` may be
    replaced whole: it is empty, or a folder :func:`write_folder` wrote that holds nothing but the
    files its manifest lists."""
    out = Path(path)
    if out.is_symlink():
        raise OutputExistsError(f"output folder {out} is a symbolic link; give the folder itself or "
                                "a new path")
    if not out.is_dir():
        raise OutputExistsError(f"output folder {out} is a file; choose another path")
    files = _files_of(out)
    if not files and not (out / MANIFEST).exists():
        if any(out.iterdir()):   # empty sub-folders only
            raise OutputExistsError(f"output folder {out} holds folders neurofuse did not write; "
                                    "remove them or choose another path")
        return
    try:
        listed = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]
        if not isinstance(listed, list):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise OutputExistsError(
            f"output folder {out} exists and was not written by neurofuse (it has no readable "
            f"{MANIFEST}); --force replaces only neurofuse's own output folders: remove it yourself "
            "or choose another path") from None
    extra = [f for f in files if f not in set(map(str, listed))]
    if extra:
        shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
        raise OutputExistsError(
            f"output folder {out} holds files neurofuse did not write there ({shown}); --force "
            "replaces the whole folder: move them away or choose another path")


def write_folder(path: PathLike, write: Callable[[Path], None], *, force: bool = False) -> Path:
    """Write the folder ``path`` atomically with ``write(tmp)``, which fills the empty folder ``tmp``.

    ``tmp`` is a sibling of ``path``; when ``write`` returns, a manifest of its files is added,
    everything is fsynced and ``tmp`` takes the place of ``path`` (see the module docstring).  An
    existing ``path`` is replaced only if it is empty, or with ``force`` and only if
    :func:`check_folder_replaceable` allows it.  On any error ``tmp`` is removed and ``path`` is
    left as it was.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    out = Path(path)
    exists = out.exists() or out.is_symlink()
    if exists:
        if not force and not _empty_dir(out):
            raise OutputExistsError(f"{out} exists; pass --force to overwrite")
        check_folder_replaceable(out)
    _make_parents(out.parent)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name.lstrip('.')}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~mask)   # mkdtemp makes it private; the output is an ordinary folder
        write(tmp)
        files = _files_of(tmp)
        write_json(tmp / MANIFEST, {"written_by": "neurofuse", "files": files})
        for rel in files:
            _fsync_path(tmp / rel)
        for d in sorted({(tmp / rel).parent for rel in files}, key=lambda p: -len(p.parts)):
            _fsync_path(d)
        if exists:
            check_folder_replaceable(out)   # nothing was put into it meanwhile
            if _exchange(tmp, out):
                old = tmp
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{out.name.lstrip('.')}.", suffix=".old",
                                            dir=out.parent))
                os.rmdir(old)
                os.rename(out, old)
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(old, out)   # put the old output back
                    raise
            _fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
            _fsync_dir(out.parent)
    except BaseException:
        if tmp.exists() and tmp.resolve() != out.resolve():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# the output check
# ---------------------------------------------------------------------------------------------
def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file: equal after resolving symlinks, or one inode."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop
        pass
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies under it (after resolving symlinks)."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def _writable_parent(path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        if anc.is_symlink():  # a dangling symlink as a parent
            raise OutputExistsError(f"cannot create {path}: {anc} is a broken symlink")
        anc = anc.parent
    if not anc.is_dir():
        raise OutputExistsError(f"cannot create {path}: {anc} is a file, not a directory; "
                                "choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot write {path}: directory {anc} is not writable; choose "
                                "another path or fix its permissions")


def _check_folder(out: Path, force: bool, ins: Sequence[Path], data_root: Optional[Path]) -> None:
    """The rules of an output folder that is replaced whole (kind ``"folder"``)."""
    for i in ins:
        if same_file(out, i):
            raise OutputExistsError(f"output folder {out} is one of the inputs ({i}); inputs are "
                                    "never overwritten: choose another output path")
        if inside(i, out) and (i.exists() or i.is_symlink()):
            raise OutputExistsError(f"output folder {out} contains the input {i}; inputs are never "
                                    "overwritten: choose an output folder outside the inputs")
        if inside(out, i):
            raise OutputExistsError(f"output folder {out} lies inside the input {i}; choose an "
                                    "output folder outside the inputs")
    if data_root is not None and (inside(out, data_root) or inside(data_root, out)):
        raise OutputExistsError(f"output folder {out} is, holds or lies inside the data directory "
                                f"{data_root}; choose another path")
    if inside(Path.cwd(), out):
        raise OutputExistsError(f"output folder {out} is or holds the working directory, which "
                                "would be replaced whole; give a new folder such as runs/fused")
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            check_folder_replaceable(out)   # says why a link or a file cannot be replaced
        if not force and not _empty_dir(out):
            raise OutputExistsError(f"{out} exists; pass --force to overwrite")
        check_folder_replaceable(out)
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise OutputExistsError(f"cannot replace {out}: its directory {out.parent} is not writable")
    else:
        _writable_parent(out)


def check_outputs(outputs: Sequence[Tuple[Any, str]], force: bool, inputs: Sequence[Any] = (),
                  data_root: Optional[Path] = None) -> None:
    """Check every output of a command before any work, the same way for every command.

    Parameters
    ----------
    outputs : sequence of (path, kind)
        ``kind`` is the required suffix of an output file (``".safetensors"``, ``".json"``,
        ``".png"``, ``".md"``), ``"dir"`` for a directory that files are written into, or
        ``"folder"`` for a folder that is written (and replaced) whole by :func:`write_folder`.
    force : bool
        Whether existing outputs may be replaced (``--force``).
    inputs : sequence of path
        Every file and folder the command reads: no output may be one of them, ``--force`` or
        not (compared after resolving symlinks, and by inode for hard links); an output folder
        may neither contain one nor lie inside one.
    data_root : pathlib.Path, optional
        The resolved data directory, when the command reads a dataset: its files are inputs too.

    Raises
    ------
    OutputExistsError, ConfigError
        Naming the output and what to do.
    """
    ins = [Path(i) for i in inputs]
    seen: List[Path] = []
    for raw, kind in outputs:
        out = Path(raw)
        if str(raw) == "" or (out.name in ("", ".", "..") and kind != "folder"):
            raise ConfigError(f"output path {str(raw)!r} names no file; give a file name")
        for other in seen:
            if same_file(out, other):
                raise ConfigError(f"two outputs are the same file {out}; give each its own path")
        seen.append(out)
        if kind == "folder":
            _check_folder(out, force, ins, data_root)
            continue
        for i in ins:
            if same_file(out, i):
                raise OutputExistsError(f"output {out} is one of the inputs ({i}); inputs are never "
                                        "overwritten: choose another output path")
        if kind == "dir":
            if out.exists() and not out.is_dir():
                raise OutputExistsError(f"output directory {out} is a file; choose a directory")
            if not out.exists():
                _writable_parent(out / "x")
            elif not os.access(out, os.W_OK | os.X_OK):
                raise OutputExistsError(f"cannot write into {out}: the directory is not writable")
            continue
        if out.is_dir():
            raise OutputExistsError(f"output {out} is a directory; give a file path instead")
        if out.suffix != kind:
            raise ConfigError(f"output {out} must end in {kind}; rename it")
        if out.exists() or out.is_symlink():
            if data_root is not None and inside(out, data_root):
                raise OutputExistsError(f"output {out} is a file of the data directory "
                                        f"{data_root}; choose another path")
            if not force:
                raise OutputExistsError(f"{out} exists; pass --force to overwrite")
        _writable_parent(out)
