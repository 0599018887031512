"""Partial fusion: fused widths between the base width and the sum of the base widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.errors import IncompatibleModelsError
from neurofuse.grouping import output_weights
from neurofuse.training import predict_logits


@pytest.fixture(scope="module")
def three(dirichlet_mlps):
    models, _ = dirichlet_mlps
    return models[:3]


def test_kf_linear_at_the_sum_of_widths_is_the_mean_logit_ensemble(three, digits_fusion):
    x = digits_fusion[0]
    fused = neurofuse.fuse(three, digits_fusion, method="kf-linear", width=3.0, n_init=1, progress=False)
    assert fused.level_widths() == [3 * w for w in three[0].level_widths()[:-1]] + [10]
    mean = torch.stack([predict_logits(m, x) for m in three]).mean(0)
    torch.testing.assert_close(predict_logits(fused, x), mean, atol=1e-4, rtol=1e-4)


def test_kf_linear_at_the_sum_of_widths_is_the_class_weighted_logit_ensemble(three, digits_fusion):
    x = digits_fusion[0]
    cw = np.random.default_rng(1).uniform(0.1, 1, (3, 10))
    fused = neurofuse.fuse(three, digits_fusion, method="kf-linear", width=3.0, n_init=1, progress=False,
                           class_weights=cw)
    w = torch.from_numpy(output_weights(3, 10, cw)).float()
    target = (torch.stack([predict_logits(m, x) for m in three]) * w[:, None, :]).sum(0)
    torch.testing.assert_close(predict_logits(fused, x), target, atol=1e-4, rtol=1e-4)


def test_kf_linear_fit_to_the_ensemble_improves_with_width(three, digits_fusion):
    x = digits_fusion[0]
    mean = torch.stack([predict_logits(m, x) for m in three]).mean(0)
    errs = [float(((predict_logits(neurofuse.fuse(three, digits_fusion, method="kf-linear", width=w,
                                                  n_init=1, progress=False), x) - mean) ** 2).mean())
            for w in (1.0, 2.0, 3.0)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-6


def test_kf_gradient_fuses_above_the_base_width(three, digits_fusion):
    fused = neurofuse.fuse(three[:2], digits_fusion, method="kf-gradient", width=1.5, progress=False,
                           levels={"epochs": 2}, head={"epochs": 2})
    assert fused.level_widths() == [96, 96, 10]


@pytest.mark.parametrize("method", ["kf-linear", "kf-gradient"])
def test_widths_above_the_sum_are_refused(method, three, digits_fusion):
    with pytest.raises(IncompatibleModelsError, match="larger than"):
        neurofuse.fuse(three[:2], digits_fusion, method=method, width=2.5, progress=False)
