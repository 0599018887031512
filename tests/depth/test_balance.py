"""Depth balancing is exact: identity levels and merged levels leave the function unchanged."""

import itertools

import pytest
import torch
from torch import nn

from neurofuse.depth import (
    SequentialNet,
    align_models,
    identity_level,
    insert_identity_levels,
    is_idempotent,
    merge_affine,
    merge_levels,
)
from neurofuse.errors import ConfigError
from neurofuse.levels import levels_from, split_affine
from neurofuse.models import MLP, VGG

SHALLOW_VGG = [8, "M", 16, "M", 32, 32, "M", 32, 32]            # 6 conv levels + head = 7
DEEP_VGG = [8, "M", 16, "M", 32, 32, "M", 32, 32, 32, 32]       # 8 conv levels + head = 9


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _alignments(m, n):
    for mid in itertools.combinations(range(1, n - 1), m - 2):
        yield [0, *mid, n - 1]


def _max_diff(a, b, x):
    a.eval()
    b.eval()
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def _trained_like(model, seed):
    """Random weights at a trained model's scale (biases non-zero, so padding effects show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = (2.0 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# ---- balance="add" ------------------------------------------------------------------------------

def test_inserting_identity_levels_leaves_an_mlp_unchanged(x):
    torch.manual_seed(0)
    shallow = MLP((1, 8, 8), 10, [16, 12])  # 3 levels
    deep = MLP((1, 8, 8), 10, [16, 12, 12, 12])
    for a in _alignments(3, 5):
        bal = insert_identity_levels(shallow, a, 5, deep=deep)
        assert isinstance(bal, SequentialNet) and bal.num_levels == 5
        assert bal.axes == ["dense"] * 5
        assert _max_diff(shallow, bal, x) < 1e-5
        for k in set(range(5)) - set(a):  # inserted: [ReLU, Linear = I], width of the level before
            lvl = bal.levels[k]
            assert isinstance(lvl[0], nn.ReLU) and isinstance(lvl[1], nn.Linear)
            assert torch.equal(lvl[1].weight, torch.eye(lvl[1].in_features))
        assert bal.level_widths()[-1] == 10


def test_inserting_identity_levels_leaves_a_vgg_unchanged(x):
    torch.manual_seed(0)
    shallow = _trained_like(VGG((1, 8, 8), 10, layout=SHALLOW_VGG), 1)
    deep = VGG((1, 8, 8), 10, layout=DEEP_VGG)
    count = 0
    for a in _alignments(shallow.num_levels, deep.num_levels):
        bal = insert_identity_levels(shallow, a, deep.num_levels, deep=deep)
        assert bal.num_levels == deep.num_levels
        assert _max_diff(shallow, bal, x) < 1e-5
        count += 1
    assert count == 21
    # the identity conv takes the neighbouring kernel size (3x3, same padding)
    k = next(k for k in range(deep.num_levels) if k not in a)
    conv = bal.levels[k][1]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)


def test_identity_conv_is_1x1_without_a_template_and_is_exact():
    level = identity_level((2, 5, 4, 4), "conv", nn.ReLU())
    z = torch.randn(2, 5, 4, 4)
    assert level[1].kernel_size == (1, 1)
    assert torch.allclose(level(z), torch.relu(z))
    tok = identity_level((2, 3, 6), "token")
    t = torch.randn(2, 3, 6)
    assert torch.equal(tok(t), t)


def test_idempotence_of_activations():
    assert is_idempotent(nn.ReLU()) and is_idempotent(nn.ReLU6()) and is_idempotent(nn.Hardtanh())
    assert not is_idempotent(nn.GELU())
    assert not is_idempotent(nn.Tanh())
    assert not is_idempotent(nn.LeakyReLU(0.1))


@pytest.mark.parametrize("act", [nn.GELU, nn.Tanh, nn.LeakyReLU])
def test_non_idempotent_activations_get_a_bare_identity_level_and_stay_exact(act, x):
    torch.manual_seed(0)
    levels = [nn.Sequential(nn.Flatten(1), nn.Linear(64, 16)), nn.Sequential(act(), nn.Linear(16, 10))]
    net = _trained_like(SequentialNet(levels, ["dense", "dense"], (1, 8, 8), 10), 2)
    bal = insert_identity_levels(net, [0, 3], 4)
    assert _max_diff(net, bal, x) < 1e-5
    assert isinstance(bal.levels[1][0], nn.Identity)


def test_add_balancing_through_align_models_keeps_every_function(x, digits_fusion):
    torch.manual_seed(0)
    models = [MLP((1, 8, 8), 10, [16]), MLP((1, 8, 8), 10, [16, 16, 16]), MLP((1, 8, 8), 10, [16, 8])]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    bal, info = align_models(models, digits_fusion, balance="add", max_samples=100)
    assert info.reference == 1 and bal[0] is models[1] and info.order == [1, 0, 2]
    assert [b.num_levels for b in bal] == [4, 4, 4]
    for b, i in zip(bal, info.order):
        assert _max_diff(models[i], b, x) < 1e-5
    for m, sd in zip(models, before):  # the caller's models are not modified
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


# ---- balance="merge" ----------------------------------------------------------------------------

def test_merging_levels_leaves_an_mlp_and_a_vgg_unchanged(x):
    torch.manual_seed(0)
    mlp = MLP((1, 8, 8), 10, [16, 12, 12, 8])  # 5 levels
    for a in _alignments(3, 5):
        bal = merge_levels(mlp, a)
        assert bal.num_levels == 3
        assert _max_diff(mlp, bal, x) < 1e-5
    vgg = _trained_like(VGG((1, 8, 8), 10, layout=DEEP_VGG), 3)
    for a in _alignments(7, 9):
        bal = merge_levels(vgg, a)
        assert bal.num_levels == 7 and bal.axes == [vgg.axes[j] for j in a]
        assert _max_diff(vgg, bal, x) < 1e-5


def test_consecutive_affine_levels_merge_into_one_affine_layer(x):
    torch.manual_seed(0)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 20), nn.Linear(20, 12), nn.Linear(12, 10)

        def forward(self, z):
            return self.fc3(torch.relu(self.fc2(self.fc1(z.flatten(1)))))

    plain = Plain().eval()
    net = levels_from(plain, [[nn.Flatten(1), "fc1"], "fc2", [torch.relu, "fc3"]],
                      axes=["dense"] * 3, input_shape=(1, 8, 8))
    bal = merge_levels(net, [1, 2])  # fc1 and fc2 have no non-linearity between them
    assert bal.num_levels == 2
    pre, affine = split_affine(bal.levels[0])  # still affine: the closed-form methods can fit it
    assert isinstance(affine, nn.Linear) and affine.in_features == 64 and affine.out_features == 12
    assert _max_diff(plain, bal, x) < 1e-5
    # conv followed by a pointwise conv
    c1, c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 4, 1)
    merged = merge_affine([c1, nn.Identity(), c2])
    assert len(merged) == 1 and merged[0].kernel_size == (3, 3)
    with torch.no_grad():
        assert torch.allclose(merged[0](x), c2(c1(x)), atol=1e-5)
    # a non-linearity in between stops the merge
    assert len(merge_affine([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)])) == 3


def test_balanced_models_are_fusion_inputs_only():
    torch.manual_seed(0)
    bal = merge_levels(MLP((1, 8, 8), 10, [8, 8, 8]), [0, 1, 3])
    with pytest.raises(ConfigError, match="cannot change its widths"):
        bal.with_widths([4, 4])
    with pytest.raises(NotImplementedError, match="fusion input"):
        bal.config()
    with pytest.raises(ConfigError, match="not a monotone map"):
        merge_levels(MLP((1, 8, 8), 10, [8, 8, 8]), [0, 2, 1])
