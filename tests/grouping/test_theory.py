"""Theorem 1: representation cost = grouping error + approximation error."""

import numpy as np
import pytest

from neurofuse.grouping import approximation_error, grouping_error, representation_cost


@pytest.mark.parametrize("seed", range(10))
def test_representation_cost_decomposes_into_grouping_plus_approximation(seed):
    rng = np.random.default_rng(seed)
    samples, m, k = 30, 12, 4
    a = rng.normal(size=(samples, m))                 # base neuron outputs (columns)
    f = rng.normal(size=(samples, k))                 # any fused outputs
    s = rng.uniform(0.01, 3.0, size=m)                # importance scores
    labels = np.concatenate([np.arange(k), rng.integers(k, size=m - k)])
    total = representation_cost(f, a, s, labels)
    parts = grouping_error(a, s, labels, k) + approximation_error(f, a, s, labels, k)
    assert total == pytest.approx(parts, rel=1e-10)


def test_decomposition_would_fail_with_unweighted_centres():
    """The cross term vanishes only for the importance-weighted mean: a guard that the test can fail."""
    rng = np.random.default_rng(0)
    a, f = rng.normal(size=(20, 6)), rng.normal(size=(20, 2))
    s = np.array([5.0, 0.1, 1.0, 3.0, 0.2, 2.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    t_plain = np.stack([a[:, labels == c].mean(1) for c in range(2)], 1)
    plain_group = float((s * ((a - t_plain[:, labels]) ** 2).sum(0)).sum())
    big_s = np.bincount(labels, weights=s)
    plain_approx = float((big_s * ((t_plain - f) ** 2).sum(0)).sum())
    assert representation_cost(f, a, s, labels) != pytest.approx(plain_group + plain_approx, rel=1e-6)
