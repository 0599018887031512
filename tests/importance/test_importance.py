"""Neuron importance: shapes, positivity, and that attribution follows the labels."""

import pytest
import torch

from neurofuse import FusionSet
from neurofuse.errors import ConfigError, DataError
from neurofuse.importance import importance_methods, neuron_importance


def test_registry_lists_the_three_scores():
    assert {"uniform", "conductance", "deeplift"} <= set(importance_methods())


@pytest.mark.parametrize("method", ["uniform", "conductance", "deeplift"])
@pytest.mark.parametrize("arch", ["trained_mlp", "trained_vgg"])
def test_scores_have_one_positive_entry_per_neuron(method, arch, request, digits_fusion):
    model = request.getfixturevalue(arch)
    fs = FusionSet(digits_fusion[0][:60], digits_fusion[1][:60], batch_size=25)
    for level in range(model.num_levels - 1):
        s = neuron_importance(model, level, fs, method)
        assert s.shape == (model.level_widths()[level],)
        assert (s > 0).all()


def test_a_dead_neuron_gets_the_lowest_conductance(trained_mlp, digits_fusion):
    m = trained_mlp.clone()
    with torch.no_grad():
        m.levels[1][1].weight[:, 3] = 0.0  # neuron 3 of level 0 no longer reaches the output
    fs = FusionSet(*digits_fusion)
    s = neuron_importance(m, 0, fs, "conductance")
    assert int(s.argmin()) == 3


def test_attribution_needs_labels_and_known_names(trained_mlp, digits_fusion):
    with pytest.raises(DataError, match="needs labels"):
        neuron_importance(trained_mlp, 0, FusionSet(digits_fusion[0]), "deeplift")
    with pytest.raises(ConfigError, match="unknown importance"):
        neuron_importance(trained_mlp, 0, FusionSet(*digits_fusion), "shapley")


# -- all levels at once, against captum's per-layer attributions ------------------------------

from captum.attr import LayerConductance, LayerDeepLift  # noqa: E402
from torch import nn  # noqa: E402

from neurofuse.importance import EPS, all_level_importance, importance_sums, register_importance  # noqa: E402
from neurofuse.importance._attribution import conductance_batch  # noqa: E402
from neurofuse.levels import LeveledNet  # noqa: E402
from neurofuse.models import ResNet, ViT  # noqa: E402


def _captum_scores(model, fs, method):
    """The oracle: one captum run per level, reduced as the library reduces (s_j, float64)."""
    out = []
    for level, axis in enumerate(model.axes):
        layer = model.levels[level]
        algo = LayerConductance(model, layer) if method == "conductance" else LayerDeepLift(model, layer)
        total, n = 0.0, 0
        for xb, yb in fs.batches():
            xb = xb.clone().requires_grad_(True)
            kw = {"n_steps": 10} if method == "conductance" else {}
            a = algo.attribute(xb, target=yb, **kw).detach().abs()
            a = a.sum(dim=(2, 3)) if axis == "conv" else a.sum(dim=1) if axis == "token" else a
            total = total + a.double().sum(0)
            n += xb.shape[0]
        out.append(total / n + EPS)
    return out


def _assert_matches_captum(model, fs, method):
    got = all_level_importance(model, fs, method)
    want = _captum_scores(model, fs, method)
    assert len(got) == model.num_levels
    for level, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float64 and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-12, msg=lambda m: f"level {level}: {m}")


def _small(digits_fusion, n=60, batch_size=25, dtype=torch.float32):
    # 60 = 25 + 25 + 10: the last batch is smaller
    return FusionSet(digits_fusion[0][:n].to(dtype), digits_fusion[1][:n], batch_size=batch_size)


@pytest.mark.parametrize("method", ["conductance", "deeplift"])
@pytest.mark.parametrize("arch", ["trained_mlp", "trained_vgg"])
def test_all_levels_match_captum_per_layer_on_trained_models(method, arch, request, digits_fusion):
    _assert_matches_captum(request.getfixturevalue(arch), _small(digits_fusion), method)


@pytest.mark.parametrize("method", ["conductance", "deeplift"])
@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_all_levels_match_captum_per_layer_on_resnet_and_vit(method, arch, digits, digits_fusion):
    torch.manual_seed(0)
    cls = ResNet if arch == "resnet" else ViT
    model = cls.preset("tiny", digits.input_shape, 10).eval()
    _assert_matches_captum(model, _small(digits_fusion, 40, 16), method)


def _rules_net():
    """Every module type with a DeepLIFT rule, a max-pool right on a pre-activation included."""
    levels = [nn.Conv2d(1, 6, 3, padding=1),
              nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(6, 6, 3, padding=1)),
              nn.Sequential(nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1)),
              nn.Sequential(nn.ELU(), nn.MaxPool2d(2), nn.Flatten(1), nn.Linear(24, 16)),
              nn.Sequential(nn.Sigmoid(), nn.Linear(16, 16)),
              nn.Sequential(nn.LeakyReLU(0.1), nn.Linear(16, 16)),
              nn.Sequential(nn.Softplus(), nn.Linear(16, 16)),
              nn.Sequential(nn.Softmax(dim=1), nn.Linear(16, 10))]
    return LeveledNet(levels, ["conv"] * 3 + ["dense"] * 5, (1, 8, 8), 10)


def _post_activation_net():
    """Levels that end in a ReLU, or are one: DeepLIFT falls back to captum per level."""
    levels = [nn.Sequential(nn.Flatten(1), nn.Linear(64, 20), nn.ReLU()),
              nn.Sequential(nn.ReLU(), nn.Linear(20, 20), nn.Tanh()),
              nn.ReLU(),
              nn.Sequential(nn.Sigmoid(), nn.Linear(20, 10))]
    return LeveledNet(levels, ["dense"] * 4, (1, 8, 8), 10)


@pytest.mark.parametrize("method", ["conductance", "deeplift"])
@pytest.mark.parametrize("make", [_rules_net, _post_activation_net])
def test_every_rescale_rule_and_the_fallback_match_captum(method, make, digits_fusion):
    torch.manual_seed(0)
    model = make().double().eval()
    _assert_matches_captum(model, _small(digits_fusion, 40, 16, torch.float64), method)


@pytest.mark.parametrize("method,rows_per_sample", [("conductance", 11), ("deeplift", 2)])
@pytest.mark.parametrize("arch", ["trained_mlp", "trained_vgg"])
def test_all_levels_cost_one_integration(method, rows_per_sample, arch, request, digits_fusion):
    """Conductance for every level: n_steps + 1 = 11 <= n_steps + 2 passes over the fusion set;
    DeepLIFT: one pass over inputs and baselines."""
    model = request.getfixturevalue(arch)
    fs = _small(digits_fusion)
    rows = []
    handle = model.levels[0].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    try:
        scores = all_level_importance(model, fs, method)
    finally:
        handle.remove()
    assert len(scores) == model.num_levels
    assert sum(rows) == rows_per_sample * len(fs) <= (10 + 2) * len(fs)
    assert len(rows) == len(range(0, len(fs), fs.batch_size))  # one forward per batch


def test_sums_are_additive_and_give_the_scores(trained_vgg, digits_fusion):
    fs = _small(digits_fusion)
    sums, n = importance_sums(trained_vgg, fs, "conductance")
    assert n == len(fs)
    first, n1 = importance_sums(trained_vgg, FusionSet(fs.x[:25], fs.y[:25], batch_size=25), "conductance")
    rest, n2 = importance_sums(trained_vgg, FusionSet(fs.x[25:], fs.y[25:], batch_size=25), "conductance")
    assert n1 + n2 == n
    scores = all_level_importance(trained_vgg, fs, "conductance")
    for s, a, b, sc in zip(sums, first, rest, scores):
        assert s.dtype == torch.float64
        torch.testing.assert_close(a + b, s, rtol=1e-12, atol=0)
        torch.testing.assert_close(s / n + EPS, sc, rtol=0, atol=0)
    uni, n_u = importance_sums(trained_vgg, FusionSet(fs.x), "uniform")
    assert n_u == len(fs) and all(torch.equal(u, torch.full_like(u, float(n_u))) for u in uni)


def test_levels_argument_and_neuron_importance_agree(trained_mlp, digits_fusion):
    fs = _small(digits_fusion)
    every = all_level_importance(trained_mlp, fs, "deeplift")
    some = all_level_importance(trained_mlp, fs, "deeplift", levels=[-1, 0, 0])
    assert [tuple(s.shape) for s in some] == [(10,), (32,), (32,)]
    torch.testing.assert_close(some[0], every[-1], rtol=0, atol=0)
    torch.testing.assert_close(some[1], every[0], rtol=0, atol=0)
    torch.testing.assert_close(neuron_importance(trained_mlp, 1, fs, "deeplift"), every[1], rtol=0, atol=0)
    with pytest.raises(IndexError):
        all_level_importance(trained_mlp, fs, "deeplift", levels=[3])


def test_integration_points_may_run_in_smaller_batches(trained_vgg, digits_fusion):
    model = trained_vgg.clone().double()
    x, y = digits_fusion[0][:20].double(), digits_fusion[1][:20]
    mods = list(model.levels)
    ref = conductance_batch(model, mods, x, y)
    for per_pass in (1, 3):
        for a, r in zip(conductance_batch(model, mods, x, y, alphas_per_pass=per_pass), ref):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_a_registered_score_serves_every_level(trained_mlp, digits_fusion):
    @register_importance("test-level-index")
    def _by_index(model, levels, fs, device):
        widths = model.level_widths()
        return [torch.full((widths[lvl],), float(lvl * len(fs))) for lvl in levels], len(fs)

    fs = FusionSet(digits_fusion[0][:30])
    assert "test-level-index" in importance_methods()
    s = all_level_importance(trained_mlp, fs, "test-level-index")
    assert [float(t[0]) for t in s] == [EPS, 1 + EPS, 2 + EPS]
    assert float(neuron_importance(trained_mlp, 2, fs, "test-level-index")[0]) == 2 + EPS
    with pytest.raises(DataError, match="needs labels"):
        all_level_importance(trained_mlp, fs, "conductance")
