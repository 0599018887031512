"""FedDF-style ensemble distillation (method "feddf"): starts at the average, moves to the ensemble."""

from __future__ import annotations

import pytest
import torch

import neurofuse
from neurofuse.errors import ConfigError
from neurofuse.methods import get_method
from neurofuse.methods._distill import EnsembleDistillation
from neurofuse.methods._kd import kd_loss
from neurofuse.models import MLP
from neurofuse.training import TrainConfig, train_model


@pytest.fixture(scope="module")
def two_mlps(digits):
    out = []
    for i, classes in enumerate(([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])):
        torch.manual_seed(0)  # a common initialisation, as in federated learning
        m = MLP(digits.input_shape, 10, [32])
        keep = torch.isin(digits.y_train, torch.tensor(classes))
        train_model(m, digits.x_train[keep], digits.y_train[keep], config=TrainConfig(epochs=10, lr=3e-3, seed=i))
        out.append(m.eval())
    return out


def _kl_to_ensemble(model, models, x):
    with torch.no_grad():
        teacher = torch.softmax(torch.stack([m(x) for m in models]).mean(0), dim=-1)
        return float(kd_loss(model(x), teacher, 1.0))


def test_feddf_is_registered_and_needs_no_labels(two_mlps, digits_fusion):
    assert get_method("feddf") is EnsembleDistillation
    fused = neurofuse.fuse(two_mlps, digits_fusion[0], method="feddf", epochs=5, progress=False)
    assert isinstance(fused, MLP)


def test_feddf_moves_the_average_towards_the_ensemble(two_mlps, digits, digits_fusion):
    x = digits_fusion[0]
    avg = neurofuse.fuse(two_mlps, None, method="vanilla", progress=False)
    dist = neurofuse.fuse(two_mlps, x, method="feddf", epochs=30, progress=False)
    assert _kl_to_ensemble(dist, two_mlps, digits.x_test) < 0.7 * _kl_to_ensemble(avg, two_mlps, digits.x_test)


def test_feddf_is_deterministic_and_checks_its_weights(two_mlps, digits_fusion):
    x = digits_fusion[0]
    a = neurofuse.fuse(two_mlps, x, method="feddf", epochs=3, seed=1, progress=False)
    b = neurofuse.fuse(two_mlps, x, method="feddf", epochs=3, seed=1, progress=False)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with pytest.raises(ConfigError, match="weights"):
        neurofuse.fuse(two_mlps, x, method="feddf", weights=[1.0], progress=False)
    with pytest.raises(ConfigError, match="epochs"):
        neurofuse.fuse(two_mlps, x, method="feddf", epochs=0, progress=False)
