"""Grouping neurons that a GroupNorm keeps in groups: whole groups go together."""

import numpy as np
import torch

from neurofuse.grouping import grouped_grouping, hungarian_grouping, kmeans_grouping


def _twin_points(groups: int = 2, per: int = 4, dims: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(groups * per, dims, generator=g)
    order = torch.cat([torch.randperm(per, generator=g) + b * per for b in reversed(range(groups))])  # groups swapped
    return torch.cat([a, a[order]]), order


def test_a_copy_with_groups_swapped_and_permuted_inside_is_matched_back_one_to_one():
    points, order = _twin_points()
    w = np.ones(16)
    g = grouped_grouping(lambda f, ww, ws, k: hungarian_grouping(f, ww, ws), points, w, [8, 8], 8, 2)
    assert np.array_equal(g.labels[8:], g.labels[:8][order.numpy()])   # each neuron with its copy
    assert set(g.labels[:4]) == set(range(4)) and set(g.labels[4:8]) == set(range(4, 8))


def test_kmeans_inside_groups_never_mixes_two_groups_of_a_model():
    g0 = torch.Generator().manual_seed(3)
    points = torch.randn(8 + 12, 6, generator=g0)           # models of widths 8 and 12, 2 groups
    g = grouped_grouping(lambda f, w, ws, k: kmeans_grouping(f, w, k, seed=0), points, np.ones(20), [8, 12], 6, 2)
    assert g.k == 6 and set(g.labels) <= set(range(6))
    for lo, hi, per in ((0, 8, 4), (8, 20, 6)):
        for b in range(2):
            fused = set(g.labels[lo + b * per:lo + (b + 1) * per] // 3)
            assert len(fused) == 1                            # one model group -> one fused group


def test_a_fixed_assignment_of_heads_is_kept_and_read_back_from_the_plan():
    """``head_structured_plans(..., sigma)`` solves inside the given pairs of groups only, and
    ``block_assignment`` reads that assignment back from the plan (a grouped convolution's output
    keeps its input's assignment of groups)."""
    from neurofuse.grouping import block_assignment, head_structured_plans, lap_inner

    cost = np.random.default_rng(0).random((12, 9))       # 3 groups: 4 rows, 3 columns each
    sigma = np.array([2, 0, 1])
    plans, got = head_structured_plans([cost], 3, lap_inner, sigma)
    assert np.array_equal(got, sigma) and np.array_equal(block_assignment(plans[0], 3), sigma)
    free, best = head_structured_plans([cost], 3, lap_inner)
    assert np.array_equal(block_assignment(free[0], 3), best)
    assert (free[0] * cost).sum() <= (plans[0] * cost).sum() + 1e-12   # the free assignment is the cheapest


def test_a_plan_that_splits_a_group_has_no_assignment_of_groups():
    import pytest

    from neurofuse.grouping import block_assignment

    plan = np.eye(4) / 4
    assert np.array_equal(block_assignment(plan, 2), [0, 1])
    with pytest.raises(ValueError, match="as units"):
        block_assignment(plan[[0, 2, 1, 3]], 2)                      # rows of two groups in one
