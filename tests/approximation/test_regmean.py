"""RegMean's closed form: the least-squares merge of one layer from Gram matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurofuse.approximation import regmean
from neurofuse.errors import ConfigError


def test_equals_the_least_squares_fit_to_every_models_outputs_on_its_own_inputs():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    merged = regmean(ws, [x.T @ x for x in xs])
    stacked_x = torch.cat(xs).numpy()
    stacked_y = torch.cat([x @ w.T for x, w in zip(xs, ws)]).numpy()
    direct = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0].T
    assert np.allclose(merged.numpy(), direct, atol=1e-10)


def test_alpha_shrinks_the_off_diagonal_and_zero_is_a_per_input_weighted_mean():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(30, 5, generator=gen, dtype=torch.float64) * (k + 1) for k in range(2)]
    ws = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    grams = [x.T @ x for x in xs]
    d = [torch.diagonal(g) for g in grams]
    assert torch.allclose(regmean(ws, grams, alpha=0.0), (ws[0] * d[0] + ws[1] * d[1]) / (d[0] + d[1]))
    shrunk = [0.5 * g + 0.5 * torch.diag(torch.diagonal(g)) for g in grams]
    assert torch.allclose(regmean(ws, grams, alpha=0.5), regmean(ws, shrunk, alpha=1.0))
    with pytest.raises(ConfigError, match="alpha"):
        regmean(ws, grams, alpha=1.5)


def test_inputs_no_sample_excites_keep_the_mean_weights():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    x[:, 3] = 0.0  # input 3 is never active
    ws = [torch.randn(2, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    merged = regmean(ws, [x.T @ x, x.T @ x])
    assert torch.allclose(merged[:, 3], (ws[0][:, 3] + ws[1][:, 3]) / 2)
    assert torch.allclose(merged[:, :3], (ws[0][:, :3] + ws[1][:, :3]) / 2)
