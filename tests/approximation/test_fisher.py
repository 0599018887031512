"""The diagonal Fisher and the Fisher-weighted average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neurofuse.approximation import diagonal_fisher, fisher_merge
from neurofuse.errors import ConfigError, DataError


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double().eval()


def _brute_force(net, x, y, kind):
    out = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for i in range(len(x)):
        logp = torch.log_softmax(net(x[i:i + 1]), -1)[0]
        classes = [(int(y[i]), 1.0)] if kind == "empirical" else [(c, float(logp[c].detach().exp())) for c in range(3)]
        for c, w in classes:
            grads = torch.autograd.grad(logp[c], list(net.parameters()), retain_graph=True)
            for (n, _), g in zip(net.named_parameters(), grads):
                out[n] += w * g ** 2
    return {n: v / len(x) for n, v in out.items()}


@pytest.mark.parametrize("kind", ["expected", "empirical"])
def test_matches_per_sample_autograd(kind):
    net = _net(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=gen)
    got = diagonal_fisher(net, [(x[:6], y[:6]), (x[6:], y[6:])], kind, budget=200)  # chunks of 2 samples
    want = _brute_force(net, x, y, kind)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-8, atol=1e-12), n


def test_the_merge_is_the_fisher_weighted_average():
    a, b = _net(0), _net(1)
    fa = {n: torch.rand_like(p) for n, p in a.named_parameters()}
    fb = {n: torch.rand_like(p) for n, p in b.named_parameters()}
    merged = fisher_merge([a.state_dict(), b.state_dict()], [fa, fb], floor=1e-6)
    for n, p in a.named_parameters():
        q = dict(b.named_parameters())[n]
        want = ((fa[n] + 1e-6) * p + (fb[n] + 1e-6) * q) / (fa[n] + fb[n] + 2e-6)
        assert torch.allclose(merged[n], want)
    with pytest.raises(ConfigError, match="fisher_floor"):
        fisher_merge([a.state_dict()], [fa], floor=0.0)


def test_empirical_needs_labels_and_kind_is_checked():
    net = _net(0)
    with pytest.raises(DataError, match="labels"):
        diagonal_fisher(net, [(torch.zeros(2, 5, dtype=torch.float64), None)], "empirical")
    with pytest.raises(ConfigError, match="fisher must be"):
        diagonal_fisher(net, [], "sampled")
