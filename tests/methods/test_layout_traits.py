"""Alignments that do not handle a layout structure say so up front (issues 24 and 28).

Properties checked: weight matching refuses concatenations (a depthwise kernel is matched with the
channels it is tied to, attention heads move as units), ZipIt! and CCA Merge refuse transformer
levels, saying why (a concatenation they merge part by part, block diagonal, also for models from
different initialisations), each by its own ``check_level`` and before any work with the level named;
``align="weights"`` refuses what weight matching does; and where they do apply, on automatic
levels of other people's architectures, a model fused with its permuted copy comes back.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.errors import IncompatibleModelsError
from neurofuse.levels import layout_traits
from neurofuse.methods import get_method
from neurofuse.testing import permute_spaces
from neurofuse.training import predict_logits

from ..levels.user_models import ARCHITECTURES
from ..levels.test_auto import _data, _make

#: architecture -> the layout trait it brings
TRAIT_OF = {"mobilenet_v2": "depthwise", "vit": "transformer", "branches": "parts"}
REFUSED = {  # method -> the traits it refuses
    "weight-matching": {"parts"},
    "zipit": {"transformer"},
    "cca-merge": {"transformer"},
    "regmean-aligned": set(),     # aligned by activations (the default); align="weights": below
    "fisher-aligned": set(),
}


def _pair(arch: str):
    net = neurofuse.levels_from(_make(arch, 0), input_shape=ARCHITECTURES[arch][1])
    return net, permute_spaces(net, seed=1)


@pytest.mark.parametrize("arch", sorted(TRAIT_OF))
def test_the_permuted_copy_computes_the_same_function_and_other_weights(arch):
    """``neurofuse.testing.permute_spaces`` permutes a concatenation's parts each on its own (one
    permutation of the whole output would mix its branches and change the function)."""
    net, twin = _pair(arch)
    x, _ = _data(arch)
    assert float((predict_logits(twin, x) - predict_logits(net, x)).abs().max()) < 1e-4
    differ = [k for k, v in twin.state_dict().items()
              if v.is_floating_point() and v.dim() > 1 and not torch.equal(v, net.state_dict()[k])]
    assert len(differ) >= 3


@pytest.mark.parametrize("arch", sorted(TRAIT_OF))
def test_each_architecture_shows_its_trait(arch):
    net, _ = _pair(arch)
    traits = set().union(*(layout_traits(net, i) for i in range(net.num_levels)))
    assert TRAIT_OF[arch] in traits


@pytest.mark.parametrize("method", sorted(REFUSED))
@pytest.mark.parametrize("arch", sorted(TRAIT_OF))
def test_an_alignment_refuses_what_it_does_not_handle_and_fuses_the_rest(method, arch):
    net, twin = _pair(arch)
    x, y = _data(arch)
    reasons = [get_method(method).check_level(net, i) for i in range(net.num_levels)]
    if TRAIT_OF[arch] in REFUSED[method]:
        assert any(r and "does not handle" in r for r in reasons), reasons
        if method in ("zipit", "cca-merge"):    # the reason says what stands in the way
            assert any(r and "no rule for attention heads" in r for r in reasons), reasons
        with pytest.raises(IncompatibleModelsError, match=r"cannot fuse level \d+ .*does not handle"):
            neurofuse.fuse([net, twin], (x, y), method=method, progress=False)
        return
    assert not any(reasons), reasons
    fused = neurofuse.fuse([net, twin], (x, y), method=method, progress=False)
    gap = float((predict_logits(fused, x) - predict_logits(net, x)).abs().max())
    # CCA is a regularised correlation map, not a permutation: close, not exact
    assert gap < (0.1 if method == "cca-merge" else 1e-4), gap


def test_align_by_weights_refuses_what_weight_matching_does_not_handle():
    net, twin = _pair("branches")
    x, y = _data("branches")
    with pytest.raises(IncompatibleModelsError, match="cannot align level 1 by weight matching.*concatenation"):
        neurofuse.fuse([net, twin], (x, y), method="regmean-aligned", align="weights", progress=False)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "vit"])
def test_align_by_weights_handles_depthwise_kernels_and_attention_heads(arch):
    """A depthwise kernel ``[C, 1, k, k]`` is a term of the permutation of the channels it reads;
    an attention's heads move as units (a timm-style ViT, packed ``qkv``): the permuted copy comes
    back through weight matching then RegMean."""
    net, twin = _pair(arch)
    x, y = _data(arch)
    fused = neurofuse.fuse([net, twin], (x, y), method="regmean-aligned", align="weights", progress=False)
    assert float((predict_logits(fused, x) - predict_logits(net, x)).abs().max()) < 1e-4


@pytest.mark.parametrize("method", ["zipit", "cca-merge"])
@pytest.mark.parametrize("arch", ["vgg11_bn", "resnet18"])
def test_the_merges_that_fold_batchnorm_write_back_automatic_levels(method, arch):
    """ZipIt! and CCA Merge fold BatchNorm and unfold the result into model 0's architecture;
    automatic levels are torch.fx GraphModules (each of its own class)."""
    torch.manual_seed(0)
    net, twin = _pair(arch)
    x, y = _data(arch)
    fused = neurofuse.fuse([net, twin], (x, y), method=method, progress=False)
    gap = float((predict_logits(fused, x) - predict_logits(net, x)).abs().max())
    assert gap < (0.1 if method == "cca-merge" else 1e-4), gap


class InputCat(torch.nn.Module):
    """The first level concatenates the model input itself with a convolution of it."""

    def __init__(self):
        super().__init__()
        self.grow = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.mid = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.mid(torch.relu(torch.cat([x, self.grow(x)], dim=1)))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(torch.relu(h), 1).flatten(1))


@pytest.mark.parametrize("model", ["dense", "input"])
@pytest.mark.parametrize("method", ["zipit", "cca-merge"])
def test_a_concatenation_with_the_level_input_as_a_part_comes_back(method, model):
    """DenseNet's ``cat([x, f(x)])``: the input's part keeps the input's maps (for ZipIt!, whose
    merges are summed over the models, the mean where the input is the shared model input), the
    grown part is merged on its own."""
    from ..levels.test_layout import DenseLayer

    torch.manual_seed(0)
    net = neurofuse.levels_from((DenseLayer() if model == "dense" else InputCat()).eval(), input_shape=(1, 6, 6))
    assert "concat" in net.kinds
    twin = permute_spaces(net, seed=2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 6, 6, generator=g), torch.randint(0, 2, (96,), generator=g)
    assert float((predict_logits(twin, x) - predict_logits(net, x)).abs().max()) < 1e-5
    result = neurofuse.fuse([net, twin], (x, y), method=method, progress=False, return_result=True)
    gap = float((predict_logits(result.model, x) - predict_logits(net, x)).abs().max())
    assert gap < (0.1 if method == "cca-merge" else 1e-4), gap
    if method == "zipit":   # every fused neuron of the concatenation: the mean of one per model
        matrix = result.correspondences[net.kinds.index("concat")].matrix()
        assert np.allclose(matrix.sum(1), 1.0) and set(np.unique(matrix)) <= {0.0, 0.5}


@pytest.mark.parametrize("method", ["zipit", "cca-merge"])
def test_a_concatenation_is_merged_part_by_part_for_different_models(method):
    """Models from different initialisations: no fused neuron of the concatenation draws on the
    other part's neurons (the correspondence is block diagonal over the parts)."""
    nets = [neurofuse.levels_from(_make("branches", s), input_shape=ARCHITECTURES["branches"][1]) for s in (0, 1)]
    x, y = _data("branches")
    result = neurofuse.fuse(nets, (x, y), method=method, progress=False, return_result=True)
    level = nets[0].kinds.index("concat")
    matrix = result.correspondences[level].matrix()
    first = 6                                        # the 3x3 branch's channels, then the 5x5's
    width = nets[0].level_widths()[level]
    for k in range(2):
        block = matrix[:, k * width:(k + 1) * width]
        assert np.abs(block[:first, first:]).sum() == 0 and np.abs(block[first:, :first]).sum() == 0
        assert np.abs(block[:first, :first]).sum() > 0 and np.abs(block[first:, first:]).sum() > 0


class GroupNormNet(torch.nn.Module):
    """A stem and a residual block of convolutions each followed by ``GroupNorm(groups(C), C)``."""

    def __init__(self, groups, width: int = 8, affine: bool = True):
        super().__init__()
        nn, c = torch.nn, width
        self.stem, self.gn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.GroupNorm(groups(c), c, affine=affine)
        self.conv1, self.gn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(groups(c), c, affine=affine)
        self.conv2, self.gn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(groups(c), c, affine=affine)
        self.fc = nn.Linear(c, 10)
        if affine:
            with torch.no_grad():
                for m in (self.gn, self.gn1, self.gn2):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.3)

    def forward(self, x):
        relu = torch.relu
        h = relu(self.gn(self.stem(x)))
        h = relu(h + self.gn2(self.conv2(relu(self.gn1(self.conv1(h))))))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.mark.parametrize("method", ["otfusion", "git-rebasin", "weight-matching", "zipit", "regmean-aligned",
                                    "kf-linear", "hf-linear"])
@pytest.mark.parametrize("groups", ["one", "per-channel"])
def test_a_groupnorm_that_commutes_with_permutations_is_aligned(groups, method):
    """``GroupNorm(1, C)`` (every channel together) and ``GroupNorm(C, C)`` (each alone) commute
    with any permutation of the channels: their weight and bias follow the channels."""
    torch.manual_seed(0)
    net = neurofuse.levels_from(GroupNormNet((lambda c: 1) if groups == "one" else (lambda c: c)).eval(),
                                input_shape=(3, 8, 8))
    twin = permute_spaces(net, seed=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    assert float((predict_logits(twin, x) - predict_logits(net, x)).abs().max()) < 1e-5
    differ = [k for k, v in twin.state_dict().items() if v.dim() == 1 and not torch.equal(v, net.state_dict()[k])]
    assert len(differ) >= 4                      # GroupNorm weights and biases moved with the channels
    fused = neurofuse.fuse([net, twin], (x, y), method=method, progress=False)
    assert float((predict_logits(fused, x) - predict_logits(net, x)).abs().max()) < 1e-4


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("method", ["otfusion", "git-rebasin", "weight-matching", "regmean-aligned", "cca-merge",
                                    "zipit", "kf-linear", "hf-linear"])
def test_a_groupnorm_of_several_channels_per_group_moves_its_groups_as_units(method, groups, affine):
    """``GroupNorm(g, C)`` normalises groups of channels together: the channels are matched
    group to group (as attention heads), so a copy permuted that way comes back."""
    torch.manual_seed(0)
    net = neurofuse.levels_from(GroupNormNet(lambda c: groups, affine=affine).eval(), input_shape=(3, 8, 8))
    assert "groups" in layout_traits(net, 0)
    _permuted_copy_fuses_back(net, method, "levels.0.0.weight")


@pytest.mark.parametrize("method", ["regmean-aligned", "fisher-aligned"])
def test_the_align_then_merge_methods_aligned_by_weights_move_groupnorm_groups_as_units(method):
    torch.manual_seed(0)
    net = neurofuse.levels_from(GroupNormNet(lambda c: 2).eval(), input_shape=(3, 8, 8))
    _permuted_copy_fuses_back(net, method, "levels.0.0.weight", align="weights")


def _permuted_copy_fuses_back(net, method: str, moved: str, **options) -> None:
    """A copy of ``net`` with every space permuted is the same function and moves ``moved``;
    fused with ``net`` by ``method`` it gives ``net`` back."""
    twin = permute_spaces(net, seed=1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    assert float((predict_logits(twin, x) - predict_logits(net, x)).abs().max()) < 1e-5
    assert not torch.equal(twin.state_dict()[moved], net.state_dict()[moved])
    fused = neurofuse.fuse([net, twin], (x, y), method=method, progress=False, **options)
    assert float((predict_logits(fused, x) - predict_logits(net, x)).abs().max()) < 1e-4


@pytest.mark.parametrize("method", ["otfusion", "git-rebasin", "weight-matching", "cca-merge", "zipit", "kf-linear",
                                    "hf-linear"])
def test_the_groups_of_a_groupnorm_are_matched_whole_for_different_models(method):
    """Models from different initialisations: every fused channel's group draws on one group of
    the other model (the map is block structured over the groups)."""
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(neurofuse.levels_from(GroupNormNet(lambda c: 2).eval(), input_shape=(3, 8, 8)))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    result = neurofuse.fuse(nets, (x, y), method=method, progress=False, return_result=True)
    block = result.correspondences[0].matrix()[:, 8:]          # fused channels x model 1's channels
    mass = np.array([[np.abs(block[4 * a:4 * a + 4, 4 * b:4 * b + 4]).sum() for b in range(2)] for a in range(2)])
    assert ((mass > 0).sum(1) == 1).all() and ((mass > 0).sum(0) == 1).all(), mass


class _GroupedAfterCat(torch.nn.Module):
    """A concatenation whose output stream a residual block normalises with ``GroupNorm(2, 8)``."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        self.conv, self.gn = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.cat([self.a(x), self.b(x)], 1)
        h = h + self.gn(self.conv(torch.relu(h)))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(h), 1).flatten(1))


class _MixedGroups(torch.nn.Module):
    """One residual stream normalised in 2 groups by one block and in 4 by the next."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.g1 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.c2, self.g2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.g1(self.c1(torch.relu(h)))
        h = h + self.g2(self.c2(torch.relu(h)))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(h), 1).flatten(1))


@pytest.mark.parametrize("model,needle", [(_GroupedAfterCat, "a concatenation writes"),
                                          (_MixedGroups, "into [2, 4] groups")])
@pytest.mark.parametrize("method", ["otfusion", "git-rebasin", "weight-matching", "kf-linear"])
def test_a_stream_whose_groups_cannot_be_kept_is_refused_before_any_work(method, model, needle, monkeypatch):
    import neurofuse.methods._base as base

    calls = []
    real = base.importance_sums
    monkeypatch.setattr(base, "importance_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    nets = [neurofuse.levels_from(model().eval(), input_shape=(3, 8, 8)) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    if method == "weight-matching" and model is _GroupedAfterCat:
        needle = "a concatenation of branches"   # refused for the concatenation alone
    with pytest.raises(IncompatibleModelsError, match=re.escape(needle)):
        neurofuse.fuse(nets, (x, y), method=method, progress=False)
    assert not calls


def test_grouped_permutation_keeps_groups_and_finds_the_cheapest_within_them():
    from neurofuse.grouping import grouped_permutation

    rng = np.random.default_rng(0)
    truth = np.concatenate([np.array([2, 0, 3, 1]) + 4, np.array([1, 3, 0, 2])])   # groups swapped
    cost = rng.random((8, 8)) + 5.0
    cost[np.arange(8), truth] = 0.0
    perm = grouped_permutation(cost, 2)
    assert np.array_equal(perm, truth)
    assert set(perm[:4] // 4) == {1} and set(perm[4:] // 4) == {0}


def test_the_maps_say_which_spaces_move_in_groups():
    from neurofuse.levels import format_maps

    net = neurofuse.levels_from(GroupNormNet(lambda c: 2).eval(), input_shape=(3, 8, 8))
    text = format_maps(net)
    assert text.count("channels in 2 GroupNorm groups, which move as units") == 2, text   # the stream, h0


def test_a_groupnorm_on_a_levels_input_is_refused_naming_its_groups():
    """(The automatic levels put a GroupNorm with the layer before it; a declared level may not.)"""
    from neurofuse.levels._layout import level_layout

    level = torch.nn.Sequential(torch.nn.GroupNorm(2, 8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(IncompatibleModelsError, match=r"GroupNorm\(2, 8\).*normalises the level input"):
        level_layout(level, 1)


@pytest.mark.parametrize("norm", ["groupnorm-one", "groupnorm-per-channel", "groupnorm-two", "layernorm", "prenorm"])
def test_otfusion_runs_a_width_bound_normalisation_at_the_anchors_width(norm):
    """Models of different widths: an aligned level runs with its GroupNorms and LayerNorms sized
    as their aligned weights (model k's own would not take the anchor's channels; it used to stop
    with a raw torch error)."""
    from ..levels.user_models import MLP, ResMLP

    make = {"groupnorm-one": lambda w: GroupNormNet(lambda c: 1, w),
            "groupnorm-per-channel": lambda w: GroupNormNet(lambda c: c, w),
            "groupnorm-two": lambda w: GroupNormNet(lambda c: 2, w),
            "layernorm": lambda w: MLP(192, (w, w), 10), "prenorm": lambda w: ResMLP(192, w, 2 * w)}[norm]
    nets = []
    for seed, width in ((0, 8), (1, 12)):
        torch.manual_seed(seed)
        nets.append(neurofuse.levels_from(make(width).eval(), input_shape=(3, 8, 8)))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    fused = neurofuse.fuse(nets, (x, y), method="otfusion", progress=False)
    assert fused.level_widths()[:-1] == nets[0].level_widths()[:-1]
    assert torch.isfinite(predict_logits(fused, x)).all()


def test_models_whose_groupnorms_have_other_groups_are_refused_by_name():
    nets = [neurofuse.levels_from(GroupNormNet(lambda c, g=g: g).eval(), input_shape=(3, 8, 8)) for g in (2, 4)]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    with pytest.raises(IncompatibleModelsError, match=r"model 1 level 0 has GroupNorms of other groups"):
        neurofuse.fuse(nets, (x, y), method="otfusion", progress=False)


class InstanceNormNet(torch.nn.Module):
    """A stem and a residual block of convolutions each followed by an affine ``InstanceNorm2d``."""

    def __init__(self):
        super().__init__()
        nn, c = torch.nn, 8
        self.stem, self.n0 = nn.Conv2d(3, c, 3, padding=1), nn.InstanceNorm2d(c, affine=True)
        self.conv1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.InstanceNorm2d(c, affine=True)
        self.conv2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.InstanceNorm2d(c, affine=True)
        self.fc = nn.Linear(c, 10)
        with torch.no_grad():
            for m in (self.n0, self.n1, self.n2):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0.0, 0.3)

    def forward(self, x):
        h = torch.relu(self.n0(self.stem(x)))
        h = torch.relu(h + self.n2(self.conv2(torch.relu(self.n1(self.conv1(h))))))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear", "otfusion", "git-rebasin"])
def test_an_instancenorm_follows_its_channels_and_a_permuted_copy_comes_back(method):
    """An affine InstanceNorm2d (a GroupNorm of one channel per group) commutes with any
    permutation of the channels; the closed form fits it as such a GroupNorm."""
    torch.manual_seed(0)
    net = neurofuse.levels_from(InstanceNormNet().eval(), input_shape=(3, 8, 8))
    _permuted_copy_fuses_back(net, method, "levels.0.1.weight")


def test_repair_after_otfusion_keeps_an_instancenorm_copy_and_folds_into_its_affine():
    """REPAIR folds its rescaling into an InstanceNorm that ends a level (a normalisation's output
    is its affine per channel); on a permuted copy the fused model stays the model."""
    torch.manual_seed(0)
    net = neurofuse.levels_from(InstanceNormNet().eval(), input_shape=(3, 8, 8))
    _permuted_copy_fuses_back(net, "otfusion", "levels.0.1.weight", repair=True)
    from neurofuse.repair import _fold_target

    assert isinstance(_fold_target(net.levels[0]), torch.nn.InstanceNorm2d)
