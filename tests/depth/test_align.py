"""Cross-layer alignment: the DP against brute force, CKA invariances, level costs, errors."""

import itertools

import numpy as np
import pytest
import torch

from neurofuse.depth import (
    align_levels,
    align_models,
    alignment_cost,
    alignment_report,
    cka_dissimilarity,
    level_cost_matrix,
    linear_cka,
    plot_cost_matrix,
)
from neurofuse._fusion_set import as_fusion_set
from neurofuse.errors import ConfigError, IncompatibleModelsError
from neurofuse.models import MLP, VGG
from neurofuse.testing import permute_hidden


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)


# ---- the dynamic programme -------------------------------------------------------------------

def _brute_force(cost, insertable=None):
    """Every strictly increasing map, first->first, last->last, with the insertion rule."""
    m, n = cost.shape
    best, best_a = np.inf, None
    if m == 1:
        return (cost[0, 0], [0]) if n == 1 else (np.inf, None)
    for mid in itertools.combinations(range(1, n - 1), m - 2):
        a = [0, *mid, n - 1]
        if insertable is not None and any(
                not insertable[i, k] for i in range(m - 1) for k in range(a[i] + 1, a[i + 1])):
            continue
        c = sum(cost[i, j] for i, j in enumerate(a))
        if c < best:
            best, best_a = c, a
    return best, best_a


@pytest.mark.parametrize("seed", range(40))
def test_dp_alignment_equals_brute_force_on_random_costs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    m = int(rng.integers(1, n + 1))
    cost = rng.random((m, n))
    best, best_a = _brute_force(cost)
    if best_a is None:
        with pytest.raises(IncompatibleModelsError):
            align_levels(cost)
        return
    a = align_levels(cost)
    assert a == best_a
    assert alignment_cost(cost, a) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(40))
def test_dp_alignment_with_forbidden_pairs_and_insertions_equals_brute_force(seed):
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(2, 8))
    m = int(rng.integers(2, n + 1))
    cost = rng.random((m, n))
    cost[rng.random((m, n)) < 0.2] = np.inf
    insertable = rng.random((m, n)) < 0.7
    best, best_a = _brute_force(cost, insertable)
    if not np.isfinite(best):
        with pytest.raises(IncompatibleModelsError):
            align_levels(cost, insertable)
        return
    a = align_levels(cost, insertable)
    assert a == best_a
    assert alignment_cost(cost, a) == pytest.approx(best)


def test_dp_alignment_shapes_and_edge_cases():
    assert align_levels(np.zeros((4, 4))) == [0, 1, 2, 3]
    assert align_levels([[0.3]]) == [0]
    # a cheap diagonal away from the default: picks it
    cost = np.ones((3, 6))
    cost[0, 0] = cost[1, 3] = cost[2, 5] = 0
    assert align_levels(cost) == [0, 3, 5]
    with pytest.raises(IncompatibleModelsError):
        align_levels(np.zeros((3, 2)))
    with pytest.raises(IncompatibleModelsError):
        align_levels(np.zeros((1, 3)))


# ---- CKA --------------------------------------------------------------------------------------

def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka_dissimilarity(x, x) == pytest.approx(0.0, abs=1e-12)
    assert cka_dissimilarity(x, x, "euclidean") == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("metric", ["cka", "euclidean"])
def test_level_dissimilarity_is_invariant_to_permutation_and_isotropic_scaling(metric):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 12, generator=g).double()
    y = x @ torch.randn(12, 20, generator=g).double() + 0.3 * torch.randn(60, 20, generator=g).double()
    base = cka_dissimilarity(x, y, metric)
    assert 0.01 < base < 1.0
    perm = torch.randperm(20, generator=g)
    assert cka_dissimilarity(x, y[:, perm], metric) == pytest.approx(base, abs=1e-10)
    assert cka_dissimilarity(x, 7.5 * y, metric) == pytest.approx(base, abs=1e-10)
    assert cka_dissimilarity(0.01 * x[:, torch.randperm(12, generator=g)], y, metric) == \
        pytest.approx(base, abs=1e-10)
    # but not to a non-isotropic scaling of the neurons
    scale = torch.linspace(0.1, 5.0, 20)
    assert abs(cka_dissimilarity(x, y * scale, metric) - base) > 1e-3


def test_linear_cka_matches_the_feature_space_formula():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 5, generator=g).double(), torch.randn(40, 9, generator=g).double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    ref = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(ref), rel=1e-10)
    assert 0.0 < linear_cka(x, y) < 0.5  # independent noise is dissimilar


@pytest.mark.parametrize("metric", ["cka", "euclidean"])
def test_level_cost_of_a_model_with_its_permuted_copy_has_a_zero_diagonal(metric, digits_fusion):
    torch.manual_seed(0)
    vgg = VGG((1, 8, 8), 10, layout=[4, "M", 8, "M", 8, 8])
    twin = permute_hidden(vgg, seed=3)
    fs = as_fusion_set(digits_fusion, batch_size=64)
    cost = level_cost_matrix(vgg, twin, fs, metric=metric, max_samples=150)
    assert cost.shape == (5, 5)
    assert np.allclose(np.diag(cost), 0.0, atol=1e-6)
    off = cost[~np.eye(5, dtype=bool)]
    assert off.min() > 1e-3
    assert np.allclose(cost, cost.T, atol=1e-6)


def test_levels_of_different_widths_and_spatial_sizes_are_comparable(digits_fusion):
    torch.manual_seed(0)
    a = VGG((1, 8, 8), 10, layout=[4, "M", 8, "M", 8])
    b = VGG((1, 8, 8), 10, layout=[6, 12, "M", 16, "M", 16, 16])
    cost = level_cost_matrix(a, b, digits_fusion, max_samples=100)  # an (x, y) pair works too
    assert cost.shape == (4, 6)
    assert np.isfinite(cost).all() and (cost >= 0).all() and (cost <= 1).all()


# ---- align_models on untrained models: geometry, errors, reports ------------------------------

@pytest.mark.parametrize("balance", ["add", "merge"])
@pytest.mark.parametrize("skewed", [False, True])
def test_alignment_respects_level_axes_and_spatial_sizes(balance, skewed, digits_fusion, monkeypatch):
    torch.manual_seed(0)
    shallow = VGG((1, 8, 8), 10, layout=[4, "M", 8, "M", 8, 8, "M", 8, 8])       # 8,4,2,2,1,1 + head
    deep = VGG((1, 8, 8), 10, layout=[4, "M", 8, "M", 8, 8, "M", 8, 8, 8, 8])    # 8,4,2,2,1,1,1,1 + head
    if skewed:  # a cost that, unconstrained, would align shallow levels two deep levels later
        import neurofuse.depth._align as mod

        skew = np.abs(np.arange(9)[:, None] - np.arange(7)[None, :] - 2).astype(float)  # [ref, model]
        monkeypatch.setattr(mod, "level_cost_matrix", lambda *a, **k: skew if balance == "add" else skew.T)
        unconstrained = align_levels(skew.T)
        assert unconstrained[1] == 3  # 4x4 level onto a 2x2 level: not fusable
    models = [shallow, deep]
    (ref, bal), info = align_models(models, digits_fusion, balance=balance, max_samples=100)
    ref_model = deep if balance == "add" else shallow
    assert ref is ref_model and info.order == [models.index(ref_model), 1 - models.index(ref_model)]
    assert bal.num_levels == ref.num_levels and bal.axes == ref.axes
    x = digits_fusion[0][:3]
    for k in range(ref.num_levels):  # every balanced level output has the reference's row shape
        assert bal.forward_until(x, k).shape[2:] == ref.forward_until(x, k).shape[2:]


def test_models_without_common_output_classes_are_refused(digits_fusion):
    a, b = MLP((1, 8, 8), 10, [8]), MLP((1, 8, 8), 5, [8, 8])
    with pytest.raises(IncompatibleModelsError, match="output classes") as e:
        align_models([a, b], digits_fusion)
    _one_line(e)
    with pytest.raises(IncompatibleModelsError, match="inputs of shape") as e:
        align_models([a, MLP((1, 4, 16), 10, [8])], digits_fusion)
    _one_line(e)
    with pytest.raises(IncompatibleModelsError, match="not a neurofuse LeveledNet") as e:
        align_models([a, torch.nn.Linear(64, 10)], digits_fusion)
    _one_line(e)


def test_bad_settings_are_refused_with_one_line(digits_fusion):
    a, b = MLP((1, 8, 8), 10, [8]), MLP((1, 8, 8), 10, [8, 8])
    for kwargs, match in [({"metric": "cca"}, "unknown level metric"),
                          ({"balance": "stack"}, "unknown balance"),
                          ({"reference": 5}, "out of range"),
                          ({"reference": 0, "balance": "add"}, "balance='add' only inserts"),
                          ({"reference": 1, "balance": "merge"}, "balance='merge' only merges")]:
        with pytest.raises(ConfigError, match=match) as e:
            align_models([a, b], digits_fusion, **kwargs)
        _one_line(e)


def test_report_and_cost_plot(tmp_path, digits_fusion):
    torch.manual_seed(0)
    a, b = MLP((1, 8, 8), 10, [8]), MLP((1, 8, 8), 10, [8, 8, 8])
    _, info = align_models([a, b], digits_fusion, balance="merge", max_samples=80)
    p = info.pairs[0]
    assert p.shallower == "reference" and p.alignment[0] == 0 and p.alignment[-1] == 3
    assert p.groups[-1][-1] == 3 and sum(len(g) for g in p.groups) == 4
    text = alignment_report(info)
    assert "balance=merge" in text and "model 1 (4 levels)" in text
    assert info.to_dict()["pairs"][0]["alignment"] == p.alignment
    out = plot_cost_matrix(p.cost, p.alignment, tmp_path / "cost.png", title="mlp")
    assert out.exists() and out.stat().st_size > 1000
