"""Automatic levels on models written the way people write them (tests/levels/user_models.py).

Properties checked:

* the levels of each architecture are found where the paper puts them (pre-activations; residual
  and attention blocks whole), reproduce ``model(x)``, and say which methods fuse each level;
* every method that applies fuses two such models; every method that does not is refused with a
  one-line error, and ``level_support`` gives the reason;
* the permuted-copy property: a model fused with a copy of itself whose hidden neurons are
  permuted gives back the same function, through its automatic levels, for every level-wise
  method that applies;
* Dropout at the end of a level leaves it affine; tracing failures fall back to forward hooks
  (and say so); models that cannot be cut give one-line errors.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurofuse
from neurofuse.errors import ConfigError, IncompatibleModelsError
from neurofuse.levels import AutoBlock, AutoNet, split_affine
from neurofuse.methods import format_levels, get_method, level_support
from neurofuse.levels._layout import (NeuronMap, align_level, check_alignable, concat_maps, stream_groups,
                                      stream_members)
from neurofuse.levels._transformer import describe

from .user_models import ARCHITECTURES, MLP, DropoutMLP, MobileNetV2, VisionTransformer

LEVELWISE = ["hf-linear", "kf-linear", "otfusion", "git-rebasin", "weight-matching", "zipit", "kf-gradient"]
WHOLE = ["vanilla", "ensemble", "kd-head", "base"]

#: architecture -> level-wise methods that fuse it (the others are refused with a reason)
SUPPORTED = {
    "resnet18": {"hf-linear", "kf-linear", "otfusion", "git-rebasin", "weight-matching", "zipit", "kf-gradient"},
    "resnet18_gn": {"hf-linear", "kf-linear", "otfusion", "git-rebasin", "weight-matching", "zipit", "kf-gradient"},
    "vgg11_bn": {"hf-linear", "kf-linear", "otfusion", "git-rebasin", "weight-matching", "zipit", "kf-gradient"},
    "mobilenet_v2": {"hf-linear", "kf-linear", "otfusion", "git-rebasin", "weight-matching", "zipit", "kf-gradient"},
    "vit": {"hf-linear", "kf-linear", "otfusion", "git-rebasin", "weight-matching", "kf-gradient"},
    "mlp_ln": {"hf-linear", "kf-linear", "otfusion", "git-rebasin", "weight-matching", "zipit", "kf-gradient"},
    "resmlp": {"hf-linear", "kf-linear", "otfusion", "git-rebasin", "weight-matching", "zipit", "kf-gradient"},
    "branches": {"hf-linear", "kf-linear", "otfusion", "git-rebasin", "zipit", "kf-gradient"},
    "resnext": {"hf-linear", "kf-linear", "otfusion", "git-rebasin", "weight-matching", "zipit", "kf-gradient"},
    "grouped_end": {"hf-linear", "kf-linear", "otfusion", "git-rebasin", "weight-matching", "zipit", "kf-gradient"},
}
#: a word the one-line reason of each refused method must contain
REASON = {("branches", "weight-matching"): "concatenation", ("vit", "zipit"): "transformer"}
FAST_GRADIENT = {"levels": {"epochs": 2, "val_fraction": 0.0}, "head": {"epochs": 2, "val_fraction": 0.0}}



def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def _make(arch: str, seed: int) -> nn.Module:
    factory, _ = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    return _randomise_bn(factory(), seed)


def _data(arch: str, n: int = 96, seed: int = 0):
    shape = ARCHITECTURES[arch][1]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _gap(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """max |a(x) - b(x)| relative to max |b(x)|."""
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).abs().max() / yb.abs().max())


# -- the levels that are found ---------------------------------------------------------------
def test_resnet18_levels_are_stem_blocks_and_head():
    net = neurofuse.levels_from(_make("resnet18", 0), input_shape=(3, 32, 32))
    assert isinstance(net, AutoNet) and net.tracer == "fx"
    assert net.kinds == ["chain"] + ["block"] * 8 + ["chain"]
    assert net.axes == ["conv"] * 9 + ["dense"]
    assert net.level_widths() == [4, 4, 4, 8, 8, 8, 8, 16, 16, 10]
    stem = list(net.levels[0].children())
    assert [type(m) for m in stem] == [nn.Conv2d, nn.BatchNorm2d]  # [conv, BN]: a pre-activation
    down = net.levels[3]
    assert isinstance(down, AutoBlock) and not isinstance(down.shortcut, nn.Identity)
    assert isinstance(net.levels[2].shortcut, nn.Identity)      # identity skip: residual stream
    # torchvision's in-place ReLUs are replaced, so a level never overwrites its input
    assert not any(getattr(m, "inplace", False) for lv in net.levels for m in lv.modules())


def test_vit_blocks_are_levels_of_their_own_described_as_transformer_stages():
    net = neurofuse.levels_from(_make("vit", 0), input_shape=(3, 16, 16))
    assert net.kinds == ["chain", "graph", "chain", "chain"]
    assert net.axes == ["conv", "token", "token", "dense"]
    assert [type(s).__name__ for s in describe(net.levels[1]).stages] == ["Affix", "Attention", "MLP"]
    assert [type(s).__name__ for s in describe(net.levels[2]).stages] == ["Attention", "MLP"]
    refused = {name for row in level_support(net) for name, why in row.items() if why is not None}
    assert refused == {"zipit", "cca-merge"}   # they do not handle transformer levels (weight matching does)


def test_a_vit_left_in_training_mode_keeps_its_transformer_head():
    """The head level ``norm -> select token 0 -> dropout -> head`` is recognised with its dropout
    as the identity (fusion runs in eval mode), whatever mode the user's model is in: the closed
    form fuses every level of a ViT that was never put in eval mode."""
    net = neurofuse.levels_from(_make("vit", 0), input_shape=(3, 16, 16))
    net.train()
    assert net.training and describe(net.levels[3]) is not None
    refused = {name for row in level_support(net) for name, why in row.items() if why is not None}
    assert refused == {"zipit", "cca-merge"}
    assert net.levels[3].training   # the check left the mode as it was


def test_levels_share_the_models_parameters_and_map_back_to_its_keys():
    model = _make("resnet18", 0)
    net = neurofuse.levels_from(model, input_shape=(3, 32, 32))
    assert set(net.model_keys.values()) == set(model.state_dict())
    assert {id(p) for p in net.parameters()} == {id(p) for p in model.parameters()}
    state = net.model_state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_automatic_levels_reproduce_the_model(arch):
    model = _make(arch, 1)
    net = neurofuse.levels_from(model, input_shape=ARCHITECTURES[arch][1])
    x, _ = _data(arch, 8, seed=3)
    assert _gap(net, model, x) < 1e-6


def test_dropout_at_the_end_of_a_level_keeps_it_affine():
    model = DropoutMLP().eval()
    net = neurofuse.levels_from(model, input_shape=(3, 8, 8))
    last = list(net.levels[-1].children())
    assert isinstance(last[-1], nn.Dropout)                  # the model ends in a Dropout
    _, affine = split_affine(net.levels[-1])
    assert isinstance(affine, nn.Linear)
    assert all(r is None for row in level_support(net) for r in row.values())
    x, y = torch.randn(96, 3, 8, 8), torch.randint(0, 10, (96,))
    fused = neurofuse.fuse([net, copy.deepcopy(net)], (x, y), method="kf-linear", progress=False)
    assert _gap(fused, net, x) < 1e-4


def test_format_levels_lists_widths_methods_and_reasons():
    net = neurofuse.levels_from(_make("mlp_ln", 0), input_shape=(3, 8, 8))
    text = format_levels(net)
    fused_by = [line.split("fused by: ")[1].split(", ") for line in text.splitlines() if "fused by: " in line]
    assert all({"otfusion", "git-rebasin", "kf-linear", "kf-gradient"} <= set(m) for m in fused_by)
    assert "out-map: fc1.weight rows, fc1.bias, ln1.{weight, bias}, fc2.weight columns" in text
    assert text.splitlines()[-1].startswith("whole model: otfusion")
    # a level the closed form refuses gets its reason on its own line
    mlp = neurofuse.levels_from(MLP(), input_shape=(3, 8, 8))
    mlp.levels[0].insert(2, nn.ReLU())    # Linear -> ReLU -> LayerNorm: the norm is not the layer's
    text = format_levels(mlp)
    assert "not hf-linear/kf-linear: its LayerNorm (3) holds parameters and is not folded" in text
    assert text.splitlines()[-1].endswith("hf-linear, kf-linear do not (see above)")


# -- every method that applies fuses; the others say why not --------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_methods_that_apply_fuse_and_the_others_say_why(arch):
    nets = [neurofuse.levels_from(_make(arch, s), input_shape=ARCHITECTURES[arch][1]) for s in (0, 1)]
    x, y = _data(arch)
    support = level_support(nets[0])
    for method in LEVELWISE + WHOLE:
        ok = method in WHOLE or method in SUPPORTED[arch]
        refused = [r[method] for r in support if method in r and r[method] is not None]
        kwargs = FAST_GRADIENT if method == "kf-gradient" else {"epochs": 1} if method == "kd-head" else {}
        if ok:
            assert not refused, (method, refused)
            fused = neurofuse.fuse(nets, (x, y), method=method, progress=False, **kwargs)
            with torch.no_grad():
                out = fused(x[:4])
            assert out.shape == (4, 10) and torch.isfinite(out).all(), method
        else:
            assert refused, method                       # a one-line reason per refused method
            assert all("\n" not in r for r in refused)
            if (arch, method) in REASON:
                assert REASON[(arch, method)] in refused[0], refused[0]
            with pytest.raises(IncompatibleModelsError):
                neurofuse.fuse(nets, (x, y), method=method, progress=False)


# -- the permuted-copy property ---------------------------------------------------------------
def _perm(n: int, g: torch.Generator) -> torch.Tensor:
    while True:
        p = torch.randperm(n, generator=g)
        if not torch.equal(p, torch.arange(n)):
            return p


def _perm_map(n: int, g: torch.Generator, groups: int = 0) -> NeuronMap:
    """A permutation of ``n`` neurons; with ``groups``, one that keeps that many equal contiguous
    groups together (a GroupNorm's)."""
    if groups > 1:
        size = n // groups
        order = _perm(groups, g)
        p = torch.cat([order[b] * size + torch.randperm(size, generator=g) for b in range(groups)])
    else:
        p = _perm(n, g)
    return NeuronMap.from_plan(np.eye(n)[p.numpy()].T, np.ones(n))


def _permute_by_layout(net: AutoNet, seed: int) -> None:
    """Permute every residual stream, concatenation part and internal space of a net of chains,
    blocks and concatenations in place."""
    layouts, heads = check_alignable([net], "permute")
    g = torch.Generator().manual_seed(seed)
    widths = net.level_widths()
    outs = {}
    for i, (level, lay) in enumerate(zip(net.levels, layouts)):
        maps = {"in": outs.get(i - 1)}
        if i == net.num_levels - 1 or heads[i] == -1:
            pass
        elif heads[i] < i:
            outs[i] = outs[heads[i]]
        elif lay.parts:
            in_w = widths[i - 1] if i else net.input_shape[0]
            parts = lay.part_widths(level.state_dict(), in_w)
            for p, w in zip(lay.parts, parts):
                if p != "in":
                    maps[p] = _perm_map(w, g)
            outs[i] = concat_maps([maps[p] or NeuronMap.identity(w) for p, w in zip(lay.parts, parts)])
        else:
            outs[i] = _perm_map(widths[i], g, stream_groups(layouts, stream_members(heads, heads[i])))
        maps["out"] = outs.get(i)
        for sp in lay.internal:
            maps[sp.name] = _perm_map(len(dict(level.named_modules())[sp.point].weight), g, lay.groups_of(sp.name))
        level.load_state_dict(align_level(level, lay, i, maps))


def _po(m: nn.Module, p: torch.Tensor) -> None:
    """Permute the output axis of a layer / normalisation in place."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, name, None)
        if t is not None and t.dim() >= 1:
            t.data.copy_(t.data[p])


def _pi(m: nn.Module, p: torch.Tensor) -> None:
    m.weight.data.copy_(m.weight.data[:, p])


def _permute_mobilenet(model: MobileNetV2, g: torch.Generator) -> None:
    f = model.features
    p = _perm(4, g)                     # the stem's channels run through block 1 (a residual stream)
    _po(f[0][0], p), _po(f[0][1], p)
    b1 = f[1].conv
    _po(b1[0][0], p), _po(b1[0][1], p)  # depthwise conv: output channel i reads input channel i
    _pi(b1[1], p), _po(b1[1], p), _po(b1[2], p)
    _pi(f[2].conv[0][0], p)
    for blk in (f[2], f[3], f[4]):      # every expansion (hidden) layer
        c = blk.conv
        q = _perm(c[0][0].out_channels, g)
        _po(c[0][0], q), _po(c[0][1], q), _po(c[1][0], q), _po(c[1][1], q), _pi(c[2], q)


def _permute_vit(model: VisionTransformer, g: torch.Generator) -> None:
    p = _perm(model.head.in_features, g)  # the residual stream of every token level
    _po(model.patch_embed.proj, p)
    model.cls_token.data.copy_(model.cls_token.data[..., p])
    model.pos_embed.data.copy_(model.pos_embed.data[..., p])
    for blk in model.blocks:
        _po(blk.norm1, p), _pi(blk.attn.qkv, p), _po(blk.attn.proj, p), _po(blk.norm2, p)
        q = _perm(blk.mlp.fc1.out_features, g)
        _pi(blk.mlp.fc1, p), _po(blk.mlp.fc1, q), _pi(blk.mlp.fc2, q), _po(blk.mlp.fc2, p)
    _po(model.norm, p), _pi(model.head, p)


def _grouped_perms(width: int, groups: int, g: torch.Generator) -> tuple:
    """Two permutations of ``width`` channels in ``groups`` contiguous groups that move the groups
    alike (one shuffle of the groups) and the channels inside each group each their own way, and
    for every new group the order of its old channels inside their group under the first."""
    per = width // groups
    order = _perm(groups, g)
    inner = [[torch.randperm(per, generator=g) for _ in range(groups)] for _ in range(2)]
    p0, p1 = (torch.cat([order[b] * per + inner[j][b] for b in range(groups)]) for j in range(2))
    return p0, p1, inner[0]


def _permute_resnext(model: nn.Module, g: torch.Generator) -> None:
    """Every bottleneck's inner spaces: the grouped conv's input and output groups shuffled alike
    (output group b reads input group b), each group's channels on their own."""
    for blk in model.layers:
        groups, per = blk.conv2.groups, blk.conv2.in_channels // blk.conv2.groups
        p0, p1, inner0 = _grouped_perms(blk.conv2.in_channels, groups, g)
        _po(blk.conv1, p0), _po(blk.bn1, p0)
        w = blk.conv2.weight.data[p1]                   # [out, in / groups, kh, kw]
        n_out = w.shape[0] // groups
        for b in range(groups):   # new output group b reads new input group b, its old channels reordered
            w[b * n_out:(b + 1) * n_out] = w[b * n_out:(b + 1) * n_out][:, inner0[b]]
        assert per == w.shape[1]
        blk.conv2.weight.data.copy_(w)
        _po(blk.bn2, p1), _pi(blk.conv3, p1)


def permuted_twin(arch: str, model: nn.Module, seed: int = 7) -> nn.Module:
    """A copy of ``model`` whose hidden neurons are permuted (the same function)."""
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if arch == "mobilenet_v2":
            _permute_mobilenet(twin, g)
        elif arch == "vit":
            _permute_vit(twin, g)
        elif arch == "resnext":
            _permute_resnext(twin, g)
        elif arch == "grouped_end":   # the streams in the groups of the grouped convs that write them
            from neurofuse.testing import permute_spaces

            net = neurofuse.levels_from(twin, input_shape=ARCHITECTURES[arch][1])
            twin.load_state_dict(net.model_state_dict(permute_spaces(net, seed=seed)))
        else:  # chains and residual blocks: through the alignment layout of the automatic levels
            _permute_by_layout(neurofuse.levels_from(twin, input_shape=ARCHITECTURES[arch][1]), seed)
    return twin.eval()


def _calibrate_bn(model: nn.Module, x: torch.Tensor, shape) -> nn.Module:
    """BatchNorm statistics of the fusion set itself, level by level as kf-gradient re-estimates
    them (each level in train mode on the previous levels' eval-mode outputs)."""
    from neurofuse.approximation._gradient import reestimate_batchnorm

    net = neurofuse.levels_from(model, input_shape=shape)
    h = x
    with torch.no_grad():
        for level in net.levels:
            reestimate_batchnorm(level, h)
            h = level.eval()(h)
    return model.eval()


@pytest.mark.parametrize("arch,method", [(a, m) for a in sorted(ARCHITECTURES) for m in LEVELWISE
                                         if m in SUPPORTED[a]])
def test_fused_with_its_permuted_copy_gives_back_the_model(arch, method):
    x, y = _data(arch, 128)
    model = _make(arch, 0)
    if method == "kf-gradient":
        _calibrate_bn(model, x, ARCHITECTURES[arch][1])
    twin = permuted_twin(arch, model)
    shape = ARCHITECTURES[arch][1]
    x_test, _ = _data(arch, 32, seed=9)
    assert _gap(twin, model, x_test) < 1e-5                     # the permutation keeps the function
    differ = [k for k, v in twin.state_dict().items()
              if v.is_floating_point() and not torch.equal(v, model.state_dict()[k])]
    assert len(differ) > 4                                      # ... and changes the weights
    nets = [neurofuse.levels_from(m, input_shape=shape) for m in (model, twin)]
    kwargs = FAST_GRADIENT if method == "kf-gradient" else {}
    fused = neurofuse.fuse(nets, (x, y), method=method, progress=False, **kwargs)
    assert _gap(fused, model, x) < 1e-4
    assert _gap(fused, model, x_test) < 1e-4
    # the fused weights go back into the user's own architecture
    back = _make(arch, 5)
    back.load_state_dict(nets[0].model_state_dict(fused))
    assert _gap(back, model, x_test) < 1e-4


def test_vanilla_does_not_recover_a_permuted_copy():
    """Control: without alignment the permuted copy is not recovered, so the tests can fail."""
    model = _make("resnet18", 0)
    twin = permuted_twin("resnet18", model)
    nets = [neurofuse.levels_from(m, input_shape=(3, 32, 32)) for m in (model, twin)]
    fused = neurofuse.fuse(nets, method="vanilla", progress=False)
    assert _gap(fused, model, _data("resnet18", 32)[0]) > 1e-2


# -- tracing failures and models that cannot be cut -------------------------------------------
class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; forward hooks see a chain."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        if x.sum() > 1e9:  # never true, but fx cannot know
            return self.body(x) * 0
        return self.body(x)


class BranchyFunctional(Branchy):
    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return self.body[3](F.relu(self.body[1](self.body[0](x))))


def test_untraceable_model_falls_back_to_forward_hooks_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="neurofuse"):
        net = neurofuse.levels_from(Branchy().eval(), input_shape=(3, 2, 2))
    assert net.tracer == "hooks" and net.level_widths() == [8, 3]
    assert "falling back to forward hooks" in caplog.text


def test_untraceable_model_with_functional_ops_is_a_one_line_error():
    with pytest.raises(ConfigError, match="forward-hook fallback failed.*declare the levels"):
        neurofuse.levels_from(BranchyFunctional().eval(), input_shape=(3, 2, 2))


class TokenModel(nn.Module):
    """Takes token ids: the float probe input makes its embedding raise, under fx and hooks alike."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return self.fc(self.emb(x).mean(1))


def test_a_model_that_fails_on_the_probe_input_is_a_one_line_error():
    with pytest.raises(ConfigError, match="forward-hook fallback failed: Expected tensor.*declare the levels"):
        neurofuse.levels_from(TokenModel().eval(), input_shape=(12,))


def test_declared_axes_without_levels_are_refused():
    with pytest.raises(ConfigError, match="axes are found"):
        neurofuse.levels_from(MLP(), input_shape=(3, 8, 8), axes=["dense"] * 3)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))))


def test_conv1d_outputs_are_not_cut_because_their_neurons_are_not_last():
    net = neurofuse.levels_from(Conv1dNet().eval(), input_shape=(2, 6))
    assert net.level_names == ["conv -> bn -> relu -> flatten -> fc", "relu -> out"]
    assert net.axes == ["dense", "dense"]


def test_automatic_levels_keep_their_widths():
    net = neurofuse.levels_from(MLP().eval(), input_shape=(3, 8, 8))
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    with pytest.raises(ConfigError, match="keep their widths"):
        neurofuse.fuse([net, copy.deepcopy(net)], (x, y), method="kf-gradient", width=8, progress=False)


class LayerScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        return x * self.gamma


def test_level_kinds_survive_the_copies_methods_make():
    """Fusion methods deep-copy models: the reasons and eval-identity marks must survive."""
    vit = copy.deepcopy(neurofuse.levels_from(_make("vit", 0), input_shape=(3, 16, 16)))
    assert level_support(vit)[1]["otfusion"] is None              # its transformer stages
    scaled = _make("vit", 0)
    scaled.blocks[0].ls1 = LayerScale(16)                          # a block the conventions do not read
    vit = copy.deepcopy(neurofuse.levels_from(scaled, input_shape=(3, 16, 16)))
    assert "parameters directly" in level_support(vit)[1]["otfusion"]
    mlp = copy.deepcopy(neurofuse.levels_from(MLP().eval(), input_shape=(3, 8, 8)))
    assert level_support(mlp)[1]["otfusion"] is None


class FunctionalDropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = F.dropout(self.fc1(x.flatten(1)), 0.2, self.training)
        return F.dropout(self.fc2(F.relu(h)), 0.1, self.training)


def test_functional_dropout_at_the_end_keeps_the_level_affine():
    net = copy.deepcopy(neurofuse.levels_from(FunctionalDropoutMLP().eval(), input_shape=(3, 2, 2)))
    assert net.level_widths() == [8, 3]
    assert all(r is None for row in level_support(net) for r in row.values())
    _, affine = split_affine(net.levels[-1])
    assert affine.out_features == 3


# -- forward arguments with defaults and a monotone head ---------------------------------------
class FlagNet(nn.Module):
    """``forward(x, flag=False, scale=None)`` branches on its defaults; ends in log_softmax."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x, flag=False, scale=None):
        h = self.fc1(x.flatten(1))
        if flag:
            h = h * 0
        if scale is not None:
            h = h * scale
        return F.log_softmax(self.fc2(F.relu(h)), dim=1)


def test_forward_arguments_with_defaults_are_traced_with_their_defaults():
    net = neurofuse.levels_from(FlagNet().eval(), input_shape=(3, 2, 2))
    assert net.tracer == "fx" and net.level_widths() == [8, 3]
    assert net.level_names == ["flatten -> fc1", "relu -> fc2 -> log_softmax"]


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_a_trailing_log_softmax_is_kept_and_the_logits_are_fitted(method):
    torch.manual_seed(0)
    model = FlagNet().eval()
    net = neurofuse.levels_from(model, input_shape=(3, 2, 2))
    assert all(r is None for row in level_support(net) for r in row.values())
    twin = copy.deepcopy(net)
    p = torch.randperm(8)
    with torch.no_grad():
        twin.levels[0][1].weight.copy_(twin.levels[0][1].weight[p])
        twin.levels[0][1].bias.copy_(twin.levels[0][1].bias[p])
        twin.levels[1][1].weight.copy_(twin.levels[1][1].weight[:, p])
    x, y = torch.randn(64, 3, 2, 2), torch.randint(0, 3, (64,))
    fused = neurofuse.fuse([net, twin], (x, y), method=method, progress=False)
    assert _gap(fused, model, x) < 1e-4
    assert torch.allclose(fused(x).exp().sum(1), torch.ones(64), atol=1e-5)   # still log-probabilities


def test_a_softmax_inside_the_network_is_not_a_monotone_head():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Softmax(dim=1), nn.Linear(8, 3)).eval()
    net = neurofuse.levels_from(model, levels=[["0", "1", "2"], "3"], input_shape=(3, 2, 2))
    why = level_support(net)[0]["kf-linear"]
    assert why is not None and "Softmax follows it" in why
    assert level_support(net)[1]["kf-linear"] is None


@pytest.mark.parametrize("method", [m for m in LEVELWISE if m != "kf-gradient"] + ["cca-merge", "regmean-aligned"])
def test_a_channel_shuffle_or_split_is_refused_by_name_before_any_work(method, monkeypatch):
    """ShuffleNet-V2's channel shuffle (``view -> transpose -> view``) and split (``chunk``) move
    values between channels, so no map of the channels passes through them: every method that
    maps channels refuses those levels by name before any work (the closed form used to stop with
    a raw size mismatch), and kf-gradient fuses the model."""
    from .user_models import ShuffleNetV2

    import neurofuse.methods._base as base

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(neurofuse.levels_from(ShuffleNetV2().eval(), input_shape=(3, 16, 16)))
    reasons = [get_method(method).check_level(nets[0], i) for i in range(nets[0].num_levels)]
    assert reasons[0] is None and reasons[2] is not None and reasons[3] is not None, reasons
    assert all("move values between channels" in reasons[i] for i in (2, 3)), reasons
    calls = []
    real = base.importance_sums
    monkeypatch.setattr(base, "importance_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = _data("branches", 32)
    with pytest.raises(IncompatibleModelsError, match=r"cannot fuse level \d .*(move values between channels|concat)"):
        neurofuse.fuse(nets, (x, y), method=method, progress=False,
                       importance="conductance" if get_method(method).uses_importance else "uniform")
    assert not calls
    fused = neurofuse.fuse(nets, (x, y), method="kf-gradient", progress=False, **FAST_GRADIENT)
    assert torch.isfinite(fused(x)).all()



class _ModuleShuffle(nn.Module):
    """``nn.ChannelShuffle`` as a module between two convolutions, ``nn.Flatten`` before the head."""

    def __init__(self):
        super().__init__()
        self.a, self.shuffle = nn.Conv2d(3, 8, 3, padding=1), nn.ChannelShuffle(2)
        self.b, self.flat, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 64, 10)

    def forward(self, x):
        return self.fc(self.flat(torch.relu(self.b(self.shuffle(torch.relu(self.a(x)))))))


class _ChannelsLast(nn.Module):
    """A ``Linear`` over the channels of a conv's output, through ``permute`` to channels-last and back."""

    def __init__(self):
        super().__init__()
        self.a, self.lin = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 12)
        self.b, self.fc = nn.Conv2d(12, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.a(x)).permute(0, 2, 3, 1)
        h = torch.relu(self.lin(h)).permute(0, 3, 1, 2)
        return self.fc(torch.relu(self.b(h)).mean((2, 3)))


@pytest.mark.parametrize("method", ["kf-linear", "otfusion", "zipit"])
@pytest.mark.parametrize("model,op", [(_ModuleShuffle, "ChannelShuffle"), (_ChannelsLast, "permute")])
def test_a_channel_shuffle_or_channels_last_permute_is_refused_by_name_and_a_flatten_module_is_not(method, model, op):
    """Both used to stop the methods with a raw error (the permute: every alignment too)."""
    net = neurofuse.levels_from(model().eval(), input_shape=(3, 8, 8))
    reasons = [get_method(method).check_level(net, i) for i in range(net.num_levels)]
    assert reasons[0] is None and reasons[-1] is None, reasons
    assert any(r and f"{op}, which can move values between channels" in r for r in reasons), reasons
    with pytest.raises(IncompatibleModelsError, match="move the channel axis"):
        neurofuse.fuse([net, net], (torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))), method=method,
                       progress=False)


class _LeNetView(nn.Module):
    """The PyTorch tutorial's LeNet-5, whose head flattens with ``x.view(-1, 16 * 5 * 5)``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * 5 * 5)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@pytest.mark.parametrize("method", ["kf-linear", "otfusion"])
def test_a_flatten_written_as_a_view_to_two_axes_is_not_refused(method):
    from neurofuse.testing import permute_spaces

    torch.manual_seed(0)
    net = neurofuse.levels_from(_LeNetView().eval(), input_shape=(1, 32, 32))
    assert not any(get_method(method).check_level(net, i) for i in range(net.num_levels))
    x = torch.randn(64, 1, 32, 32)
    fused = neurofuse.fuse([net, permute_spaces(net, seed=1)], (x, torch.randint(0, 10, (64,))), method=method,
                           progress=False)
    assert _gap(fused, net, x) < 1e-4


class _TextCNN(nn.Module):
    """Token ids through an ``nn.Embedding`` first (the ids come as floats), a Conv1d over time."""

    def __init__(self):
        super().__init__()
        self.emb, self.conv, self.fc = nn.Embedding(50, 16), nn.Conv1d(16, 24, 3, padding=1), nn.Linear(24, 10)

    def forward(self, x):
        h = self.emb(x.long()).permute(0, 2, 1)
        return self.fc(F.relu(self.conv(h)).max(dim=2).values)


def test_a_model_that_starts_with_an_embedding_is_probed_with_token_ids():
    """The automatic levels probe a model with random inputs; an embedding needs ids inside its
    vocabulary (a normal probe stopped with "index out of range")."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(_TextCNN().eval())
    nets = [neurofuse.levels_from(m, input_shape=(12,)) for m in models]
    x = torch.randint(0, 50, (32, 12)).float()
    assert _gap(nets[0], models[0], x) < 1e-6                  # the levels compute the model
    fused = neurofuse.fuse(nets, (x, torch.randint(0, 10, (32,))), method="kf-gradient", progress=False,
                           **FAST_GRADIENT)
    assert torch.isfinite(fused(x)).all()
