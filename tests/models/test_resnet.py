"""ResNet-20/18 in the zoo: levels, shapes, widths, config round trip, and kf-gradient fusion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurofuse
from neurofuse.data import partition
from neurofuse.errors import ConfigError
from neurofuse.models import ResNet, build_model, make_model
from neurofuse.models.resnet import BasicBlock
from neurofuse.training import TrainConfig, evaluate, train_model


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("depth, n_blocks", [(20, 9), (18, 8)])
def test_levels_and_shapes(shape, depth, n_blocks):
    torch.manual_seed(0)
    m = ResNet(shape, 10, depth, width_multiplier=0.25)
    assert m.num_levels == 1 + n_blocks + 1
    assert m.axes == ["conv"] * (1 + n_blocks) + ["dense"]
    assert all(isinstance(lv, BasicBlock) for lv in m.levels[1:-1])
    x = torch.randn(2, *shape)
    assert m(x).shape == (2, 10)
    h = m.forward_until(x, 0)
    assert h.shape == (2, m.widths[0], shape[1], shape[2])
    assert m.forward_until(x, m.num_levels - 2).dim() == 4


def test_standard_widths():
    assert ResNet((3, 32, 32), 10, 20).widths == [16] * 4 + [32] * 3 + [64] * 3
    assert ResNet((3, 32, 32), 10, 18).widths == [64] * 3 + [128] * 2 + [256] * 2 + [512] * 2
    assert make_model("resnet", "tiny", (1, 8, 8), 10).level_widths() == [4] * 4 + [8] * 3 + [16] * 3 + [10]
    assert make_model("resnet", "paper", (3, 32, 32), 10).depth == 18


def test_block_outputs_pre_activations_and_matches_a_standard_resnet_block():
    """h_out = branch(relu(h)) + shortcut(relu(h)): the standard post-activation ResNet with the
    closing ReLU moved to the start of the next block."""
    torch.manual_seed(0)
    blk = BasicBlock(4, 8, stride=2).eval()
    h = torch.randn(3, 4, 6, 6)
    a = F.relu(h)
    b = blk.branch
    ref = b[4](b[3](F.relu(b[1](b[0](a))))) + blk.shortcut(a)
    torch.testing.assert_close(blk(h), ref)
    assert (blk(h) < 0).any(), "block outputs are pre-activations (can be negative)"
    assert isinstance(BasicBlock(4, 4, 1).shortcut, nn.Identity)
    assert not isinstance(BasicBlock(4, 5, 1).shortcut, nn.Identity)


def test_stride_skipped_where_the_map_is_already_1x1():
    m = ResNet((1, 2, 2), 10, 18, width_multiplier=0.125)
    assert m(torch.randn(2, 1, 2, 2)).shape == (2, 10)


def test_with_widths_and_config_round_trip():
    torch.manual_seed(0)
    m = ResNet((1, 8, 8), 10, 20, width_multiplier=0.25)
    w = [5, 5, 6, 5, 8, 9, 8, 16, 12, 16]
    n = m.with_widths(w)
    assert n.level_widths() == w + [10]
    assert n(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ConfigError, match="widths"):
        m.with_widths([4, 4])
    r = build_model(m.config())
    r.load_state_dict(m.state_dict())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(r.eval()(x), m.eval()(x))


@pytest.mark.parametrize("kwargs, word", [
    (dict(depth=34), "depth"), (dict(width_multiplier=0), "width_multiplier"),
    (dict(widths=[4, 0] + [4] * 8), "widths"), (dict(input_shape=(8, 8)), "(C, H, W)"),
])
def test_bad_arguments(kwargs, word):
    args = dict(input_shape=(1, 8, 8), num_classes=10)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=word):
        ResNet(**args)
    with pytest.raises(ConfigError, match="size"):
        ResNet.preset("huge", (1, 8, 8), 10)


@pytest.fixture(scope="module")
def two_resnets(digits):
    parts = partition(digits.y_train.numpy(), 2, "dirichlet", seed=0)
    models = []
    for i, p in enumerate(parts):
        torch.manual_seed(i)
        m = make_model("resnet", "tiny", digits.input_shape, 10)
        train_model(m, digits.x_train[p], digits.y_train[p],
                    config=TrainConfig(epochs=6, lr=1e-2, warmup_epochs=1, batch_size=32, seed=i))
        models.append(m.eval())
    return models


@pytest.mark.slow
def test_two_resnets_fuse_end_to_end_with_kf_gradient(two_resnets, digits, digits_fusion):
    fused = neurofuse.fuse(two_resnets, digits_fusion, method="kf-gradient", progress=False,
                           levels={"epochs": 10}, head={"epochs": 20})
    assert isinstance(fused, ResNet) and not fused.training
    base = [evaluate(m, digits.x_test, digits.y_test)["accuracy"] for m in two_resnets]
    vanilla = evaluate(neurofuse.fuse(two_resnets, method="vanilla", progress=False),
                       digits.x_test, digits.y_test)["accuracy"]
    acc = evaluate(fused, digits.x_test, digits.y_test)["accuracy"]
    assert acc > 0.5 and acc > vanilla + 0.1, (acc, vanilla, base)
    # batch-norm statistics were re-estimated on the fusion data, through the fused stem
    stem = fused.levels[0]
    with torch.no_grad():
        z = stem[0](digits_fusion[0])
    torch.testing.assert_close(stem[1].running_mean, z.mean((0, 2, 3)), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_the_closed_form_fuses_residual_blocks_beyond_vanilla_averaging(method, two_resnets, digits, digits_fusion):
    """The closed form fits residual blocks (one layer at a time, issue 24): a trained pair fuses above vanilla averaging."""
    fused = neurofuse.fuse(two_resnets, digits_fusion, method=method, progress=False)
    assert isinstance(fused, ResNet) and not fused.training
    vanilla = evaluate(neurofuse.fuse(two_resnets, method="vanilla", progress=False),
                       digits.x_test, digits.y_test)["accuracy"]
    acc = evaluate(fused, digits.x_test, digits.y_test)["accuracy"]
    assert acc > 0.5 and acc > vanilla + 0.1, (acc, vanilla)
