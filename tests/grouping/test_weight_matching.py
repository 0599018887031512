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


def test_groups_of_one_unit_keep_their_heads_together():
    """An attention: queries and keys (group 0) and values (group 1), 3 heads of 4.  B is A with
    its heads permuted as units and the neurons inside each head permuted (queries/keys one way,
    values another).  Solved as a unit, every found permutation maps whole heads to whole heads,
    one assignment of heads for both groups, and recovers B."""
    gen = torch.Generator().manual_seed(2)
    heads, d, c = 3, 4, 6
    q, k, v = (torch.randn(heads * d, c, generator=gen) for _ in range(3))
    o = torch.randn(c, heads * d, generator=gen)
    head_perm = torch.randperm(heads, generator=gen)
    qk_inner = [torch.randperm(d, generator=gen) for _ in range(heads)]
    vo_inner = [torch.randperm(d, generator=gen) for _ in range(heads)]
    pqk = torch.cat([head_perm[h] * d + qk_inner[h] for h in range(heads)])
    pvo = torch.cat([head_perm[h] * d + vo_inner[h] for h in range(heads)])
    tensors = [MatchedTensor(q[:, :, None], q[pqk][:, :, None], 0, None),
               MatchedTensor(k[:, :, None], k[pqk][:, :, None], 0, None),
               MatchedTensor(v[:, :, None], v[pvo][:, :, None], 1, None),
               MatchedTensor(o.T[:, :, None], o.T[pvo][:, :, None], 1, None)]
    res = weight_matching(tensors, [heads * d, heads * d], units=[((0, 1), heads)])
    for g, p in enumerate((pqk, pvo)):
        assert np.array_equal(p.numpy()[res.perms[g]], np.arange(heads * d))
        blocks = res.perms[g].reshape(heads, d) // d
        assert (blocks == blocks[:, :1]).all()                          # a head stays whole
    # the head assignment is shared: head h of A takes one head of B in both groups
    assert np.array_equal(res.perms[0].reshape(heads, d)[:, 0] // d, res.perms[1].reshape(heads, d)[:, 0] // d)
    with pytest.raises(ConfigError, match="not 5 equal heads"):
        weight_matching(tensors, [heads * d, heads * d], units=[((0, 1), 5)])


def test_a_grouped_weight_matches_as_its_block_diagonal_ungrouped_weight_would():
    """A chain in -> 12 (group 0) -> grouped conv of 3 groups -> 12 (group 1) -> out, two random
    networks: the grouped term (``MatchedTensor.groups``) finds the same permutations and objective
    as the block-diagonal dense weight it stands for, and keeps the groups whole."""
    gen = torch.Generator().manual_seed(4)
    g, per, taps = 3, 4, 5
    nets = []
    for _ in range(2):
        w0 = torch.randn(12, 6, taps, generator=gen)
        wg = torch.randn(12, per, taps, generator=gen)       # [out, in / groups, taps]
        w2 = torch.randn(7, 12, taps, generator=gen)
        nets.append((w0, wg, w2))
    units = [((0, 1), g)]

    def run(grouped: bool):
        ts = [MatchedTensor(nets[0][0], nets[1][0], 0, None)]
        if grouped:
            ts.append(MatchedTensor(nets[0][1], nets[1][1], 1, 0, g))
        else:
            dense = [MatchedTensor(n[1], n[1], 1, 0, g).dense(n[1]) for n in nets]
            ts.append(MatchedTensor(dense[0], dense[1], 1, 0))
        ts.append(MatchedTensor(nets[0][2], nets[1][2], None, 1))
        return weight_matching(ts, [12, 12], units=units, seed=3)

    a, b = run(True), run(False)
    assert all(np.array_equal(p, q) for p, q in zip(a.perms, b.perms))
    assert a.objective == pytest.approx(b.objective, rel=1e-6)
    for p in a.perms:
        blocks = p.reshape(g, per) // per
        assert (blocks == blocks[:, :1]).all()                          # a group stays whole
    assert np.array_equal(a.perms[0][::per] // per, a.perms[1][::per] // per)   # one assignment
