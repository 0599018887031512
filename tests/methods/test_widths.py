"""Fusing models of different widths into a chosen width, and compression (narrower than the
parents), with kf-gradient and kf-linear."""

from __future__ import annotations

import pytest
import torch

import neurofuse
from neurofuse.data import partition
from neurofuse.errors import ConfigError, IncompatibleModelsError
from neurofuse.models import MLP, ResNet, ViT
from neurofuse.training import TrainConfig, evaluate, train_model


def _train_mlp(digits, hidden, idx, seed):
    torch.manual_seed(seed)
    m = MLP(digits.input_shape, 10, hidden)
    train_model(m, digits.x_train[idx], digits.y_train[idx],
                config=TrainConfig(epochs=10, lr=3e-3, warmup_epochs=1, batch_size=32, seed=seed))
    return m.eval()


@pytest.fixture(scope="module")
def three_widths(digits):
    """MLPs with one hidden layer of 32, 48 and 64 neurons, each on a third of digits (iid)."""
    parts = partition(digits.y_train.numpy(), 3, "iid", seed=0)
    return [_train_mlp(digits, [w], p, seed=i) for i, (w, p) in enumerate(zip([32, 48, 64], parts))]


@pytest.fixture(scope="module")
def two_wide(digits):
    """Two MLPs with 64 hidden neurons on halves of digits."""
    parts = partition(digits.y_train.numpy(), 2, "iid", seed=1)
    return [_train_mlp(digits, [64], p, seed=10 + i) for i, p in enumerate(parts)]


@pytest.mark.parametrize("method", ["kf-gradient", "kf-linear"])
def test_three_widths_fuse_into_width_40(method, three_widths, digits, digits_fusion):
    assert [m.level_widths()[0] for m in three_widths] == [32, 48, 64]
    fused = neurofuse.fuse(three_widths, digits_fusion, method=method, width=40, progress=False)
    assert isinstance(fused, MLP) and fused.level_widths() == [40, 10]
    acc = evaluate(fused, digits.x_test, digits.y_test)["accuracy"]
    base = [evaluate(m, digits.x_test, digits.y_test)["accuracy"] for m in three_widths]
    assert acc > min(base) - 0.1 and acc > 0.8, (acc, base)


@pytest.mark.parametrize("method", ["kf-gradient", "kf-linear"])
@pytest.mark.parametrize("width", [32, 0.5, [32]])
def test_compression_two_width_64_models_into_width_32(method, width, two_wide, digits, digits_fusion):
    fused = neurofuse.fuse(two_wide, digits_fusion, method=method, width=width, progress=False)
    assert fused.level_widths() == [32, 10]
    acc = evaluate(fused, digits.x_test, digits.y_test)["accuracy"]
    assert acc > 0.8, acc


def test_wider_than_the_parents_but_within_their_neurons(two_wide, digits, digits_fusion):
    fused = neurofuse.fuse(two_wide, digits_fusion, method="kf-gradient", width=96, progress=False)
    assert fused.level_widths() == [96, 10]
    assert evaluate(fused, digits.x_test, digits.y_test)["accuracy"] > 0.8


@pytest.mark.parametrize("width, err, word", [
    (0, ConfigError, "at least 1"),
    ([0], ConfigError, "at least 1"),
    (-1.0, ConfigError, "positive"),
    ([32, 32], ConfigError, "levels"),
    (129, IncompatibleModelsError, "larger"),
])
def test_bad_widths_are_one_line_errors(width, err, word, two_wide, digits_fusion):
    for method in ("kf-gradient", "kf-linear"):
        with pytest.raises(err) as e:
            neurofuse.fuse(two_wide, digits_fusion, method=method, width=width, progress=False)
        assert "\n" not in str(e.value) and word in str(e.value)


def test_hf_linear_needs_equal_widths(two_wide, digits_fusion):
    with pytest.raises(neurofuse.ConfigError, match="kf-linear"):
        neurofuse.fuse(two_wide, digits_fusion, method="hf-linear", width=32, progress=False)


def test_resnet_fuses_into_other_widths_with_projection_shortcuts(digits, digits_fusion):
    torch.manual_seed(0)
    models = [ResNet(digits.input_shape, 10, 20, width_multiplier=0.25) for _ in range(2)]
    widths = models[0].level_widths()[:-1]
    target = [6] + [6, 5, 6, 8, 8, 8, 12, 12, 12]
    assert len(target) == len(widths)
    fused = neurofuse.fuse(models, digits_fusion, method="kf-gradient", width=target, progress=False,
                           levels={"epochs": 1}, head={"epochs": 1})
    assert fused.level_widths() == target + [10]


def test_vit_levels_share_one_width(digits, digits_fusion):
    torch.manual_seed(0)
    models = [ViT(digits.input_shape, 10, hidden=16, depth=2, heads=2, mlp_hidden=16) for _ in range(2)]
    fused = neurofuse.fuse(models, digits_fusion, method="kf-gradient", width=24, progress=False,
                           levels={"epochs": 1}, head={"epochs": 1})
    assert fused.level_widths() == [24, 24, 10]
    with pytest.raises(ConfigError, match="same width"):
        neurofuse.fuse(models, digits_fusion, method="kf-gradient", width=[24, 16], progress=False)
