"""The per-neuron fits of norms: several inputs per neuron, and what a norm's units are."""

import torch
from torch import nn

from neurofuse.approximation import NeuronRegression, norm_units, normalise


def test_a_regression_on_several_inputs_per_neuron_recovers_their_slopes_and_intercept():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, 2, generator=g, dtype=torch.float64)
    gamma = torch.randn(6, 2, generator=g, dtype=torch.float64)
    beta = torch.randn(6, generator=g, dtype=torch.float64)
    y = (x * gamma).sum(-1) + beta
    reg = NeuronRegression()
    for rows in (slice(0, 200), slice(200, 500)):          # additive over batches
        reg.update(x[rows], y[rows])
    got_g, got_b = reg.solve()
    assert torch.allclose(got_g, gamma, atol=1e-9) and torch.allclose(got_b, beta, atol=1e-9)
    assert reg.relative_error(got_g, got_b) < 1e-12
    assert reg.relative_error(torch.zeros_like(gamma), torch.zeros_like(beta)) > 0.5


def test_an_input_that_does_not_vary_gets_slope_zero_and_one_input_matches_the_line_fit():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    y = 2.0 * x - 1.0
    both = NeuronRegression()
    both.update(torch.stack([x, torch.full_like(x, 3.0)], -1), y)
    slopes, intercept = both.solve()
    assert torch.allclose(slopes[:, 0], torch.full((4,), 2.0, dtype=torch.float64), atol=1e-9)
    assert slopes[:, 1].abs().max() < 1e-9 and torch.allclose(intercept, torch.full((4,), -1.0, dtype=torch.float64))
    noisy = y + torch.randn(300, 4, generator=g, dtype=torch.float64)
    one, many = NeuronRegression(), NeuronRegression()
    one.update(x, noisy)
    many.update(x[..., None], noisy)
    for intercept in (True, False):
        (g1, b1), (gm, bm) = one.solve(intercept=intercept), many.solve(intercept=intercept)
        assert torch.allclose(g1, gm[:, 0]) and torch.allclose(b1, bm)
        assert abs(one.relative_error(g1, b1) - many.relative_error(gm, bm)) < 1e-12


def test_a_groupnorms_units_are_a_samples_group_of_channels_over_positions():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 8, 5, 5, generator=g) * 4 + 1
    gn = nn.GroupNorm(2, 8, affine=False)
    kept, sigma = norm_units(gn, z)
    assert torch.equal(kept, z)                   # a unit spans positions: no convolution computes its mean
    assert sigma.shape == (6,)
    assert torch.allclose(normalise(gn, z), gn(z), atol=1e-6)
    want = torch.sqrt(z.reshape(3, 2, -1).double().var(-1, unbiased=False) + gn.eps).reshape(-1)
    assert torch.allclose(sigma, want)
    rows = torch.randn(4, 8, generator=g)
    centred, s = norm_units(nn.GroupNorm(2, 8), rows)  # on [B, C] a unit is part of a row: centred
    assert s.shape == (8,) and centred.reshape(4, 2, 4).mean(-1).abs().max() < 1e-6
    ln = nn.LayerNorm(8)
    centred, s = norm_units(ln, rows)
    assert s.shape == (4,) and centred.mean(-1).abs().max() < 1e-6
    assert torch.allclose(normalise(ln, rows), ln(rows), atol=1e-6)


def test_an_input_that_barely_varies_gets_slope_zero_with_several_inputs_as_with_one():
    g = torch.Generator().manual_seed(3)
    x = 1e-7 * torch.randn(500, 3, generator=g, dtype=torch.float64)
    y = torch.randn(500, 3, generator=g, dtype=torch.float64)
    one, many = NeuronRegression(), NeuronRegression()
    one.update(x, y)
    many.update(x[..., None], y)
    assert one.solve()[0].abs().max() == 0 and many.solve()[0].abs().max() == 0
