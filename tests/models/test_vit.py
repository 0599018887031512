"""ViT in the zoo: levels, token axis, standard attention, widths, and kf-gradient fusion."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neurofuse
from neurofuse.data import partition
from neurofuse.errors import ConfigError
from neurofuse.levels import flatten_neurons
from neurofuse.models import ViT, build_model, make_model
from neurofuse.models.vit import ClassifierHead, EncoderBlock, PatchEmbedding, SelfAttention
from neurofuse.training import TrainConfig, evaluate, train_model


def test_paper_configuration():
    torch.manual_seed(0)
    m = ViT((3, 32, 32), 100, patch=4, hidden=384, depth=7, heads=12, mlp_hidden=384)
    assert m.num_levels == 8 and m.axes == ["token"] * 7 + ["dense"]
    assert isinstance(m.levels[0][0], PatchEmbedding) and isinstance(m.levels[0][1], EncoderBlock)
    assert all(isinstance(lv, EncoderBlock) for lv in m.levels[1:-1])
    assert isinstance(m.levels[-1], ClassifierHead)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = m.forward_until(x, 0)
        assert h.shape == (2, 65, 384)              # [B, T, hidden], hidden last, CLS + 64 patches
        assert m(x).shape == (2, 100)
    assert flatten_neurons(h, "token").shape == (130, 384)
    assert make_model("vit", "paper", (3, 32, 32), 10).config()["kwargs"]["hidden"] == 384


@pytest.mark.parametrize("shape, patch, tokens", [((1, 8, 8), 2, 17), ((1, 28, 28), 4, 50),
                                                   ((3, 32, 32), 4, 65)])
def test_default_patch_sizes(shape, patch, tokens):
    m = make_model("vit", "tiny", shape, 10)
    assert m.patch == patch
    assert m.forward_until(torch.randn(2, *shape), 0).shape == (2, tokens, 32)


def test_attention_is_standard_scaled_dot_product_with_head_dim_scale():
    torch.manual_seed(0)
    att = SelfAttention(12, 3)
    x = torch.randn(2, 5, 12)
    q, k, v = att.qkv(x).split(12, dim=-1)
    heads = []
    for h in range(3):
        s = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(w @ v[..., s])
    ref = att.out(torch.cat(heads, dim=-1))
    torch.testing.assert_close(att(x), ref, atol=1e-5, rtol=1e-5)


def test_block_is_pre_ln_with_a_single_gelu():
    torch.manual_seed(0)
    blk = EncoderBlock(8, 2, 16)
    assert sum(isinstance(m, nn.GELU) for m in blk.modules()) == 1
    x = torch.randn(2, 3, 8)
    y = x + blk.attn(blk.ln1(x))
    torch.testing.assert_close(blk(x), y + blk.mlp(blk.ln2(y)))


def test_widths_config_and_errors():
    m = ViT((1, 8, 8), 10, hidden=16, depth=3, heads=4, mlp_hidden=8)
    assert m.level_widths() == [16, 16, 16, 10]
    n = m.with_widths([8, 8, 8])
    assert n.level_widths() == [8, 8, 8, 10] and n.heads == 4 and n.mlp_hidden == 8
    with pytest.raises(ConfigError, match="same width"):
        m.with_widths([8, 16, 8])
    with pytest.raises(ConfigError, match="divisible"):
        m.with_widths([10, 10, 10])
    with pytest.raises(ConfigError, match="patch"):
        ViT((1, 8, 8), 10, patch=3)
    r = build_model(m.config())
    r.load_state_dict(m.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(r.eval()(x), m.eval()(x))


@pytest.fixture(scope="module")
def two_vits(digits):
    parts = partition(digits.y_train.numpy(), 2, "dirichlet", seed=0)
    models = []
    for i, p in enumerate(parts):
        torch.manual_seed(i)
        m = make_model("vit", "tiny", digits.input_shape, 10)
        train_model(m, digits.x_train[p], digits.y_train[p],
                    config=TrainConfig(epochs=10, lr=3e-3, warmup_epochs=1, batch_size=32, seed=i))
        models.append(m.eval())
    return models


@pytest.mark.slow
def test_two_vits_fuse_end_to_end_with_kf_gradient(two_vits, digits, digits_fusion):
    fused = neurofuse.fuse(two_vits, digits_fusion, method="kf-gradient", progress=False,
                           importance="conductance", levels={"epochs": 10}, head={"epochs": 20})
    assert isinstance(fused, ViT)
    base = [evaluate(m, digits.x_test, digits.y_test)["accuracy"] for m in two_vits]
    vanilla = evaluate(neurofuse.fuse(two_vits, method="vanilla", progress=False),
                       digits.x_test, digits.y_test)["accuracy"]
    acc = evaluate(fused, digits.x_test, digits.y_test)["accuracy"]
    assert acc > 0.5 and acc > vanilla + 0.1, (acc, vanilla, base)


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_the_closed_form_fuses_transformer_levels_beyond_vanilla_averaging(method, two_vits, digits, digits_fusion):
    """The closed form fits transformer levels (stage by stage, issue 24): a trained pair fuses above vanilla averaging."""
    fused = neurofuse.fuse(two_vits, digits_fusion, method=method, progress=False)
    assert isinstance(fused, ViT) and not fused.training
    vanilla = evaluate(neurofuse.fuse(two_vits, method="vanilla", progress=False),
                       digits.x_test, digits.y_test)["accuracy"]
    acc = evaluate(fused, digits.x_test, digits.y_test)["accuracy"]
    assert acc > 0.5 and acc > vanilla + 0.1, (acc, vanilla)
