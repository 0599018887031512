"""Additive statistics: shards merge to the statistics of their union, state round-trips."""

import pytest
import torch

from neurofuse.approximation import LinearStats
from neurofuse.stats import SYRK_MIN, CrossMoments, ImportanceSums, MomentStats


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cls,args", [
    (MomentStats, lambda s: (_rand(7, 3, seed=s),)),
    (CrossMoments, lambda s: (_rand(7, 3, seed=s), _rand(7, 4, seed=s + 100))),
    (LinearStats, lambda s: (_rand(7, 5, seed=s), _rand(7, 2, seed=s + 100))),
])
def test_merged_shards_equal_the_union_and_state_round_trips(cls, args):
    a, b, union = cls(), cls(), cls()
    xa, xb = args(0), args(1)
    a.update(*xa)
    b.update(*xb)
    union.update(*[torch.cat([p, q]) for p, q in zip(xa, xb)])
    merged = cls.from_state(a.state()).merge(b)
    for k, v in union.state().items():
        assert torch.allclose(merged.state()[k], v, atol=1e-12), k


def test_importance_sums_give_the_mean_plus_eps():
    s = ImportanceSums(2)
    s.update([torch.tensor([2.0, 4.0]), torch.tensor([6.0])], 2)
    t = ImportanceSums.from_state(s.state())
    scores = t.merge(s).scores(eps=0.0)
    assert torch.allclose(scores[0], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.allclose(scores[1], torch.tensor([3.0], dtype=torch.float64))


def test_merging_different_statistics_or_unknown_state_is_refused():
    with pytest.raises(TypeError, match="cannot merge"):
        MomentStats().merge(CrossMoments())
    with pytest.raises(KeyError, match="no statistic"):
        MomentStats.from_state({"bogus": torch.zeros(1)})


class _Gram(MomentStats):
    """A symmetric sum accumulated through ``_add_gram`` (dsyrk from ``SYRK_MIN`` columns)."""

    fields = ("g",)

    def update(self, x):
        self._add_gram("g", x)


@pytest.mark.parametrize("d", [SYRK_MIN - 1, SYRK_MIN + 3])
def test_gram_sums_from_one_triangle_are_whole_when_read_merged_or_saved(d):
    """``_add_gram`` adds xᵀx (dsyrk writes one triangle on the CPU from SYRK_MIN columns): every
    read, ``state``, and a merge of such a sum with one made by ``addmm_`` give the full, symmetric
    xᵀx of the union."""
    xs = [_rand(n, d, seed=s) for s, n in enumerate((40, 300, 7))]
    whole = torch.cat(xs)
    expect = whole.T @ whole
    a = _Gram()
    for x in xs[:2]:
        a.update(x)
    assert torch.allclose(a.g, xs[0].T @ xs[0] + xs[1].T @ xs[1], rtol=0, atol=1e-9)
    a.update(xs[2])                                   # after a read: the triangle is stale again
    assert torch.allclose(_Gram.from_state(a.state()).g, expect, rtol=0, atol=1e-9)

    def shards():
        full = _Gram()
        full._add_product("g", xs[2].T, xs[2])        # a whole matrix, as below SYRK_MIN
        half = _Gram()
        for x in xs[:2]:
            half.update(x)
        return full, half

    full, half = shards()
    one = full.merge(half)
    full, half = shards()
    other = half.merge(full)
    for merged in (one, other):
        g = merged.state()["g"]
        assert torch.allclose(g, expect, rtol=0, atol=1e-9) and torch.allclose(g, g.T, rtol=0, atol=1e-9)


def test_statistics_converted_in_float64_chunks_equal_the_whole_batch_sums(monkeypatch):
    """Moments, cross moments and Gram sums of a batch are added a few rows at a time
    (``CHUNK_BYTES``); the sums are those of the whole batch, column blocks joined in order."""
    from neurofuse import stats as stats_mod
    from neurofuse.approximation import GramStats

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(700, 5, generator=g), torch.randn(700, 4, generator=g)
    monkeypatch.setattr(stats_mod, "CHUNK_BYTES", 8 * 5 * 256)   # 256-row chunks: 3 of them
    assert len(stats_mod.row_chunks(700, 5)) == 3
    m, c, gr = MomentStats(), CrossMoments(), GramStats()
    m.update(a)
    c.update(a, b)
    gr.update([a, b])
    a64, b64 = a.double(), b.double()
    both = torch.cat([a64, b64], 1)
    assert torch.allclose(m.sq, (a64 ** 2).sum(0), rtol=1e-12) and int(m.count) == 700
    assert torch.allclose(c.ab, a64.T @ b64, rtol=1e-12, atol=1e-10)
    assert torch.allclose(gr.gram, both.T @ both, rtol=1e-12, atol=1e-10)
