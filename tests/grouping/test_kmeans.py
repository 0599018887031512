"""Importance-weighted K-means reaches scikit-learn's weighted cost."""

import numpy as np
import pytest
import torch
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


def _single_moves(x, w, labels, k):
    """Cost of the clustering and of every clustering one point-move away (brute force)."""
    base = _cost(x, w, labels, k)
    counts = np.bincount(labels, minlength=k)
    moved = []
    for j in range(len(x)):
        if counts[labels[j]] == 1:
            continue
        for b in range(k):
            if b != labels[j]:
                lab = labels.copy()
                lab[j] = b
                moved.append(_cost(x, w, lab, k))
    return base, np.array(moved)


@pytest.mark.parametrize("seed", range(3))
def test_batched_refinement_stops_where_no_single_move_lowers_the_cost(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 3))
    w = rng.gamma(1.0, size=40) + 1e-3
    labels, _, cost = weighted_kmeans(x, w, 6, n_init=2, seed=seed)
    base, moved = _single_moves(x, w, labels, 6)
    assert cost == pytest.approx(base)
    assert moved.min() >= base * (1 - 1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_refinement_never_raises_the_cost_of_high_dimensional_points(seed):
    # unstructured points in many dimensions: Lloyd leaves large clusters that many batched
    # Hartigan moves (several per cluster and round) take apart
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 60))
    w = rng.gamma(1.0, size=300) + 1e-3
    plain = weighted_kmeans(x, w, 40, n_init=2, seed=seed, refine=False)[2]
    labels, _, refined = weighted_kmeans(x, w, 40, n_init=2, seed=seed, refine=True)
    assert refined <= plain
    assert refined == pytest.approx(_cost(x, w, labels, 40))
    assert set(labels) == set(range(40))


def test_torch_float32_points_on_the_cpu_give_float32_centres_and_a_float64_quality_cost():
    import torch

    rng = np.random.default_rng(0)
    x = rng.normal(scale=3.0, size=(8, 4))[rng.integers(8, size=200)] + rng.normal(size=(200, 4))
    w = rng.gamma(1.0, size=200) + 1e-3
    labels, c, cost = weighted_kmeans(torch.tensor(x, dtype=torch.float32), torch.tensor(w), 8, seed=1)
    assert labels.dtype == torch.long and labels.device.type == "cpu"
    assert c.dtype == torch.float32 and c.shape == (8, 4)
    assert len(set(labels.tolist())) == 8
    assert cost == pytest.approx(_cost(x, w, labels.numpy(), 8), rel=1e-4)
    assert cost <= weighted_kmeans(x, w, 8, seed=1)[2] * 1.01


def test_restarts_give_the_same_result_batched_or_one_at_a_time(monkeypatch):
    from neurofuse.grouping import _core

    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 10))
    w = rng.gamma(1.0, size=120) + 1e-3
    together = weighted_kmeans(x, w, 12, n_init=5, seed=2)
    monkeypatch.setattr(_core, "_CPU_BATCH", 1)
    alone = weighted_kmeans(x, w, 12, n_init=5, seed=2)
    assert np.array_equal(together[0], alone[0]) and together[2] == alone[2]


def test_without_the_gram_matrix_the_clustering_is_the_same(monkeypatch):
    from neurofuse.grouping import _core

    rng = np.random.default_rng(4)
    x = rng.normal(scale=4.0, size=(10, 6))[rng.integers(10, size=150)] + rng.normal(size=(150, 6))
    w = rng.gamma(1.0, size=150) + 1e-3
    gram = weighted_kmeans(x, w, 10, n_init=3, seed=0)
    monkeypatch.setattr(_core, "_GRAM_BYTES", 0)
    dense = weighted_kmeans(x, w, 10, n_init=3, seed=0)
    assert np.array_equal(gram[0], dense[0])
    assert dense[2] == pytest.approx(gram[2])


def test_the_blocked_gram_matrix_is_the_full_product_and_symmetric():
    from neurofuse.grouping._core import _symmetric_gram

    x = torch.randn(1500, 7, dtype=torch.float64)
    g = _symmetric_gram(x, blocks=5)
    assert torch.allclose(g, x @ x.T, rtol=1e-12, atol=1e-12)
    assert torch.equal(g, g.T)


def test_points_of_zero_weight_cluster_the_same_with_or_without_the_gram_matrix(monkeypatch):
    """Seeding reads distances from the weighted Gram matrix's rows only while every weight is
    positive; with a zero weight it computes them from the points, and nothing else changes."""
    from neurofuse.grouping import _core

    rng = np.random.default_rng(5)
    x = rng.normal(scale=4.0, size=(8, 5))[rng.integers(8, size=120)] + rng.normal(size=(120, 5))
    w = rng.gamma(1.0, size=120) + 1e-3
    w[::7] = 0.0
    gram = weighted_kmeans(x, w, 8, n_init=3, seed=1)
    monkeypatch.setattr(_core, "_GRAM_BYTES", 0)
    dense = weighted_kmeans(x, w, 8, n_init=3, seed=1)
    assert np.array_equal(gram[0], dense[0]) and set(gram[0]) == set(range(8))
    assert dense[2] == pytest.approx(gram[2])


def test_given_init_with_repeated_centres_leaves_no_cluster_empty():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2))
    init = np.repeat(x[:2], 2, axis=0)  # 4 centres, only 2 distinct
    for refine in (False, True):
        labels, _, _ = weighted_kmeans(x, np.ones(30), 4, init=init, refine=refine)
        assert set(labels) == set(range(4))


def test_a_tolerance_stops_lloyd_early_but_still_gives_a_full_clustering():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 5))
    labels, c, cost = weighted_kmeans(x, np.ones(100), 7, n_init=2, tol=0.5, refine=False)
    assert set(labels) == set(range(7)) and c.shape == (7, 5)
    assert cost == pytest.approx(_cost(x, np.ones(100), labels, 7))


def test_points_of_more_dimensions_than_clusters_times_points_are_clustered():
    # the scratch space is [R * k, M]: here a point has more coordinates than it holds
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 300))[rng.integers(3, size=12)] + 0.1 * rng.normal(size=(12, 300))
    for refine in (False, True):
        labels, c, cost = weighted_kmeans(x, np.ones(12), 2, n_init=3, refine=refine)
        assert set(labels) == {0, 1} and c.shape == (2, 300)
        assert cost == pytest.approx(_cost(x, np.ones(12), labels, 2))
