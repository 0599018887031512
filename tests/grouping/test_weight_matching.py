"""Weight matching (Git Re-Basin section 3.2) as a pure function on tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurofuse.errors import ConfigError
from neurofuse.grouping import MatchedTensor, weight_matching


def _chain(widths, gen):
    return [torch.randn(o, i, generator=gen) for i, o in zip(widths[:-1], widths[1:])]


def _tensors(wa, wb):
    """An MLP ``widths[0] -> ... -> widths[-1]``: hidden spaces are groups 0..L-2."""
    last = len(wa) - 1
    return [MatchedTensor(a[:, :, None], b[:, :, None], None if i == last else i, None if i == 0 else i - 1)
            for i, (a, b) in enumerate(zip(wa, wb))]


def _permuted(ws, perms):
    out = []
    for i, w in enumerate(ws):
        if i < len(perms):
            w = w[perms[i]]
        if i > 0:
            w = w[:, perms[i - 1]]
        out.append(w)
    return out


def test_finds_the_permutations_of_a_permuted_copy():
    gen = torch.Generator().manual_seed(0)
    widths = [7, 12, 9, 5]
    wa = _chain(widths, gen)
    perms = [torch.randperm(n, generator=gen) for n in widths[1:-1]]
    wb = _permuted(wa, perms)
    res = weight_matching(_tensors(wa, wb), widths[1:-1])
    assert res.converged
    for p, found in zip(perms, res.perms):
        assert np.array_equal(p.numpy()[found], np.arange(len(p)))  # B[found] == A
    assert res.objective == pytest.approx(sum(float((w * w).sum()) for w in wa), rel=1e-6)


def test_a_noisy_permuted_copy_is_still_recovered_and_the_objective_never_falls_below_the_start():
    gen = torch.Generator().manual_seed(1)
    widths = [20, 64, 48, 10]
    wa = _chain(widths, gen)
    perms = [torch.randperm(n, generator=gen) for n in widths[1:-1]]
    wb = [w + 0.3 * torch.randn(w.shape, generator=gen) for w in _permuted(wa, perms)]
    res = weight_matching(_tensors(wa, wb), widths[1:-1], seed=3)
    for p, found in zip(perms, res.perms):
        assert np.array_equal(p.numpy()[found], np.arange(len(p)))
    start = sum(float((a * b).sum()) for a, b in zip(wa, wb))
    assert res.objective >= start


def test_every_group_is_a_local_optimum_at_convergence():
    """With the others fixed, no single group's assignment can raise the objective."""
    from scipy.optimize import linear_sum_assignment

    gen = torch.Generator().manual_seed(2)
    widths = [6, 10, 8, 4]
    wa, wb = _chain(widths, gen), _chain(widths, gen)
    res = weight_matching(_tensors(wa, wb), widths[1:-1])
    assert res.converged
    p0, p1 = (torch.from_numpy(p) for p in res.perms)
    c0 = wa[0] @ wb[0].T + wa[1].T @ wb[1][p1]
    c1 = wa[1] @ wb[1][:, p0].T + wa[2].T @ wb[2]
    for cost, p in ((c0, res.perms[0]), (c1, res.perms[1])):
        c = cost.double().numpy()
        r, cols = linear_sum_assignment(c, maximize=True)
        assert c[np.arange(len(p)), p].sum() == pytest.approx(c[r, cols].sum(), rel=1e-6)


def test_refuses_mismatched_shapes():
    a = torch.zeros(3, 2, 1)
    with pytest.raises(ConfigError, match="group 0 has 4"):
        weight_matching([MatchedTensor(a, a, 0, None)], [4])
    with pytest.raises(ConfigError, match="max_sweeps"):
        weight_matching([MatchedTensor(a, a, 0, None)], [3], max_sweeps=0)
