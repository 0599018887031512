"""Additive statistics: shards merge to the statistics of their union, state round-trips."""

import pytest
import torch

from neurofuse.approximation import LinearStats
from neurofuse.stats import CrossMoments, ImportanceSums, MomentStats


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
