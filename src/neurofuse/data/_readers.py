"""Readers for the original on-disk dataset formats: idx (MNIST, Fashion-MNIST) and CIFAR pickles.

Every reader checks what it reads and raises :class:`~neurofuse.errors.DataError` with a one-line
message naming the file when the file is missing, truncated, corrupt or of the wrong kind.

CIFAR batches are Python pickles. They are never loaded with a plain :func:`pickle.load`: a
restricted unpickler only lets through what rebuilding a NumPy array needs, so a malicious file
cannot run code.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import logging
import os
import pickle
import pickletools
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import numpy as np

from ..errors import DataError

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

__all__ = [
    "read_idx",
    "read_cifar_batch",
    "md5_of_content",
    "verify_mnist",
    "find_files",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_SUBDIRS",
]

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IDX_NDIM = {_IDX_IMAGES_MAGIC: 3, _IDX_LABELS_MAGIC: 1}

#: The four MNIST-format idx files (Fashion-MNIST uses the same names), without ``.gz``.
MNIST_FILES: Tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: md5 of the decompressed content of the original MNIST files.
MNIST_MD5: Dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

#: Sub-directories of the data directory searched for MNIST, in order ("" is the directory itself).
MNIST_SUBDIRS: Tuple[str, ...] = ("mnist", "")

_HINT = "pass --data-dir DIR or set NEUROFUSE_DATA to the folder that holds them"


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------
def _candidates(name: str, compressed_ok: bool) -> Tuple[str, ...]:
    return (name, name + ".gz") if compressed_ok else (name,)


def find_files(
    what: str,
    names: Sequence[str],
    dirs: Sequence[Path],
    compressed_ok: bool = True,
) -> Dict[str, Path]:
    """Find all ``names`` in the first directory of ``dirs`` that holds every one of them.

    Parameters
    ----------
    what : str
        What the files are ("MNIST", "CIFAR-10"), used in the error message.
    names : sequence of str
        Expected file names, without a ``.gz`` suffix.
    dirs : sequence of pathlib.Path
        Directories to look in, in order of preference.
    compressed_ok : bool, default True
        Also accept ``<name>.gz`` (the uncompressed file wins if both exist).

    Returns
    -------
    dict of str to pathlib.Path
        Each expected name mapped to the file found for it.

    Raises
    ------
    DataError
        If no directory holds all the files. The one-line message names the expected files,
        every directory looked in, and how to point neurofuse at the data.
    """
    unique_dirs: list[Path] = []
    for d in dirs:
        if d not in unique_dirs:
            unique_dirs.append(d)
    best_missing: list[str] = list(names)
    for d in unique_dirs:
        if not d.is_dir():
            continue
        found: Dict[str, Path] = {}
        missing: list[str] = []
        for name in names:
            hit = next(
                (d / c for c in _candidates(name, compressed_ok) if (d / c).is_file()), None
            )
            if hit is None:
                missing.append(name)
            else:
                found[name] = hit
        if not missing:
            return found
        if len(missing) < len(best_missing):
            best_missing = missing
    suffix = "[.gz]" if compressed_ok else ""
    expected = ", ".join(f"{n}{suffix}" for n in names)
    partial = ""
    if len(best_missing) < len(names):
        lacking = ", ".join(f"{n}{suffix}" for n in best_missing)
        partial = f" (the closest folder lacks {lacking})"
    looked = ", ".join(str(d) for d in unique_dirs) or "(no directory)"
    raise DataError(
        f"cannot find the {what} files {expected}{partial}; looked in: {looked}; {_HINT}"
    )


# --------------------------------------------------------------------------------------------
# Raw bytes
# --------------------------------------------------------------------------------------------
def md5_of_content(path: str | os.PathLike[str]) -> str:
    """md5 hex digest of a file's content, decompressed first when the file is gzip.

    Parameters
    ----------
    path : str or os.PathLike
        The file. gzip files (recognised by their magic bytes) are hashed after decompression,
        so ``x.gz`` and ``x`` give the same digest when their contents agree.

    Returns
    -------
    str
        32 lowercase hex digits.

    Raises
    ------
    DataError
        If the file is missing, unreadable or a corrupt gzip file.
    """
    p = Path(path)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with p.open("rb") as fh:
            head = fh.read(2)
        stream: io.BufferedIOBase
        if head == _GZIP_MAGIC:
            stream = gzip.open(p, "rb")  # type: ignore[assignment]
        else:
            if p.suffix == ".gz":
                raise DataError(f"{p} ends in .gz but is not gzip-compressed; download it again")
            stream = p.open("rb")
        with stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise DataError(f"file not found: {p}; {_HINT}") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(
            f"{p} is a corrupt or truncated gzip file ({exc}); download it again"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror or exc}; check its permissions") from None
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# idx
# --------------------------------------------------------------------------------------------
#: most data bytes an idx file may declare (EMNIST, the largest idx data set, is about 0.6 GB)
MAX_IDX_BYTES = 1 << 30
#: most a gzip idx file may expand (MNIST's files expand about 5 times; deflate can reach 1032)
MAX_GZIP_RATIO = 64
#: data a gzip idx file may always hold, whatever its ratio (small synthetic files compress well)
GZIP_FREE_BYTES = 64 << 20
#: largest CIFAR batch file read (the CIFAR-100 training file, the largest, is about 155 MB)
MAX_CIFAR_BYTES = 1 << 30
_CHUNK = 1 << 20


def _read_upto(stream: Any, n: int) -> bytes:
    """Read at most ``n`` bytes, in chunks: nothing is allocated beyond what the stream holds."""
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzip-compressed or not.

    The header is read first; then the data bytes it declares are read or decompressed, in
    chunks, straight into the one array returned (plus one byte, to detect extra data), so the
    reader never holds more than the header states; a header may state at most
    :data:`MAX_IDX_BYTES`, and a gzip file at most :data:`MAX_GZIP_RATIO` times its own size
    (or :data:`GZIP_FREE_BYTES`): a small file cannot make the reader allocate gigabytes.

    Parameters
    ----------
    path : str or os.PathLike
        An idx image file (magic 2051: big-endian count, rows, cols, then uint8 pixels) or an idx
        label file (magic 2049: big-endian count, then uint8 labels).

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``[n, rows, cols]`` for images or ``[n]`` for labels (writable,
        not a view of the file).

    Raises
    ------
    DataError
        If the file is missing, has a wrong magic number, declares more than
        :data:`MAX_IDX_BYTES`, or its payload is shorter or longer than its header says
        (truncated or corrupt).
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            gz = fh.read(2) == _GZIP_MAGIC
            fh.seek(0)
            if not gz and p.suffix == ".gz":
                raise DataError(f"{p} ends in .gz but is not gzip-compressed; download it again")
            size = os.fstat(fh.fileno()).st_size
            stream: Any = gzip.GzipFile(fileobj=fh, mode="rb") if gz else fh
            try:
                return _parse_idx(p, stream, None if gz else size,
                                  max(GZIP_FREE_BYTES, MAX_GZIP_RATIO * size) if gz else None)
            except (OSError, EOFError, zlib.error) as exc:
                if not gz:
                    raise
                raise DataError(
                    f"{p} is a corrupt or truncated gzip file ({exc}); download it again"
                ) from None
    except FileNotFoundError:
        raise DataError(f"file not found: {p}; {_HINT}") from None
    except IsADirectoryError:
        raise DataError(f"{p} is a directory, not an idx file; {_HINT}") from None
    except OSError as exc:
        raise DataError(
            f"cannot read {p}: {exc.strerror or exc}; check its permissions"
        ) from None


def _parse_idx(p: Path, stream: Any, size: Any, inflated_cap: Any = None) -> np.ndarray:
    """The idx array from ``stream``; ``size`` is the file's size when it is not compressed,
    ``inflated_cap`` the most data a compressed file may expand to."""
    head = _read_upto(stream, 4)
    if len(head) < 4:
        raise DataError(
            f"{p} is truncated ({len(head)} bytes, no idx header); download it again"
        )
    (magic,) = struct.unpack(">I", head)
    if magic not in _IDX_NDIM:
        raise DataError(
            f"{p} is not an idx image or label file (magic {magic}, expected "
            f"{_IDX_IMAGES_MAGIC} or {_IDX_LABELS_MAGIC}); check the file name and download it "
            "again"
        )
    ndim = _IDX_NDIM[magic]
    header = 4 + 4 * ndim
    rest = _read_upto(stream, 4 * ndim)
    if len(rest) < 4 * ndim:
        raise DataError(f"{p} is truncated (header cut short); download it again")
    dims = struct.unpack(f">{ndim}I", rest)
    expected = 1
    for d in dims:
        expected *= int(d)
    if expected > MAX_IDX_BYTES:
        raise DataError(
            f"{p}: its header {tuple(dims)} declares {expected} data bytes, more than the "
            f"{MAX_IDX_BYTES} an idx file may hold here; the file is corrupt, download it again"
        )
    if inflated_cap is not None and expected > inflated_cap:
        raise DataError(
            f"{p}: its header {tuple(dims)} declares {expected} data bytes, more than "
            f"{MAX_GZIP_RATIO} times the compressed file's size (MNIST files expand about 5 times); "
            "the file is corrupt or hostile: download it again"
        )
    if size is not None and size - header != expected:
        payload = size - header
        kind = "truncated" if payload < expected else "corrupt"
        raise DataError(
            f"{p} is {kind}: its header {tuple(dims)} needs {expected} data bytes but it has "
            f"{payload}; download it again"
        )
    arr = np.empty(expected, dtype=np.uint8)   # the only buffer: filled in place, chunk by chunk
    view = memoryview(arr)
    payload = 0
    while payload < expected:
        n = stream.readinto(view[payload:payload + _CHUNK])
        if not n:
            break
        payload += n
    if payload == expected and stream.read(1):
        payload += 1
    if payload != expected:
        kind = "truncated" if payload < expected else "corrupt"
        shown = str(payload) if payload <= expected else "more"
        raise DataError(
            f"{p} is {kind}: its header {tuple(dims)} needs {expected} data bytes but it has "
            f"{shown}; download it again"
        )
    return arr.reshape(dims)


# --------------------------------------------------------------------------------------------
# CIFAR pickles
# --------------------------------------------------------------------------------------------
_ALLOWED_GLOBALS: Mapping[Tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals a pickled NumPy array needs."""

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self._source}: not a CIFAR batch"
            ) from None


def _get_key(batch: Mapping[Any, Any], key: str) -> Any:
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def read_cifar_batch(
    path: str | os.PathLike[str], label_key: str | None = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 / CIFAR-100 batch in the "python version" pickle format, safely.

    The file is unpickled with a restricted unpickler (``encoding="bytes"``) that only allows the
    globals NumPy array reconstruction needs; anything else is refused before it can run.

    Parameters
    ----------
    path : str or os.PathLike
        A batch file such as ``cifar-10-batches-py/data_batch_1`` or ``cifar-100-python/train``:
        a pickled dict with ``data`` (uint8 ``[n, 3072]``, channel-major R, G, B planes of 32x32)
        and labels. Keys may be ``bytes`` or ``str``.
    label_key : str, optional
        Which labels to return. Default: ``fine_labels`` if present (CIFAR-100), else ``labels``.

    Returns
    -------
    data : numpy.ndarray
        ``uint8`` array of shape ``[n, 3, 32, 32]``.
    labels : numpy.ndarray
        ``int64`` array of shape ``[n]``.

    Raises
    ------
    DataError
        If the file is missing, truncated or corrupt, tries to unpickle anything but NumPy
        arrays, or does not hold a CIFAR batch of consistent shape.
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_CIFAR_BYTES:
                raise DataError(f"{p} is {size} bytes, more than the {MAX_CIFAR_BYTES} of a CIFAR "
                                "batch; not a CIFAR batch, check the file")
            blob = fh.read()
        # the unpickler allocates what a length field asks for before it reads: walk the opcodes
        # first (nothing runs), so that a length beyond the end of the file is refused
        for _ in pickletools.genops(io.BytesIO(blob)):
            pass
        batch = _CifarUnpickler(io.BytesIO(blob), p).load()  # type: ignore[arg-type]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"file not found: {p}; {_HINT}") from None
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror or exc}; check its permissions") from None
    except Exception as exc:  # any unpickling failure means a corrupt or truncated file
        raise DataError(
            f"{p} is not a readable CIFAR batch ({type(exc).__name__}: {exc}); download it again"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{p} does not hold a dict: not a CIFAR batch; check the file")
    data = _get_key(batch, "data")
    if label_key is None:
        label_key = "fine_labels" if _get_key(batch, "fine_labels") is not None else "labels"
    labels = _get_key(batch, label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(
            f"{p} lacks 'data' (a NumPy array) or '{label_key}': not a CIFAR batch; check the file"
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{p}: 'data' is {data.dtype} {tuple(data.shape)}, expected uint8 [n, 3072]; "
            "not a CIFAR batch"
        )
    try:
        label_arr = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(
            f"{p}: '{label_key}' is not a list of integers; not a CIFAR batch"
        ) from None
    if label_arr.shape != (data.shape[0],):
        raise DataError(
            f"{p}: {data.shape[0]} images but '{label_key}' has shape {tuple(label_arr.shape)}; "
            "the file is corrupt, download it again"
        )
    return data.reshape(-1, 3, 32, 32).copy(), label_arr


# --------------------------------------------------------------------------------------------
# MNIST checksums
# --------------------------------------------------------------------------------------------
def verify_mnist(data_dir: str | os.PathLike[str]) -> Dict[str, bool]:
    """Check the four MNIST files against the md5 of the original (decompressed) files.

    Parameters
    ----------
    data_dir : str or os.PathLike
        The data directory; the files are looked for in ``<data_dir>/mnist`` and then in
        ``<data_dir>`` itself, compressed (``.gz``) or not.

    Returns
    -------
    dict of str to bool
        Maps each file name (without ``.gz``, e.g. ``"train-images-idx3-ubyte"``) to whether its
        decompressed content has the known md5.

    Raises
    ------
    DataError
        If a file is missing or unreadable.
    """
    root = Path(data_dir)
    files = find_files("MNIST", MNIST_FILES, [root / s if s else root for s in MNIST_SUBDIRS])
    result: Dict[str, bool] = {}
    for name in MNIST_FILES:
        ok = md5_of_content(files[name]) == MNIST_MD5[name]
        if not ok:
            logger.warning("MNIST file %s does not have the expected md5", files[name])
        result[name] = ok
    return result
