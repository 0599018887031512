"""Fine-tuning after fusion: schedule, validation hold-out, best-checkpoint restore, API."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.data import balanced_subset
from neurofuse.errors import ConfigError, DataError
from neurofuse.finetune import FinetuneConfig, finetune, schedule_lr, stratified_holdout
from neurofuse.models import MLP
from neurofuse.training import TrainConfig, evaluate, train_model




@pytest.fixture(scope="module")
def train_part(digits):
    idx = balanced_subset(digits.y_train.numpy(), np.arange(len(digits.y_train)), 400, seed=4)
    return digits.x_train[idx], digits.y_train[idx]


@pytest.fixture(scope="module")
def models(digits):
    out = []
    for seed in (40, 41):
        torch.manual_seed(seed)
        m = MLP(digits.input_shape, 10, [24])
        train_model(m, digits.x_train, digits.y_train, config=TrainConfig(epochs=4, lr=3e-3, seed=seed))
        out.append(m.eval())
    return out


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_takes_only_training_data():
    """No test-set argument: model selection uses a hold-out of the data it is given."""
    params = list(inspect.signature(finetune).parameters)
    assert params == ["model", "x", "y", "config", "progress"]
    assert not any("test" in f.name for f in FinetuneConfig.__dataclass_fields__.values())


def test_config_defaults_and_validation():
    c = FinetuneConfig()
    assert (c.lr, c.lr_min, c.schedule, c.t_0, c.t_mult) == (1e-4, 1e-6, "warm-restarts", 10, 2)
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"lr_min": 1.0}, {"schedule": "step"}, {"t_0": 0},
                {"batch_size": 0}, {"weight_decay": -1.0}, {"label_smoothing": 1.0},
                {"val_fraction": 1.0}, {"seed": 1.5}, {"device": "tpu:x"}):
        with pytest.raises(ConfigError):
            FinetuneConfig(**bad)


def test_warm_restarts_match_torch():
    cfg = FinetuneConfig(lr=1e-2, lr_min=1e-5, t_0=3, t_mult=2, epochs=20)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2, eta_min=1e-5)
    for e in [0, 0.5, 1, 2.9, 3, 4.25, 8.9, 9, 15.5, 20]:
        sched.step(e)
        assert schedule_lr(cfg, e) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
    assert schedule_lr(FinetuneConfig(schedule="constant"), 7.0) == 1e-4
    cos = FinetuneConfig(schedule="cosine", epochs=10, lr=1.0, lr_min=0.0)
    assert schedule_lr(cos, 0) == 1.0 and schedule_lr(cos, 5) == pytest.approx(0.5) and schedule_lr(cos, 10) == 0


def test_stratified_holdout():
    y = np.repeat(np.arange(5), [10, 20, 1, 7, 2])
    tr, va = stratified_holdout(y, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert set(y[va]) == {0, 1, 3, 4} and (y[va] == 1).sum() == 4  # a single-sample class trains


def test_restores_best_validation_checkpoint(models, train_part):
    x, y = train_part
    model = models[0]
    before = _state(model)
    cfg = FinetuneConfig(epochs=6, lr=3e-3, schedule="constant", batch_size=32, seed=1)
    tuned, hist = finetune(model, x, y, cfg, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched
    va, tr = hist["val_indices"], hist["train_indices"]
    assert len(np.intersect1d(va, tr)) == 0 and len(va) + len(tr) == len(y)
    assert len(hist["val_accuracy"]) == cfg.epochs + 1 and len(hist["train_loss"]) == cfg.epochs
    assert hist["best_val_accuracy"] == max(hist["val_accuracy"])
    assert hist["val_accuracy"][hist["best_epoch"]] == hist["best_val_accuracy"]
    assert evaluate(tuned, x[va], y[va])["accuracy"] == pytest.approx(hist["best_val_accuracy"])


def test_a_harmful_run_gives_back_the_input(models, train_part):
    """With a destructive learning rate every epoch validates worse than the input model, so
    the restored checkpoint is the input itself."""
    x, y = train_part
    cfg = FinetuneConfig(epochs=3, lr=0.5, schedule="constant", batch_size=16, seed=0)
    tuned, hist = finetune(models[0], x, y, cfg, progress=False)
    assert hist["best_epoch"] == 0 and max(hist["val_accuracy"][1:]) < hist["val_accuracy"][0]
    for k, v in tuned.state_dict().items():
        assert torch.equal(v, models[0].state_dict()[k])


def test_improves_a_vanilla_average_and_is_deterministic(models, train_part):
    x, y = train_part
    fused = neurofuse.fuse(models, method="vanilla", progress=False)
    cfg = FinetuneConfig(epochs=8, lr=1e-3, seed=3)
    a, hist = finetune(fused, x, y, cfg, progress=False)
    b, _ = finetune(fused, x, y, cfg, progress=False)
    assert hist["best_val_accuracy"] > hist["val_accuracy"][0]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_refuses_ensembles_and_bad_data(models, train_part):
    x, y = train_part
    ens = neurofuse.fuse(models, method="ensemble", progress=False)
    with pytest.raises(ConfigError, match="ensemble"):
        finetune(ens, x, y, FinetuneConfig(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="ensemble"):
        neurofuse.fuse(models, (x, y), method="ensemble", finetune=1, progress=False)
    with pytest.raises(DataError):
        finetune(models[0], x, y[:-1], progress=False)
    with pytest.raises(DataError):
        finetune(models[0], x.reshape(len(x), -1), y, progress=False)
    with pytest.raises(ConfigError):
        neurofuse.fuse(models, (x, y), method="vanilla", finetune="yes", progress=False)


def test_api_finetunes_after_fusion(models, train_part, digits):
    x, y = train_part
    result = neurofuse.fuse(models, (x[:100], y[:100]), method="otfusion", finetune=2,
                            finetune_data=(x, y), progress=False, return_result=True)
    hist = result.step("finetune").info["history"]
    assert len(hist["train_loss"]) == 2
    assert len(hist["train_indices"]) + len(hist["val_indices"]) == len(x)  # finetune_data, not the fusion set
    cfg = FinetuneConfig(epochs=1, seed=5)
    result2 = neurofuse.fuse(models, (x, y), method="otfusion", finetune=cfg, progress=False,
                             return_result=True)
    assert len(result2.step("finetune").info["history"]["val_accuracy"]) == 2
    assert [s.name for s in result2.steps] == ["finetune"]
    with pytest.raises(DataError):
        neurofuse.fuse(models, x, method="otfusion", finetune=1, progress=False)  # no labels
