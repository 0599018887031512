"""Level layouts of depthwise convolutions and concatenations, and the maps a model shows.

Properties checked:

* a depthwise convolution stays in the space it reads (its weight, bias and BatchNorm follow the
  input's map), so a level of depthwise layers only is tied to its input; a grouped convolution
  that is not depthwise is refused with a reason naming it, unless laid out ``grouped=True``
  (otfusion, git-rebasin): then the spaces it reads and writes move in its groups, its output's
  groups as its input's, and a copy permuted that way comes back exactly;
* a concatenation's output is its parts' spaces in order; the map of a concatenation is the
  block diagonal of its parts' maps, and aligning with it is exact for permutations;
* ``neuron_maps`` / ``format_maps`` / ``format_levels`` list which tensors every map moves and
  along which axis, for any model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurofuse
from neurofuse.errors import IncompatibleModelsError
from neurofuse.levels import AutoConcat, format_maps, neuron_maps
from neurofuse.levels._layout import NeuronMap, align_level, concat_maps, is_depthwise, level_layout
from neurofuse.methods import format_levels, get_method

from .user_models import BranchNet, MobileNetV2


def _perm_map(p: np.ndarray) -> NeuronMap:
    n = len(p)
    return NeuronMap.from_plan(np.eye(n)[p].T, np.ones(n))


def test_a_depthwise_convolution_stays_in_the_space_it_reads():
    level = nn.Sequential(nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6))
    lay = level_layout(level, 3)
    assert is_depthwise(level[1]) and lay.tied
    assert {s0 for _, s0, _, _ in lay.tensors} == {"in"}
    assert ("1.weight", "in", None, "depthwise") in lay.tensors
    inner = nn.Sequential(nn.Conv2d(4, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(),
                          nn.Conv2d(6, 5, 1))
    lay = level_layout(inner, 0)
    assert not lay.tied and [sp.name for sp in lay.internal] == ["h0"]
    assert ("2.weight", "h0", None, "depthwise") in lay.tensors and ("4.weight", "out", "h0", "conv") in lay.tensors


@pytest.mark.parametrize("conv,needle", [(nn.Conv2d(8, 8, 3, groups=2), "grouped convolution (groups=2, 4 input"),
                                         (nn.Conv2d(4, 8, 3, groups=4), "depthwise convolution with a channel multiplier")])
def test_other_grouped_convolutions_are_refused_with_their_shape(conv, needle):
    with pytest.raises(IncompatibleModelsError, match="level 2 has a " + needle.replace("(", r"\(")):
        level_layout(nn.Sequential(nn.ReLU(), conv), 2)


def test_a_depthwise_level_aligned_with_a_permutation_computes_the_permuted_function():
    torch.manual_seed(0)
    level = nn.Sequential(nn.ReLU(), nn.Conv2d(5, 5, 3, padding=1, groups=5), nn.BatchNorm2d(5)).eval()
    with torch.no_grad():
        level[2].running_mean.normal_()
        level[2].running_var.uniform_(0.5, 2)
    p = np.array([3, 0, 4, 1, 2])
    m = _perm_map(p)
    new = nn.Sequential(nn.ReLU(), nn.Conv2d(5, 5, 3, padding=1, groups=5), nn.BatchNorm2d(5)).eval()
    new.load_state_dict(align_level(level, level_layout(level, 0), 0, {"in": m, "out": m}))
    x = torch.randn(4, 5, 6, 6)
    # channel j of the aligned level is channel p[j] of the original, on both sides
    assert torch.allclose(new(x[:, p]), level(x)[:, p], atol=1e-6)


def test_a_concatenation_is_cut_into_one_level_whose_parts_are_its_branches():
    net = neurofuse.levels_from(BranchNet().eval(), input_shape=(3, 16, 16))
    assert net.kinds == ["chain", "concat", "chain", "chain", "chain"]
    cat = net.levels[1]
    assert isinstance(cat, AutoConcat) and len(cat.branches) == 2
    lay = level_layout(cat, 1)
    assert lay.parts == ("out0", "out1") and not lay.tied
    assert lay.part_widths(cat.state_dict(), 8) == [6, 10]


class DenseLayer(nn.Module):
    """DenseNet-style: the level input is one part of the output (``cat([x, f(x)])``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.grow = nn.Conv2d(4, 3, 3, padding=1)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        h = self.stem(x)
        h = torch.cat([h, self.grow(F.relu(h))], dim=1)
        return self.head(F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1))


def test_a_part_that_is_the_level_input_keeps_the_input_map():
    net = neurofuse.levels_from(DenseLayer().eval(), input_shape=(1, 6, 6))
    assert net.kinds == ["chain", "concat", "chain"]
    lay = level_layout(net.levels[1], 1)
    assert lay.parts == ("in", "out1")
    text = format_maps(net)
    assert "level 1 out-map: head.weight columns  [block diagonal of level 0 out, level 1 out1]" in text
    assert "level 0 out-map: stem.weight rows, stem.bias, grow.weight columns (per 3x3 tap)" in text


def test_the_map_of_a_concatenation_is_block_diagonal_and_exact_for_permutations():
    a, b = _perm_map(np.array([1, 2, 0])), _perm_map(np.array([1, 0]))
    m = concat_maps([a, b])
    assert m.out.shape == (5, 5) and m.parts == (a, b)
    assert torch.equal(m.out[:3, :3], a.out) and torch.equal(m.out[3:, 3:], b.out)
    assert m.out[:3, 3:].abs().sum() == 0 and m.out[3:, :3].abs().sum() == 0
    assert torch.allclose(m.out @ m.inc, torch.eye(5, dtype=m.out.dtype))


def test_maps_list_every_tensor_each_moves_and_along_which_axis():
    net = neurofuse.levels_from(BranchNet().eval(), input_shape=(3, 16, 16))
    assert format_maps(net).splitlines() == [
        "level 0 out-map: stem.weight rows, stem.bias, branch3.weight columns (per 3x3 tap), "
        "branch5.weight columns (per 5x5 tap)",
        "level 1 out0-map: branch3.weight rows, branch3.bias",
        "level 1 out1-map: branch5.weight rows, branch5.bias",
        "level 1 out-map: mid.weight columns (per 3x3 tap)  [block diagonal of level 1 out0, level 1 out1]",
        "level 2 out-map: mid.weight rows, mid.bias, fc.weight columns (per position, 4 positions)",
        "level 3 out-map: fc.weight rows, fc.bias, out.weight columns",
        "level 4 out-map: out.weight rows, out.bias  [the identity: the output classes are not permuted]",
    ]


def test_every_tensor_of_a_laid_out_model_is_moved_by_exactly_its_maps():
    """MobileNet-V2: every weight/bias/statistic appears on its rows' map; a residual stream (and
    a depthwise level tied to it) is one map."""
    net = neurofuse.levels_from(MobileNetV2().eval(), input_shape=(3, 16, 16))
    maps = neuron_maps(net)
    assert [(m.level, m.space) for m in maps] == [(0, "out"), (2, "out"), (4, "out"), (5, "h0"), (6, "h0"),
                                                  (7, "out"), (8, "out")]
    by = {(m.level, m.space): m for m in maps}
    assert by[(0, "out")].note == "residual stream of levels 0-1"
    assert "features.2.conv.1.0.weight rows (depthwise: one kernel per channel)" in by[(2, "out")].tensors
    assert "features.3.conv.0.0.weight columns" in by[(4, "out")].tensors
    listed = " ".join(t for m in maps for t in m.tensors)
    for key, v in net.model_state_dict().items():
        if v.is_floating_point():
            mod, leaf = key.rsplit(".", 1)
            assert key in listed or (mod + ".{") in listed, key


def test_format_levels_shows_the_maps_of_each_level_and_why_a_level_has_none():
    net = neurofuse.levels_from(MobileNetV2().eval(), input_shape=(3, 16, 16))
    text = format_levels(net)
    first = next(line for line in text.splitlines() if "fused by: " in line)
    assert {"otfusion", "git-rebasin", "hf-linear", "kf-linear", "kf-gradient"} <= set(first.split("fused by: ")[1].split(", "))
    assert "out-map: features.0.0.weight rows, features.0.1.{weight, bias, running_mean, running_var}" in text
    assert "h0-map: features.3.conv.0.0.weight rows" in text


class BasicConv2d(nn.Sequential):
    def __init__(self, c_in, c_out, k):
        super().__init__(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class InceptionLike(nn.Module):
    """torchvision-style branches that end in their own ReLU, one of them two layers deep."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = BasicConv2d(8, 4, 1)
        self.b3 = nn.Sequential(BasicConv2d(8, 3, 1), BasicConv2d(3, 5, 3))
        self.fc = nn.Linear(9, 2)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = torch.cat([self.b1(h), self.b3(h)], 1)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("arch", ["dense", "inception"])
@pytest.mark.parametrize("method", ["kf-linear", "hf-linear", "otfusion", "git-rebasin"])
def test_concatenations_fused_with_their_permuted_copy_give_back_the_model(arch, method):
    """A DenseNet layer (the level input is one part) and Inception-style branches (ending in
    their ReLU, one with an inner space)."""
    from .test_auto import _gap, _permute_by_layout

    make = DenseLayer if arch == "dense" else InceptionLike
    torch.manual_seed(0)
    model = _randomise_bn(make())
    twin = make().eval()
    twin.load_state_dict(model.state_dict())
    _permute_by_layout(neurofuse.levels_from(twin, input_shape=(1, 6, 6)), seed=3)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 2, (64,))
    assert _gap(twin, model, x) < 1e-5 and not torch.equal(twin.stem.weight, model.stem.weight)
    nets = [neurofuse.levels_from(m, input_shape=(1, 6, 6)) for m in (model, twin)]
    assert nets[0].kinds[1] == "concat"
    fused = neurofuse.fuse(nets, (x, y), method=method, progress=False)
    assert _gap(fused, model, x) < 1e-4
    assert _gap(fused, model, torch.randn(16, 1, 6, 6)) < 1e-4


def test_the_maps_print_any_layout_generically(monkeypatch):
    """The display reads LevelLayout.tensors only: a packed weight whose rows run over a
    concatenation of spaces ("a+b") is listed block by block under each part's map, a tensor whose
    last axis is the space ("last") and a kind the display does not know are named by axis."""
    from neurofuse.levels import _maps
    from neurofuse.levels._layout import LevelLayout, Space

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)
            self.cls = nn.Parameter(torch.zeros(1, 1, 4))
            self.odd = nn.Parameter(torch.zeros(3, 4))

        def forward(self, x):
            return self.qkv(x)[:, :4] + self.cls[0, 0] + self.odd.sum()

    net = neurofuse.levels_from(nn.Sequential(Packed(), nn.Linear(4, 2)).eval(),
                                levels=["0", "1"], input_shape=(4,))
    fake = LevelLayout((("qkv.weight", "qk+qk+vo", "in", "linear"), ("cls", "in", None, "last"),
                        ("odd", "in", "qk", "future")), (Space("qk", "qkv", None), Space("vo", "qkv", None)),
                       True)
    real = _maps.level_layout
    monkeypatch.setattr(_maps, "level_layout", lambda lv, i, *a, **k: fake if i == 0 else real(lv, i, *a, **k))
    maps = {(m.level, m.space): m.tensors for m in neuron_maps(net)}
    assert maps[(0, "qk")] == ("levels.0.qkv.weight rows (block 1 of 3)",
                               "levels.0.qkv.weight rows (block 2 of 3)", "levels.0.odd axis 1 (future)")
    assert maps[(0, "vo")] == ("levels.0.qkv.weight rows (block 3 of 3)",)
    assert (0, "out") not in maps     # tied: its output is its input, the network input (no map)
    assert "cls" not in " ".join(t for ts in maps.values() for t in ts)  # the network input: no map


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("method", ["kf-linear", "otfusion", "git-rebasin"])
def test_a_declared_level_that_is_one_module_is_aligned(method):
    """levels=["fc1", ...] makes the level the Linear itself, whose keys are "weight" and "bias"
    (its layout named them ".weight" and otfusion and git-rebasin left it unaligned)."""
    torch.manual_seed(0)
    model, twin = TwoLinear().eval(), TwoLinear().eval()
    twin.load_state_dict(model.state_dict())
    p = torch.randperm(8)
    with torch.no_grad():
        twin.fc1.weight.copy_(twin.fc1.weight[p])
        twin.fc1.bias.copy_(twin.fc1.bias[p])
        twin.fc2.weight.copy_(twin.fc2.weight[:, p])
    nets = [neurofuse.levels_from(m, levels=["fc1", [F.relu, "fc2"]], input_shape=(12,)) for m in (model, twin)]
    assert level_layout(nets[0].levels[0], 0).tensors[0] == ("weight", "out", "in", "linear")
    x, y = torch.randn(50, 12), torch.randint(0, 3, (50,))
    fused = neurofuse.fuse(nets, (x, y), method=method, progress=False)
    assert (fused(x) - model(x)).abs().max() < 1e-5


def test_the_maps_say_which_spaces_a_grouped_convolution_matches_together():
    from neurofuse.levels import format_maps

    from ..methods.test_steps import GroupedNet, _net

    text = format_maps(_net(GroupedNet()))
    assert "level 0 out-map" in text and "matched as the level 1 out groups are" in text, text
    assert "matched as the level 0 out groups are" in text, text


class _InputGrouped(nn.Module):
    """A grouped convolution that reads the network input (whose groups stay where they are)."""

    def __init__(self):
        super().__init__()
        self.g, self.c, self.head = nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.c(torch.relu(self.g(x)))).mean((2, 3)))


class _GroupedChain(nn.Module):
    """Grouped convolutions in levels of their own, one after the other (the second widens)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.g1, self.bn = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.g2, self.head = nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.g1(torch.relu(self.stem(x)))))
        return self.head(torch.relu(self.g2(h)).mean((2, 3)))


class _Multiplier(nn.Module):
    """A depthwise convolution with a channel multiplier (8 groups of one input, two outputs)."""

    def __init__(self):
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.dw(torch.relu(self.stem(x)))).mean((2, 3)))


class _GroupedEnd(nn.Module):
    """A residual block that ends in a grouped convolution."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.g, self.head = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(h + self.g(torch.relu(self.c1(h)))).mean((2, 3)))


class _GroupedEnds(nn.Module):
    """Residual blocks that end in grouped convolutions: one tied to the stem's stream; with
    ``downsample``, one that widens (a projection shortcut: it starts a new stream); one with a
    GroupNorm after its grouped convolution; one whose grouped convolution reads the stream itself."""

    def __init__(self, downsample: bool = True):
        super().__init__()
        c, g = (16, 4) if downsample else (8, 2)
        self.downsample = downsample
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.g1 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        if downsample:
            self.short = nn.Conv2d(8, c, 1, stride=2)
            self.c2, self.g2 = nn.Conv2d(8, c, 1), nn.Conv2d(c, c, 3, stride=2, padding=1, groups=g)
        self.c3, self.g3, self.gn = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1, groups=g), nn.GroupNorm(g, c)
        self.g4, self.head = nn.Conv2d(c, c, 3, padding=1, groups=g), nn.Linear(c, 10)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 1.5), self.gn.bias.normal_(0.0, 0.3)

    def forward(self, x):
        relu = torch.relu
        h = relu(self.stem(x))
        h = relu(h + self.g1(relu(self.c1(h))))
        if self.downsample:
            h = relu(self.short(h) + self.g2(relu(self.c2(h))))
        h = relu(h + self.gn(self.g3(relu(self.c3(h)))))
        h = relu(h + self.g4(h))
        return self.head(h.mean((2, 3)))


class _GroupedEndChained(nn.Module):
    """A residual block that ends in a grouped convolution reading another grouped convolution's
    output: the inner space would have to keep the first one's input groups and the stream's."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.ga, self.gb = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(h + self.gb(torch.relu(self.ga(torch.relu(self.c1(h)))))).mean((2, 3)))


def _grouped_models():
    from ..methods.test_steps import GroupedNet, _GroupedBranch, _GroupedInBlock

    return {"reads the level input": (GroupedNet, (3, 8, 8)),
            "writes a concatenation part": (_GroupedBranch, (3, 8, 8)),
            "inside a block, GroupNorm after": (lambda: _GroupedInBlock("groupnorm"), (3, 8, 8)),
            "reads the network input": (_InputGrouped, (4, 8, 8)),
            "a chain of levels": (_GroupedChain, (3, 8, 8)),
            "a channel multiplier": (_Multiplier, (3, 8, 8)),
            "ends a residual block": (_GroupedEnd, (3, 8, 8)),
            "ends blocks: tied, widening, GroupNorm after, reading the stream": (_GroupedEnds, (3, 8, 8)),
            "ends tied blocks: GroupNorm after, reading the stream": (lambda: _GroupedEnds(False), (3, 8, 8))}


@pytest.mark.parametrize("method", ["otfusion", "git-rebasin", "weight-matching", "regmean-aligned", "fisher-aligned",
                                    "cca-merge", "zipit", "kf-linear", "hf-linear"])
@pytest.mark.parametrize("case", sorted(_grouped_models()))
@pytest.mark.parametrize("seed", [1, 2])   # seed 2 reorders 4 groups in cycles longer than swaps
def test_a_copy_permuted_in_the_groups_of_its_grouped_convolutions_is_aligned_back(case, method, seed):
    from neurofuse.testing import permute_spaces

    factory, shape = _grouped_models()[case]
    torch.manual_seed(0)
    model = factory().eval()
    refused = {("weight-matching", "writes a concatenation part"): "concatenation"}   # it refuses concatenations
    if (method, case) in refused:
        net = neurofuse.levels_from(model, input_shape=shape)
        why = [get_method(method).check_level(net, i) for i in range(net.num_levels)]
        assert any(w and refused[method, case] in w for w in why), why
        return
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    net = neurofuse.levels_from(model, input_shape=shape)
    twin = permute_spaces(net, seed=seed)
    x = torch.randn(64, *shape)
    with torch.no_grad():
        assert (twin(x) - net(x)).abs().max() < 1e-5                      # the same function ...
    assert any(not torch.equal(a, b) for a, b in zip(twin.state_dict().values(), net.state_dict().values()))
    fused = neurofuse.fuse([net, twin], (x, torch.randint(0, 10, (64,))), method=method, progress=False)
    with torch.no_grad():
        assert (fused(x) - net(x)).abs().max() / net(x).abs().max() < 1e-4


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_otfusion_aligns_resnexts_of_other_widths_keeping_every_grouped_weight_in_groups(solver):
    from .user_models import ResNeXt

    torch.manual_seed(0)
    nets = [neurofuse.levels_from(ResNeXt(base_width=b).eval(), input_shape=(3, 16, 16)) for b in (64, 96, 64)]
    x = torch.randn(64, 3, 16, 16)
    result = neurofuse.fuse(nets, (x, torch.randint(0, 10, (64,))), method="otfusion", solver=solver, reg=0.05,
                            progress=False, return_result=True)
    anchor = nets[0].state_dict()
    assert {k: v.shape for k, v in result.model.state_dict().items()} == {k: v.shape for k, v in anchor.items()}
    with torch.no_grad():
        out = result.model(x)
        assert torch.isfinite(out).all() and not torch.allclose(out, nets[0](x))   # an average, not the anchor


@pytest.mark.parametrize("method", ["otfusion", "git-rebasin", "weight-matching", "cca-merge", "zipit"])
def test_a_grouped_convolution_reading_the_network_input_keeps_its_groups_in_place(method):
    """Its input channels are not permuted, so output group ``a`` must stay group ``a``; only the
    channels inside each group move.  Model 1 is model 0 with the grouped conv's two output groups
    exchanged (and the next conv's columns with them), so that everything after the conv pulls
    towards exchanging the groups back, which the conv cannot do."""
    torch.manual_seed(0)
    a = _InputGrouped().eval()
    b = _InputGrouped().eval()
    swap = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    with torch.no_grad():
        b.load_state_dict(a.state_dict())
        b.g.weight.mul_(0.1)                                     # its own term weighs little
        b.g.weight.copy_(b.g.weight[swap].clone()), b.g.bias.copy_(a.g.bias[swap].clone())
        b.c.weight.copy_(a.c.weight[:, swap].clone())
    nets = [neurofuse.levels_from(m, input_shape=(4, 8, 8)) for m in (a, b)]
    x = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = neurofuse.fuse(nets, (x, torch.randint(0, 10, (64,))), method=method, progress=False,
                            return_result=True)
    block = np.abs(result.correspondences[0].matrix()[:, 8:])     # fused channels x model 1's channels
    mass = np.array([[block[4 * a:4 * a + 4, 4 * b:4 * b + 4].sum() for b in range(2)] for a in range(2)])
    assert mass[0, 1] == 0 and mass[1, 0] == 0 and mass[0, 0] > 0 and mass[1, 1] > 0, mass


@pytest.mark.parametrize("method", ["kf-linear", "otfusion", "zipit"])
def test_three_copies_of_blocks_ending_in_grouped_convolutions_fuse_back(method):
    """N = 3: each copy's streams permuted in their own order of groups; the closed form groups
    every stream and the space its grouped convolutions read with one assignment per model."""
    from neurofuse.testing import permute_spaces

    torch.manual_seed(0)
    net = neurofuse.levels_from(_GroupedEnds().eval(), input_shape=(3, 8, 8))
    x = torch.randn(64, 3, 8, 8)
    fused = neurofuse.fuse([net, permute_spaces(net, seed=1), permute_spaces(net, seed=2)],
                           (x, torch.randint(0, 10, (64,))), method=method, progress=False)
    with torch.no_grad():
        assert (fused(x) - net(x)).abs().max() / net(x).abs().max() < 1e-4


def test_alignment_refuses_a_grouped_convolution_ending_a_block_that_reads_another_grouped_one_by_name():
    from neurofuse.methods import get_method

    net = neurofuse.levels_from(_GroupedEndChained().eval(), input_shape=(3, 8, 8))
    for method in ("otfusion", "git-rebasin", "weight-matching", "zipit", "cca-merge"):
        why = [get_method(method).check_level(net, i) for i in range(net.num_levels)]
        assert any(w and "grouped convolution (groups=2) that ends a residual block and reads a space another "
                   "grouped convolution writes" in w for w in why), why