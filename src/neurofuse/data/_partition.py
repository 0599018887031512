"""Splitting a training set among several models, and drawing class-balanced fusion sets.

Every function takes an explicit ``seed`` and draws from its own ``np.random.default_rng(seed)``;
no global random state is used or changed. Partitions are lists of ``int64`` index arrays into
the given label array, each **sorted ascending**; together they cover every index exactly once.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, DataError

__all__ = [
    "iid_split",
    "dirichlet_split",
    "sharded_split",
    "partition",
    "train_val_split",
    "balanced_subset",
    "class_shares",
    "partition_summary",
    "PARTITION_KINDS",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _as_labels(labels: object) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(
            f"labels must be a 1-D array, got shape {tuple(arr.shape)}; pass one label per sample"
        )
    if arr.size == 0:
        raise DataError("labels are empty: there is nothing to split; check the dataset")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {arr.dtype}; pass class indices")
    if arr.min() < 0:
        raise DataError(f"labels must be >= 0, found {int(arr.min())}; pass class indices")
    return arr.astype(np.int64, copy=False)


def _check_n(n: int, num_samples: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ConfigError(f"the number of parts must be an integer, got {n!r}")
    if n < 1:
        raise ConfigError(f"the number of parts must be at least 1, got {n}")
    if n > num_samples:
        raise ConfigError(
            f"cannot split {num_samples} samples into {n} parts; use at most {num_samples} parts"
        )
    return int(n)


def _warn_empty(parts: List[np.ndarray], kind: str) -> None:
    empty = [i for i, p in enumerate(parts) if p.size == 0]
    if empty:
        logger.warning("%s split left part(s) %s empty; use fewer parts or more data", kind, empty)


def _by_class(labels: np.ndarray) -> Dict[int, np.ndarray]:
    """Indices of each class present, in ascending class order."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    return {int(c): g.astype(np.int64) for c, g in zip(classes, groups)}


# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------
def iid_split(labels: np.ndarray | Sequence[int], n: int, seed: int) -> List[np.ndarray]:
    """Split indices into ``n`` parts with (as nearly as possible) equal shares of every class.

    Parameters
    ----------
    labels : array_like of int
        One class label per sample.
    n : int
        Number of parts, ``1 <= n <= len(labels)``.
    seed : int
        Seed of the random generator.

    Returns
    -------
    list of numpy.ndarray
        ``n`` sorted ``int64`` index arrays that together cover every index once. Per class the
        part sizes differ by at most one, and the leftover samples of successive classes go to
        different parts, so part sizes also differ by at most one.
    """
    y = _as_labels(labels)
    n = _check_n(n, len(y))
    rng = np.random.default_rng(seed)
    buckets: List[List[np.ndarray]] = [[] for _ in range(n)]
    offset = 0
    for idx in _by_class(y).values():
        pieces = np.array_split(rng.permutation(idx), n)
        for j, piece in enumerate(pieces):
            buckets[(j + offset) % n].append(piece)
        offset = (offset + len(idx) % n) % n
    parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
    _warn_empty(parts, "iid")
    return parts


def dirichlet_split(
    labels: np.ndarray | Sequence[int], n: int, seed: int, ratio: float = 0.2
) -> List[np.ndarray]:
    """Non-IID split: each class is divided among the parts by a Dirichlet draw.

    As in the paper's appendix D: ``alphas = linspace(1, 1/ratio, n)``; for each class, its
    indices are shuffled, the alphas are shuffled, ``p ~ Dirichlet(alphas)``, part ``i`` gets
    ``floor(p[i] * n_c)`` of them and the last part also gets the remainder.

    Parameters
    ----------
    labels : array_like of int
        One class label per sample.
    n : int
        Number of parts, ``1 <= n <= len(labels)``.
    seed : int
        Seed of the random generator.
    ratio : float, default 0.2
        Smallest-to-largest concentration ratio, ``0 < ratio <= 1``; smaller is more skewed,
        1 gives a flat Dirichlet(1, ..., 1).

    Returns
    -------
    list of numpy.ndarray
        ``n`` sorted ``int64`` index arrays covering every index once. Parts may differ in size
        and a part can be empty on small data (a warning is logged).

    Raises
    ------
    ConfigError
        If ``ratio`` is outside ``(0, 1]`` or ``n`` is out of range.
    """
    if not (isinstance(ratio, (int, float, np.floating)) and 0.0 < float(ratio) <= 1.0):
        raise ConfigError(
            f"dirichlet ratio must be in (0, 1], got {ratio!r}; 0.2 is the paper's value"
        )
    y = _as_labels(labels)
    n = _check_n(n, len(y))
    rng = np.random.default_rng(seed)
    alphas = np.linspace(1.0, 1.0 / float(ratio), n)
    buckets: List[List[np.ndarray]] = [[] for _ in range(n)]
    for idx in _by_class(y).values():
        idx = rng.permutation(idx)
        p = rng.dirichlet(rng.permutation(alphas))
        counts = np.floor(p * len(idx)).astype(np.int64)
        counts[-1] += len(idx) - counts.sum()
        for i, piece in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            buckets[i].append(piece)
    parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
    _warn_empty(parts, "dirichlet")
    return parts


def sharded_split(labels: np.ndarray | Sequence[int], n: int, seed: int) -> List[np.ndarray]:
    """Split by class: each part gets all samples of its own, disjoint set of classes.

    The class list is shuffled and cut into ``n`` groups with ``np.array_split``.

    Parameters
    ----------
    labels : array_like of int
        One class label per sample.
    n : int
        Number of parts, at most the number of classes present.
    seed : int
        Seed of the random generator.

    Returns
    -------
    list of numpy.ndarray
        ``n`` sorted ``int64`` index arrays covering every index once, with disjoint class sets.

    Raises
    ------
    ConfigError
        If ``n`` exceeds the number of classes present.
    """
    y = _as_labels(labels)
    n = _check_n(n, len(y))
    classes = np.unique(y)
    if n > len(classes):
        raise ConfigError(
            f"cannot shard {len(classes)} classes into {n} parts; use at most {len(classes)} parts "
            "or the 'dirichlet' partition"
        )
    rng = np.random.default_rng(seed)
    groups = np.array_split(rng.permutation(classes), n)
    return [np.flatnonzero(np.isin(y, g)).astype(np.int64) for g in groups]


def _iid(labels: np.ndarray, n: int, seed: int, ratio: float) -> List[np.ndarray]:
    return iid_split(labels, n, seed)


def _sharded(labels: np.ndarray, n: int, seed: int, ratio: float) -> List[np.ndarray]:
    return sharded_split(labels, n, seed)


_PARTITIONS: Dict[str, Callable[[np.ndarray, int, int, float], List[np.ndarray]]] = {
    "iid": _iid,
    "dirichlet": dirichlet_split,
    "sharded": _sharded,
}

#: The partition kinds accepted by :func:`partition`.
PARTITION_KINDS: Tuple[str, ...] = tuple(_PARTITIONS)


def partition(
    labels: np.ndarray | Sequence[int], n: int, kind: str, seed: int, ratio: float = 0.2
) -> List[np.ndarray]:
    """Split sample indices into ``n`` parts of the given kind.

    Parameters
    ----------
    labels : array_like of int
        One class label per sample.
    n : int
        Number of parts (>= 1).
    kind : {"iid", "dirichlet", "sharded"}
        See :func:`iid_split`, :func:`dirichlet_split`, :func:`sharded_split`.
    seed : int
        Seed of the random generator.
    ratio : float, default 0.2
        Only used by ``"dirichlet"``.

    Returns
    -------
    list of numpy.ndarray
        ``n`` sorted ``int64`` index arrays covering every index exactly once.

    Raises
    ------
    ConfigError
        If ``kind`` is unknown or ``n`` (or ``ratio``) is out of range.
    """
    if kind not in _PARTITIONS:
        raise ConfigError(f"unknown partition {kind!r}; choose one of: {', '.join(_PARTITIONS)}")
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n < 1:
        raise ConfigError(f"the number of parts must be at least 1, got {n}")
    return _PARTITIONS[kind](np.asarray(labels), n, seed, ratio)


# --------------------------------------------------------------------------------------------
# Train/validation and fusion sets
# --------------------------------------------------------------------------------------------
def train_val_split(
    indices: np.ndarray | Sequence[int], val_fraction: float, seed: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Randomly hold out a fraction of ``indices`` for validation (not stratified).

    Parameters
    ----------
    indices : array_like of int
        The indices to divide.
    val_fraction : float
        ``0 <= val_fraction < 1``. The validation part has ``floor(len * val_fraction)`` elements,
        but at least one when ``val_fraction > 0`` and there are at least two indices.
    seed : int
        Seed of the random generator.

    Returns
    -------
    train_idx, val_idx : numpy.ndarray
        Disjoint sorted ``int64`` arrays whose union is ``indices``.

    Raises
    ------
    ConfigError
        If ``val_fraction`` is outside ``[0, 1)``.
    """
    is_number = isinstance(val_fraction, (int, float, np.floating))
    if not (is_number and 0.0 <= float(val_fraction) < 1.0):
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n_val = int(np.floor(len(idx) * float(val_fraction)))
    if val_fraction > 0 and len(idx) >= 2:
        n_val = max(1, n_val)
    perm = np.random.default_rng(seed).permutation(idx)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def balanced_subset(
    labels: np.ndarray | Sequence[int],
    indices: np.ndarray | Sequence[int],
    size: int,
    seed: int,
) -> np.ndarray:
    """Draw a class-balanced subset of ``indices`` (e.g. a fusion set).

    Each class present among ``labels[indices]`` first gets ``floor(size / n_classes)`` samples
    (or all it has); the rest is filled one sample at a time, round-robin over the classes in a
    random order, from classes that still have samples.

    Parameters
    ----------
    labels : array_like of int
        Labels of the whole dataset.
    indices : array_like of int
        Candidate indices into ``labels``.
    size : int
        Number of samples to draw, ``1 <= size <= len(indices)``.
    seed : int
        Seed of the random generator.

    Returns
    -------
    numpy.ndarray
        ``size`` sorted ``int64`` values taken from ``indices`` (indices into ``labels``, not
        positions within ``indices``). When every class has enough samples the per-class counts
        differ by at most one.

    Raises
    ------
    DataError
        If ``size < 1``, ``indices`` is empty or out of range, or fewer than ``size`` samples exist.
    """
    if size < 1:
        raise DataError(
            f"empty fusion set: size must be at least 1, got {size}; ask for more samples"
        )
    y = _as_labels(labels)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise DataError("no samples to draw the fusion set from (empty indices); check the split")
    if idx.min() < 0 or idx.max() >= len(y):
        raise DataError(
            f"indices must lie in 0..{len(y) - 1}, found {int(idx.min())}..{int(idx.max())}; "
            "pass indices into the same label array"
        )
    if size > len(idx):
        raise DataError(
            f"cannot draw {size} samples from only {len(idx)}; ask for at most {len(idx)} "
            "or use more data"
        )
    rng = np.random.default_rng(seed)
    # positions within idx, grouped by class and shuffled
    pools = [rng.permutation(g) for g in _by_class(y[idx]).values()]
    per_class = size // len(pools)
    taken = [min(per_class, len(p)) for p in pools]
    remaining = size - sum(taken)
    order = rng.permutation(len(pools))
    while remaining > 0:  # terminates: len(idx) >= size guarantees a class with samples left
        progressed = False
        for c in order:
            if taken[c] < len(pools[c]):
                taken[c] += 1
                remaining -= 1
                progressed = True
                if remaining == 0:
                    break
        if not progressed:  # pragma: no cover - impossible given the size check above
            raise DataError(f"cannot draw {size} samples from only {sum(taken)}; use more data")
    positions = np.concatenate([p[:t] for p, t in zip(pools, taken)])
    return np.sort(idx[positions])


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------
def partition_summary(
    labels: np.ndarray | Sequence[int],
    parts: Sequence[np.ndarray | Sequence[int]],
    num_classes: int,
) -> np.ndarray:
    """Count the samples of each class in each part.

    Parameters
    ----------
    labels : array_like of int
        Labels of the whole dataset.
    parts : sequence of array_like of int
        Index arrays into ``labels``.
    num_classes : int
        Number of classes (columns).

    Returns
    -------
    numpy.ndarray
        ``int64`` matrix ``[len(parts), num_classes]``.

    Raises
    ------
    DataError
        If a label is ``>= num_classes`` or an index is out of range.
    """
    y = _as_labels(labels)
    if y.max() >= num_classes:
        raise DataError(
            f"labels go up to {int(y.max())} but num_classes is {num_classes}; "
            "pass the right num_classes"
        )
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, part in enumerate(parts):
        p = np.asarray(part, dtype=np.int64).reshape(-1)
        if p.size and (p.min() < 0 or p.max() >= len(y)):
            raise DataError(
                f"part {i} has indices outside 0..{len(y) - 1}; pass indices into labels"
            )
        counts[i] = np.bincount(y[p], minlength=num_classes)
    return counts


def class_shares(
    labels: np.ndarray | Sequence[int],
    parts: Sequence[np.ndarray | Sequence[int]],
    num_classes: int,
) -> np.ndarray:
    """Share of each class held by each part.

    Parameters
    ----------
    labels : array_like of int
        Labels of the whole dataset.
    parts : sequence of array_like of int
        Index arrays into ``labels``.
    num_classes : int
        Number of classes (columns).

    Returns
    -------
    numpy.ndarray
        ``float64`` matrix ``[len(parts), num_classes]``: ``p[i, c]`` is the count of class ``c``
        in part ``i`` over the count of class ``c`` in all parts (0 where the class is absent
        from every part), so each column of a present class sums to 1.
    """
    counts = partition_summary(labels, parts, num_classes).astype(np.float64)
    totals = counts.sum(axis=0)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def dirichlet_alpha_split(labels: np.ndarray, n: int, alpha: float, seed: int,
                          min_size: int = 10, max_tries: int = 1000) -> List[np.ndarray]:
    """Split sample indices among ``n`` clients with class shares drawn from ``Dirichlet(alpha)``.

    For every class, ``p ~ Dirichlet(alpha * 1_n)`` and the class's shuffled indices are cut at
    ``cumsum(p)``; the draw is repeated (up to ``max_tries``) until every client has at least
    ``min_size`` samples, as in the FL benchmarks' reference code.

    Returns
    -------
    list of numpy.ndarray
        ``n`` sorted ``int64`` index arrays covering every index once.
    """
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        raise ConfigError(f"alpha must be a positive number, got {alpha!r}")
    y = _as_labels(labels)
    n = _check_n(n, len(y))
    min_size = min(min_size, len(y) // n)
    rng = np.random.default_rng(seed)
    groups = _by_class(y)
    for _ in range(max_tries):
        buckets: List[List[np.ndarray]] = [[] for _ in range(n)]
        for idx in groups.values():
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(n, float(alpha)))
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for i, piece in enumerate(np.split(idx, cuts)):
                buckets[i].append(piece)
        parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ConfigError(f"no Dirichlet({alpha}) split gives all {n} clients {min_size} samples; "
                      "use a larger alpha or fewer clients")
