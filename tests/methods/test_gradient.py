"""kf-gradient: permutation recovery, cluster order, initialisation, early stopping, settings,
and accuracy against vanilla averaging on a 4-way Dirichlet split of digits."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurofuse
from neurofuse.approximation._gradient import fit_level, perturb_level, random_like
from neurofuse.data import partition
from neurofuse.errors import ConfigError
from neurofuse.methods import GRADIENT_PRESETS, GradientOptions, LevelConfig, get_method
from neurofuse.models import MLP, ResNet, ViT, make_model
from neurofuse.testing import permute_hidden
from neurofuse.training import TrainConfig, evaluate, train_model


def _logit_gap(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """max |a(x) - b(x)| relative to max |b(x)|."""
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max() / yb.abs().max())


def _agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).double().mean())


def _first_linear(level: nn.Module) -> nn.Module:
    return [m for m in level.modules() if isinstance(m, nn.Linear)][-1]


# ------------------------------------------------------------------------------------------------
# a model fused with a permuted copy of itself
# ------------------------------------------------------------------------------------------------
def test_permuted_copy_with_warm_start_gives_back_the_model(trained_mlp, digits, digits_fusion):
    """Default settings (warm start from model 0, K-means seeded from model 0's neurons).

    Each neuron and its permuted twin produce identical outputs, so K-means puts every pair in
    one cluster whose centre is the neuron itself, the clusters are ordered like model 0's
    neurons, and the warm-started level already has zero loss (zero gradient): the fused model
    must equal model 0 up to float rounding, so the tolerance is 1e-4 relative.  A wrong cluster
    order or a wrong centre would leave a loss of the size of the activations (order 1).
    """
    twin = permute_hidden(trained_mlp, seed=3)
    fused = neurofuse.fuse([trained_mlp, twin], digits_fusion, method="kf-gradient", progress=False)
    assert _logit_gap(fused, trained_mlp, digits.x_test) < 1e-4


def test_permuted_copy_from_a_random_start_learns_the_same_function(trained_mlp, digits, digits_fusion):
    """From fresh random levels (perturbation 1) and k-means++ seeding nothing is copied.

    The fused model must learn the function from the targets alone.  The MLP's levels are affine
    in their inputs, so the targets are reachable exactly; what limits the match is 200 Adam
    epochs on 360 samples and generalisation to the test split.  Tolerance: the predicted class
    agrees on >= 95% of the test digits and the logits differ by < 15% of their range (a fit that
    failed, or targets built from wrongly grouped neurons, gives ~10-50% agreement).
    """
    twin = permute_hidden(trained_mlp, seed=4)
    fused = neurofuse.fuse([trained_mlp, twin], digits_fusion, method="kf-gradient", progress=False,
                           kmeans_init="kmeans++",
                           levels={"perturbation": 1.0, "epochs": 200, "patience": 20},
                           head={"perturbation": 1.0, "epochs": 200, "patience": 20})
    assert _agreement(fused, trained_mlp, digits.x_test) >= 0.95
    assert _logit_gap(fused, trained_mlp, digits.x_test) < 0.15


def test_clusters_are_ordered_like_the_init_model(trained_mlp, digits_fusion):
    """paper-notes §15: K-means seeded from one model and weights from another are misaligned.

    Whatever the seeding (model neurons, or k-means++ whose cluster order is arbitrary), the
    targets must be ordered like the init model's neurons: with a warm start and no perturbation
    the fused level then keeps that model's weights exactly.
    """
    twin = permute_hidden(trained_mlp, seed=5)
    for init_model, kmeans_init in [(1, "model"), (0, "kmeans++"), (1, "kmeans++")]:
        ref = [trained_mlp, twin][init_model]
        fused = neurofuse.fuse([trained_mlp, twin], digits_fusion, method="kf-gradient",
                               progress=False, init_model=init_model, kmeans_init=kmeans_init)
        for lf, lr in zip(fused.levels, ref.levels):
            torch.testing.assert_close(_first_linear(lf).weight, _first_linear(lr).weight,
                                       atol=1e-5, rtol=1e-4)


def test_fusion_is_deterministic_for_a_seed(trained_mlp, digits_fusion):
    twin = permute_hidden(trained_mlp, seed=6)
    kw = dict(method="kf-gradient", progress=False, seed=3, kmeans_init="kmeans++",
              levels={"perturbation": 0.5, "epochs": 3}, head={"epochs": 3})
    a = neurofuse.fuse([trained_mlp, twin], digits_fusion, **kw)
    b = neurofuse.fuse([trained_mlp, twin], digits_fusion, **kw)
    c = neurofuse.fuse([trained_mlp, twin], digits_fusion, **{**kw, "seed": 4})
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


# ------------------------------------------------------------------------------------------------
# initialisation: every parameter, nested modules included
# ------------------------------------------------------------------------------------------------
class _Raw(nn.Module):
    """A module with a raw parameter and no reset_parameters (the fallback initialiser)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))

    def forward(self, x):
        return self.inner(x * self.scale)


def _levels_to_check():
    torch.manual_seed(0)
    vit = ViT((1, 8, 8), 10, hidden=16, depth=2, heads=2, mlp_hidden=16)
    res = ResNet((1, 8, 8), 10, depth=20, width_multiplier=0.25)
    return {"vit level 0 (embedding + block)": vit.levels[0], "resnet block": res.levels[4],
            "nested raw parameter": nn.Sequential(nn.Sequential(_Raw()), nn.Linear(4, 2))}


@pytest.mark.parametrize("name", list(_levels_to_check()))
def test_perturbation_touches_every_parameter_including_nested_ones(name):
    base = _levels_to_check()[name]
    with torch.no_grad():  # a "trained" base: no parameter at its initial value
        for p in base.parameters():
            p.copy_(torch.randn_like(p))
    names = [n for n, _ in base.named_parameters()]
    assert any(n.count(".") >= 2 for n in names), "the level must have nested parameters"
    rand = random_like(base, seed=11)
    for eps in (0.0, 0.3, 1.0):
        level = copy.deepcopy(base)
        how = perturb_level(level, base, eps, seed=11)
        assert how == {0.0: "base", 0.3: "perturbed", 1.0: "random"}[eps]
        got = dict(level.named_parameters())
        for n, pb in base.named_parameters():
            pr = dict(rand.named_parameters())[n]
            torch.testing.assert_close(got[n], (1 - eps) * pb + eps * pr, msg=f"{n} at eps={eps}")
            if eps > 0:
                assert not torch.equal(got[n], pb), f"{n} was not perturbed at eps={eps}"
    # random_like re-initialises every parameter, deterministically in the seed
    again = random_like(base, seed=11)
    for (n, p), (_, q) in zip(rand.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n
        assert not torch.equal(p, dict(base.named_parameters())[n]), f"{n} not re-initialised"


def test_perturbation_of_a_level_of_another_width_is_a_random_level():
    base, level = nn.Linear(4, 8), nn.Linear(4, 6)
    assert perturb_level(level, base, 0.0, seed=0).startswith("random")
    torch.testing.assert_close(level.weight, random_like(nn.Linear(4, 6), seed=0).weight)


# ------------------------------------------------------------------------------------------------
# training loop: early stopping restores the best weights
# ------------------------------------------------------------------------------------------------
def test_early_stopping_restores_the_best_weights():
    """Pure-noise targets: the validation loss is lowest early and rises as the level overfits.

    Without restoring, the level would keep the last epoch's weights, whose validation loss is
    higher than the best one.
    """
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(60, 8, generator=gen), torch.randn(60, 4, generator=gen)
    torch.manual_seed(0)
    level = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 4))
    cfg = LevelConfig(lr=1e-2, epochs=60, batch_size=8, patience=1000, val_fraction=0.5)
    hist = fit_level(level, x, t, cfg, seed=1)
    val = hist["val_index"]
    with torch.no_grad():
        kept = float(F.mse_loss(level(x[val]), t[val]))
    assert hist["epochs"] == 60 and not hist["stopped_early"]
    assert hist["val_loss"][-1] > min(hist["val_loss"]) + 1e-3, "the fit should overfit the noise"
    assert kept == pytest.approx(min(hist["val_loss"]), rel=1e-5)
    assert kept == pytest.approx(hist["best_val_loss"], rel=1e-5)
    assert hist["val_loss"][hist["best_epoch"]] == hist["best_val_loss"]
    # with a small patience it stops soon after the best epoch
    level2 = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 4))
    h2 = fit_level(level2, x, t, cfg.replace(patience=3), seed=1)
    assert h2["stopped_early"] and h2["epochs"] == h2["best_epoch"] + 3 < 60


def test_fit_level_re_estimates_batchnorm_statistics():
    torch.manual_seed(0)
    level = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    x = torch.randn(80, 5) * 3 + 1
    t = torch.randn(80, 6)
    fit_level(level, x, t, LevelConfig(epochs=3))
    with torch.no_grad():
        z = level[0](x)
    torch.testing.assert_close(level[1].running_mean, z.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(level[1].running_var, z.var(0), atol=1e-4, rtol=1e-3)
    assert not level.training


def test_diverging_fit_is_a_one_line_error():
    x, t = torch.randn(40, 3), torch.randn(40, 2) * 1e30
    with pytest.raises(ConfigError) as err:
        fit_level(nn.Linear(3, 2), x, t, LevelConfig(optimizer="sgd", lr=1e10, epochs=5))
    assert "\n" not in str(err.value) and "lr" in str(err.value)


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, word", [
    (dict(levels={"lr": -1e-3}), "lr"),
    (dict(head={"lr": 0}), "lr"),
    (dict(levels={"optimizer": "rmsprop"}), "optimizer"),
    (dict(levels={"epochs": 0}), "epochs"),
    (dict(head={"epochs": 0.5}), "epochs"),
    (dict(levels={"batch_size": 0}), "batch_size"),
    (dict(levels={"perturbation": 1.5}), "perturbation"),
    (dict(levels={"patience": 0}), "patience"),
    (dict(levels={"val_fraction": 1.0}), "val_fraction"),
    (dict(levels={"weight_decay": -1}), "weight_decay"),
    (dict(levels={"learning_rate": 1e-3}), "unknown"),
    (dict(overrides={0: {"lr": -1}}), "lr"),
    (dict(overrides={"first": {"lr": 1}}), "overrides"),
    (dict(preset="setting3"), "preset"),
    (dict(kmeans_init="random"), "kmeans_init"),
    (dict(temperature=0), "temperature"),
    (dict(width=0), "width"),
    (dict(width=-0.5), "width"),
    (dict(nonsense=1), "unknown option"),
])
def test_bad_settings_are_one_line_config_errors(kwargs, word, trained_mlp, digits_fusion):
    with pytest.raises(ConfigError) as err:
        neurofuse.fuse([trained_mlp, trained_mlp], digits_fusion, method="kf-gradient",
                       progress=False, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and word in msg, msg


def test_init_model_out_of_range_is_an_error(trained_mlp, digits_fusion):
    with pytest.raises(ConfigError, match="init_model"):
        neurofuse.fuse([trained_mlp, trained_mlp], digits_fusion, method="kf-gradient",
                       progress=False, init_model=2)


def test_presets_follow_the_paper_table_5_and_merge_overrides():
    s1, s2 = GradientOptions(preset="setting1"), GradientOptions(preset="setting2")
    assert s1.levels == LevelConfig("adam", 1e-3, 1e-4, 100, 32, 1.0, 15, 0.1)
    assert s2.levels == LevelConfig("sgd", 1e-4, 1e-4, 50, 32, 0.1, 15, 0.1)
    for s in (s1, s2):
        assert (s.head.optimizer, s.head.lr, s.head.epochs) == ("adam", 1e-3, 100)
        assert s.head.batch_size == 32 and s.head.val_fraction == 0.1
    o = GradientOptions(preset="setting1", levels={"epochs": 5}, overrides={0: {"lr": 0.5}, -1: {"epochs": 7}})
    assert o.levels.epochs == 5 and o.levels.lr == 1e-3 and o.levels.optimizer == "adam"
    assert o.level_config(0, 4).lr == 0.5 and o.level_config(1, 4).lr == 1e-3
    assert o.level_config(3, 4).epochs == 7 and o.level_config(3, 4).lr == 1e-3
    assert o.level_config(2, 4) == o.levels
    assert set(GRADIENT_PRESETS) >= {"default", "setting1", "setting2"}
    assert GradientOptions(overrides={"-1": {"epochs": 3}}).level_config(2, 3).epochs == 3  # JSON keys


def test_preset_is_accepted_by_fuse(trained_mlp, digits_fusion):
    fused = neurofuse.fuse([trained_mlp, trained_mlp], digits_fusion, method="kf-gradient",
                           progress=False, preset="setting2", levels={"epochs": 2}, head={"epochs": 2})
    assert isinstance(fused, MLP)


def test_head_kd_fits_a_true_kl_divergence(trained_mlp, digits, digits_fusion):
    method = get_method("kf-gradient")(progress=False, head_kd=True, temperature=2.0)
    twin = permute_hidden(trained_mlp, seed=7)
    result = method.run([trained_mlp, twin], digits_fusion)
    fused = result.model
    # the teacher is the model itself: the KL is 0 at the warm start, so nothing moves
    assert _logit_gap(fused, trained_mlp, digits.x_test) < 1e-4
    assert result.report[-1]["head"] == "kd"
    loss = method._loss(True, torch.ones(10), "dense")
    z = torch.randn(6, 10)
    target = F.log_softmax(torch.randn(6, 10) / 2.0, dim=-1)
    p = target.exp()
    manual = 4.0 * (p * (target - F.log_softmax(z / 2.0, dim=-1))).sum(1).mean()
    torch.testing.assert_close(loss(z, target), manual)
    assert float(loss(target * 2.0, target)) == pytest.approx(0.0, abs=1e-6)


def test_weighted_loss_and_normalized_acts_run(dirichlet_mlps, digits, digits_fusion):
    models, _ = dirichlet_mlps
    fused = neurofuse.fuse(models[:2], digits_fusion, method="kf-gradient", progress=False,
                           weighted_loss=True, normalize_acts=True, levels={"epochs": 5},
                           head={"epochs": 5}, class_weights=np.full((2, 10), 0.5))
    assert evaluate(fused, digits.x_test, digits.y_test)["accuracy"] > 0.5


def test_progress_false_prints_nothing(trained_mlp, digits_fusion, capsys):
    neurofuse.fuse([trained_mlp], digits_fusion, method="kf-gradient", progress=False,
                   levels={"epochs": 1}, head={"epochs": 1})
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


# ------------------------------------------------------------------------------------------------
# accuracy: 4 models, Dirichlet split of digits
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirichlet_vggs(digits):
    """Four VGG11 (tiny preset, 1/8 width) trained on a 4-way Dirichlet split of digits."""
    y = digits.y_train.numpy()
    parts = partition(y, 4, "dirichlet", seed=0)
    models = []
    for i, part in enumerate(parts):
        torch.manual_seed(100 + i)
        m = make_model("vgg", "tiny", digits.input_shape, 10)
        train_model(m, digits.x_train[part], digits.y_train[part],
                    config=TrainConfig(epochs=30, lr=1e-2, warmup_epochs=1, batch_size=32, seed=i))
        models.append(m.eval())
    return models


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mlp", "vgg"])
def test_kf_gradient_beats_vanilla_by_20_points_on_a_dirichlet_split(arch, request, digits,
                                                                    digits_fusion):
    models = (request.getfixturevalue("dirichlet_mlps")[0] if arch == "mlp"
              else request.getfixturevalue("dirichlet_vggs"))
    x, y = digits.x_test, digits.y_test
    base = [evaluate(m, x, y)["accuracy"] for m in models]
    vanilla = evaluate(neurofuse.fuse(models, method="vanilla", progress=False), x, y)["accuracy"]
    t0 = time.perf_counter()
    fused = neurofuse.fuse(models, digits_fusion, method="kf-gradient", progress=False)
    seconds = time.perf_counter() - t0
    acc = evaluate(fused, x, y)["accuracy"]
    print(f"\n{arch}: base {np.round(base, 3).tolist()} vanilla {vanilla:.3f} "
          f"kf-gradient {acc:.3f} ({seconds:.1f} s)")
    assert acc >= vanilla + 0.20, (acc, vanilla)
