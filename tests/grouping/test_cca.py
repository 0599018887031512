"""The CCA map of CCA Merge."""

from __future__ import annotations

import numpy as np
import pytest

from neurofuse.errors import ConfigError
from neurofuse.grouping import cca_alignment


def test_a_permuted_copy_gives_the_permutation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 7)) @ rng.normal(size=(7, 7))
    perm = rng.permutation(7)
    t, t_inv = cca_alignment(np.cov(np.concatenate([a, a[:, perm]], 1).T), 7)
    expected = np.zeros((7, 7))
    expected[perm, np.arange(7)] = 1.0           # a = a[:, perm] @ expected^T
    assert np.allclose(t, expected, atol=1e-6) and np.allclose(t @ t_inv, np.eye(7), atol=1e-9)


def test_an_invertible_linear_copy_is_mapped_back():
    """B's features are a mixture of A's: T writes them back in A's basis."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(1000, 5))
    mix = rng.normal(size=(5, 5)) + 3 * np.eye(5)
    b = a @ mix.T
    t, _ = cca_alignment(np.cov(np.concatenate([a, b], 1).T), 5, reg=1e-9)
    assert np.allclose(b @ t.T, a, atol=1e-4)


def test_refuses_unequal_widths_and_a_non_positive_reg():
    cov = np.eye(5)
    with pytest.raises(ConfigError, match="equal widths"):
        cca_alignment(cov, 2)
    with pytest.raises(ConfigError, match="reg"):
        cca_alignment(np.eye(4), 2, reg=0.0)


def test_grouped_cca_keeps_groups_whole_and_finds_a_group_permuted_copy():
    """Features in 3 groups of 4; B is A with its groups reordered and the features inside each
    permuted: the map is that permutation, block structured, and a given assignment is kept."""
    from neurofuse.grouping import block_assignment, grouped_cca_alignment

    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))
    order = np.array([2, 0, 1])
    perm = np.concatenate([order[g] * 4 + rng.permutation(4) for g in range(3)])   # B's feature j = A's perm[j]
    b = a[:, perm]
    cov = np.cov(np.concatenate([a, b], 1), rowvar=False)
    t, t_inv, sigma = grouped_cca_alignment(cov, 12, 3, reg=1e-8)
    assert np.allclose(t @ b.T, a.T, atol=1e-5)                       # B's features written in A's basis
    assert np.allclose(t @ t_inv, np.eye(12), atol=1e-6)
    assert np.array_equal(block_assignment(t.T, 3), sigma)             # one block per group
    fixed = np.array([0, 1, 2])
    t2, _, s2 = grouped_cca_alignment(cov, 12, 3, reg=1e-8, sigma=fixed)
    assert np.array_equal(s2, fixed) and np.array_equal(block_assignment(t2.T, 3), fixed)
