"""The field's baselines record which base neurons every fused neuron stands for, and REPAIR uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.methods import get_method
from neurofuse.models import MLP

NEW = ["weight-matching", "zipit", "cca-merge", "regmean", "regmean-aligned", "fisher", "fisher-aligned"]


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(3)
    return [MLP((1, 8, 8), 10, [12, 10]).eval() for _ in range(2)]


@pytest.mark.parametrize("name", NEW)
def test_one_row_stochastic_matrix_per_hidden_level_and_repair_accepts_it(name, pair, digits_fusion):
    method = get_method(name)(progress=False)
    fused = method.fuse(pair, digits_fusion)
    assert [g.shape for g in method.groupings] == [(12, 24), (10, 20)]
    for g in method.groupings:
        assert (g >= 0).all() and np.allclose(g.sum(1), 1.0)
    repaired = neurofuse.fuse(pair, digits_fusion, method=name, repair=True, progress=False)
    assert torch.isfinite(repaired(digits_fusion[0])).all()
    assert type(repaired) is type(fused)
