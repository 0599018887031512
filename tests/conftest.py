"""Shared fixtures: small models trained on scikit-learn's digits (no download)."""

from __future__ import annotations

import os

# before torch loads libgomp: idle OpenMP threads sleep instead of spinning, which keeps the
# suite fast on a shared 2-core machine (neurofuse itself leaves the variable to its users)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest
import torch

from neurofuse.data import balanced_subset, load_dataset, partition
from neurofuse.models import MLP, VGG
from neurofuse.training import TrainConfig, train_model


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_fusion(digits):
    idx = balanced_subset(digits.y_train.numpy(), np.arange(len(digits.y_train)), 400, seed=0)
    return digits.x_train[idx], digits.y_train[idx]


@pytest.fixture(scope="session")
def trained_mlp(digits):
    torch.manual_seed(0)
    m = MLP(digits.input_shape, 10, [32, 24])
    train_model(m, digits.x_train, digits.y_train, config=TrainConfig(epochs=8, lr=3e-3, seed=0))
    return m.eval()


@pytest.fixture(scope="session")
def trained_vgg(digits):
    torch.manual_seed(0)
    m = VGG(digits.input_shape, 10, width_multiplier=0.125)
    train_model(m, digits.x_train, digits.y_train, config=TrainConfig(epochs=3, lr=3e-3, seed=0))
    return m.eval()


@pytest.fixture(scope="session")
def dirichlet_mlps(digits):
    """Four MLPs trained on a 4-way Dirichlet split of digits (validation split for selection)."""
    y = digits.y_train.numpy()
    parts = partition(y, 4, "dirichlet", seed=0)
    models = []
    for i, part in enumerate(parts):
        torch.manual_seed(100 + i)
        m = MLP(digits.input_shape, 10, [64, 64])
        rng = np.random.default_rng(i)
        part = rng.permutation(part)
        n_val = max(1, len(part) // 10)
        val, tr = part[:n_val], part[n_val:]
        train_model(m, digits.x_train[tr], digits.y_train[tr], digits.x_train[val], digits.y_train[val],
                    config=TrainConfig(epochs=60, lr=1e-3, seed=i))
        models.append(m.eval())
    return models, parts


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine OpenMP threads thrash."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
