"""ZipIt!'s greedy zip of correlated features, within and across models."""

from __future__ import annotations

import numpy as np
import pytest

from neurofuse.errors import ConfigError
from neurofuse.grouping import zip_features, zip_grouped_features, zip_matrices


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


def _grouped_copies(rng, groups=3, per=4, models=3, rows=600):
    """Model 0's features in ``groups`` groups; every other model holds the same features with its
    groups in another order and its channels shuffled inside each group (plus a little noise)."""
    x = rng.normal(size=(rows, groups * per))
    blocks, sigmas = [x], [np.arange(groups)]
    for _ in range(1, models):
        order = rng.permutation(groups)               # model group q holds model-0 group order[q]
        inner = [rng.permutation(per) for _ in range(groups)]
        blocks.append(np.concatenate([x[:, order[q] * per + inner[q]] for q in range(groups)], 1)
                      + 0.01 * rng.normal(size=(rows, groups * per)))
        sigma = np.empty(groups, dtype=int)
        sigma[order] = np.arange(groups)              # sigma[b]: the model group that holds group b
        sigmas.append(sigma)
    return np.cov(np.concatenate(blocks, 1).T), sigmas


@pytest.mark.parametrize("within", [True, False])
def test_a_grouped_space_is_zipped_group_to_group_and_no_merge_mixes_groups(within):
    rng = np.random.default_rng(3)
    cov, truth = _grouped_copies(rng)
    labels, sigmas = zip_grouped_features(cov, [12, 12, 12], 12, 3, within_model=within)
    assert [s.tolist() for s in sigmas] == [t.tolist() for t in truth]
    owner_group = np.tile(np.repeat(np.arange(3), 4), 3)              # each feature's group in its model
    model = np.repeat(np.arange(3), 12)
    for j in range(3):
        for q in range(3):   # model j's group q goes whole into fused group b with sigma_j[b] = q
            b = int(np.flatnonzero(sigmas[j] == q)[0])
            assert set((labels[(model == j) & (owner_group == q)] // 4).tolist()) == {b}
    assert np.bincount(labels).tolist() == [3] * 12                  # every copy of a feature together


def test_a_given_assignment_of_groups_is_kept_even_against_the_correlations():
    rng = np.random.default_rng(4)
    cov, truth = _grouped_copies(rng, models=2)
    forced = [None, truth[1][::-1].copy()]
    labels, sigmas = zip_grouped_features(cov, [12, 12], 12, 3, sigmas=forced)
    assert sigmas[1].tolist() == forced[1].tolist()
    for b in range(3):
        q = forced[1][b]
        assert set((labels[12 + 4 * q:12 + 4 * q + 4] // 4).tolist()) == {b}


def test_a_grouped_width_that_does_not_split_into_the_groups_is_refused_by_value():
    cov = np.eye(16)
    with pytest.raises(ConfigError, match="fused width 6 .* multiple of 4"):
        zip_grouped_features(cov, [8, 8], 6, 4)
