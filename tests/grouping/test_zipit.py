"""ZipIt!'s greedy zip of correlated features, within and across models."""

from __future__ import annotations

import numpy as np
import pytest

from neurofuse.errors import ConfigError
from neurofuse.grouping import zip_features, zip_matrices


def _greedy_pairs(cov, owners, within):
    """The paper's rule by brute force: match the most correlated unmatched pair, repeat."""
    sd = np.sqrt(np.diag(cov))
    corr = cov / np.outer(sd, sd)
    m = len(cov)
    pairs = sorted(((corr[i, j], i, j) for i in range(m) for j in range(i + 1, m)
                    if within or owners[i] != owners[j]), reverse=True)
    free = set(range(m))
    labels = -np.ones(m, dtype=int)
    for _, i, j in pairs:
        if i in free and j in free:
            labels[i] = labels[j] = i
            free -= {i, j}
    return labels


def _same_partition(a, b):
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


@pytest.mark.parametrize("within", [True, False])
def test_two_models_at_their_width_is_the_greedy_pairing(within):
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
        cov = np.cov(x.T)
        owners = np.repeat([0, 1], 8)
        labels = zip_features(cov, owners, 8, within_model=within)
        assert np.bincount(labels).tolist() == [2] * 8
        assert _same_partition(labels, _greedy_pairs(cov, owners, within))


def test_a_permuted_copy_is_paired_neuron_by_neuron():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 10))
    perm = rng.permutation(10)
    cov = np.cov(np.concatenate([x, x[:, perm]], 1).T)
    labels = zip_features(cov, np.repeat([0, 1], 10), 10)
    assert all(labels[perm[j]] == labels[10 + j] for j in range(10))


def test_redundant_features_of_one_model_merge_with_each_other():
    """Model A holds a feature twice, model B one A lacks: the zip merges A's twins (a
    permutation would have to pair one of them with B's unrelated feature)."""
    rng = np.random.default_rng(2)
    shared = rng.normal(size=(400, 3))
    twin, own = rng.normal(size=(400, 1)), rng.normal(size=(400, 1))
    a = np.concatenate([shared, twin, twin + 0.01 * rng.normal(size=(400, 1))], 1)
    b = np.concatenate([shared + 0.1 * rng.normal(size=(400, 3)), own, twin + 0.5 * rng.normal(size=(400, 1))], 1)
    labels = zip_features(np.cov(np.concatenate([a, b], 1).T), np.repeat([0, 1], 5), 5)
    assert labels[3] == labels[4]                       # A's twins zipped together
    assert len({labels[8], labels[3]}) == 2             # B's own feature is not forced onto them
    across = zip_features(np.cov(np.concatenate([a, b], 1).T), np.repeat([0, 1], 5), 5, within_model=False)
    assert across[3] != across[4]                       # across models only: the twins stay apart


def test_any_width_and_more_models():
    rng = np.random.default_rng(3)
    cov = np.cov(rng.normal(size=(200, 12)).T)
    owners = np.repeat([0, 1, 2], 4)
    for k in (1, 3, 4, 7, 12):
        labels = zip_features(cov, owners, k)
        assert sorted(set(labels)) == list(range(k))
    merge, unmerge = zip_matrices(zip_features(cov, owners, 4), 4)
    assert np.allclose(merge @ unmerge, np.eye(4)) and np.allclose(merge.sum(1), 1.0)
    with pytest.raises(ConfigError, match="into 13"):
        zip_features(cov, owners, 13)
