"""Partitions of a training set among models, train/val splits and class-balanced fusion sets."""

from __future__ import annotations

import numpy as np
import pytest

from neurofuse.data import (
    balanced_subset,
    class_shares,
    dirichlet_split,
    iid_split,
    partition,
    partition_summary,
    sharded_split,
    train_val_split,
)
from neurofuse.errors import ConfigError, DataError

KINDS = ["iid", "dirichlet", "sharded"]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """10 classes x 600 samples, shuffled."""
    return np.random.default_rng(123).permutation(np.repeat(np.arange(10), 600))


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# Coverage and determinism
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 7])
def test_partition_covers_every_index_exactly_once(
    labels: np.ndarray, kind: str, n: int, seed: int
) -> None:
    parts = partition(labels, n, kind, seed)
    assert len(parts) == n
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    everything = np.concatenate(parts)
    assert len(everything) == len(labels)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))


@pytest.mark.parametrize("kind", KINDS)
def test_partition_same_seed_same_split_different_seed_different_split(
    labels: np.ndarray, kind: str
) -> None:
    a, b = partition(labels, 4, kind, 1), partition(labels, 4, kind, 1)
    c = partition(labels, 4, kind, 2)
    assert _same(a, b)
    assert not _same(a, c)


def test_partition_functions_match_the_dispatcher(labels: np.ndarray) -> None:
    assert _same(partition(labels, 3, "iid", 5), iid_split(labels, 3, 5))
    assert _same(
        partition(labels, 3, "dirichlet", 5, ratio=0.5), dirichlet_split(labels, 3, 5, ratio=0.5)
    )
    assert _same(partition(labels, 3, "sharded", 5), sharded_split(labels, 3, 5))


def test_partition_does_not_touch_global_numpy_rng(labels: np.ndarray) -> None:
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    for kind in KINDS:
        partition(labels, 4, kind, 3)
    balanced_subset(labels, np.arange(len(labels)), 100, 3)
    train_val_split(np.arange(100), 0.2, 3)
    assert np.random.rand() == expected


# ------------------------------------------------------------------------------------------------
# Shape of each kind
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4, 8])
def test_iid_split_gives_equal_class_shares_and_sizes(labels: np.ndarray, n: int) -> None:
    counts = partition_summary(labels, iid_split(labels, n, 0), 10)
    assert np.all(counts.max(axis=0) - counts.min(axis=0) <= 1)
    sizes = counts.sum(axis=1)
    assert sizes.max() - sizes.min() <= 1


def test_iid_split_spreads_leftover_samples_so_part_sizes_differ_by_at_most_one() -> None:
    uneven = np.random.default_rng(0).permutation(np.repeat(np.arange(5), [7, 5, 3, 9, 6]))
    parts = iid_split(uneven, 4, 0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1, sizes
    counts = partition_summary(uneven, parts, 5)
    assert np.all(counts.max(axis=0) - counts.min(axis=0) <= 1)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_sharded_split_parts_have_disjoint_class_sets(labels: np.ndarray, n: int) -> None:
    parts = sharded_split(labels, n, 0)
    class_sets = [set(np.unique(labels[p]).tolist()) for p in parts]
    assert all(class_sets)
    for i in range(n):
        for j in range(i + 1, n):
            assert not class_sets[i] & class_sets[j]
    # each part holds *all* samples of its classes
    shares = class_shares(labels, parts, 10)
    assert set(np.unique(shares).tolist()) <= {0.0, 1.0}


def test_sharded_split_refuses_more_parts_than_classes(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="10 classes into 11 parts"):
        sharded_split(labels, 11, 0)


def test_dirichlet_split_is_skewed_compared_with_iid(labels: np.ndarray) -> None:
    n = 4
    d_shares = class_shares(labels, dirichlet_split(labels, n, 0), 10)
    i_shares = class_shares(labels, iid_split(labels, n, 0), 10)
    d_spread = (d_shares.max(axis=0) - d_shares.min(axis=0)).mean()
    i_spread = (i_shares.max(axis=0) - i_shares.min(axis=0)).mean()
    assert i_spread < 0.01
    assert d_spread > 0.2 and d_spread > 20 * i_spread
    sizes = [len(p) for p in dirichlet_split(labels, n, 0)]
    assert max(sizes) - min(sizes) > 100  # part sizes differ


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_dirichlet_split_rejects_ratio_outside_0_1(labels: np.ndarray, ratio: float) -> None:
    with pytest.raises(ConfigError, match="ratio"):
        dirichlet_split(labels, 4, 0, ratio=ratio)


def test_partition_rejects_unknown_kind_listing_known_ones(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError) as info:
        partition(labels, 2, "random", 0)
    assert all(kind in str(info.value) for kind in KINDS)


@pytest.mark.parametrize("n", [0, -1])
def test_partition_rejects_fewer_than_one_part(labels: np.ndarray, n: int) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        partition(labels, n, "iid", 0)


def test_partition_with_one_part_returns_everything(labels: np.ndarray) -> None:
    for kind in KINDS:
        (only,) = partition(labels, 1, kind, 0)
        np.testing.assert_array_equal(only, np.arange(len(labels)))


# ------------------------------------------------------------------------------------------------
# train_val_split
# ------------------------------------------------------------------------------------------------
def test_train_val_split_is_a_disjoint_cover_of_the_given_indices() -> None:
    indices = np.arange(10, 110, 3)
    train, val = train_val_split(indices, 0.25, seed=0)
    assert len(val) == int(len(indices) * 0.25)
    assert not set(train.tolist()) & set(val.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), indices)


def test_train_val_split_keeps_at_least_one_validation_sample() -> None:
    train, val = train_val_split(np.array([4, 8, 15]), 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2


def test_train_val_split_with_zero_fraction_has_empty_validation() -> None:
    train, val = train_val_split(np.arange(5), 0.0, seed=0)
    assert len(val) == 0 and train.tolist() == list(range(5))


@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_train_val_split_rejects_fraction_outside_0_1(fraction: float) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        train_val_split(np.arange(5), fraction, seed=0)


def test_train_val_split_depends_on_seed() -> None:
    a = train_val_split(np.arange(100), 0.3, seed=0)[1]
    assert np.array_equal(a, train_val_split(np.arange(100), 0.3, seed=0)[1])
    assert not np.array_equal(a, train_val_split(np.arange(100), 0.3, seed=1)[1])


# ------------------------------------------------------------------------------------------------
# balanced_subset
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [400, 403, 10, 7])
def test_balanced_subset_is_balanced_and_a_subset_of_the_given_indices(
    labels: np.ndarray, size: int
) -> None:
    indices = np.flatnonzero(np.arange(len(labels)) % 3 == 1)  # values != positions
    subset = balanced_subset(labels, indices, size, seed=0)
    assert len(subset) == size and len(np.unique(subset)) == size
    assert set(subset.tolist()) <= set(indices.tolist())
    counts = np.bincount(labels[subset], minlength=10)
    assert counts.max() - counts.min() <= 1


def test_balanced_subset_fills_from_classes_that_still_have_samples() -> None:
    labels = np.array([0] * 50 + [1] * 3 + [2] * 50)
    subset = balanced_subset(labels, np.arange(len(labels)), 30, seed=0)
    counts = np.bincount(labels[subset], minlength=3)
    assert len(subset) == 30 and counts[1] == 3
    assert abs(int(counts[0]) - int(counts[2])) <= 1


def test_balanced_subset_only_uses_classes_present_in_the_indices(labels: np.ndarray) -> None:
    indices = np.flatnonzero(labels < 3)
    subset = balanced_subset(labels, indices, 90, seed=1)
    assert np.bincount(labels[subset], minlength=10).tolist() == [30, 30, 30] + [0] * 7


def test_balanced_subset_raises_when_too_few_samples(labels: np.ndarray) -> None:
    with pytest.raises(DataError, match="cannot draw 11 samples from only 10"):
        balanced_subset(labels, np.arange(10), 11, seed=0)


@pytest.mark.parametrize("size", [0, -5])
def test_balanced_subset_rejects_empty_fusion_set(labels: np.ndarray, size: int) -> None:
    with pytest.raises(DataError, match="empty fusion set"):
        balanced_subset(labels, np.arange(100), size, seed=0)


def test_balanced_subset_depends_on_seed(labels: np.ndarray) -> None:
    a = balanced_subset(labels, np.arange(len(labels)), 50, seed=0)
    assert np.array_equal(a, balanced_subset(labels, np.arange(len(labels)), 50, seed=0))
    assert not np.array_equal(a, balanced_subset(labels, np.arange(len(labels)), 50, seed=1))


# ------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_class_shares_columns_sum_to_one(labels: np.ndarray, kind: str) -> None:
    shares = class_shares(labels, partition(labels, 4, kind, 0), 10)
    assert shares.shape == (4, 10)
    np.testing.assert_allclose(shares.sum(axis=0), np.ones(10))


def test_class_shares_are_zero_for_classes_absent_everywhere() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    shares = class_shares(labels, [np.array([0, 2]), np.array([1, 3, 4])], num_classes=3)
    np.testing.assert_allclose(shares, [[0.5, 1 / 3, 0.0], [0.5, 2 / 3, 0.0]])


def test_partition_summary_counts_each_class_per_part() -> None:
    labels = np.array([2, 0, 2, 1, 2])
    counts = partition_summary(labels, [np.array([0, 1]), np.array([2, 3, 4])], num_classes=3)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[1, 0, 1], [0, 1, 2]]


def test_partition_summary_rejects_labels_beyond_num_classes() -> None:
    with pytest.raises(DataError, match="num_classes"):
        partition_summary(np.array([0, 5]), [np.array([0, 1])], num_classes=3)
