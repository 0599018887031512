"""The closed form inside a level (methods/_steps.py) and what the level-wise methods refuse.

Properties checked:

* a residual block, a depthwise level and a concatenation are fitted one layer at a time, in the
  order and with the kinds ``closed_form_steps`` gives (reported per level);
* the grouping of a concatenation keeps every part's neurons in that part (block diagonal), for
  models from different initialisations;
* N models of different weights (and a compressed fused width for the zoo ResNet) fuse to a
  finite model whose correspondences cover every fused neuron;
* a grouped convolution that is not depthwise is refused by every method but kf-gradient, and
  ``check_level`` agrees: the refusal names the level and comes before any importance score;
* the one-pass statistics protocol (federated servers) refuses a level it cannot carry.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurofuse
from neurofuse._fusion_set import as_fusion_set
from neurofuse.errors import IncompatibleModelsError
from neurofuse.levels import fold_batchnorm
from neurofuse.methods import get_method, list_methods
from neurofuse.models import make_model

from ..levels.user_models import BranchNet, MobileNetV2


def _net(model: nn.Module, shape=(3, 16, 16)):
    return neurofuse.levels_from(model.eval(), input_shape=shape)


def _data(n: int = 96, shape=(3, 16, 16), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_blocks_and_depthwise_levels_are_fitted_in_steps_and_reported():
    torch.manual_seed(0)
    nets = [_net(MobileNetV2()) for _ in range(2)]
    result = neurofuse.fuse(nets, _data(), method="kf-linear", progress=False, return_result=True)
    steps = {r["level"]: [(s["kind"], s["space"]) for s in r.get("steps", [])] for r in result.report}
    assert steps[1] == [("depthwise", "in"), ("residual", "in")]
    assert steps[3] == [("depthwise", "in")]
    assert steps[5] == [("new", "h0"), ("depthwise", "h0"), ("residual", "in")]
    assert steps[0] == []                                     # a single layer: one pass
    assert len(result.correspondences) == nets[0].num_levels - 1
    assert all(c.covered().all() for c in result.correspondences)
    # a tied level keeps the grouping of the level it is tied to
    assert np.array_equal(result.correspondences[1].labels, result.correspondences[0].labels)


def test_a_concatenation_is_grouped_part_by_part():
    torch.manual_seed(1)
    nets = [_net(BranchNet()) for _ in range(3)]
    result = neurofuse.fuse(nets, _data(), method="kf-linear", progress=False, return_result=True)
    corr = result.correspondences[1]
    labels = np.split(corr.labels, np.cumsum(corr.widths)[:-1])
    for lab in labels:                                        # parts of 6 and 10 channels
        assert (lab[:6] < 6).all() and (lab[6:] >= 6).all()
    assert [(s["kind"], s["space"]) for s in result.report[1]["steps"]] == [("new", "out0"), ("new", "out1")]


@pytest.mark.parametrize("method", ["kf-linear", "otfusion"])
def test_n_models_of_different_weights_fuse(method):
    torch.manual_seed(2)
    nets = [_net(MobileNetV2()) for _ in range(3)]
    x, y = _data()
    fused = neurofuse.fuse(nets, (x, y), method=method, progress=False)
    out = fused(x[:8])
    assert out.shape == (8, 10) and torch.isfinite(out).all()


def test_the_zoo_resnet_is_compressed_by_the_closed_form(digits):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(make_model("resnet", "tiny", digits.input_shape, 10).eval())
    x, y = digits.x_train[:128], digits.y_train[:128]
    result = neurofuse.fuse(models, (x, y), method="kf-linear", width=0.5, progress=False, return_result=True)
    widths = result.model.level_widths()
    assert widths[:-1] == [max(1, round(w * 0.5)) for w in models[0].level_widths()[:-1]]
    assert torch.isfinite(result.model(x[:8])).all()
    assert all(c.covered().all() for c in result.correspondences)


class GroupedNet(nn.Module):
    """A ResNeXt-style grouped convolution (two groups of four channels)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.stem(x))))
        return self.head(h.mean((2, 3)))


def _shuffle_groups(opener: nn.Conv2d, grouped: nn.Conv2d, reader: nn.Module, cols: slice = slice(None),
                    norm: "nn.Module | None" = None) -> None:
    """In place, the same function: the 8 channels ``opener`` writes and the 8 ``grouped`` (2
    groups) writes permuted, both groups swapped alike and each group's channels on their own;
    ``reader`` reads the grouped conv's outputs in its weight's columns ``cols``, after ``norm``."""
    p0, p1 = torch.tensor([6, 4, 7, 5, 1, 3, 0, 2]), torch.tensor([5, 7, 4, 6, 3, 2, 0, 1])
    with torch.no_grad():
        opener.weight.copy_(opener.weight[p0].clone()), opener.bias.copy_(opener.bias[p0].clone())
        w = grouped.weight[p1].clone()
        for k in range(2):
            w[4 * k:4 * k + 4] = w[4 * k:4 * k + 4][:, p0[4 * k:4 * k + 4] % 4]
        grouped.weight.copy_(w), grouped.bias.copy_(grouped.bias[p1].clone())
        if norm is not None:
            norm.weight.copy_(norm.weight[p1].clone()), norm.bias.copy_(norm.bias[p1].clone())
        reader.weight[:, cols] = reader.weight[:, cols][:, p1].clone()


def _grouped_twin(a: GroupedNet) -> GroupedNet:
    b = copy.deepcopy(a)
    _shuffle_groups(b.stem, b.grouped, b.head)
    return b.eval()


@pytest.mark.parametrize("method", [n for n in list_methods() if get_method(n).fuses_levels])
def test_a_grouped_convolution_is_fused_group_by_group_by_every_level_wise_method(method):
    """The closed form fits a grouped conv that reads the level input (the level before groups its
    output in the conv's groups) and gives a group-permuted copy back; so do the alignments
    (otfusion, git-rebasin, weight matching, ZipIt!, CCA Merge, the align-then-merge methods),
    which move its groups as units."""
    cls = get_method(method)
    torch.manual_seed(0)
    model = GroupedNet().eval()
    assert not any(cls.check_level(_net(model), i) for i in range(_net(model).num_levels))
    x, y = _data()
    if method == "kf-gradient":
        kw = {"levels": {"epochs": 1}, "head": {"epochs": 1}}
        assert torch.isfinite(neurofuse.fuse([_net(model)] * 2, (x, y), method=method, progress=False, **kw)(x[:4])).all()
        return
    fused = neurofuse.fuse([_net(model), _net(_grouped_twin(model))], (x, y), method=method, progress=False)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max() / model(x).abs().max() < 1e-4


@pytest.mark.parametrize("method", [n for n in list_methods() if get_method(n).fuses_levels and n != "kf-gradient"])
def test_a_grouped_convolution_ending_a_residual_block_is_refused_by_name_before_any_importance(method, monkeypatch):
    from ..levels.test_layout import _GroupedEndChained

    cls = get_method(method)
    torch.manual_seed(0)
    nets = [neurofuse.levels_from(_GroupedEndChained().eval(), input_shape=(3, 8, 8)) for _ in range(2)]
    reasons = [cls.check_level(nets[0], i) for i in range(nets[0].num_levels)]
    assert any(r and "grouped convolution" in r and "residual block" in r for r in reasons), reasons
    calls = []
    import neurofuse.methods._base as base

    real = base.importance_sums
    monkeypatch.setattr(base, "importance_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    with pytest.raises(IncompatibleModelsError, match=r"cannot fuse level 1 .*grouped convolution.*residual block"):
        neurofuse.fuse(nets, (x, y), method=method, progress=False,
                       importance="conductance" if cls.uses_importance else "uniform")
    assert not calls


def test_the_one_pass_statistics_refuse_a_level_fitted_in_steps():
    torch.manual_seed(0)
    nets = [fold_batchnorm(_net(MobileNetV2())) for _ in range(2)]
    fusion = get_method("kf-linear")(progress=False)
    assert fusion.one_pass(nets[0].levels[0]) and not fusion.one_pass(nets[0].levels[1])
    _, fused, _ = fusion.setup(fusion.Run(fusion, nets, None))
    x, _ = _data(16)
    with fusion.stream(as_fusion_set(x, 16), 3) as stream:
        stream.advance({0: fused.levels[0], 1: nets[0].levels[0], 2: nets[1].levels[0]})
        with pytest.raises(IncompatibleModelsError, match="level 1 is fitted one layer at a time"):
            fusion.level_statistics(1, nets, fused, stream)


class NormMLP(nn.Module):
    """``Linear -> LayerNorm -> ReLU`` hidden layers (the LayerNorm's affine as asked)."""

    def __init__(self, affine: bool = True, bias: bool = True, hidden: int = 12):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(48, hidden), nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, elementwise_affine=affine, bias=bias)
        self.ln2 = nn.LayerNorm(hidden, elementwise_affine=affine, bias=bias)
        self.out = nn.Linear(hidden, 10)
        if affine:
            with torch.no_grad():
                for ln in (self.ln1, self.ln2):
                    ln.weight.uniform_(0.5, 1.5)
                    if bias:
                        ln.bias.normal_(0.0, 0.3)

    def forward(self, x):
        h = torch.relu(self.ln1(self.fc1(x.flatten(1))))
        return self.out(torch.relu(self.ln2(self.fc2(h))))


def _permuted_norm_mlp(model: NormMLP, seed: int, hidden: int = 12) -> NormMLP:
    import copy

    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    p1, p2 = torch.randperm(hidden, generator=g), torch.randperm(hidden, generator=g)
    with torch.no_grad():
        for fc, ln, p, nxt in ((twin.fc1, twin.ln1, p1, twin.fc2), (twin.fc2, twin.ln2, p2, twin.out)):
            fc.weight.copy_(fc.weight[p]), fc.bias.copy_(fc.bias[p])
            for t in (ln.weight, ln.bias):
                if t is not None:
                    t.copy_(t[p])
            nxt.weight.copy_(nxt.weight[:, p])
    return twin.eval()


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_a_linear_then_layernorm_is_one_step_and_a_permuted_copy_comes_back(method, affine, bias):
    torch.manual_seed(3)
    model = NormMLP(affine, bias).eval()
    twin = _permuted_norm_mlp(model, 4)
    x, y = _data(64, (3, 4, 4))
    x_test, _ = _data(32, (3, 4, 4), seed=5)
    assert (twin(x_test) - model(x_test)).abs().max() < 1e-5
    nets = [_net(m, (3, 4, 4)) for m in (model, twin)]
    result = neurofuse.fuse(nets, (x, y), method=method, progress=False, return_result=True)
    step = result.report[0]["steps"][0]
    assert len(result.report[0]["steps"]) == 1 and step["kind"] == "new" and step["norm"] is not None
    assert (step["norm_error"] < 1e-8) if affine else step["norm_error"] is None
    with torch.no_grad():
        assert (result.model(x_test) - model(x_test)).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_a_layernorm_step_sees_rows_as_its_layernorm_does(method):
    """LayerNorm ignores each row's mean and scale: a copy whose pre-LayerNorm rows are shifted
    and scaled (weights x 10, every bias + 5: the same function) and permuted fuses back to the
    model, since the layer is grouped and fitted on centred rows scaled per model."""
    torch.manual_seed(3)
    model = NormMLP(hidden=24).eval()
    twin = _permuted_norm_mlp(model, 4, hidden=24)
    with torch.no_grad():
        twin.fc1.weight.mul_(10.0)
        twin.fc1.bias.mul_(10.0).add_(5.0)
    x, y = _data(200, (3, 4, 4))
    x_test, _ = _data(32, (3, 4, 4), seed=5)
    assert (twin(x_test) - model(x_test)).abs().max() < 1e-4
    nets = [_net(m, (3, 4, 4)) for m in (model, twin)]
    fused = neurofuse.fuse(nets, (x, y), method=method, progress=False)
    with torch.no_grad():
        assert (fused(x_test) - model(x_test)).abs().max() < 1e-3


def test_which_layernorm_is_a_step_of_its_linear():
    """A LayerNorm over a Linear's outputs (dropout between them allowed) is that Linear's step;
    one after the activation is refused with the reason."""
    from neurofuse.levels import closed_form_steps

    _, steps = closed_form_steps(nn.Sequential(nn.ReLU(), nn.Linear(8, 6), nn.Dropout(0.1), nn.LayerNorm(6)), 1)
    assert [(s.kind, s.norm) for s in steps] == [("new", "3")]
    for level in (nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.LayerNorm(6)),
                  nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(3))):
        with pytest.raises(IncompatibleModelsError, match="LayerNorm"):
            closed_form_steps(level, 1)


def test_the_layernorm_of_a_step_is_fitted_to_its_groups_outputs():
    """Two different models: the fused LayerNorm's weight and bias are each neuron's least-squares
    line from the fused normalised rows to the grouped base outputs, so moving them only raises
    the level's error against those targets."""
    torch.manual_seed(6)
    nets = [_net(NormMLP().eval(), (3, 4, 4)) for _ in range(2)]
    x, y = _data(200, (3, 4, 4))
    result = neurofuse.fuse(nets, (x, y), method="kf-linear", progress=False, return_result=True)
    fused = result.model
    labels = np.split(result.correspondences[0].labels, [12])
    with torch.no_grad():
        targets = torch.zeros(200, 12)
        count = torch.zeros(12)
        for net, lab in zip(nets, labels):
            out = net.levels[0](x)
            targets.index_add_(1, torch.as_tensor(lab), out)
            count.index_add_(0, torch.as_tensor(lab), torch.ones(12))
        targets /= count.clamp_min(1)
        ln = fused.levels[0].get_submodule("2")

        def error() -> float:
            return float(((fused.levels[0](x) - targets)[:, count > 0] ** 2).sum())

        best = error()
        for t in (ln.weight, ln.bias):
            t += 0.05
            assert error() > best
            t -= 0.05


class PreNormMLP(nn.Module):
    """A stem, two pre-norm residual MLP blocks ``x + fc2(gelu(fc1(LayerNorm(x))))`` and a head
    ``[LayerNorm, Linear]``: every LayerNorm is read by a Linear."""

    def __init__(self, width: int = 12, hidden: int = 20):
        super().__init__()
        self.stem = nn.Linear(48, width)
        self.lns = nn.ModuleList([nn.LayerNorm(width) for _ in range(3)])
        self.fc1 = nn.ModuleList([nn.Linear(width, hidden) for _ in range(2)])
        self.fc2 = nn.ModuleList([nn.Linear(hidden, width) for _ in range(2)])
        self.head = nn.Linear(width, 10)
        with torch.no_grad():
            for ln in self.lns:
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0.0, 0.3)

    def forward(self, x):
        h = self.stem(x.flatten(1))
        for ln, fc1, fc2 in zip(self.lns, self.fc1, self.fc2):
            h = h + fc2(torch.nn.functional.gelu(fc1(ln(h))))
        return self.head(self.lns[2](h))


@pytest.mark.parametrize("ridge", ["auto", 1e3])
@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_a_layernorm_read_by_a_linear_is_folded_and_a_permuted_copy_comes_back(method, ridge):
    """Pre-norm residual MLP blocks: the closed form fits each first Linear on the normalised
    input (the LayerNorm's affine folded into it, the LayerNorm left at weight 1, bias 0).  With a
    large penalty the fit stays at its prior, so the base layers' priors must hold their own
    LayerNorm's affine too."""
    from neurofuse.testing import permute_spaces

    torch.manual_seed(5)
    net = _net(PreNormMLP().eval(), (3, 4, 4))
    twin = permute_spaces(net, seed=3)
    x, y = _data(200, (3, 4, 4))
    x_test, _ = _data(32, (3, 4, 4), seed=5)
    assert (twin(x_test) - net(x_test)).abs().max() < 1e-5
    result = neurofuse.fuse([net, twin], (x, y), method=method, progress=False, return_result=True, ridge=ridge)
    assert [s["kind"] for s in result.report[1]["steps"]] == ["new", "residual"]
    with torch.no_grad():
        assert (result.model(x_test) - net(x_test)).abs().max() < 1e-4
    norms = [m for m in result.model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 3 and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)


def test_a_layernorm_with_bias_read_by_a_linear_without_is_refused():
    from neurofuse.levels import closed_form_steps

    with pytest.raises(IncompatibleModelsError, match="LayerNorm .*has a bias where the LayerNorm has one"):
        closed_form_steps(nn.Sequential(nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 6, bias=False)), 1)
    _, steps = closed_form_steps(nn.Sequential(nn.ReLU(), nn.LayerNorm(8), nn.Dropout(), nn.Linear(8, 6)), 1)
    assert [(s.kind, s.pre_norm) for s in steps] == [("new", "1")]


class TokenMixer(nn.Module):
    """MLP-Mixer's channel mixing on tokens ``[B, T, C]``: a token embedding, pre-norm residual
    MLP blocks applied to every token, a LayerNorm, the mean over tokens, a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.norms = nn.ModuleList([nn.LayerNorm(16) for _ in range(3)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16)) for _ in range(2)])
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            for ln in self.norms:
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0.0, 0.3)

    def forward(self, x):
        h = self.embed(x)
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h))
        return self.head(self.norms[2](h).mean(1))


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_linear_layers_on_tokens_are_fitted_token_by_token(method):
    """A Linear on ``[B, T, C]`` maps every token: its design has one row per token (it used to
    have one per sample, every token's inputs side by side, and the fit stopped on a row count)."""
    from neurofuse.testing import permute_spaces

    torch.manual_seed(2)
    net = neurofuse.levels_from(TokenMixer().eval(), input_shape=(4, 12))
    assert net.axes[0] == "token"
    twin = permute_spaces(net, seed=4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 4, 12, generator=g), torch.randint(0, 10, (120,), generator=g)
    fused = neurofuse.fuse([net, twin], (x, y), method=method, progress=False)
    with torch.no_grad():
        assert (fused(x) - net(x)).abs().max() < 1e-4


# -- GroupNorm, and norms at the end of residual blocks -------------------------------------------
class NormBlocks(nn.Module):
    """A stem ``Conv -> GroupNorm(2)``, a projection block whose branch ends in ``Conv ->
    GroupNorm`` and whose shortcut is a bare ``Conv`` (a path without a norm), a dense ``Linear ->
    GroupNorm(2)`` (units that are parts of rows) and a residual MLP block ending in a LayerNorm."""

    def __init__(self, c: int = 8, d: int = 12):
        super().__init__()
        self.stem, self.gn0 = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(2, c)
        self.b1, self.gn1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c)
        self.b2, self.gn2 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.GroupNorm(2, 2 * c)
        self.proj = nn.Conv2d(c, 2 * c, 1)
        self.fc, self.gnf = nn.Linear(2 * c, d), nn.GroupNorm(2, d)
        self.r1, self.r2, self.ln = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.LayerNorm(d)
        self.out = nn.Linear(d, 10)
        with torch.no_grad():
            for m in (self.gn0, self.gn1, self.gn2, self.gnf, self.ln):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)

    def forward(self, x):
        h = torch.relu(self.gn0(self.stem(x)))
        h = torch.relu(self.gn2(self.b2(torch.relu(self.gn1(self.b1(h))))) + self.proj(h))
        h = torch.relu(self.gnf(self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))))
        h = torch.relu(h + self.ln(self.r2(torch.relu(self.r1(h)))))
        return self.out(h)


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_groupnorms_and_norms_ending_residual_blocks_are_fitted_and_a_permuted_copy_comes_back(method):
    """Spaces normalised in groups are grouped group by group; a block whose last layers are
    followed by norms fits each layer alone and then the norms together to the block output."""
    from neurofuse.testing import permute_spaces

    torch.manual_seed(0)
    net = _net(NormBlocks(), (3, 8, 8))
    twin = permute_spaces(net, seed=2)
    x, y = _data(96, (3, 8, 8))
    x_test, _ = _data(32, (3, 8, 8), seed=5)
    with torch.no_grad():
        assert (twin(x_test) - net(x_test)).abs().max() < 1e-5
        assert not torch.equal(twin.levels[0][0].weight, net.levels[0][0].weight)
    result = neurofuse.fuse([net, twin], (x, y), method=method, progress=False, return_result=True)
    kinds = [[s["kind"] for s in r.get("steps", [])] for r in result.report]
    assert ["new", "new", "keep", "norms"] in kinds and ["new", "keep", "norms"] in kinds, kinds
    with torch.no_grad():
        ref = net(x_test)
        assert (result.model(x_test) - ref).abs().max() / ref.abs().max() < 1e-4


def test_a_copy_scaled_before_its_groupnorms_fuses_back_with_kmeans():
    """GroupNorm ignores the scale of each group of channels: a permuted copy whose convolutions
    before a GroupNorm are scaled x10 is the same function, and K-means, which compares the base
    models' outputs in the units the GroupNorms see, gives the model back."""
    from neurofuse.testing import permute_spaces

    torch.manual_seed(1)
    net = _net(NormBlocks(), (3, 8, 8))
    twin = permute_spaces(net, seed=3)
    with torch.no_grad():
        for conv in (twin.levels[0][0], twin.levels[1].branch[0]):
            conv.weight.mul_(10.0)
            conv.bias.mul_(10.0)
    x, y = _data(96, (3, 8, 8))
    x_test, _ = _data(32, (3, 8, 8), seed=5)
    with torch.no_grad():
        ref = net(x_test)
        assert (twin(x_test) - ref).abs().max() < 1e-4
    fused = neurofuse.fuse([net, twin], (x, y), method="kf-linear", progress=False)
    with torch.no_grad():
        assert (fused(x_test) - ref).abs().max() / ref.abs().max() < 1e-4


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
@pytest.mark.parametrize("model", ["groupnorm", "layernorm"])
def test_a_norm_whose_input_is_tiny_next_to_its_eps_still_fuses_back(method, model):
    """The targets are scaled per model relative to the models' mean constant, so they keep the
    models' scale and the norm's ``eps`` acts on the fused layer as on the base ones (scaled to
    unit spread, a copy of layers whose outputs are ~1e-3 used to come back 4-18 % off)."""
    from neurofuse.testing import permute_spaces

    torch.manual_seed(4)
    shape = (3, 8, 8) if model == "groupnorm" else (3, 4, 4)
    base = NormBlocks() if model == "groupnorm" else NormMLP()
    with torch.no_grad():
        first = base.stem if model == "groupnorm" else base.fc1
        first.weight.mul_(0.002)
        first.bias.mul_(0.002)
    net = _net(base, shape)
    twin = permute_spaces(net, seed=5)
    x, y = _data(96, shape)
    with torch.no_grad():
        ref = net(x)
    fused = neurofuse.fuse([net, twin], (x, y), method=method, progress=False)
    with torch.no_grad():
        assert (fused(x) - ref).abs().max() / ref.abs().max() < 1e-4


class TokenGroupNorm(nn.Module):
    """A GroupNorm on tokens ``[B, T, C]``: its channels (axis 1) are the tokens."""

    def __init__(self):
        super().__init__()
        self.fc0, self.gn, self.fc1 = nn.Linear(5, 8), nn.GroupNorm(2, 8), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc1(torch.relu(self.gn(self.fc0(x))).mean(1))


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear", "otfusion", "git-rebasin"])
def test_a_groupnorm_on_tokens_is_refused_by_name(method):
    net = neurofuse.levels_from(TokenGroupNorm().eval(), input_shape=(8, 5))
    why = get_method(method).check_level(net, 0)
    assert why is not None and "GroupNorm reads tokens" in why, why


def test_hf_linear_on_grouped_spaces_of_other_widths_names_the_widths():
    from .test_layout_traits import GroupNormNet

    nets = [neurofuse.levels_from(GroupNormNet(lambda c: 2, w).eval(), input_shape=(3, 8, 8)) for w in (8, 12)]
    with pytest.raises(IncompatibleModelsError, match="8 and 12"):
        neurofuse.fuse(nets, _data(32, (3, 8, 8)), method="hf-linear", progress=False)


class _GroupedInBlock(nn.Module):
    """A bottleneck whose grouped convolution is followed by ``after`` (a GroupNorm, or nothing)."""

    def __init__(self, after: str):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.after = nn.GroupNorm(2, 8) if after == "groupnorm" else nn.Identity()
        self.c3 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.c3(torch.relu(self.after(self.c2(torch.relu(self.c1(h)))))))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
@pytest.mark.parametrize("after", ["groupnorm", "nothing"])
def test_a_grouped_convolution_inside_a_block_is_fitted_group_by_group_and_a_shuffled_copy_comes_back(after, method):
    """With a GroupNorm of its groups after it (ResNeXt with GroupNorm), the conv's targets are
    scaled as the GroupNorm sees them and its weight and bias fitted per channel."""
    torch.manual_seed(0)
    model = _GroupedInBlock(after).eval()
    if after == "groupnorm":
        with torch.no_grad():
            model.after.weight.uniform_(0.5, 1.5), model.after.bias.normal_(0.0, 0.3)
        model.after.eps = 1e-10   # so that the copy scaled below is the same function to float precision
    twin = copy.deepcopy(model)
    _shuffle_groups(twin.c1, twin.c2, twin.c3, norm=twin.after if after == "groupnorm" else None)
    if after == "groupnorm":   # the GroupNorm ignores its groups' scale: compared in its units
        with torch.no_grad():
            twin.c2.weight.mul_(10.0), twin.c2.bias.mul_(10.0)
    x, y = _data(96, (3, 8, 8))
    with torch.no_grad():
        assert (twin(x) - model(x)).abs().max() < 1e-5
    net = _net(model, (3, 8, 8))
    assert get_method(method).check_level(net, 1) is None
    result = neurofuse.fuse([net, _net(twin, (3, 8, 8))], (x, y), method=method, progress=False,
                            return_result=True)
    assert [s["kind"] for s in result.report[1]["steps"]] == ["new", "grouped", "residual"]
    x_test, _ = _data(16, (3, 8, 8), seed=3)
    with torch.no_grad():
        assert (result.model(x_test) - model(x_test)).abs().max() / model(x_test).abs().max() < 1e-4


def test_a_groupnorm_of_other_groups_after_a_grouped_convolution_is_refused():
    class Other(_GroupedInBlock):
        def __init__(self):
            super().__init__("nothing")
            self.after = nn.GroupNorm(4, 8)

    why = get_method("kf-linear").check_level(_net(Other(), (3, 8, 8)), 1)
    assert why is not None and "other groups" in why, why


class _GroupedBranch(nn.Module):
    """A concatenation whose second part ends in a grouped convolution."""

    def __init__(self):
        super().__init__()
        self.stem, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.b1a, self.b1b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.cat([self.b0(h), self.b1b(torch.relu(self.b1a(h)))], 1)
        return self.head(torch.relu(h).mean((2, 3)))


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_a_concatenation_part_written_by_a_grouped_convolution_comes_back(method):
    """Its groups shuffled alike on both sides of the grouped conv, each group's channels apart."""
    torch.manual_seed(0)
    a = _GroupedBranch().eval()
    b = copy.deepcopy(a)
    _shuffle_groups(b.b1a, b.b1b, b.head, slice(4, None))
    x, y = _data(128, (3, 8, 8))
    with torch.no_grad():
        assert (b(x) - a(x)).abs().max() < 1e-5
    fused = neurofuse.fuse([_net(a, (3, 8, 8)), _net(b, (3, 8, 8))], (x, y), method=method, progress=False)
    with torch.no_grad():
        assert (fused(x) - a(x)).abs().max() / a(x).abs().max() < 1e-4


class _TwoGrouped(nn.Module):
    """Two grouped convolutions in a row, of 4 and then 2 groups: no grouping of the space
    between them keeps both whole."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.g4, self.g2 = nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3, self.head = nn.Conv2d(8, 8, 1), nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.c3(torch.relu(self.g2(torch.relu(self.g4(torch.relu(self.c1(h))))))))
        return self.head(h.mean((2, 3)))


def test_grouped_convolutions_of_other_groups_on_one_space_are_refused_before_any_work():
    net = _net(_TwoGrouped(), (3, 8, 8))
    why = get_method("kf-linear").check_level(net, 1)
    assert why is not None and "into different groups ([2, 4])" in why, why


def test_a_declared_level_without_a_layer_is_refused_by_the_closed_form_with_a_reason():
    """(It used to stop inside the fit with ``min() arg is an empty sequence``.)"""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.last = nn.Conv2d(3, 8, 8), nn.Sequential(nn.ReLU(), nn.Conv2d(8, 10, 1))

        def forward(self, x):
            return self.last(self.stem(x)).flatten(1)

    net = neurofuse.levels_from(Net().eval(), input_shape=(3, 8, 8), levels=["stem", "last", lambda x: x.flatten(1)])
    why = get_method("kf-linear").check_level(net, 2)
    assert why is not None and "no Linear/Conv2d layer" in why, why
