"""REPAIR after fusion: BatchNorm reset and per-neuron statistics rescaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import neurofuse
from neurofuse.data import balanced_subset
from neurofuse.errors import ConfigError, IncompatibleModelsError
from neurofuse.grouping import Correspondence
from neurofuse.levels import LeveledNet, flatten_neurons
from neurofuse.methods import GitRebasin
from neurofuse.models import MLP
from neurofuse.repair import repair, reset_batchnorm
from neurofuse.training import TrainConfig, evaluate, predict_logits, train_model

TOL = 1e-4




@pytest.fixture(scope="module")
def fs(digits):
    idx = balanced_subset(digits.y_train.numpy(), np.arange(len(digits.y_train)), 400, seed=5)
    return digits.x_train[idx], digits.y_train[idx]


@pytest.fixture(scope="module")
def models(digits):
    out = []
    for seed in (50, 51):
        torch.manual_seed(seed)
        m = MLP(digits.input_shape, 10, [32, 24])
        train_model(m, digits.x_train, digits.y_train, config=TrainConfig(epochs=6, lr=3e-3, seed=seed))
        out.append(m.eval())
    return out


def permuted(model, seed):
    g = torch.Generator().manual_seed(seed)
    out = model.clone()
    lins = [lvl[-1] for lvl in out.levels]
    with torch.no_grad():
        for a, nxt in zip(lins[:-1], lins[1:]):
            p = torch.randperm(a.out_features, generator=g)
            a.weight.copy_(a.weight[p])
            a.bias.copy_(a.bias[p])
            nxt.weight.copy_(nxt.weight[:, p])
    return out.eval(), p


def _diff(a, b, x):
    return float((predict_logits(a, x) - predict_logits(b, x)).abs().max())


def _stats(model, x, level):
    with torch.no_grad():
        z = flatten_neurons(model.forward_until(x, level), model.axes[level]).double()
    return z.mean(0).numpy(), z.std(0, unbiased=False).numpy()


def _repaired_to_the_mean(a, b, repaired, x, levels: int = 2):
    """Assert that every neuron of the first ``levels`` levels of ``repaired`` has the mean of the
    base neurons' means and stds (vanilla averaging keeps neuron j with neuron j); returns each
    level's (index, base a's stats, base b's stats)."""
    out = []
    for lvl in range(levels):
        (ma, sa), (mb, sb) = _stats(a, x, lvl), _stats(b, x, lvl)
        mr, sr = _stats(repaired, x, lvl)
        assert np.allclose(mr, (ma + mb) / 2, atol=1e-4)
        assert np.allclose(sr, (sa + sb) / 2, atol=1e-4)
        out.append((lvl, (ma, sa), (mb, sb)))
    return out


# -- consistent models are left alone ------------------------------------------------------------
def test_model_fused_with_itself_is_unchanged(models, fs, digits):
    m = models[0]
    fused = neurofuse.fuse([m, m.clone()], method="vanilla", progress=False)
    repaired = repair(fused, [m, m], fs)
    assert repaired is not fused
    assert _diff(repaired, m, fs[0]) < TOL and _diff(repaired, m, digits.x_test) < TOL


@pytest.mark.parametrize("method", ["git-rebasin", "otfusion"])
def test_model_fused_with_its_permuted_copy_is_unchanged(models, fs, digits, method):
    m = models[0]
    twin, _ = permuted(m, 3)
    fused = neurofuse.fuse([m, twin], fs, method=method, repair=True, progress=False)
    assert _diff(fused, m, fs[0]) < TOL and _diff(fused, m, digits.x_test) < TOL


def test_without_the_grouping_the_permuted_copy_is_misread(models, fs):
    """Control: matching by index (no grouping) pairs unrelated neurons of the permuted copy, so
    repair changes the model; the test above can therefore fail."""
    m = models[0]
    twin, _ = permuted(m, 3)
    fused = neurofuse.fuse([m, twin], fs, method="git-rebasin", progress=False)
    assert _diff(repair(fused, [m, twin], fs), m, fs[0]) > 0.01


def test_hard_and_dense_correspondences_repair_alike(models, fs):
    m = models[0]
    twin, _ = permuted(m, 4)
    result = GitRebasin(progress=False).run([m, twin], fs)
    hard = list(result.correspondences)
    assert all(c.is_hard for c in hard)
    dense = [Correspondence.from_matrix(c.matrix(), c.widths) for c in hard]
    blocks = [Correspondence.from_blocks([c.block(0), c.block(1)]) for c in hard]
    outs = [predict_logits(repair(result.model, [m, twin], fs, correspondences=g), fs[0])
            for g in (hard, dense, blocks)]
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], atol=1e-5)
    assert float((outs[0] - predict_logits(m, fs[0])).abs().max()) < TOL
    with pytest.raises(ConfigError, match="must list"):
        repair(result.model, [m, twin], fs, correspondences=hard[:1])
    with pytest.raises(ConfigError, match="not a neurofuse.grouping.Correspondence"):
        repair(result.model, [m, twin], fs, correspondences=[np.zeros(5, dtype=int), None])
    wrong = Correspondence.same_index([3, 3], 3)
    with pytest.raises(ConfigError, match="base widths"):
        repair(result.model, [m, twin], fs, correspondences=[wrong, hard[1]])


# -- what repair does --------------------------------------------------------------------------
def test_rescaled_neurons_get_the_base_statistics(models, fs, digits):
    a, b = models
    fused = neurofuse.fuse([a, b], method="vanilla", progress=False)
    repaired = neurofuse.fuse([a, b], fs, method="vanilla", repair=True, progress=False)
    x = fs[0]
    for lvl, (_, sa), (_, sb) in _repaired_to_the_mean(a, b, repaired, x):
        _, sf = _stats(fused, x, lvl)
        assert (sf < (sa + sb) / 2 - 1e-3).any()  # the average had collapsed variance
    # the output level is not touched
    assert torch.equal(repaired.levels[-1][-1].bias, fused.levels[-1][-1].bias)
    acc = [evaluate(m, digits.x_test, digits.y_test)["accuracy"] for m in (fused, repaired)]
    assert acc[1] > acc[0], acc


class NormNet(LeveledNet):
    """Levels ending in a LayerNorm or a GroupNorm over their neurons (random affines)."""

    def __init__(self, norm: str, seed: int):
        torch.manual_seed(seed)
        make = (lambda: nn.LayerNorm(16)) if norm == "layernorm" else (lambda: nn.GroupNorm(1, 16))
        super().__init__([nn.Sequential(nn.Flatten(1), nn.Linear(64, 16), make()),
                          nn.Sequential(nn.ReLU(), nn.Linear(16, 16), make()),
                          nn.Sequential(nn.ReLU(), nn.Linear(16, 10))], ["dense"] * 3, (1, 8, 8), 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.3)
        self.eval()


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm"])
def test_levels_ending_in_a_layernorm_or_groupnorm_are_rescaled_through_its_affine(norm, fs):
    """A normalisation's output is its weight and bias applied per neuron, so REPAIR folds the
    rescaling into them (it used to leave such levels alone)."""
    a, b = NormNet(norm, 0), NormNet(norm, 1)
    repaired = neurofuse.fuse([a, b], fs, method="vanilla", repair=True, progress=False)
    _repaired_to_the_mean(a, b, repaired, fs[0])


class BNNet(LeveledNet):
    def __init__(self):
        super().__init__([nn.Sequential(nn.Flatten(1), nn.Linear(64, 16), nn.BatchNorm1d(16)),
                          nn.Sequential(nn.ReLU(), nn.Linear(16, 10))], ["dense", "dense"], (1, 8, 8), 10)


def test_batchnorm_statistics_are_re_estimated(fs):
    torch.manual_seed(0)
    net = BNNet().eval()
    bn = net.levels[0][2]
    with torch.no_grad():
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(9.0)
        bn.weight.uniform_(0.5, 2.0)
    x = fs[0]
    out = repair(net, [net], x, rescale=False, batch_size=len(x))
    with torch.no_grad():
        pre = net.levels[0][1](net.levels[0][0](x)).double()
    rbn = out.levels[0][2]
    assert torch.allclose(rbn.running_mean.double(), pre.mean(0), atol=1e-5)
    assert torch.allclose(rbn.running_var.double(), pre.var(0, unbiased=True), atol=1e-4)
    assert rbn.momentum == bn.momentum and not out.training
    assert bn.running_mean[0] == 3.0  # the input model is untouched
    # with rescale, the fold goes into the BatchNorm's affine parameters
    other = BNNet().eval()
    reset_batchnorm(other, x)
    rep = repair(out, [out, other], x, rescale=True)
    mt = (_stats(out, x, 0)[0] + _stats(other, x, 0)[0]) / 2
    st = (_stats(out, x, 0)[1] + _stats(other, x, 0)[1]) / 2
    mr, sr = _stats(rep, x, 0)
    assert np.allclose(mr, mt, atol=1e-4) and np.allclose(sr, st, atol=1e-4)
    assert torch.equal(rep.levels[0][1].weight, out.levels[0][1].weight)  # Linear unchanged
    assert not torch.equal(rep.levels[0][2].weight, out.levels[0][2].weight)


def test_refusals(models, fs):
    ens = neurofuse.fuse(models, method="ensemble", progress=False)
    with pytest.raises(ConfigError, match="ensemble"):
        repair(ens, models, fs)
    with pytest.raises(ConfigError):
        neurofuse.fuse(models, fs, method="ensemble", repair=True, progress=False)
    plain = nn.Sequential(nn.Flatten(1), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10)).eval()
    with pytest.raises(IncompatibleModelsError):
        repair(plain, [plain], fs)
    assert isinstance(repair(plain, [plain], fs, rescale=False), nn.Sequential)


def test_resnet_with_batchnorm(fs, digits):
    """BatchNorm statistics re-estimated on the same data and neurons already at their targets:
    a ResNet fused with itself comes back unchanged (blocks are residual and are not rescaled;
    the stem's correction is folded into its BatchNorm)."""
    resnet = pytest.importorskip("neurofuse.models.resnet")
    torch.manual_seed(0)
    model = resnet.ResNet((1, 8, 8), 10, 20, width_multiplier=0.25).eval()
    reset_batchnorm(model, fs[0], batch_size=len(fs[0]))
    for method in ("vanilla", "otfusion"):
        fused = neurofuse.fuse([model, model.clone()], fs, method=method, repair=True,
                               batch_size=len(fs[0]), progress=False)
        assert _diff(fused, model, fs[0]) < TOL and _diff(fused, model, digits.x_test[:100]) < TOL
    # stale statistics are replaced by those of the fusion data
    stale = model.clone()
    with torch.no_grad():
        stale.levels[0][1].running_var.mul_(4.0)
    assert _diff(stale, model, fs[0]) > 1e-2
    fixed = repair(stale, [model], fs, rescale=False, batch_size=len(fs[0]))
    assert _diff(fixed, model, fs[0]) < TOL
