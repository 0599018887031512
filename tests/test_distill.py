"""Distillation after fusion: toward the class-weighted ensemble, no labels, held-out selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.distill import DistillConfig, _augment, distill, teacher_probs
from neurofuse.errors import ConfigError, DataError

FAST = DistillConfig(epochs=4, patience=2)


@pytest.fixture(scope="module")
def pair(dirichlet_mlps):
    models, parts = dirichlet_mlps
    return models[:2]


@pytest.fixture(scope="module")
def fused(pair, digits_fusion):
    return neurofuse.fuse(pair, digits_fusion, method="vanilla", progress=False)


def test_never_returns_a_model_further_from_the_teacher_on_the_held_out_part(fused, pair, digits_fusion):
    student, hist = distill(fused, pair, digits_fusion[0], DistillConfig(epochs=10, lr=1e-3), progress=False)
    assert hist["val_kl"][hist["best_epoch"]] == min(hist["val_kl"])
    assert min(hist["val_kl"]) < hist["val_kl"][0]        # vanilla averaging is far from the ensemble


def test_the_input_model_and_the_teachers_are_left_alone(fused, pair, digits_fusion):
    before = [v.clone() for v in fused.state_dict().values()]
    pair[0].train()
    try:
        distill(fused, pair, digits_fusion[0], FAST, progress=False)
        assert pair[0].training and not pair[1].training
    finally:
        pair[0].eval()
    assert all(torch.equal(a, b) for a, b in zip(before, fused.state_dict().values()))


def test_deterministic_for_a_seed(fused, pair, digits_fusion):
    a, _ = distill(fused, pair, digits_fusion[0], FAST, progress=False)
    b, _ = distill(fused, pair, digits_fusion[0], FAST, progress=False)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


def test_teacher_is_the_class_weighted_ensemble(pair, digits_fusion):
    x = digits_fusion[0][:16]
    cw = np.random.default_rng(0).uniform(0.1, 1, (2, 10))
    ens = neurofuse.fuse(pair, None, method="ensemble", class_weights=cw, progress=False)
    w = torch.from_numpy(cw).float()
    with torch.no_grad():
        torch.testing.assert_close(torch.log(teacher_probs(pair, x, 1.0, w)), ens(x), atol=1e-5, rtol=1e-5)


def test_needs_no_labels_and_runs_after_any_method(pair, digits_fusion):
    x = digits_fusion[0]
    out = neurofuse.fuse(pair, x, method="kf-linear", n_init=1, progress=False, distill=FAST,
                         return_result=True)
    assert "val_kl" in out.step("distill").info["history"]
    extra = x[:50] + 0.01
    out = neurofuse.fuse(pair, x, method="otfusion", progress=False, distill=FAST, distill_data=extra,
                         return_result=True)
    assert out.step("distill").info["history"]["best_epoch"] >= 0


def test_augmentation_keeps_shapes_and_is_off_when_disabled():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 6, 6)
    off = DistillConfig(mixup=0.0, shift=0)
    assert torch.equal(_augment(x, off, gen), x)
    y = _augment(x, DistillConfig(mixup=1.0, shift=2, flip=True), gen)
    assert y.shape == x.shape and not torch.equal(y, x)
    same = torch.ones(8, 1, 6, 6)
    assert torch.allclose(_augment(same, DistillConfig(mixup=1.0, shift=0), gen), same)
    # a shift moves pixels, it does not invent new values (zero padding aside)
    s = _augment(x, DistillConfig(mixup=0.0, shift=1), gen)
    assert set(s.flatten().tolist()) <= set(x.flatten().tolist()) | {0.0}


@pytest.mark.parametrize("kw", [{"epochs": 0}, {"lr": -1.0}, {"temperature": 0}, {"mixup": 1.5},
                                {"shift": -1}, {"val_fraction": 1.0}, {"flip": 1}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ConfigError):
        DistillConfig(**kw)


def test_refusals(pair, fused, digits_fusion):
    with pytest.raises(ConfigError, match="ensemble"):
        neurofuse.fuse(pair, digits_fusion, method="ensemble", distill=3)
    with pytest.raises(ConfigError, match="distill"):
        neurofuse.fuse(pair, digits_fusion, method="vanilla", distill=True)
    with pytest.raises(DataError):
        distill(fused, pair, torch.zeros(4, 3), FAST, progress=False)


def test_a_distillation_that_keeps_epoch_0_says_so(pair, digits_fusion, caplog):
    """The student already is the (single) teacher: no epoch comes closer, the model comes back
    unchanged, and a warning says that distillation did nothing and what would help."""
    caplog.set_level("INFO", logger="neurofuse")
    student, hist = distill(pair[0], pair[:1], digits_fusion[0], FAST, progress=False)
    assert hist["best_epoch"] == 0
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), pair[0].state_dict().values()))
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "unchanged" in r.getMessage()]
    assert len(warned) == 1 and "held-out" in warned[0].getMessage()
