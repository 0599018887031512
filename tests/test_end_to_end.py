"""End to end on digits, 4 models, Dirichlet: KF-Linear beats vanilla averaging and the base models."""

import numpy as np
import pytest

import neurofuse
from neurofuse.data import balanced_subset
from neurofuse.training import evaluate


@pytest.mark.slow
def test_kf_linear_beats_vanilla_by_20_points_and_the_mean_base_model(digits, dirichlet_mlps):
    models, parts = dirichlet_mlps
    # the fusion set comes from the training data, never the test set
    idx = balanced_subset(digits.y_train.numpy(), np.arange(len(digits.y_train)), 400, seed=0)
    fusion = (digits.x_train[idx], digits.y_train[idx])
    acc = lambda m: evaluate(m, digits.x_test, digits.y_test)["accuracy"]  # noqa: E731
    base = [acc(m) for m in models]
    vanilla = acc(neurofuse.fuse(models, fusion, method="vanilla", progress=False))
    kf = acc(neurofuse.fuse(models, fusion, method="kf-linear", progress=False))
    assert kf >= vanilla + 0.20, (kf, vanilla)
    assert kf > float(np.mean(base)), (kf, base)
