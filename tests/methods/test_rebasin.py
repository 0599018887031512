"""Git Re-Basin (activation matching) with importance-weighted averaging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

import neurofuse
from neurofuse._fusion_set import as_fusion_set
from neurofuse.data import balanced_subset
from neurofuse.errors import ConfigError, IncompatibleModelsError
from neurofuse.importance import neuron_importance
from neurofuse.methods import GitRebasin, get_method
from neurofuse.models import MLP
from neurofuse.training import TrainConfig, predict_logits, train_model




@pytest.fixture(scope="module")
def fs(digits):
    idx = balanced_subset(digits.y_train.numpy(), np.arange(len(digits.y_train)), 300, seed=2)
    return digits.x_train[idx], digits.y_train[idx]


@pytest.fixture(scope="module")
def pair(digits):
    out = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        m = MLP(digits.input_shape, 10, [20, 16])
        train_model(m, digits.x_train, digits.y_train, config=TrainConfig(epochs=5, lr=3e-3, seed=seed))
        out.append(m.eval())
    return out


def _acts(model, x, level, post):
    with torch.no_grad():
        z = model.forward_until(x, level)
    z = torch.relu(z) if post else z
    return z.double().numpy()


def test_registered_and_options():
    assert "git-rebasin" in neurofuse.methods() and get_method("git-rebasin") is GitRebasin
    gr = GitRebasin()
    assert gr.options.activations == "post" and gr.options.metric == "distance"  # the paper's
    with pytest.raises(ConfigError):
        GitRebasin(metric="cosine")
    with pytest.raises(ConfigError):
        GitRebasin(activations="both")
    with pytest.raises(ConfigError):
        GitRebasin(width=0.5)


def test_two_models_of_equal_widths_only(pair, fs, digits):
    a, b = pair
    with pytest.raises(IncompatibleModelsError, match="otfusion"):
        neurofuse.fuse([a, b, a], fs, method="git-rebasin", progress=False)
    with pytest.raises(IncompatibleModelsError, match="exactly 2"):
        neurofuse.fuse([a], fs, method="git-rebasin", progress=False)
    wide = MLP(digits.input_shape, 10, [24, 16])
    with pytest.raises(IncompatibleModelsError, match="equal widths.*(otfusion|kf-linear)"):
        neurofuse.fuse([a, wide], fs, method="git-rebasin", progress=False)


@pytest.mark.parametrize("post", [True, False])
def test_matching_is_the_hungarian_solution(pair, fs, post):
    a, b = pair
    gr = GitRebasin(activations="post" if post else "pre", progress=False)
    perms = gr.run([a, b], fs).extras["permutations"]
    for lvl in range(2):
        cost = cdist(_acts(a, fs[0], lvl, post).T, _acts(b, fs[0], lvl, post).T)
        rows, cols = linear_sum_assignment(cost)
        got = cost[np.arange(cost.shape[0]), perms[lvl]].sum()
        assert got == pytest.approx(cost[rows, cols].sum(), rel=1e-9, abs=1e-9)  # optimal
        assert sorted(perms[lvl]) == list(range(cost.shape[0]))
    assert perms[2] is None  # output level: identity


def test_neurons_dead_on_the_fusion_set_are_matched_by_their_pre_activations(pair, fs, digits):
    """Neurons inactive on every fusion sample have identical (zero) post-activations; the
    pre-activation tie-break still pairs them correctly, so the permuted copy is recovered on
    inputs where they are active."""
    model = pair[0].clone()
    lin = model.levels[0][1]
    with torch.no_grad():
        z = model.forward_until(fs[0], 0)
        for j in (3, 5, 11):  # dead on the fusion set, alive on some test digits
            lin.bias[j] -= z[:, j].max() + 0.05
        zt = model.forward_until(digits.x_test, 0)
    assert (zt[:, [3, 5, 11]] > 0).any(0).sum() >= 2
    twin = model.clone()
    p = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        twin.levels[0][1].weight.copy_(lin.weight[p])
        twin.levels[0][1].bias.copy_(lin.bias[p])
        twin.levels[1][1].weight.copy_(model.levels[1][1].weight[:, p])
    fused = neurofuse.fuse([model, twin], fs, method="git-rebasin", progress=False)
    diff = (predict_logits(fused, digits.x_test) - predict_logits(model, digits.x_test)).abs().max()
    assert float(diff) < 1e-4


def test_correlation_matching(pair, fs):
    a, b = pair
    gr = GitRebasin(metric="correlation", progress=False)
    perms = gr.run([a, b], fs).extras["permutations"]
    za, zb = _acts(a, fs[0], 0, True), _acts(b, fs[0], 0, True)
    with np.errstate(invalid="ignore", divide="ignore"):  # dead neurons have no correlation
        corr = np.nan_to_num(np.corrcoef(za.T, zb.T)[: za.shape[1], za.shape[1]:])
    rows, cols = linear_sum_assignment(-corr)
    best = corr[rows, cols].sum()
    got = corr[np.arange(za.shape[1]), perms[0]].sum()
    assert got == pytest.approx(best, abs=1e-9)  # optimal (ties between dead neurons may differ)


def test_importance_weighted_average(pair, fs):
    """W = diag(s0/(s0+s1')) W0 + diag(s1'/(s0+s1')) W1_aligned, s1' the permuted scores."""
    a, b = pair
    gr = GitRebasin(importance="conductance", progress=False)
    res = gr.run([a, b], fs)
    fused, perms = res.model, res.extras["permutations"]
    data = as_fusion_set(fs)
    p0, p1 = perms[0], perms[1]
    s0 = neuron_importance(a, 0, data, "conductance").numpy()
    s1 = neuron_importance(b, 0, data, "conductance").numpy()[p0]
    assert not np.allclose(s0 / (s0 + s1), 0.5, atol=0.02)  # the weights are not trivial
    w0, b0 = a.levels[0][1].weight.detach().double().numpy(), a.levels[0][1].bias.detach().double().numpy()
    w1, b1 = b.levels[0][1].weight.detach().double().numpy()[p0], b.levels[0][1].bias.detach().double().numpy()[p0]
    lam = s1 / (s0 + s1)
    assert np.allclose(fused.levels[0][1].weight.detach().numpy(),
                       (1 - lam)[:, None] * w0 + lam[:, None] * w1, atol=1e-6)
    assert np.allclose(fused.levels[0][1].bias.detach().numpy(), (1 - lam) * b0 + lam * b1, atol=1e-6)
    # level 1: rows weighted by level-1 scores, columns permuted by level 0's matching
    t0 = neuron_importance(a, 1, data, "conductance").numpy()
    t1 = neuron_importance(b, 1, data, "conductance").numpy()[p1]
    mu = t1 / (t0 + t1)
    v0 = a.levels[1][1].weight.detach().double().numpy()
    v1 = b.levels[1][1].weight.detach().double().numpy()[p1][:, p0]
    assert np.allclose(fused.levels[1][1].weight.detach().numpy(),
                       (1 - mu)[:, None] * v0 + mu[:, None] * v1, atol=1e-6)
    # output level: rows (classes) weighted by the output neurons' scores, inputs permuted
    h0 = a.levels[2][1].weight.detach().double().numpy()
    h1 = b.levels[2][1].weight.detach().double().numpy()[:, p1]
    u0 = neuron_importance(a, 2, data, "conductance").numpy()
    u1 = neuron_importance(b, 2, data, "conductance").numpy()
    nu = u1 / (u0 + u1)
    assert np.allclose(fused.levels[2][1].weight.detach().numpy(),
                       (1 - nu)[:, None] * h0 + nu[:, None] * h1, atol=1e-6)
    # with output_weights="mean": the plain mean
    plain = GitRebasin(importance="conductance", progress=False, output_weights="mean").fuse([a, b], fs)
    assert np.allclose(plain.levels[2][1].weight.detach().numpy(), (h0 + h1) / 2, atol=1e-6)


def test_output_is_logits(pair, fs, digits):
    fused = neurofuse.fuse(pair, fs, method="git-rebasin", progress=False)
    out = predict_logits(fused, digits.x_test)
    assert out.shape == (len(digits.x_test), 10) and torch.isfinite(out).all()
    assert isinstance(fused, MLP) and fused.hidden == [20, 16]
