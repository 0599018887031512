"""Last-layer knowledge distillation (``kd-head``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.data import balanced_subset
from neurofuse.errors import ConfigError, IncompatibleModelsError
from neurofuse.methods import KDHead, get_method
from neurofuse.methods._kd import kd_loss
from neurofuse.models import MLP
from neurofuse.training import TrainConfig, predict_logits, train_model




@pytest.fixture(scope="module")
def fs(digits):
    idx = balanced_subset(digits.y_train.numpy(), np.arange(len(digits.y_train)), 200, seed=3)
    return digits.x_train[idx], digits.y_train[idx]


@pytest.fixture(scope="module")
def models(digits):
    out = []
    for seed, h in ((30, [24, 16]), (31, [32]), (32, [16, 16])):
        torch.manual_seed(seed)
        m = MLP(digits.input_shape, 10, h)
        train_model(m, digits.x_train, digits.y_train, config=TrainConfig(epochs=3, lr=3e-3, seed=seed))
        out.append(m.eval())
    return out


def _teacher(models, x, t=1.0):
    with torch.no_grad():
        return torch.stack([torch.softmax(m(x) / t, -1) for m in models]).mean(0)


def test_registered_and_options():
    assert "kd-head" in neurofuse.methods() and get_method("kd-head") is KDHead
    kd = KDHead()
    assert kd.options.temperature == 1.0 and kd.batch_size == 32
    for bad in ({"temperature": 0.0}, {"lr": -1.0}, {"epochs": 0}, {"weight_decay": -1.0}):
        with pytest.raises(ConfigError):
            KDHead(**bad)
    with pytest.raises(ConfigError):
        KDHead(importance="conductance")


def test_kd_loss_is_scaled_kl():
    torch.manual_seed(0)
    z, t = torch.randn(5, 4), 2.0
    p = torch.softmax(torch.randn(5, 4), -1)
    q = torch.softmax(z / t, -1)
    manual = (p * (p.log() - q.log())).sum(1).mean() * t * t
    assert torch.allclose(kd_loss(z, p, t), manual, atol=1e-6)
    assert float(kd_loss(z, torch.softmax(z / t, -1), t)) == pytest.approx(0.0, abs=1e-6)


def test_only_the_head_changes(models, fs):
    fused = neurofuse.fuse(models, fs, method="kd-head", epochs=20, progress=False)
    base = models[0].state_dict()
    head = {f"levels.{models[0].num_levels - 1}.{k}" for k in models[0].levels[-1].state_dict()}
    changed = {k for k, v in fused.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == head
    assert all(p.requires_grad for p in fused.parameters())
    assert not fused.training


def test_distills_towards_the_mean_softmax(models, fs):
    x = fs[0]
    p = _teacher(models, x, 2.0)
    fused = neurofuse.fuse(models, fs, method="kd-head", temperature=2.0, epochs=40, progress=False)
    before = float(kd_loss(predict_logits(models[0], x), p, 2.0))
    after = float(kd_loss(predict_logits(fused, x), p, 2.0))
    assert after < 0.7 * before, (before, after)


def test_deterministic_for_a_seed(models, fs):
    a = neurofuse.fuse(models, fs, method="kd-head", epochs=5, seed=3, progress=False)
    b = neurofuse.fuse(models, fs, method="kd-head", epochs=5, seed=3, progress=False)
    c = neurofuse.fuse(models, fs, method="kd-head", epochs=5, seed=4, progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_errors(models, fs):
    with pytest.raises(IncompatibleModelsError, match="LeveledNet"):
        neurofuse.fuse([torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), models[0]],
                       fs, method="kd-head", progress=False)
    with pytest.raises(neurofuse.DataError):
        neurofuse.fuse(models, None, method="kd-head", progress=False)
