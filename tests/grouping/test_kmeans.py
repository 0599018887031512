"""Importance-weighted K-means reaches scikit-learn's weighted cost."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

from neurofuse.errors import IncompatibleModelsError
from neurofuse.grouping import centroids, weighted_kmeans


def _cost(x, w, labels, k):
    c = centroids(x, w, labels, k)
    return float((w * ((x - c[labels]) ** 2).sum(1)).sum())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m,d,k", [(60, 5, 4), (200, 16, 10), (96, 40, 32)])
def test_weighted_kmeans_cost_within_one_percent_of_sklearn(seed, m, d, k):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, d))
    x = centres[rng.integers(k, size=m)] + rng.normal(size=(m, d))
    w = rng.gamma(1.0, size=m) + 1e-3
    labels, _, cost = weighted_kmeans(x, w, k, n_init=10, seed=seed)
    ref = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x, sample_weight=w)
    ref_cost = _cost(x, w, ref.labels_, k)
    assert cost == pytest.approx(_cost(x, w, labels, k))
    assert cost <= ref_cost * 1.01


def test_weighted_kmeans_has_no_empty_cluster_even_with_duplicates():
    x = np.repeat(np.eye(3), [10, 1, 1], axis=0)  # 12 points, only 3 distinct
    labels, _, _ = weighted_kmeans(x, np.ones(12), 5, n_init=3, seed=0)
    assert set(labels) == set(range(5))


def test_weights_pull_the_centre_towards_important_points():
    x = np.array([[0.0], [1.0]])
    _, c, _ = weighted_kmeans(x, np.array([3.0, 1.0]), 1, n_init=1)
    assert c[0, 0] == pytest.approx(0.25)


def test_weighted_kmeans_is_deterministic_given_the_seed():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    a = weighted_kmeans(x, np.ones(50), 6, seed=3)[0]
    b = weighted_kmeans(x, np.ones(50), 6, seed=3)[0]
    assert np.array_equal(a, b)


def test_more_clusters_than_points_is_a_clear_error():
    with pytest.raises(IncompatibleModelsError, match="cannot make 5 fused neurons out of 3"):
        weighted_kmeans(np.zeros((3, 2)), np.ones(3), 5)


@pytest.mark.parametrize("init", [True, False])
def test_torch_points_stay_tensors_and_init_from_given_neurons_recovers_the_clusters(init):
    import torch

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 5, generator=gen) * 10
    pts = torch.cat([centres + 0.01 * torch.randn(3, 5, generator=gen) for _ in range(4)])
    labels, c, cost = weighted_kmeans(pts, torch.ones(12), 3, init=pts[3:6] if init else None,
                                      n_init=3, seed=0)
    assert isinstance(labels, torch.Tensor) and isinstance(c, torch.Tensor)
    assert all(len(set(labels[i::3].tolist())) == 1 for i in range(3))
    assert len(set(labels.tolist())) == 3 and cost < 1.0


def test_hartigan_moves_never_increase_the_cost():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(150, 6))
    w = rng.gamma(1.0, size=150) + 1e-3
    plain = weighted_kmeans(x, w, 12, n_init=1, seed=1, refine=False)[2]
    refined = weighted_kmeans(x, w, 12, n_init=1, seed=1, refine=True)[2]
    assert refined <= plain + 1e-9
