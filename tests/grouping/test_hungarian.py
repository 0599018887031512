"""Hungarian grouping is the optimal one-to-one matching (paper Theorem 2(a))."""

import itertools

import numpy as np
import pytest

from neurofuse.errors import IncompatibleModelsError
from neurofuse.grouping import grouping_error, hungarian_grouping


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [2, 3, 5])
def test_hungarian_equals_brute_force_over_all_matchings(seed, n):
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(2 * n, 4))
    s = rng.uniform(0.1, 2.0, size=2 * n)
    g = hungarian_grouping(pts, s, [n, n])
    got = grouping_error(pts.T, s, g.labels, n)
    best = np.inf
    for perm in itertools.permutations(range(n)):
        labels = np.concatenate([np.arange(n), np.array(perm)])
        best = min(best, grouping_error(pts.T, s, labels, n))
    assert got == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_hungarian_pairs_one_neuron_of_each_model():
    rng = np.random.default_rng(0)
    g = hungarian_grouping(rng.normal(size=(8, 3)), np.ones(8), [4, 4])
    assert sorted(g.labels[:4]) == [0, 1, 2, 3]
    assert sorted(g.labels[4:]) == [0, 1, 2, 3]


def test_hungarian_rejects_three_models_and_unequal_widths():
    with pytest.raises(IncompatibleModelsError, match="exactly two"):
        hungarian_grouping(np.zeros((6, 2)), np.ones(6), [2, 2, 2])
    with pytest.raises(IncompatibleModelsError, match="equal widths"):
        hungarian_grouping(np.zeros((5, 2)), np.ones(5), [2, 3])
