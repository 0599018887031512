"""Transformer levels (levels/_transformer.py): described, laid out, aligned and fused.

Properties checked:

* every transformer level neurofuse describes (the zoo's ViT, Hugging Face ViT, BERT and GPT-2,
  timm-style blocks and ``nn.TransformerEncoderLayer`` through the automatic levels) is recomputed exactly by
  its stages, and its layout puts each tensor in the right space: one residual stream, packed
  ``qkv`` rows as ``qk+qk+vo``, head-structured attention spaces, CLS and position embeddings
  along their last axis;
* the permuted-copy property: a model fused with a copy of itself whose residual channels, MLP
  hidden neurons, attention heads and the dimensions inside every head are permuted gives back the
  same function (to 1e-4) with every level-wise method that applies (otfusion, git-rebasin,
  hf-linear and kf-linear; kf-gradient is checked in ``tests/levels/test_auto.py``);
* a block the conventions misread is refused (a layer scale that is not the identity), with the
  reason.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neurofuse
from neurofuse.levels import alignment_reason
from neurofuse.levels._layout import check_alignable, space_sizes
from neurofuse.levels._transformer import MLP, Attention, Embed, Head, describe
from neurofuse.models import make_model
from neurofuse.testing import permute_spaces

from .user_models import VisionTransformer

ALIGNED = ["otfusion", "git-rebasin", "weight-matching", "hf-linear", "kf-linear"]


class EncoderViT(nn.Module):
    """A ViT written on ``nn.TransformerEncoder`` (as public packages write it)."""

    def __init__(self, d=16, heads=2, depth=2, classes=10, norm_first=True, batch_first=True):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 2, 2)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, d))
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, batch_first=batch_first,
                                           norm_first=norm_first, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = self.encoder(x)
        return self.head(self.norm(x[:, 0]))


def _models(name: str, seed: int = 0):
    """(leveled model, inputs) of each transformer family, randomly initialised."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "zoo":
        return make_model("vit", "tiny", (1, 8, 8), 10).eval(), torch.randn(48, 1, 8, 8, generator=g)
    if name == "timm":
        net = neurofuse.levels_from(VisionTransformer().eval(), input_shape=(3, 16, 16))
        return net, torch.randn(48, 3, 16, 16, generator=g)
    if name in ("encoder-pre", "encoder-post"):
        net = neurofuse.levels_from(EncoderViT(norm_first=name == "encoder-pre").eval(), input_shape=(1, 8, 8))
        return net, torch.randn(48, 1, 8, 8, generator=g)
    pytest.importorskip("transformers")
    from neurofuse.hf import tiny_model

    if name == "hf-vit":
        return tiny_model("vit", (1, 8, 8), 10, seed=seed), torch.randn(48, 1, 8, 8, generator=g)
    family = name.removeprefix("hf-")
    return tiny_model(family, (12,), 6, vocab_size=30, seed=seed), torch.randint(0, 30, (48, 12), generator=g).float()


FAMILIES = ["zoo", "timm", "encoder-pre", "encoder-post", "hf-vit", "hf-bert", "hf-distilbert", "hf-roberta", "hf-gpt2"]


def _gap(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


@pytest.mark.parametrize("name", FAMILIES)
def test_stages_recompute_every_level(name):
    net, x = _models(name)
    h = x
    specs = []
    with torch.no_grad():
        for lv in net.levels:
            spec = describe(lv)
            specs.append(spec)
            if spec is not None:
                torch.testing.assert_close(spec.forward(lv, h), lv(h), atol=1e-5, rtol=1e-5)
            h = lv(h)
    assert isinstance(specs[-1].stages[-1], Head)                    # the head reads the stream
    kinds = [type(s) for sp in specs if sp is not None for s in sp.stages]
    assert kinds.count(Attention) == kinds.count(MLP) == 2           # two blocks everywhere
    assert all(alignment_reason(net, i) is None for i in range(net.num_levels))


def test_layout_of_the_zoo_vit():
    net, _ = _models("zoo")
    layouts, heads = check_alignable([net], "test")
    assert heads == [0, 0, 2]                                        # one stream, then the head
    lay = dict((k, (s0, s1, kind)) for k, s0, s1, kind in layouts[0].tensors)
    assert lay["1.attn.qkv.weight"] == ("qk0+qk0+vo0", "out", "linear")  # packed: rows by part
    assert lay["1.attn.out.weight"] == ("out", "vo0", "linear")
    assert lay["0.cls"] == ("out", None, "last") and lay["0.pos"] == ("out", None, "last")
    assert lay["1.ln1.weight"] == ("out", None, "vector")           # LayerNorms follow the stream
    assert lay["1.mlp.0.weight"] == ("h0", "out", "linear")
    spaces = {sp.name: sp for sp in layouts[0].internal}
    assert spaces["qk0"].heads == spaces["vo0"].heads == 4 and spaces["qk0"].unit == spaces["vo0"].unit
    assert space_sizes(net.levels[0], layouts[0]) == {"out": 32, "qk0": 32, "vo0": 32, "h0": 64}
    assert layouts[1].tied and not layouts[0].tied                  # a block reads and writes the stream
    assert dict((k, s1) for k, _, s1, _ in layouts[2].tensors)["fc.weight"] == "in"


@pytest.mark.parametrize("name", FAMILIES)
def test_the_permuted_copy_computes_the_same_function(name):
    net, x = _models(name)
    twin = permute_spaces(net, seed=3)
    assert _gap(twin, net, x) < 1e-5
    changed = [k for k, v in twin.state_dict().items() if v.is_floating_point()
               and v.dim() > 1 and not torch.equal(v, net.state_dict()[k])]
    assert len(changed) >= 6


@pytest.mark.parametrize("name,method", [(n, m) for n in FAMILIES for m in ALIGNED])
def test_fused_with_its_permuted_copy_gives_back_the_model(name, method):
    net, x = _models(name)
    twin = permute_spaces(net, seed=3)
    y = torch.randint(0, net.num_classes, (len(x),), generator=torch.Generator().manual_seed(5))
    fused = neurofuse.fuse([net, twin], (x, y), method=method, progress=False)
    _, x_test = _models(name, seed=7)
    assert _gap(fused, net, x) < 1e-4
    assert _gap(fused, net, x_test) < 1e-4


def test_vanilla_does_not_recover_the_permuted_copy():
    """Control: averaging without alignment does not give the model back."""
    net, x = _models("zoo")
    fused = neurofuse.fuse([net, permute_spaces(net, seed=3)], method="vanilla", progress=False)
    assert _gap(fused, net, x) > 1e-2


def test_kf_linear_fuses_three_models_of_different_widths_into_any_width():
    """The closed form groups every model's stream and MLP neurons (K-means) and matches heads
    as units: N models, different widths (same head count), another fused width."""
    torch.manual_seed(0)
    from neurofuse.models import ViT

    nets = [ViT((1, 8, 8), 10, hidden=h, depth=2, heads=4, mlp_hidden=m).eval()
            for h, m in ((16, 32), (24, 16), (32, 64))]
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    result = neurofuse.fuse(nets, (x, y), method="kf-linear", width=20, progress=False, return_result=True)
    assert result.model.level_widths() == [20, 20, 10]
    assert [c.n_fused for c in result.correspondences] == [20, 20]
    heads = result.report[0]["heads0"]
    assert len(heads) == 3 and all(sorted(h) == [0, 1, 2, 3] for h in heads)
    with torch.no_grad():
        assert torch.isfinite(result.model(x)).all()


def _of_width(name: str, width: int, seed: int):
    """A randomly initialised model of family ``name`` with stream width ``width`` (4 heads; 2 for
    the encoder), and inputs."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    if name == "zoo":
        from neurofuse.models import ViT

        return ViT((1, 8, 8), 10, hidden=width, depth=2, heads=4, mlp_hidden=2 * width).eval(), \
            torch.randn(48, 1, 8, 8, generator=g)
    if name == "encoder-pre":
        net = neurofuse.levels_from(EncoderViT(d=width).eval(), input_shape=(1, 8, 8))
        return net, torch.randn(48, 1, 8, 8, generator=g)
    pytest.importorskip("transformers")
    from neurofuse.hf import tiny_model

    if name == "hf-vit":
        return tiny_model("vit", (1, 8, 8), 10, seed=seed, hidden=width), torch.randn(48, 1, 8, 8, generator=g)
    return tiny_model(name.removeprefix("hf-"), (12,), 6, vocab_size=30, seed=seed, hidden=width), \
        torch.randint(0, 30, (48, 12), generator=g).float()


@pytest.mark.parametrize("repair", [False, True])
@pytest.mark.parametrize("name", ["zoo", "encoder-pre", "hf-vit", "hf-bert", "hf-gpt2"])
def test_otfusion_aligns_transformers_of_other_widths_to_the_anchor(name, repair):
    """Optimal transport maps a wider and a narrower model onto the anchor's stream, heads and
    MLP neurons: the aligned levels run with the anchor's widths through their stages, whatever
    their own modules were built with (a LayerNorm's shape, a packed qkv's rows)."""
    nets, x = zip(*(_of_width(name, w, seed) for seed, w in enumerate((32, 48, 24))))
    x = x[0]
    y = torch.randint(0, nets[0].num_classes, (len(x),), generator=torch.Generator().manual_seed(5))
    result = neurofuse.fuse(list(nets), (x, y), method="otfusion", repair=repair, progress=False,
                            return_result=True)
    fused = result.model
    assert fused.level_widths() == nets[0].level_widths()
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in nets[0].state_dict().items()}
    assert [c.n_fused for c in result.correspondences] == nets[0].level_widths()[:-1]
    with torch.no_grad():
        out = fused(x)
    assert torch.isfinite(out).all() and _gap(fused, nets[0], x) > 1e-3     # a fusion, not the anchor


def test_the_transformer_closed_form_honours_the_ridge_option():
    """Every least-squares fit of a transformer level solves with the method's ``ridge``: a fixed
    penalty is used as given, ``ridge=0`` is the pseudo-inverse, ``"auto"`` picks from the GCV
    grid; the level's report lists each fit's penalty and condition number."""
    from neurofuse.approximation._ridge import PENALTY_GRID

    nets = [_models("zoo", seed=s)[0] for s in (0, 1)]
    x, y = _models("zoo", seed=2)[1], torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(5))
    out = {}
    for ridge in (0.0, 0.5, "auto"):
        res = neurofuse.fuse(nets, (x, y), method="kf-linear", ridge=ridge, progress=False, return_result=True)
        blocks = [r for r in res.report if "penalties" in r]
        assert blocks and all(r["penalties"] and len(r["conditions"]) == len(r["penalties"]) for r in blocks)
        penalties = {p for r in blocks for p in r["penalties"]}
        assert penalties == {ridge} if ridge != "auto" else penalties <= set(PENALTY_GRID)
        out[ridge] = res.model
    assert _gap(out[0.0], out[0.5], x) > 1e-3


def test_a_block_with_a_layer_scale_is_refused_with_the_reason():
    model = VisionTransformer().eval()

    class Scale(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.gamma = nn.Parameter(torch.full((d,), 0.5))

        def forward(self, x):
            return x * self.gamma

    model.blocks[0].ls1 = Scale(16)
    net = neurofuse.levels_from(model, input_shape=(3, 16, 16))
    reasons = [alignment_reason(net, i) for i in range(net.num_levels)]
    assert any(r is not None for r in reasons)
    blocks = [describe(lv) for lv in net.levels]
    assert sum(b is not None for b in blocks) < net.num_levels


def test_embeddings_are_an_embed_stage():
    net, _ = _models("zoo")
    assert isinstance(describe(net.levels[0]).stages[0], Embed)


@pytest.mark.parametrize("method", ["hf-linear", "kf-linear"])
def test_values_fitted_head_by_head_when_the_attention_is_wide(monkeypatch, method):
    """Above JOINT_VALUE_COLUMNS the values are fitted per head to the grouped contexts: the
    permuted copy still gives the model back."""
    import neurofuse.methods._blockfit as bf

    monkeypatch.setattr(bf, "JOINT_VALUE_COLUMNS", 8)
    net, x = _models("hf-bert")
    y = torch.randint(0, net.num_classes, (len(x),), generator=torch.Generator().manual_seed(5))
    fused = neurofuse.fuse([net, permute_spaces(net, seed=3)], (x, y), method=method, progress=False)
    assert _gap(fused, net, x) < 1e-4


def test_statistics_only_fusion_refuses_transformers_with_the_reason():
    """Federated fusion from one round of level statistics cannot run the stage-by-stage fit."""
    from neurofuse.errors import IncompatibleModelsError
    from neurofuse.methods import get_method

    net, _ = _models("zoo")
    method = get_method("kf-linear")(progress=False)
    with pytest.raises(IncompatibleModelsError, match="transformer.*kf-gradient"):
        method.level_statistics(0, [net], net.clone(), None)


@pytest.mark.parametrize("name,method", [(n, m) for n in FAMILIES for m in ("hf-linear", "kf-linear")])
def test_aligned_queries_also_give_back_the_model_from_its_permuted_copy(name, method):
    """``queries="align"`` writes the grouped base weights of queries and keys instead of their
    least-squares fit: with a permuted copy the groups are pairs of equal neurons, so the model
    comes back all the same."""
    net, x = _models(name)
    twin = permute_spaces(net, seed=3)
    y = torch.randint(0, net.num_classes, (len(x),), generator=torch.Generator().manual_seed(5))
    fused = neurofuse.fuse([net, twin], (x, y), method=method, queries="align", progress=False)
    _, x_test = _models(name, seed=7)
    assert _gap(fused, net, x_test) < 1e-4


def test_aligned_queries_differ_from_the_fitted_ones_on_models_from_different_inits():
    """The option changes the queries and keys: on two models of different initialisations the
    grouped base weights are not the least-squares fit."""
    torch.manual_seed(0)
    from neurofuse.models import ViT

    nets = [ViT((1, 8, 8), 10, hidden=16, depth=1, heads=2, mlp_hidden=32).eval() for _ in range(2)]
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 10, (48,))
    fit = neurofuse.fuse(nets, (x, y), method="hf-linear", progress=False).state_dict()
    aligned = neurofuse.fuse(nets, (x, y), method="hf-linear", queries="align", progress=False).state_dict()
    qkv = [k for k in fit if k.endswith("qkv.weight")]
    assert qkv and not torch.allclose(fit[qkv[0]], aligned[qkv[0]])


@pytest.mark.parametrize("name", ["zoo", "encoder-post", "hf-bert", "hf-gpt2"])
def test_attention_steps_keep_the_model_of_its_permuted_copy(name):
    """The gradient steps on the queries and keys start where the closed form stops: from a
    permuted copy the residual error is zero there, so they leave the model as it is."""
    net, x = _models(name)
    twin = permute_spaces(net, seed=3)
    y = torch.randint(0, net.num_classes, (len(x),), generator=torch.Generator().manual_seed(5))
    fused = neurofuse.fuse([net, twin], (x, y), method="kf-linear", attention_steps=10, progress=False)
    _, x_test = _models(name, seed=7)
    assert _gap(fused, net, x_test) < 1e-4


@pytest.mark.parametrize("name", ["zoo", "hf-gpt2"])
def test_attention_steps_lower_the_attention_stages_error_on_the_fusion_set(name):
    """On models from different initialisations the closed-form queries and keys leave the
    attention pattern off; gradient steps through the softmax lower every attention stage's
    residual error (the stream error the level reports), and the queries and keys move."""
    (a, x), (b, _) = _models(name, seed=0), _models(name, seed=1)
    y = torch.randint(0, a.num_classes, (len(x),), generator=torch.Generator().manual_seed(5))
    runs = {s: neurofuse.fuse([a, b], (x, y), method="kf-linear", attention_steps=s, seed=0, progress=False,
                              return_result=True) for s in (0, 30)}
    for before, after in zip(runs[0].report, runs[30].report):
        for stage, e0, e1 in zip(before.get("stages", []), before.get("stream_error", []), after.get("stream_error", [])):
            if stage == "Attention":
                assert e1 < e0, (before["level"], e0, e1)
    changed = [k for k, v in runs[30].model.state_dict().items()
               if not torch.allclose(v, runs[0].model.state_dict()[k])]
    assert changed


def test_attention_steps_leave_no_gradients_in_the_fused_model():
    (a, x), (b, _) = _models("hf-gpt2", seed=0), _models("hf-gpt2", seed=1)
    y = torch.zeros(len(x), dtype=torch.long)
    fused = neurofuse.fuse([a, b], (x, y), method="kf-linear", attention_steps=5, seed=0, progress=False)
    assert [n for n, p in fused.named_parameters() if p.grad is not None] == []
    assert all(p.requires_grad for p in fused.parameters())


def test_attention_steps_that_diverge_are_a_one_line_error(monkeypatch):
    """A step whose error is not finite stops the steps with the option's name and what to do."""
    import neurofuse.methods._blockfit as blockfit
    from neurofuse.errors import ConfigError

    calls = {"n": 0}
    real = blockfit.heads_attention

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        pattern, ctx = real(*args, **kwargs)
        return (pattern, ctx * float("nan")) if calls["n"] > 3 else (pattern, ctx)

    monkeypatch.setattr(blockfit, "heads_attention", poisoned)
    (a, x), (b, _) = _models("zoo", seed=0), _models("zoo", seed=1)
    with pytest.raises(ConfigError, match="attention_steps: the queries and keys diverged.*attention_steps=0"):
        neurofuse.fuse([a, b], (x, torch.zeros(len(x), dtype=torch.long)), method="kf-linear",
                       attention_steps=10, seed=0, progress=False)


def test_attention_steps_must_be_a_count():
    from neurofuse.errors import ConfigError

    net, x = _models("zoo")
    with pytest.raises(ConfigError, match="attention_steps"):
        neurofuse.fuse([net, net], (x, torch.zeros(len(x), dtype=torch.long)), method="kf-linear",
                       attention_steps=-1, progress=False)


def test_a_packed_projection_whose_parts_cannot_keep_their_proportions_is_refused():
    """Aligned tensors of other widths rescale a packed ``qkv``'s parts; rows that do not divide
    (parts of unequal widths) are an error naming the tensor, not a wrong slice."""
    import dataclasses

    from neurofuse.errors import IncompatibleModelsError
    from neurofuse.levels._transformer import Proj

    net, _ = _models("zoo")
    spec = describe(net.levels[1])
    att = next(st for st in spec.stages if isinstance(st, Attention))
    odd = dataclasses.replace(spec, stages=tuple(dataclasses.replace(st, q=Proj(att.q.weight, None, att.q.module, 0, 5))
                                                 if st is att else st for st in spec.stages))
    w = net.levels[1].get_parameter(att.q.weight)
    with pytest.raises(IncompatibleModelsError, match="packed projection"):
        odd.resized(net.levels[1], {att.q.weight: torch.zeros(w.shape[0] * 2 // 3, w.shape[1])})


@pytest.mark.parametrize("method,options", [("otfusion", {}), ("git-rebasin", {}), ("weight-matching", {}),
                                            ("regmean-aligned", {"align": "weights"}),
                                            ("fisher-aligned", {"align": "activations"})])
def test_repair_after_an_alignment_rescales_inside_the_blocks(method, options):
    """The alignments (and the merges after one) record their maps of the heads and MLP neurons:
    REPAIR rescales them (it changes the fusion of two models from different initialisations)
    and leaves a permuted copy's fusion the model itself."""
    (a, x), (b, _) = _models("zoo", seed=0), _models("zoo", seed=1)
    y = torch.randint(0, a.num_classes, (len(x),), generator=torch.Generator().manual_seed(5))
    plain = neurofuse.fuse([a, b], (x, y), method=method, progress=False, **options)
    repaired = neurofuse.fuse([a, b], (x, y), method=method, repair=True, progress=False, **options)
    assert _gap(repaired, plain, x) > 1e-3
    twin = neurofuse.fuse([a, permute_spaces(a, seed=3)], (x, y), method=method, repair=True, progress=False,
                          **options)
    assert _gap(twin, a, x) < 1e-4


def test_repair_says_which_transformer_levels_it_leaves_alone(caplog):
    """A fusion that records no map of the heads and MLP neurons (the closed form) cannot be
    repaired inside the blocks: REPAIR says so, naming the levels, instead of doing nothing quietly."""
    (a, x), (b, _) = _models("zoo", seed=0), _models("zoo", seed=1)
    y = torch.zeros(len(x), dtype=torch.long)
    with caplog.at_level("WARNING", logger="neurofuse"):
        neurofuse.fuse([a, b], (x, y), method="otfusion", repair=True, progress=False)
    assert "were left as they are" not in caplog.text
    with caplog.at_level("WARNING", logger="neurofuse"):
        neurofuse.fuse([a, b], (x, y), method="kf-linear", repair=True, progress=False)
    assert "repair: transformer levels 0, 1 were left as they are" in caplog.text
