"""The per-channel closed form of a depthwise convolution (approximation/_grouped.py).

Properties checked: a depthwise layer is recovered exactly from its own outputs; base channels
grouped into one fused channel get the weighted mean of their own least-squares weights; the
statistics of two shards add up to those of their union; input directions the fusion set never
excites keep the prior's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from neurofuse.approximation import DepthwiseStats, depthwise_design, group_means


def _dw(c: int, seed: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(c, c, 3, padding=1, stride=stride, groups=c, bias=bias).double()


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def test_a_depthwise_layer_is_recovered_from_its_outputs():
    conv = _dw(4, 0, stride=2)
    u = torch.randn(6, 4, 7, 7, dtype=torch.float64)
    stats = DepthwiseStats(torch.arange(4), 4)
    stats.update(depthwise_design(conv, u), _flat(conv(u)).detach())
    w, residual, rank = stats.solve()
    assert rank == 10 and residual.abs().max() < 1e-8
    ref = torch.cat([conv.weight.detach().reshape(4, -1), conv.bias.detach()[:, None]], 1).T
    assert torch.allclose(w, ref, atol=1e-8)


def test_grouped_channels_get_the_weighted_mean_of_their_own_weights():
    """Two base layers whose channels are permuted into the fused ones: each fused channel fits
    both members from its own input channel, and takes their weighted mean."""
    a, b = _dw(3, 1), _dw(3, 2)
    perm = torch.tensor([2, 0, 1])                   # channel j of b reads fused channel perm[j]
    u = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    outs = torch.cat([_flat(a(u)), _flat(b(u[:, perm]))], 1).detach()
    labels = torch.cat([torch.arange(3), perm])
    stats = DepthwiseStats(labels, 3)
    stats.update(depthwise_design(a, u), outs)
    w, _, _ = stats.solve()
    fused = group_means(w, torch.tensor([1.0, 1.0, 1.0, 3.0, 3.0, 3.0], dtype=torch.float64), labels, 3)
    wa = torch.cat([a.weight.detach().reshape(3, -1), a.bias.detach()[:, None]], 1).T
    wb = torch.cat([b.weight.detach().reshape(3, -1), b.bias.detach()[:, None]], 1).T
    expect = 0.25 * wa + 0.75 * wb[:, torch.argsort(perm)]
    assert torch.allclose(fused, expect, atol=1e-8)


def test_shard_statistics_add_up_to_the_union():
    conv = _dw(2, 3)
    u = torch.randn(8, 2, 5, 5, dtype=torch.float64)
    z = _flat(conv(u)).detach()
    x = depthwise_design(conv, u)
    whole = DepthwiseStats(torch.tensor([1, 0]), 2)
    whole.update(x, z)
    half = x.shape[0] // 2
    a, b = DepthwiseStats(torch.tensor([1, 0]), 2), DepthwiseStats(torch.tensor([1, 0]), 2)
    a.update(x[:half], z[:half])
    b.update(x[half:], z[half:])
    merged = a.merge(b)
    for name in ("count", "gram", "cross", "sq"):
        assert torch.allclose(getattr(merged, name), getattr(whole, name))


def test_directions_the_data_never_excites_keep_the_prior():
    conv = _dw(1, 4, bias=False)
    u = torch.randn(4, 1, 1, 1, dtype=torch.float64)   # one pixel: only the centre tap sees data
    stats = DepthwiseStats(torch.tensor([0]), 1)
    stats.update(depthwise_design(conv, u), _flat(conv(u)).detach())
    prior = conv.weight.detach().reshape(1, -1).T
    w, _, rank = stats.solve(prior=prior)
    assert rank == 1
    assert torch.allclose(w, prior, atol=1e-8)
    w0, _, _ = stats.solve()
    assert not torch.allclose(w0, prior, atol=1e-3)          # without it: minimum norm


def test_auto_ridge_picks_each_channels_gcv_penalty_from_the_statistics():
    """ridge='auto': every fused channel's penalty is the GCV argmin computed from its rows (brute
    force here), and the weights are that ridge fit; a well-posed channel keeps the exact fit."""
    from neurofuse.approximation._ridge import PENALTY_GRID

    torch.manual_seed(4)
    conv = _dw(2, 4, stride=3)
    u = torch.randn(2, 2, 6, 6, dtype=torch.float64)                  # 8 rows of 10 inputs: square-ish
    x = depthwise_design(conv, u)                                      # [rows, k, d]
    a = torch.randn(x.shape[0], 4, dtype=torch.float64)                # noise targets: a penalty wins
    labels = torch.tensor([0, 0, 1, 1])
    stats = DepthwiseStats(labels, 2)
    stats.update(x, a)
    w, _, _ = stats.solve(ridge="auto")
    for c in range(2):
        xc, ac = x[:, c], a[:, labels == c]
        n, d = xc.shape
        g = xc.T @ xc
        scale = torch.diagonal(g).mean()

        def fit(lam):
            return torch.linalg.pinv(g) @ xc.T @ ac if lam == 0 else torch.linalg.solve(g + lam * torch.eye(d), xc.T @ ac)

        def gcv(lam):
            hat = xc @ (torch.linalg.pinv(g) if lam == 0 else torch.linalg.inv(g + lam * torch.eye(d))) @ xc.T
            rss = ((ac - xc @ fit(lam)) ** 2).sum()
            free = n - torch.trace(hat)
            return float("inf") if free < 1e-9 * n else float(n * rss / free ** 2)

        best = min(PENALTY_GRID, key=lambda r: gcv(r * scale))
        assert best > 0
        assert torch.allclose(w[:, labels == c], fit(best * scale), atol=1e-6)
    exact = DepthwiseStats(torch.arange(2), 2)
    big = torch.randn(64, 2, 6, 6, dtype=torch.float64)
    exact.update(depthwise_design(conv, big), _flat(conv(big)).detach())
    assert torch.allclose(exact.solve(ridge="auto")[0], exact.solve(ridge=0.0)[0], atol=1e-8)
