"""OTFusion: transport maps, target-marginal correction, progressive activations, residual streams."""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch
from scipy.spatial.distance import cdist
from torch import nn

import neurofuse
from neurofuse.data import balanced_subset
from neurofuse.errors import ConfigError, IncompatibleModelsError
from neurofuse.importance import neuron_importance
from neurofuse.levels import LeveledNet
from neurofuse.methods import OTFusion, get_method
from neurofuse.models import MLP
from neurofuse.training import TrainConfig, predict_logits, train_model

TOL = 1e-4


# -- a hand-made residual model: levels that add their input to their output ----------------
class AddInput(nn.Module):
    """``x + body(x)``: declares ``adds_input`` so alignment ties its output to its input."""

    adds_input = True

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.body(x)


class ResMLP(LeveledNet):
    def __init__(self, width: int = 24, blocks: int = 2) -> None:
        levels = ([nn.Sequential(nn.Flatten(1), nn.Linear(64, width))]
                  + [AddInput(width) for _ in range(blocks)]
                  + [nn.Sequential(nn.ReLU(), nn.Linear(width, 10))])
        super().__init__(levels, ["dense"] * len(levels), (1, 8, 8), 10)


def permute_resmlp(model: ResMLP, seed: int) -> ResMLP:
    """One permutation for the whole residual stream (every level but the output)."""
    out = model.clone()
    p = torch.randperm(out.levels[0][1].out_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        first = out.levels[0][1]
        first.weight.copy_(first.weight[p])
        first.bias.copy_(first.bias[p])
        for lvl in out.levels[1:-1]:
            lin = lvl.body[1]
            lin.weight.copy_(lin.weight[p][:, p])
            lin.bias.copy_(lin.bias[p])
        head = out.levels[-1][1]
        head.weight.copy_(head.weight[:, p])
    return out.eval()


def acts(model, x, level):
    with torch.no_grad():
        return model.forward_until(x, level).double().numpy()


def _train(model, data, seed, epochs=6):
    torch.manual_seed(seed)
    train_model(model, data.x_train, data.y_train, config=TrainConfig(epochs=epochs, lr=3e-3, seed=seed))
    return model.eval()




@pytest.fixture(scope="module")
def fs(digits):
    idx = balanced_subset(digits.y_train.numpy(), np.arange(len(digits.y_train)), 300, seed=1)
    return digits.x_train[idx], digits.y_train[idx]


@pytest.fixture(scope="module")
def mlps(digits):
    """Anchor (hidden 16, 12) and a wider model (hidden 24, 20): rectangular transports."""
    torch.manual_seed(0)
    a = _train(MLP(digits.input_shape, 10, [16, 12]), digits, 0)
    torch.manual_seed(1)
    b = _train(MLP(digits.input_shape, 10, [24, 20]), digits, 1)
    return a, b


@pytest.fixture(scope="module")
def resmlps(digits):
    out = []
    for seed in (4, 5):
        torch.manual_seed(seed)
        out.append(_train(ResMLP(), digits, seed, 4))
    return out


# -- registry, options, errors -----------------------------------------------------------------
def test_registered_with_options():
    assert "otfusion" in neurofuse.methods()
    assert get_method("otfusion") is OTFusion
    assert OTFusion.uses_importance and not OTFusion.supports_width
    with pytest.raises(ConfigError):
        OTFusion(solver="greedy")
    with pytest.raises(ConfigError):
        OTFusion(solver="sinkhorn", reg=0.0)
    with pytest.raises(ConfigError):
        OTFusion(ground_metric="cosine")
    with pytest.raises(ConfigError):
        OTFusion(max_iter=0)
    with pytest.raises(ConfigError):
        OTFusion(epsilon=1.0)
    with pytest.raises(ConfigError):
        OTFusion(width=16)


def test_rejects_levels_it_cannot_align(mlps, fs):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 10)
            self.gain = nn.Parameter(torch.ones(10, 3))

        def forward(self, x):
            return self.lin(torch.relu(x)) * self.gain[:, 0]

    a = mlps[0].clone()
    a.levels[-1] = Scaled()
    with pytest.raises(IncompatibleModelsError, match="parameters"):
        neurofuse.fuse([a, a.clone()], fs, method="otfusion", progress=False)
    with pytest.raises(IncompatibleModelsError):  # different depth
        neurofuse.fuse([mlps[0], MLP((1, 8, 8), 10, [16])], fs, method="otfusion", progress=False)


def test_single_model_is_returned_unchanged(mlps, fs, digits):
    fused = neurofuse.fuse([mlps[0]], fs, method="otfusion", progress=False)
    assert fused is not mlps[0]
    assert torch.equal(predict_logits(fused, digits.x_test), predict_logits(mlps[0], digits.x_test))


# -- transport maps and the target-marginal correction ------------------------------------------
def test_rectangular_plans_and_target_marginal_correction(mlps, fs):
    a, b = mlps
    result = OTFusion(progress=False).run([a, b], fs)
    fused = result.model
    assert fused.level_widths() == a.level_widths()  # the anchor's architecture and widths
    plans = result.extras["transports"][0]
    assert plans[0].shape == (24, 16) and plans[1].shape == (20, 12) and plans[2] is None
    for t, (n, m) in zip(plans[:2], [(24, 16), (20, 12)]):
        assert np.allclose(t.sum(1), 1 / n) and np.allclose(t.sum(0), 1 / m)  # uniform marginals
    # level 0 by hand: W = (W_anchor + diag(1/nu) T^T W_b) / 2 with the TARGET marginal nu
    t0 = plans[0]
    q = (t0 / t0.sum(0)[None, :]).T  # diag(1/nu) T^T
    wb = b.levels[0][1].weight.detach().double().numpy()
    expected = (a.levels[0][1].weight.detach().double().numpy() + q @ wb) / 2
    assert np.allclose(fused.levels[0][1].weight.detach().numpy(), expected, atol=1e-6)
    wrong = (a.levels[0][1].weight.detach().double().numpy() + (t0 / t0.sum(1)[:, None]).T @ wb) / 2
    assert not np.allclose(expected, wrong, atol=1e-3)  # 1/mu (the reference code) would differ
    # correspondences: identity for the anchor, the barycentric map for model 1
    assert len(result.correspondences) == 2
    c0 = result.correspondences[0]
    assert np.allclose(c0.block(0), np.eye(16)) and np.allclose(c0.block(1), q)
    assert np.allclose(c0.block(1).sum(1), 1)


def test_activations_of_the_aligned_model_are_recomputed(mlps, fs):
    """Level 1's plan is the exact OT between the anchor's pre-activations and those of model 1
    with level 0 already aligned and level 1's input written in the anchor's basis."""
    a, b = mlps
    t0, t1 = OTFusion(progress=False).run([a, b], fs).extras["transports"][0][:2]
    q0 = (t0 / t0.sum(0)[None, :]).T  # [16, 24]
    p0 = t0 / t0.sum(0)[None, :]  # [24, 16]
    x = fs[0].reshape(len(fs[0]), -1).double().numpy()
    l0, l1 = b.levels[0][1], b.levels[1][1]
    w0, b0 = l0.weight.detach().double().numpy(), l0.bias.detach().double().numpy()
    w1, b1 = l1.weight.detach().double().numpy(), l1.bias.detach().double().numpy()
    h = np.maximum(x @ (q0 @ w0).T + q0 @ b0, 0.0)  # aligned level 0, then ReLU
    z_b = h @ (w1 @ p0).T + b1  # level 1 fed with anchor-basis inputs
    z_a = acts(a, fs[0], 1)
    cost = cdist(z_b.T, z_a.T)
    ref = ot.emd(np.full(20, 1 / 20), np.full(12, 1 / 12), cost / cost.max())
    assert np.allclose(t1, ref, atol=1e-6)
    z_orig = acts(b, fs[0], 1)  # without recomputation
    c2 = cdist(z_orig.T, z_a.T)
    stale = ot.emd(np.full(20, 1 / 20), np.full(12, 1 / 12), c2 / c2.max())
    assert not np.allclose(stale, ref, atol=1e-6)  # the test can tell the two apart


def test_importance_gives_the_marginals(mlps, fs):
    a, b = mlps
    fusion = OTFusion(importance="conductance", progress=False)
    from neurofuse._fusion_set import as_fusion_set

    result = fusion.run([a, b], fs)
    fused = result.model
    data = as_fusion_set(fs)
    for lvl in range(2):
        mu = neuron_importance(b, lvl, data, "conductance").numpy()
        nu = neuron_importance(a, lvl, data, "conductance").numpy()
        t = result.extras["transports"][0][lvl]
        assert np.allclose(t.sum(1), mu / mu.sum(), atol=1e-8)
        assert np.allclose(t.sum(0), nu / nu.sum(), atol=1e-8)
    assert predict_logits(fused, fs[0]).shape == (len(fs[0]), 10)


def test_importance_weighs_the_transport_inside_groupnorm_groups():
    """A space a GroupNorm normalises in groups is transported group to group; each block between
    the importance scores' shares of its groups, so the plan's column sums are the anchor's
    scores (they were uniform inside the groups before) and a copy permuted group-wise still
    comes back."""
    from neurofuse._fusion_set import as_fusion_set
    from neurofuse.levels._layout import check_alignable
    from neurofuse.testing import permute_spaces

    from .test_layout_traits import GroupNormNet

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(neurofuse.levels_from(GroupNormNet(lambda c: 2).eval(), input_shape=(3, 8, 8)))
    result = OTFusion(importance="conductance", progress=False).run(nets, (x, y))
    _, heads = check_alignable(nets, "otfusion", grouped=True)
    members = [i for i, h in enumerate(heads) if h == heads[0]]     # level 0's residual stream
    scores = [neuron_importance(nets[0], m, as_fusion_set((x, y)), "conductance").numpy() for m in members]
    nu = sum(s / s.sum() for s in scores)
    nu = nu / nu.sum()
    plan = result.extras["transports"][0][0]
    assert not np.allclose(nu, 1.0 / len(nu))                             # the scores are not uniform
    assert np.allclose(plan.sum(0), nu, atol=1e-8)
    mass = np.array([[plan[4 * a:4 * a + 4, 4 * b:4 * b + 4].sum() for b in range(2)] for a in range(2)])
    assert ((mass > 0).sum(0) == 1).all() and ((mass > 0).sum(1) == 1).all()   # groups whole
    twin = permute_spaces(nets[0], seed=1)
    fused = neurofuse.fuse([nets[0], twin], (x, y), method="otfusion", importance="conductance", progress=False)
    assert float((predict_logits(fused, x) - predict_logits(nets[0], x)).abs().max()) < 1e-4


def test_sinkhorn_is_a_soft_plan(mlps, fs):
    a, b = mlps
    exact, soft = OTFusion(progress=False), OTFusion(solver="sinkhorn", reg=0.05, progress=False)
    te = exact.run([a, b], fs).extras["transports"][0][0]
    soft_result = soft.run([a, b], fs)
    fused, ts = soft_result.model, soft_result.extras["transports"][0][0]
    assert (ts > 1e-6).sum() > (te > 1e-12).sum()  # entropic plans spread their mass
    assert np.allclose(ts.sum(0), 1 / 16, atol=1e-6)
    assert torch.isfinite(predict_logits(fused, fs[0])).all()


# -- residual streams ------------------------------------------------------------------------
def test_residual_stream_shares_one_transport(resmlps, fs, digits):
    a, b = resmlps
    plans = OTFusion(progress=False).run([a, b], fs).extras["transports"][0]
    assert plans[1] is plans[0] and plans[2] is plans[0] and plans[3] is None
    # the shared plan is the exact OT for the summed ground metric of the stream's levels
    cost = sum(cdist(acts(b, fs[0], lvl).T, acts(a, fs[0], lvl).T) for lvl in range(3))
    u = np.full(24, 1 / 24)
    ref = ot.emd(u, u, cost / cost.max())
    assert np.allclose(plans[0], ref, atol=1e-8)


def test_residual_model_recovered_from_its_permuted_copy(resmlps, fs, digits):
    model = resmlps[0]
    twin = permute_resmlp(model, seed=3)
    assert float((predict_logits(twin, digits.x_test) - predict_logits(model, digits.x_test)).abs().max()) < 1e-5
    for method in ("otfusion", "git-rebasin"):
        fused = neurofuse.fuse([model, twin], fs, method=method, progress=False)
        for x in (fs[0], digits.x_test):
            assert float((predict_logits(fused, x) - predict_logits(model, x)).abs().max()) < TOL, method


# -- the zoo's ResNet (residual blocks with inner convolutions and BatchNorm) -------------------
resnet_mod = pytest.importorskip("neurofuse.models.resnet")


def _bn_ready_resnet(seed, x, mult=0.25):
    torch.manual_seed(seed)
    m = resnet_mod.ResNet((1, 8, 8), 10, 20, width_multiplier=mult)
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
        m(x)
    return m.eval()


def _perm_rows(layer, p):
    layer.weight.copy_(layer.weight[p])
    if getattr(layer, "bias", None) is not None:
        layer.bias.copy_(layer.bias[p])
    if isinstance(layer, nn.BatchNorm2d):
        layer.running_mean.copy_(layer.running_mean[p])
        layer.running_var.copy_(layer.running_var[p])


def permute_resnet(model, seed):
    g = torch.Generator().manual_seed(seed)
    out = model.clone()
    with torch.no_grad():
        conv, bn = out.levels[0][0], out.levels[0][1]
        p = torch.randperm(conv.out_channels, generator=g)
        _perm_rows(conv, p)
        _perm_rows(bn, p)
        for block in out.levels[1:-1]:
            c1, b1, _, c2, b2 = block.branch
            q = torch.randperm(c1.out_channels, generator=g)
            c1.weight.copy_(c1.weight[:, p])
            _perm_rows(c1, q)
            _perm_rows(b1, q)
            c2.weight.copy_(c2.weight[:, q])
            if isinstance(block.shortcut, nn.Identity):
                p_new = p
            else:
                p_new = torch.randperm(c2.out_channels, generator=g)
                sc, sbn = block.shortcut
                sc.weight.copy_(sc.weight[:, p])
                _perm_rows(sc, p_new)
                _perm_rows(sbn, p_new)
            _perm_rows(c2, p_new)
            _perm_rows(b2, p_new)
            p = p_new
        head = out.levels[-1][-1]
        head.weight.copy_(head.weight[:, p])
    return out.eval()


def test_resnet_recovered_from_its_permuted_copy(fs, digits):
    model = _bn_ready_resnet(0, fs[0])
    twin = permute_resnet(model, seed=1)
    assert float((predict_logits(twin, digits.x_test) - predict_logits(model, digits.x_test)).abs().max()) < 1e-4
    result = OTFusion(progress=False).run([model, twin], fs)
    fused = result.model
    heads_tied = [lvl for lvl in range(1, model.num_levels - 1)
                  if isinstance(model.levels[lvl].shortcut, nn.Identity)]
    assert heads_tied  # identity-shortcut blocks share their input's transport
    for lvl in heads_tied:
        assert result.extras["transports"][0][lvl] is result.extras["transports"][0][lvl - 1]
    for method, f in (("otfusion", fused),
                      ("git-rebasin", neurofuse.fuse([model, twin], fs, method="git-rebasin", progress=False))):
        for x in (fs[0], digits.x_test[:100]):
            assert float((predict_logits(f, x) - predict_logits(model, x)).abs().max()) < TOL, method


def test_resnets_of_different_widths(fs):
    a = _bn_ready_resnet(0, fs[0], 0.25)
    b = _bn_ready_resnet(1, fs[0], 0.375)
    fused = neurofuse.fuse([a, b], fs, method="otfusion", progress=False)
    assert fused.level_widths() == a.level_widths()
    assert torch.isfinite(predict_logits(fused, fs[0])).all()


def test_sinkhorn_that_cannot_reach_its_tolerance_stops_at_its_own_limit_and_warns():
    """A small reg keeps log-domain Sinkhorn from its tolerance; the default limit for Sinkhorn
    (10,000 iterations, not the exact solver's 1,000,000) bounds the cost, and a RuntimeWarning
    says so."""
    import time

    from neurofuse.methods._otfusion import SOLVER_ITERATIONS

    rng = np.random.default_rng(0)
    cost = rng.random((8, 8))
    mu = np.full(8, 1 / 8)
    method = OTFusion(solver="sinkhorn", reg=0.001, progress=False)
    start = time.process_time()
    with pytest.warns(RuntimeWarning, match="max_iter=10000"):
        plan = method._solve(mu, mu, cost, 0)
    assert SOLVER_ITERATIONS["sinkhorn"] == 10_000 and time.process_time() - start < 60
    assert np.allclose(plan.sum(), 1.0, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a reg that converges: no warning
        OTFusion(solver="sinkhorn", reg=0.05, progress=False)._solve(mu, mu, cost, 0)
