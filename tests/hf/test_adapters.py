"""The level adapters: levels reproduce the model, share its parameters, refuse what they cannot do."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import neurofuse  # noqa: E402
import neurofuse.hf as nh  # noqa: E402
from neurofuse.errors import ConfigError, IncompatibleModelsError  # noqa: E402
from neurofuse.methods import get_method  # noqa: E402

FAMILIES = {"vit": ((1, 8, 8), 10, 0), "resnet": ((1, 16, 16), 10, 0), "bert": ((12,), 6, 25),
            "distilbert": ((12,), 6, 25), "roberta": ((12,), 6, 25), "gpt2": ((12,), 6, 25)}


def tiny(family: str, seed: int = 0) -> nh.HFLeveledNet:
    shape, classes, vocab = FAMILIES[family]
    return nh.tiny_model(family, shape, classes, seed=seed, vocab_size=vocab)


def inputs(family: str, n: int = 5) -> torch.Tensor:
    shape, _, vocab = FAMILIES[family]
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab, (n, *shape), generator=g) if vocab else torch.randn((n, *shape), generator=g)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_composed_levels_equal_hf_logits(family):
    net = tiny(family)
    x = inputs(family)
    with torch.no_grad():
        assert torch.allclose(net(x), net.hf_model(x).logits, atol=1e-5)
        # and level by level: forward_until / forward_from compose to the same function
        h = net.forward_until(x, 1)
        assert torch.allclose(net.forward_from(h, 2), net(x), atol=1e-5)


@pytest.mark.parametrize("family,n_levels,axes", [
    ("vit", 4, ["token", "token", "token", "dense"]),         # embeddings, 2 layers, head
    ("resnet", 4, ["conv", "conv", "conv", "dense"]),          # embedder, 2 stages x 1 layer, head
    ("bert", 4, ["token", "token", "token", "dense"]),
    ("distilbert", 4, ["token", "token", "token", "dense"]),
    ("roberta", 4, ["token", "token", "token", "dense"]),
    ("gpt2", 4, ["token", "token", "token", "dense"]),
])
def test_levels_are_embeddings_layers_and_head(family, n_levels, axes):
    net = tiny(family)
    assert net.num_levels == n_levels and net.axes == axes
    assert net.level_widths()[-1] == FAMILIES[family][1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_levels_share_every_parameter_with_the_hf_model_once(family):
    net = tiny(family)
    level_params = [p for lv in net.levels for p in lv.parameters()]
    assert {id(p) for p in level_params} == {id(p) for p in net.hf_model.parameters()}
    assert len(level_params) == len({id(p) for p in level_params})
    # writing a level changes the Hugging Face model (no copies)
    x = inputs(family)
    before = net.hf_model(x).logits.detach()
    with torch.no_grad():
        for p in net.levels[-1].parameters():
            p.add_(1.0)
    assert not torch.allclose(net.hf_model(x).logits, before)
    # a clone owns a new Hugging Face model whose parameters are the clone's levels'
    c = net.clone()
    assert c.hf_model is not net.hf_model
    assert {id(p) for lv in c.levels for p in lv.parameters()} == {id(p) for p in c.hf_model.parameters()}


def test_not_a_transformers_model_is_refused():
    with pytest.raises(IncompatibleModelsError, match="not a transformers model"):
        nh.wrap(torch.nn.Linear(3, 2))


def test_unsupported_class_of_a_known_family_is_refused():
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16,
                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(IncompatibleModelsError, match="ViTForImageClassification, not ViTModel"):
        nh.wrap(model)


def test_unknown_family_names_the_supported_ones():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    model = AlbertForSequenceClassification(AlbertConfig(
        vocab_size=10, embedding_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=8))
    with pytest.raises(IncompatibleModelsError, match="model_type 'albert'.*vit.*register_adapter"):
        nh.wrap(model)


def test_resnet_without_an_input_shape_says_to_pass_one():
    net = tiny("resnet")
    with pytest.raises(ConfigError, match=r"input_shape=\(C, H, W\)"):
        nh.wrap(net.hf_model)
    # ... and BERT one longer than its position embeddings is refused
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        nh.wrap(tiny("bert").hf_model, (40,))


def _resnet_with_running_statistics(seed: int = 0) -> nh.HFLeveledNet:
    """A tiny Hugging Face ResNet whose BatchNorms hold statistics other than 0 / 1 (in eval mode
    a folded BatchNorm then changes the convolution's weights and bias)."""
    net = tiny("resnet", seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(1.0, 0.2, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
    return net.eval()


@pytest.mark.parametrize("method", [m for m in neurofuse.methods() if get_method(m).fuses_levels
                                    and m != "kf-gradient"])
def test_resnet_layers_are_blocks_every_level_wise_method_fuses_exactly(method, tmp_path):
    """Hugging Face ResNet layers are cut as the zoo's residual blocks (the closing ReLU starts the
    next level; after the stem, with its max-pool): a model fused with its permuted copy comes back
    to the same function with every level-wise method, and the result is the Hugging Face
    architecture again (BatchNorms folded by the closed form are written back), which
    ``save_pretrained`` writes and ``from_pretrained`` loads to the same logits."""
    from transformers import ResNetForImageClassification

    from neurofuse.testing import permute_spaces

    net = _resnet_with_running_statistics()
    twin = permute_spaces(net, seed=3)
    x = inputs("resnet", 64)
    with torch.no_grad():
        assert float((twin(x) - net(x)).abs().max()) < 1e-4
        assert not torch.allclose(twin.levels[1].branch[0].weight, net.levels[1].branch[0].weight)
    fused = neurofuse.fuse([net, twin], (x, torch.arange(64) % 10), method=method, progress=False)
    assert isinstance(fused, nh.HFLeveledNet)
    nh.save_pretrained(fused, tmp_path / "fused")
    back = ResNetForImageClassification.from_pretrained(tmp_path / "fused").eval()
    with torch.no_grad():
        assert float((fused(x) - net(x)).abs().max()) < 1e-4
        assert float((back(x).logits - fused(x)).abs().max()) < 1e-5


def test_transformer_levels_carry_their_stages_and_no_refusal():
    """ViT, BERT and GPT-2 levels are described (levels/_transformer.py): every level-wise method
    fuses them; ResNet layers are the zoo's residual blocks (no stages, no refusal either)."""
    for family in ("vit", "bert", "gpt2"):
        net = tiny(family)
        assert all(lv.transformer_spec is not None and not lv.not_alignable for lv in net.levels)
    assert all(lv.transformer_spec is None and not lv.not_alignable for lv in tiny("resnet").levels)


def test_method_table_covers_every_method_and_family():
    table = nh.method_table()
    assert sorted(table) == ["bert", "distilbert", "gpt2", "resnet", "roberta", "vit"]
    whole = {m for m in neurofuse.methods() if not get_method(m).fuses_levels}
    levelwise = {m for m in neurofuse.methods() if get_method(m).fuses_levels}
    for family, row in table.items():
        assert sorted(row) == sorted(neurofuse.methods())
        assert all(v.startswith(("yes: ", "no: ")) and len(v) > 12 for v in row.values())
        yes = {m for m, v in row.items() if v.startswith("yes")}
        # the alignments that do not handle a transformer's stream and heads refuse it (issue 28's)
        no_transformer = {m for m in levelwise if "transformer" in getattr(get_method(m), "unsupported_traits", ())}
        assert yes == whole | (levelwise if family == "resnet" else levelwise - no_transformer)


def test_gpt2_blocks_are_causal_with_conv1d_weights_and_the_head_reads_the_last_token():
    """GPT-2's levels: causal attention (a later token does not change an earlier one's stream),
    ``Conv1D`` projections stored ``[in, out]`` (layout kind ``linear_t``), a last-token head."""
    from neurofuse.levels._layout import level_layout
    from neurofuse.levels._transformer import Attention, Head, Proj

    net = tiny("gpt2")
    x = inputs("gpt2", 4)
    later = x.clone()
    later[:, -1] = (later[:, -1] + 1) % 25
    with torch.no_grad():
        a, b = net.forward_until(x, 1), net.forward_until(later, 1)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6) and not torch.allclose(a[:, -1], b[:, -1])
    att = net.levels[1].transformer_spec.stages[0]
    assert isinstance(att, Attention) and att.causal and att.q.transposed
    head = net.levels[-1].transformer_spec.stages[-1]
    assert head == Head(Proj("parts.score.weight", None, "parts.score"), norm=head.norm, pool="last")
    kinds = {key: kind for key, _, _, kind in level_layout(net.levels[1], 1).tensors}
    assert kinds["parts.layer.attn.c_attn.weight"] == kinds["parts.layer.mlp.c_proj.weight"] == "linear_t"


def test_gpt2_sequences_ending_in_padding_are_refused():
    """The model classifies the last token that is not padding, the head level the last token:
    padded inputs would give other logits, so they are refused with a one-line reason."""
    from neurofuse.errors import DataError

    net = tiny("gpt2")
    x = inputs("gpt2", 4)
    x[1, -2:] = net.hf_model.config.pad_token_id
    with pytest.raises(DataError, match="1 of 4 sequences end with the pad token"):
        net(x)


def test_roberta_sequences_holding_the_padding_id_are_refused():
    """RoBERTa numbers the positions of the tokens that are not padding; the levels' stages
    number every token, so padded inputs are refused with a one-line reason."""
    from neurofuse.errors import DataError

    net = tiny("roberta")
    x = inputs("roberta", 4)
    x[2, 5] = net.hf_model.config.pad_token_id
    with pytest.raises(DataError, match="1 of 4 sequences hold the padding id 25"):
        net(x)


@pytest.mark.parametrize("family,where", [("roberta", 5), ("gpt2", -1)])
@pytest.mark.parametrize("method", ["kf-linear", "otfusion"])
def test_padded_fusion_sets_are_refused_before_any_work(family, where, method):
    """The closed form and the alignments compute the levels through their stages, which number
    every token: a fusion set with padding is refused before they run (it used to fuse silently)."""
    from neurofuse.errors import DataError

    nets = [tiny(family, seed) for seed in (0, 1)]
    x = inputs(family, 8)
    x[3, where] = nets[0].hf_model.config.pad_token_id
    with pytest.raises(DataError, match="1 of 8 sequences"):
        neurofuse.fuse(nets, (x, torch.zeros(8, dtype=torch.long)), method=method, progress=False)


def test_roberta_positions_start_after_the_padding_id():
    """The embeddings' stage reads position rows ``padding_idx + 1 ...``, as the model does."""
    from neurofuse.levels._transformer import describe

    net = tiny("roberta")
    spec = describe(net.levels[0])
    assert spec.stages[0].pos_offset == net.hf_model.config.pad_token_id + 1 == 26
    x = inputs("roberta", 4)
    with torch.no_grad():
        torch.testing.assert_close(spec.forward(net.levels[0], x), net.levels[0](x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change,match", [
    ({"pad_token_id": None}, "pad_token_id"),
    ({"scale_attn_by_inverse_layer_idx": True}, "1/sqrt"),
])
def test_gpt2_configs_the_levels_do_not_describe_are_refused(change, match):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = dict(vocab_size=26, n_embd=16, n_layer=1, n_head=2, n_positions=16, num_labels=3,
               pad_token_id=25, bos_token_id=25, eos_token_id=25)
    model = GPT2ForSequenceClassification(GPT2Config(**{**cfg, **change}))
    with pytest.raises(IncompatibleModelsError, match=match):
        nh.wrap(model, (12,))


def test_register_adapter_adds_a_family_with_one_class():
    from transformers import DeiTConfig, DeiTForImageClassification

    from neurofuse.hf._adapters import ViTAdapter, _ADAPTERS

    @nh.register_adapter("deit")
    class DeiTAdapter(ViTAdapter):   # DeiT's classifier is laid out as ViT's, under .deit
        model_classes = ("DeiTForImageClassification",)
        body = "deit"

    try:
        model = DeiTForImageClassification(DeiTConfig(
            image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=16, num_labels=3))
        net = nh.wrap(model.eval())      # checks the levels against the model's logits
        assert net.family == "deit" and net.num_levels == 3 and net.level_names[0] == "deit.embeddings"
        with pytest.raises(ValueError, match="already registered"):
            nh.register_adapter("deit")(DeiTAdapter)
    finally:
        _ADAPTERS._items.pop("deit", None)


@pytest.mark.parametrize("method", ["otfusion", "git-rebasin", "kf-linear", "hf-linear"])
def test_bottleneck_resnets_with_another_activation_fuse_exactly(method):
    """Bottleneck layers (three convolutions, downsampling in the first one) and a GELU closing
    each layer are cut the same way: the permuted copy comes back, the Hugging Face model too."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from neurofuse.testing import permute_spaces

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, num_labels=10, layer_type="bottleneck", hidden_sizes=[16, 32],
                          depths=[2, 1], embedding_size=8, downsample_in_bottleneck=True, hidden_act="gelu")
    net = nh.wrap(ResNetForImageClassification(config).eval(), (1, 16, 16))
    twin = permute_spaces(net, seed=1)
    x = inputs("resnet", 48)
    fused = neurofuse.fuse([net, twin], (x, torch.arange(48) % 10), method=method, progress=False)
    with torch.no_grad():
        assert float((fused(x) - net(x)).abs().max()) < 1e-4
        assert float((fused.hf_model.eval()(x).logits - net(x)).abs().max()) < 1e-4
