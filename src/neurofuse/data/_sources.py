"""Datasets by name: where their files are, how they are read and normalised.

``load_dataset(name, data_dir)`` returns a :class:`Dataset` of normalised ``float32`` image tensors
``[N, C, H, W]`` and ``int64`` labels. The registry is a plain dict; :func:`list_datasets` lists it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ._readers import MNIST_FILES, MNIST_SUBDIRS, find_files, read_cifar_batch, read_idx

__all__ = ["Dataset", "load_dataset", "list_datasets", "resolve_data_dir"]

logger = logging.getLogger(__name__)

#: Environment variable naming the data directory.
DATA_ENV = "NEUROFUSE_DATA"

_REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True, eq=False)
class Dataset:
    """An image-classification dataset held in memory, already normalised.

    Parameters
    ----------
    name : str
        Registry name (``"mnist"``, ``"cifar10"``, ...).
    x_train, x_test : torch.Tensor
        ``float32`` images ``[N, C, H, W]``, normalised with the dataset's fixed mean/std.
    y_train, y_test : torch.Tensor
        ``int64`` labels ``[N]`` in ``[0, num_classes)``.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        ``(C, H, W)`` of one image.

    Notes
    -----
    Equality is identity (``eq=False``): comparing tensors element-wise has no single truth value.
    """

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    input_shape: Tuple[int, ...]

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


# --------------------------------------------------------------------------------------------
# Data directory
# --------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Decide which directory datasets are read from.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        An explicit directory; it always wins.

    Returns
    -------
    pathlib.Path
        In order of preference: ``data_dir``; the ``NEUROFUSE_DATA`` environment variable; the
        first existing of ``<cwd>/../shared/data`` and ``<repo root>/../shared/data`` (a
        development fallback). If none applies, ``<cwd>/../shared/data`` is returned even though
        it does not exist, and the reader reports the missing files. The path is made absolute
        but is not checked.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser().absolute()
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        return Path(env).expanduser().absolute()
    fallbacks = [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]
    for cand in fallbacks:
        if cand.is_dir():
            return cand.resolve()
    return fallbacks[0].absolute()


def _dirs(root: Path, subdirs: Sequence[str]) -> List[Path]:
    return [root / s if s else root for s in subdirs]


# --------------------------------------------------------------------------------------------
# Conversion helpers
# --------------------------------------------------------------------------------------------
def _normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 in [0, 1], then ``(x - mean) / std`` per channel."""
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _labels(labels: np.ndarray, num_classes: int, source: str) -> torch.Tensor:
    arr = np.asarray(labels, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(
            f"{source} has labels outside 0..{num_classes - 1} "
            f"(found {int(arr.min())}..{int(arr.max())}); "
            "check that the files belong to this dataset"
        )
    return torch.from_numpy(arr.copy())


def _check_pair(images: np.ndarray, labels: np.ndarray, image_file: Path, label_file: Path) -> None:
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{image_file} has {images.shape[0]} images but {label_file} has {labels.shape[0]} "
            "labels; use files from the same release"
        )
    if images.shape[0] == 0:
        raise DataError(f"{image_file} holds no images; download it again")


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------
def _load_digits(_: Path) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(((x_tr - mean) / std).astype(np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(((x_te - mean) / std).astype(np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        num_classes=10,
        input_shape=(1, 8, 8),
    )


def _idx_loader(
    name: str,
    label: str,
    subdirs: Sequence[str],
    mean: float,
    std: float,
) -> Callable[[Path], Dataset]:
    def load(root: Path) -> Dataset:
        files = find_files(label, MNIST_FILES, _dirs(root, subdirs))
        arrays = {k: read_idx(v) for k, v in files.items()}
        parts = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            img_key, lab_key = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
            images, labels = arrays[img_key], arrays[lab_key]
            if images.ndim != 3 or images.shape[1:] != (28, 28):
                raise DataError(
                    f"{files[img_key]} holds images of shape {images.shape[1:]}, "
                    "expected (28, 28); "
                    f"check that it is a {label} image file"
                )
            if labels.ndim != 1:
                raise DataError(f"{files[lab_key]} is not an idx label file; check the file names")
            _check_pair(images, labels, files[img_key], files[lab_key])
            parts[split] = (
                _normalise(images[:, None], (mean,), (std,)),
                _labels(labels, 10, str(files[lab_key])),
            )
        logger.info("loaded %s from %s", name, files[MNIST_FILES[0]].parent)
        return Dataset(
            name=name,
            x_train=parts["train"][0],
            y_train=parts["train"][1],
            x_test=parts["test"][0],
            y_test=parts["test"][1],
            num_classes=10,
            input_shape=(1, 28, 28),
        )

    return load


def _cifar_loader(
    name: str,
    label: str,
    folder: str,
    alias: str,
    train_files: Sequence[str],
    test_file: str,
    num_classes: int,
    mean: Tuple[float, float, float],
    std: Tuple[float, float, float],
) -> Callable[[Path], Dataset]:
    def load(root: Path) -> Dataset:
        dirs = [root / folder, root / alias / folder, root / alias]
        files = find_files(label, [*train_files, test_file], dirs, compressed_ok=False)

        def read(names: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
            batches = [read_cifar_batch(files[n]) for n in names]
            images = np.concatenate([b[0] for b in batches])
            labels = np.concatenate([b[1] for b in batches])
            if images.shape[0] == 0:
                raise DataError(f"{files[names[0]]} holds no images; download it again")
            source = ", ".join(str(files[n]) for n in names)
            return _normalise(images, mean, std), _labels(labels, num_classes, source)

        x_tr, y_tr = read(train_files)
        x_te, y_te = read([test_file])
        logger.info("loaded %s from %s", name, files[test_file].parent)
        return Dataset(
            name=name,
            x_train=x_tr,
            y_train=y_tr,
            x_test=x_te,
            y_test=y_te,
            num_classes=num_classes,
            input_shape=(3, 32, 32),
        )

    return load


_DATASETS: Dict[str, Callable[[Path], Dataset]] = {
    "digits": _load_digits,
    "mnist": _idx_loader("mnist", "MNIST", MNIST_SUBDIRS, 0.1307, 0.3081),
    "fashion-mnist": _idx_loader(
        "fashion-mnist", "Fashion-MNIST", ("fashion-mnist", "fashion_mnist"), 0.2860, 0.3530
    ),
    "cifar10": _cifar_loader(
        "cifar10",
        "CIFAR-10",
        "cifar-10-batches-py",
        "cifar10",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _cifar_loader(
        "cifar100",
        "CIFAR-100",
        "cifar-100-python",
        "cifar100",
        ["train"],
        "test",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}

#: Datasets that need no files.
_BUILTIN = frozenset({"digits"})


def list_datasets() -> List[str]:
    """Names accepted by :func:`load_dataset`.

    Returns
    -------
    list of str
        The registered dataset names, in registration order.
    """
    return list(_DATASETS)


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load a dataset by name, normalised and ready to use.

    Parameters
    ----------
    name : str
        One of :func:`list_datasets`: ``digits`` (scikit-learn's 8x8 digits; a fixed stratified
        80/20 split with seed 0, standardised with the training mean/std), ``mnist``,
        ``fashion-mnist`` (idx files), ``cifar10``, ``cifar100`` (python-version pickles; fine
        labels for CIFAR-100). Case and ``_`` vs ``-`` do not matter.
    data_dir : str or os.PathLike, optional
        Where the files are; see :func:`resolve_data_dir`. MNIST is looked for in
        ``<data_dir>/mnist`` then ``<data_dir>``; Fashion-MNIST in ``<data_dir>/fashion-mnist``
        or ``<data_dir>/fashion_mnist``; CIFAR in ``<data_dir>/cifar-10-batches-py`` /
        ``cifar-100-python``, or below ``<data_dir>/cifar10`` / ``cifar100``.

    Returns
    -------
    Dataset
        ``float32`` images ``[N, C, H, W]`` normalised per channel with the dataset's standard
        statistics (MNIST 0.1307/0.3081, Fashion-MNIST 0.2860/0.3530, CIFAR-10 and CIFAR-100
        their own per-channel means and stds) and ``int64`` labels.

    Raises
    ------
    ConfigError
        If ``name`` is unknown.
    DataError
        If a file is missing (the message names the files and every directory looked in),
        truncated, corrupt or inconsistent.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in _DATASETS:
        raise ConfigError(
            f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}"
        )
    root = resolve_data_dir(data_dir) if key not in _BUILTIN else Path(".")
    return _DATASETS[key](root)
