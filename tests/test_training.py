"""Tests of neurofuse.training: learning, best-validation restore, reproducibility, metrics."""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from neurofuse import training
from neurofuse.errors import ConfigError, DataError
from neurofuse.models import MLP
from neurofuse.training import TrainConfig, evaluate, predict_logits, seed_everything, train_model


@pytest.fixture(scope="module")
def digits() -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """sklearn digits, standardised with training statistics, split 60/20/20 (train/val/test)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order]
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = ((x - mean) / std).reshape(-1, 1, 8, 8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    return (xt[:n_train], yt[:n_train], xt[n_train:n_train + n_val], yt[n_train:n_train + n_val],
            xt[n_train + n_val:], yt[n_train + n_val:])


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(input_shape=(1, 8, 8), num_classes=10, hidden=(32,))


def _weights(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mlp_learns_digits_above_90_percent_on_held_out_split(digits) -> None:
    x_tr, y_tr, x_va, y_va, x_te, y_te = digits
    model = _mlp()
    history = train_model(model, x_tr, y_tr, x_va, y_va,
                          TrainConfig(epochs=6, lr=1e-2, warmup_epochs=1, batch_size=32))
    assert len(history["train_loss"]) == 6 and len(history["val_accuracy"]) == 6
    assert history["train_loss"][-1] < history["train_loss"][0], "training loss did not decrease"
    assert history["best_val_accuracy"] == max(history["val_accuracy"])
    assert not model.training, "train_model must leave the model in eval mode"
    metrics = evaluate(model, x_te, y_te)
    assert metrics["accuracy"] > 0.9, metrics
    assert metrics["n"] == len(y_te)


def test_best_validation_epoch_weights_are_restored(digits, monkeypatch) -> None:
    x_tr, y_tr, x_va, y_va, _, _ = digits
    scripted = iter([0.3, 0.8, 0.5, 0.6])  # epoch 1 (0-based) is the best; the last is worse
    snapshots: List[Dict[str, Tensor]] = []

    def fake_accuracy(model, x, y, batch_size, device):  # same signature as the real one
        snapshots.append(_weights(model))
        return next(scripted)

    monkeypatch.setattr(training, "_accuracy", fake_accuracy)
    model = _mlp()
    history = train_model(model, x_tr[:256], y_tr[:256], x_va, y_va,
                          TrainConfig(epochs=4, warmup_epochs=0, batch_size=64))
    assert history["best_epoch"] == 1
    assert history["val_accuracy"] == [0.3, 0.8, 0.5, 0.6]
    assert len(snapshots) == 4
    assert not _equal(snapshots[1], snapshots[-1]), "epochs must differ for this test to mean anything"
    assert _equal(_weights(model), snapshots[1]), "the best validation epoch was not restored"


def test_without_validation_the_last_epoch_is_kept(digits) -> None:
    x_tr, y_tr, *_ = digits
    model = _mlp()
    history = train_model(model, x_tr[:128], y_tr[:128], config=TrainConfig(epochs=2))
    assert history["best_epoch"] == 1 and history["val_accuracy"] == []
    assert history["best_val_accuracy"] is None


def test_same_seed_gives_identical_weights_and_other_seed_does_not(digits) -> None:
    x_tr, y_tr, x_va, y_va, _, _ = digits
    runs = []
    for seed in (7, 7, 8):
        model = _mlp(seed=0)  # same initialisation; only the training seed varies
        torch.manual_seed(1234 + len(runs))  # global RNG state must not matter
        train_model(model, x_tr[:300], y_tr[:300], x_va, y_va,
                    TrainConfig(epochs=2, seed=seed, batch_size=32))
        runs.append(_weights(model))
    assert _equal(runs[0], runs[1]), "the same seed gave different weights"
    assert not _equal(runs[0], runs[2]), "a different seed gave the same weights"


def test_training_does_not_consume_the_global_rng(digits) -> None:
    x_tr, y_tr, *_ = digits
    model = _mlp()  # built first: _mlp seeds the global RNG itself
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    train_model(model, x_tr[:64], y_tr[:64], config=TrainConfig(epochs=1))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kwargs", [
    {"epochs": 0}, {"lr": -1.0}, {"lr": 0.0}, {"batch_size": 0}, {"weight_decay": -1e-3},
    {"warmup_epochs": -1}, {"label_smoothing": 1.0}, {"lr_min": 1.0}, {"epochs": 2.5},
    {"device": "nonsense"},
])
def test_bad_train_config_raises_config_error(kwargs) -> None:
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**kwargs)
    name = next(iter(kwargs))
    assert name in str(exc.value) or "device" in str(exc.value)


def test_learning_rate_schedule_warms_up_then_decays_to_lr_min() -> None:
    cfg = TrainConfig(epochs=5, lr=1e-2, lr_min=1e-4, warmup_epochs=1)
    steps = 10
    lrs = [cfg.lr_at(s, steps) for s in range(5 * steps)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[steps - 1] == pytest.approx(1e-2)
    assert all(a < b for a, b in zip(lrs[:steps - 1], lrs[1:steps])), "warmup is not increasing"
    assert all(a >= b for a, b in zip(lrs[steps:], lrs[steps + 1:])), "cosine is not decreasing"
    assert lrs[-1] == pytest.approx(1e-4)


def test_diverging_training_raises_config_error(digits) -> None:
    x_tr, y_tr, *_ = digits
    x = x_tr[:64].clone()
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(ConfigError):
        train_model(_mlp(), x, y_tr[:64], config=TrainConfig(epochs=1))


def test_bad_data_raises_data_error(digits) -> None:
    x_tr, y_tr, *_ = digits
    with pytest.raises(DataError):
        train_model(_mlp(), x_tr[:10], y_tr[:9], config=TrainConfig(epochs=1))
    with pytest.raises(DataError):
        train_model(_mlp(), x_tr[:10], y_tr[:10], x_val=x_tr[:5], config=TrainConfig(epochs=1))
    with pytest.raises(DataError):
        train_model(_mlp(), x_tr[:10], torch.full((10,), 10), config=TrainConfig(epochs=1))


class _Fixed(nn.Module):
    """Returns preset outputs, whatever the input."""

    def __init__(self, outputs: Tensor) -> None:
        super().__init__()
        self.outputs = nn.Parameter(outputs, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.outputs[x[:, 0].long()]


def test_evaluate_on_a_hand_made_example() -> None:
    # 4 samples, 3 classes; predictions 0, 1, 1, 2 against labels 0, 1, 2, 2
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    model = _Fixed(logits)
    x = torch.arange(4, dtype=torch.float32).reshape(4, 1)
    y = torch.tensor([0, 1, 2, 2])
    metrics = evaluate(model, x, y, batch_size=3)
    assert metrics["n"] == 4
    assert metrics["accuracy"] == pytest.approx(0.75)
    # per-class F1: class 0 = 1, class 1 = 2/3 (p=1/2, r=1), class 2 = 2/3 (p=1, r=1/2)
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    expected_loss = float(torch.nn.functional.cross_entropy(logits, y))
    assert metrics["loss"] == pytest.approx(expected_loss)
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1


def test_evaluate_treats_log_probabilities_as_the_same_nll() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    x = torch.arange(6, dtype=torch.float32).reshape(6, 1)
    a = evaluate(_Fixed(logits), x, y)
    b = evaluate(_Fixed(torch.log_softmax(logits, dim=1)), x, y)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_evaluate_and_predict_reject_empty_data() -> None:
    model = _mlp()
    with pytest.raises(DataError):
        evaluate(model, torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long))
    with pytest.raises(DataError):
        predict_logits(model, torch.empty(0, 1, 8, 8))


def test_predict_logits_is_batched_no_grad_and_restores_mode() -> None:
    model = _mlp().train()
    x = torch.randn(70, 1, 8, 8)
    out = predict_logits(model, x, batch_size=16)
    assert out.shape == (70, 10) and not out.requires_grad
    assert model.training, "predict_logits must restore the train/eval mode"
    with torch.no_grad():
        assert torch.allclose(out, model.eval()(x), atol=1e-6)


def test_seed_everything_makes_global_draws_repeatable() -> None:
    seed_everything(3)
    a = (torch.rand(2), np.random.rand(2))
    seed_everything(3)
    b = (torch.rand(2), np.random.rand(2))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
