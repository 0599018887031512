"""Level adapters, one per ``transformers`` model family, behind a small registry.

``transformers`` 5 models cannot be traced with ``torch.fx``, so each family says explicitly
where its levels are: the embeddings, every encoder layer (or residual layer of a stage), and the
head.  A family is added by one adapter class::

    @register_adapter("vit")
    class ViTAdapter(HFAdapter):
        model_classes = ("ViTForImageClassification",)
        def levels(self, model): ...

    @register_adapter("roberta")       # a BERT-like family: its own head and position rows
    class RobertaAdapter(BertAdapter):
        model_classes = ("RobertaForSequenceClassification",)
        def levels(self, model): ...

The adapter also says what its levels' structure does not allow (:attr:`HFAdapter.not_alignable`:
why one map per neuron space cannot align them); the fusion methods read it from the levels and
decide for themselves (:meth:`neurofuse.methods.FusionMethod.check_level`).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, List, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from .._registry import Registry
from ..errors import ConfigError, DataError, IncompatibleModelsError
from ..levels._transformer import (MLP, Attention, Embed, Head, Norm, Proj, TransformerSpec, numbered,
                                   prefixed)
from ._net import HFLevel

__all__ = ["HFAdapter", "adapter_for", "list_adapters", "register_adapter"]

_ADAPTERS: Registry[Type["HFAdapter"]] = Registry("Hugging Face model family")

_ALIGN_ATTENTION = ("the adapter does not describe this level's transformer stages "
                    "(neurofuse.levels._transformer), so its attention heads and residual stream "
                    "cannot be aligned")


class HFAdapter:
    """How one ``transformers`` family is cut into levels.

    Subclasses set :attr:`model_classes` and implement :meth:`levels`; those that take tokens
    set ``input_kind = "tokens"``.
    """

    #: the ``config.model_type`` the adapter is registered under (set by :func:`register_adapter`)
    model_type: ClassVar[str] = "?"
    #: class names of the Hugging Face models it cuts (``type(model).__name__``)
    model_classes: ClassVar[Tuple[str, ...]] = ()
    #: ``"image"`` (``[B, C, H, W]`` floats) or ``"tokens"`` (``[B, T]`` token ids)
    input_kind: ClassVar[str] = "image"
    #: why the family's levels cannot be aligned by one map per neuron space (every level of the
    #: family says so: :attr:`HFLevel.not_alignable`)
    not_alignable: ClassVar[str] = _ALIGN_ATTENTION

    def levels(self, model: nn.Module) -> List[Tuple[nn.Module, str]]:
        """``(level, neuron axis)`` pairs in order from the input, sharing ``model``'s modules: an
        :class:`HFLevel`, or a module the alignment machinery reads directly (a chain, a
        ``branch`` / ``shortcut`` block) with ``level_name``, ``not_alignable`` and
        ``transformer_spec`` attributes (the ResNet adapter's)."""
        raise NotImplementedError

    def default_input_shape(self, config: Any) -> Optional[Tuple[int, ...]]:
        """The input shape the config fixes (``None``: the user must give it)."""
        return None

    def check_config(self, config: Any) -> None:
        """Refuse configurations the levels do not describe (default: accept)."""

    def check_inputs(self, config: Any, x: Tensor) -> None:
        """Refuse inputs ``x`` that the levels' stages do not describe (default: accept).  The
        fusion methods call it on the whole fusion set before any work
        (:meth:`HFLeveledNet.check_inputs`): the closed form and the alignments compute the
        levels through their stages, not only through the model's own modules."""

    def example_input(self, config: Any, shape: Tuple[int, ...], gen: torch.Generator) -> Tensor:
        """A random batch of two inputs, for the check that the levels reproduce ``model(x)``."""
        if self.input_kind == "tokens":
            return torch.randint(0, int(config.vocab_size), (2, *shape), generator=gen)
        return torch.randn((2, *shape), generator=gen)


def register_adapter(model_type: str):  # type: ignore[no-untyped-def]
    """Class decorator registering an :class:`HFAdapter` for ``config.model_type == model_type``."""

    def deco(cls: Type[HFAdapter]) -> Type[HFAdapter]:
        cls.model_type = model_type
        _ADAPTERS.register(model_type)(cls)
        return cls

    return deco


def list_adapters() -> List[str]:
    """The registered families (``config.model_type`` values)."""
    return _ADAPTERS.names()


def adapter_for(model: nn.Module) -> HFAdapter:
    """The adapter of ``model``'s family, checked to know its class."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise IncompatibleModelsError(
            f"{type(model).__name__} is not a transformers model (it has no config.model_type); "
            "declare its levels with neurofuse.levels_from instead"
        )
    if model_type not in _ADAPTERS:
        raise IncompatibleModelsError(
            f"no level adapter for Hugging Face model_type {model_type!r}; supported: "
            f"{', '.join(list_adapters())} (add one with neurofuse.hf.register_adapter)"
        )
    adapter = _ADAPTERS.get(model_type)()
    name = type(model).__name__
    if name not in adapter.model_classes:
        raise IncompatibleModelsError(
            f"the {model_type!r} adapter cuts {', '.join(adapter.model_classes)}, not {name}; "
            "load the classification model (e.g. from_pretrained with that class)"
        )
    adapter.check_config(config)
    return adapter


# ---------------------------------------------------------------------------------------------
# level calls (functions of the parts only, so copies of a level run their own parts)
# ---------------------------------------------------------------------------------------------
def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_layer(parts: nn.ModuleDict, x: Tensor) -> Tensor:
    return _first(parts["layer"](x))


def _vit_embeddings(parts: nn.ModuleDict, x: Tensor) -> Tensor:
    emb = parts["embeddings"]
    return emb(x.to(emb.patch_embeddings.projection.weight.dtype))


def _cls_head(parts: nn.ModuleDict, x: Tensor) -> Tensor:
    return parts["classifier"](parts["layernorm"](x)[:, 0])


def _token_embeddings(parts: nn.ModuleDict, x: Tensor) -> Tensor:
    return parts["embeddings"](input_ids=x.long())


def _pooler_head(parts: nn.ModuleDict, x: Tensor) -> Tensor:
    return parts["classifier"](parts["dropout"](parts["pooler"](x)))


def _check_tokens(family: str, shape: Tuple[int, ...], limit_name: str, limit: int) -> None:
    """Refuse an input shape that is not ``(T,)`` token ids within the model's positions."""
    if len(shape) != 1:
        raise ConfigError(f"{family} inputs are token ids [T]; input_shape must be (T,), got {list(shape)}")
    if shape[0] > limit:
        raise ConfigError(f"sequence length {shape[0]} exceeds the model's {limit_name} {limit}")


def _in_transform(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` transform's tensor (e.g. one sample of Fisher's ``vmap``),
    on which a data-dependent check cannot run; the same data are checked outside it."""
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor
    except ImportError:  # pragma: no cover - a torch without functorch
        return False
    return bool(is_functorch_wrapped_tensor(t))


def _refuse_padding(x: Tensor, pad: int, family: str, anywhere: bool) -> None:
    """Refuse token ids ``x`` ``[B, T]`` that hold the padding id ``pad`` (``anywhere``: RoBERTa,
    which numbers the positions of the other tokens) or end with it (GPT-2, which classifies the
    last token that is not padding), where the levels' stages would compute something else."""
    ids = x.long()
    if ids.dim() != 2 or _in_transform(ids):
        return
    n = int(((ids == pad).any(-1) if anywhere else ids[:, -1] == pad).sum())
    if n:
        what = f"hold the padding id {pad}" if anywhere else f"end with the pad token (id {pad})"
        raise DataError(f"{n} of {ids.shape[0]} sequences {what}; {family} levels take sequences of one "
                        "length without padding: trim or regroup them")


def _gpt2_embeddings(parts: nn.ModuleDict, x: Tensor, pad: int) -> Tensor:
    _refuse_padding(x, pad, "GPT-2", anywhere=False)
    ids = x.long()
    pos = torch.arange(ids.shape[1], device=ids.device)
    return parts["drop"](parts["wte"](ids) + parts["wpe"](pos)[None])


def _causal_layer(parts: nn.ModuleDict, x: Tensor) -> Tensor:
    """A decoder block on ``[B, T, C]`` with the additive causal mask its model builds."""
    t = x.shape[1]
    mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
    return _first(parts["layer"](x, attention_mask=mask[None, None]))


def _last_token_head(parts: nn.ModuleDict, x: Tensor) -> Tensor:
    return parts["score"](parts["ln_f"](x)[:, -1])


def _encoder_layers(model: nn.Module, body: nn.Module) -> nn.ModuleList:
    layers = getattr(body, "layers", None)
    if layers is None:
        layers = getattr(getattr(body, "encoder", None), "layer", None)
    if layers is None:  # pragma: no cover - a transformers layout the adapter does not know
        raise IncompatibleModelsError(f"cannot find the encoder layers of {type(model).__name__}")
    return layers


def _stack(embeddings: HFLevel, layers: Any, name: str, layer_spec: Any, head: HFLevel,
           call: Any = None) -> List[Tuple[HFLevel, str]]:
    """The levels of an encoder or decoder: ``embeddings``, one level per layer (``name i``, its
    stages ``layer_spec(layer)``, run by ``call``, :func:`_run_layer` by default), ``head``."""
    body = [(HFLevel({"layer": layer}, call or _run_layer, f"{name} {i}", transformer_spec=layer_spec(layer)),
             "token") for i, layer in enumerate(layers)]
    return [(embeddings, "token"), *body, (head, "dense")]


# ---------------------------------------------------------------------------------------------
# transformer stages of the families (keys relative to the level: parts.<name>.<path>)
# ---------------------------------------------------------------------------------------------
def _lin(path: str, m: nn.Module) -> Proj:
    return Proj(f"{path}.weight", f"{path}.bias" if getattr(m, "bias", None) is not None else None, path)


def _conv1d(path: str, start: int = 0, stop: Optional[int] = None) -> Proj:
    """Rows ``[start, stop)`` of a ``transformers`` ``Conv1D`` (weight ``[in, out]``, bias)."""
    return Proj(f"{path}.weight", f"{path}.bias", path, start, stop, transposed=True)


def _ln(path: str, m: nn.Module) -> Norm:
    return Norm(f"{path}.weight" if m.weight is not None else None,
                f"{path}.bias" if getattr(m, "bias", None) is not None else None, float(m.eps))


def _spec(stages: List[Any], prefix: str) -> TransformerSpec:
    return numbered(prefixed(stages, prefix))


def _vit_embeddings_spec(emb: nn.Module) -> Optional[TransformerSpec]:
    if getattr(emb, "mask_token", None) is not None:
        return None
    conv = emb.patch_embeddings.projection
    return _spec([Embed("conv", _lin("patch_embeddings.projection", conv), cls="cls_token",
                        pos="position_embeddings")], "parts.embeddings.")


def _vit_layer_spec(layer: nn.Module, heads: int) -> TransformerSpec:
    att, mlp = layer.attention, layer.mlp
    return _spec([Attention(_lin("attention.q_proj", att.q_proj), _lin("attention.k_proj", att.k_proj),
                            _lin("attention.v_proj", att.v_proj), _lin("attention.o_proj", att.o_proj), heads,
                            pre=_ln("layernorm_before", layer.layernorm_before)),
                  MLP(_lin("mlp.fc1", mlp.fc1), _lin("mlp.fc2", mlp.fc2), "mlp.activation_fn",
                      pre=_ln("layernorm_after", layer.layernorm_after))], "parts.layer.")


def _bert_embeddings_spec(emb: nn.Module, pos_offset: int = 0) -> TransformerSpec:
    return _spec([Embed("lookup", Proj("word_embeddings.weight", None, "word_embeddings"),
                        pos="position_embeddings.weight", pos_table=True,
                        rows=("token_type_embeddings.weight",), norm=_ln("LayerNorm", emb.LayerNorm),
                        pos_offset=pos_offset)],
                 "parts.embeddings.")


def _bert_layer_spec(layer: nn.Module, heads: int) -> TransformerSpec:
    sa, so = layer.attention.self, layer.attention.output
    return _spec([Attention(_lin("attention.self.query", sa.query), _lin("attention.self.key", sa.key),
                            _lin("attention.self.value", sa.value), _lin("attention.output.dense", so.dense),
                            heads, post=_ln("attention.output.LayerNorm", so.LayerNorm)),
                  MLP(_lin("intermediate.dense", layer.intermediate.dense), _lin("output.dense", layer.output.dense),
                      "intermediate.intermediate_act_fn", post=_ln("output.LayerNorm", layer.output.LayerNorm))],
                 "parts.layer.")


def _gpt2_layer_spec(layer: nn.Module, heads: int, width: int) -> TransformerSpec:
    q, k, v = (_conv1d("attn.c_attn", i * width, (i + 1) * width) for i in range(3))
    return _spec([Attention(q, k, v, _conv1d("attn.c_proj"), heads, pre=_ln("ln_1", layer.ln_1), causal=True),
                  MLP(_conv1d("mlp.c_fc"), _conv1d("mlp.c_proj"), "mlp.act", pre=_ln("ln_2", layer.ln_2))],
                 "parts.layer.")


# ---------------------------------------------------------------------------------------------
# the families
# ---------------------------------------------------------------------------------------------
@register_adapter("vit")
class ViTAdapter(HFAdapter):
    """``ViTForImageClassification``: patch embeddings (+ CLS token, position embedding); one
    level per encoder layer (pre-LN, attention + MLP with their residuals); the head is the final
    LayerNorm and the classifier on the CLS token."""

    model_classes = ("ViTForImageClassification",)
    #: the attribute holding the encoder (a ViT-like family, e.g. DeiT's ``deit``, sets its own)
    body: ClassVar[str] = "vit"

    def levels(self, model: nn.Module) -> List[Tuple[HFLevel, str]]:
        vit = getattr(model, self.body)
        if getattr(vit, "pooler", None) is not None:
            raise IncompatibleModelsError("this ViT has a pooler the classifier does not use; "
                                          "build it as ViTForImageClassification(config)")
        b = self.body
        heads = int(model.config.num_attention_heads)
        emb = HFLevel({"embeddings": vit.embeddings}, _vit_embeddings, f"{b}.embeddings",
                      transformer_spec=_vit_embeddings_spec(vit.embeddings))
        head = _spec([Head(_lin("classifier", model.classifier), norm=_ln("layernorm", vit.layernorm))], "parts.")
        return _stack(emb, _encoder_layers(model, vit), f"{b} layer", lambda layer: _vit_layer_spec(layer, heads),
                      HFLevel({"layernorm": vit.layernorm, "classifier": model.classifier}, _cls_head,
                              f"{b}.layernorm + classifier (CLS token)", transformer_spec=head))

    def default_input_shape(self, config: Any) -> Optional[Tuple[int, ...]]:
        size = config.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(config.num_channels), int(h), int(w))


class _ResNetChain(nn.Sequential):
    """A level of a Hugging Face ResNet that is one chain of the model's own modules (the stem's
    convolution and BatchNorm; the head's activation, pool and classifier)."""

    transformer_spec = None

    def __init__(self, modules: List[nn.Module], name: str) -> None:
        super().__init__(*modules)
        self.level_name = name
        self.not_alignable = ""

    def extra_repr(self) -> str:
        return self.level_name


class _ResNetBlock(nn.Module):
    r"""A Hugging Face residual layer in the zoo's block protocol
    (:class:`neurofuse.models.resnet.BasicBlock`): ``branch(act(h)) + shortcut(act(h))``, where
    ``act`` is the activation that ends the *previous* layer (after the stem also its max-pool),
    ``branch`` the layer's convolutions with their BatchNorms and inner activations, ``shortcut``
    its projection (or the identity).  Its output is the pre-activation sum: the layer's own
    closing activation starts the next level.  The modules are the model's own."""

    transformer_spec = None

    def __init__(self, act: nn.Module, layer: nn.Module, name: str) -> None:
        super().__init__()
        self.act = act
        self.branch = nn.Sequential(*[m for conv in layer.layer
                                      for m in (conv.convolution, conv.normalization, conv.activation)])
        self.shortcut = layer.shortcut if isinstance(layer.shortcut, nn.Identity) else nn.Sequential(
            layer.shortcut.convolution, layer.shortcut.normalization)
        self.level_name = name
        self.not_alignable = ""

    def forward(self, h: Tensor) -> Tensor:
        a = self.act(h)
        return self.branch(a) + self.shortcut(a)

    def extra_repr(self) -> str:
        return self.level_name


@register_adapter("resnet")
class ResNetAdapter(HFAdapter):
    """``ResNetForImageClassification`` (basic or bottleneck layers), cut as the zoo's ResNet:
    the stem (7x7 convolution, BatchNorm: a pre-activation); one residual block per layer of every
    stage, ``branch(act(h)) + shortcut(act(h))`` with ``act`` the previous layer's closing
    activation (after the stem, the stem's activation and max-pool); the head is the last
    layer's activation, the average pool and the classifier.  Every level is a chain or a block of
    the model's own ``Conv2d`` / ``BatchNorm2d`` / ``Linear`` modules, so every level-wise method
    reads it as it reads the zoo's."""

    model_classes = ("ResNetForImageClassification",)
    not_alignable = ""

    def levels(self, model: nn.Module) -> List[Tuple[nn.Module, str]]:
        net = model.resnet
        stem = net.embedder.embedder
        out: List[Tuple[nn.Module, str]] = [
            (_ResNetChain([stem.convolution, stem.normalization], "resnet.embedder"), "conv")]
        act: nn.Module = nn.Sequential(stem.activation, net.embedder.pooler)
        for s, stage in enumerate(net.encoder.stages):
            for j, layer in enumerate(stage.layers):
                out.append((_ResNetBlock(act, layer, f"resnet stage {s} layer {j}"), "conv"))
                act = layer.activation
        out.append((_ResNetChain([act, net.pooler, *model.classifier], "resnet.pooler + classifier"), "dense"))
        return out


@register_adapter("bert")
class BertAdapter(HFAdapter):
    """``BertForSequenceClassification``: the embeddings (word + position + token type,
    LayerNorm); one level per encoder layer (post-LN); the head is the pooler (dense + tanh on
    the CLS token), dropout and the classifier.  Inputs are token ids ``[B, T]`` of one length,
    without padding (the levels run without an attention mask, as the model does when none is
    given) and with token type 0."""

    model_classes = ("BertForSequenceClassification",)
    input_kind = "tokens"

    def check_config(self, config: Any) -> None:
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise IncompatibleModelsError("the 'bert' adapter cuts encoder-only models; this config "
                                          "is a decoder (is_decoder / add_cross_attention)")

    def levels(self, model: nn.Module) -> List[Tuple[HFLevel, str]]:
        bert = model.bert
        if bert.pooler is None:
            raise IncompatibleModelsError("BertForSequenceClassification needs its pooler")
        heads = int(model.config.num_attention_heads)
        emb = HFLevel({"embeddings": bert.embeddings}, _token_embeddings, "bert.embeddings",
                      transformer_spec=_bert_embeddings_spec(bert.embeddings))
        head = _spec([Head(_lin("classifier", model.classifier), dense=_lin("pooler.dense", bert.pooler.dense),
                           act="pooler.activation")], "parts.")
        return _stack(emb, _encoder_layers(model, bert), "bert layer", lambda layer: _bert_layer_spec(layer, heads),
                      HFLevel({"pooler": bert.pooler, "dropout": model.dropout, "classifier": model.classifier},
                              _pooler_head, "bert.pooler + dropout + classifier", transformer_spec=head))

    def example_input(self, config: Any, shape: Tuple[int, ...], gen: torch.Generator) -> Tensor:
        _check_tokens("BERT", shape, "max_position_embeddings", int(config.max_position_embeddings))
        return super().example_input(config, shape, gen)


def _roberta_embeddings(parts: nn.ModuleDict, x: Tensor, pad: int) -> Tensor:
    _refuse_padding(x, pad, "RoBERTa", anywhere=True)
    return parts["embeddings"](input_ids=x.long())


def _roberta_head(parts: nn.ModuleDict, x: Tensor) -> Tensor:
    return parts["classifier"](x)


@register_adapter("roberta")
class RobertaAdapter(BertAdapter):
    """``RobertaForSequenceClassification``: BERT's embeddings and post-LN encoder layers, its
    positions counted from ``padding_idx + 1`` (the model numbers the non-padding tokens after
    its padding id); the head is ``RobertaClassificationHead`` (dense + tanh on the CLS token,
    dropout, ``out_proj``).  Inputs are token ids ``[B, T]`` of one length without the padding id
    (the levels run without an attention mask, as the model does when none is given) and with
    token type 0."""

    model_classes = ("RobertaForSequenceClassification",)

    def levels(self, model: nn.Module) -> List[Tuple[HFLevel, str]]:
        rob = model.roberta
        heads = int(model.config.num_attention_heads)
        offset = int(rob.embeddings.padding_idx) + 1
        emb = HFLevel({"embeddings": rob.embeddings},
                      functools.partial(_roberta_embeddings, pad=int(rob.embeddings.padding_idx)),
                      "roberta.embeddings", transformer_spec=_bert_embeddings_spec(rob.embeddings, offset))
        cls = model.classifier
        head = _spec([Head(_lin("classifier.out_proj", cls.out_proj), dense=_lin("classifier.dense", cls.dense),
                           act="tanh")], "parts.")
        return _stack(emb, _encoder_layers(model, rob), "roberta layer", lambda layer: _bert_layer_spec(layer, heads),
                      HFLevel({"classifier": cls}, _roberta_head, "classifier (dense + tanh + out_proj on CLS)",
                              transformer_spec=head))

    def check_inputs(self, config: Any, x: Tensor) -> None:
        _refuse_padding(x, int(config.pad_token_id), "RoBERTa", anywhere=True)

    def example_input(self, config: Any, shape: Tuple[int, ...], gen: torch.Generator) -> Tensor:
        pad = int(config.pad_token_id)
        _check_tokens("RoBERTa", shape, "max_position_embeddings less its padding offset",
                      int(config.max_position_embeddings) - pad - 1)
        x = HFAdapter.example_input(self, config, shape, gen)
        return torch.where(x == pad, (x + 1) % int(config.vocab_size), x)   # no padding id: unpadded


def _distilbert_layer_spec(layer: nn.Module, heads: int) -> TransformerSpec:
    a = layer.attention
    return _spec([Attention(_lin("attention.q_lin", a.q_lin), _lin("attention.k_lin", a.k_lin),
                            _lin("attention.v_lin", a.v_lin), _lin("attention.out_lin", a.out_lin),
                            heads, post=_ln("sa_layer_norm", layer.sa_layer_norm)),
                  MLP(_lin("ffn.lin1", layer.ffn.lin1), _lin("ffn.lin2", layer.ffn.lin2), "ffn.activation",
                      post=_ln("output_layer_norm", layer.output_layer_norm))],
                 "parts.layer.")


def _distilbert_head(parts: nn.ModuleDict, x: Tensor) -> Tensor:
    return parts["classifier"](parts["dropout"](torch.relu(parts["pre_classifier"](x[:, 0]))))


@register_adapter("distilbert")
class DistilBertAdapter(BertAdapter):
    """``DistilBertForSequenceClassification``: the embeddings (word + position, LayerNorm); one
    level per transformer block (post-LN, as BERT's); the head is ``pre_classifier`` + ReLU on the
    CLS token, dropout and the classifier.  Inputs are token ids ``[B, T]`` of one length, without
    padding (the levels run without an attention mask, as the model does when none is given)."""

    model_classes = ("DistilBertForSequenceClassification",)

    def check_config(self, config: Any) -> None:
        if getattr(config, "sinusoidal_pos_embds", False):
            raise IncompatibleModelsError("the 'distilbert' adapter fits learned position embeddings; this "
                                          "config uses sinusoidal ones (sinusoidal_pos_embds)")

    def levels(self, model: nn.Module) -> List[Tuple[HFLevel, str]]:
        body = model.distilbert
        heads = int(model.config.n_heads)
        emb = _spec([Embed("lookup", Proj("word_embeddings.weight", None, "word_embeddings"),
                           pos="position_embeddings.weight", pos_table=True,
                           norm=_ln("LayerNorm", body.embeddings.LayerNorm))], "parts.embeddings.")
        head = _spec([Head(_lin("classifier", model.classifier), dense=_lin("pre_classifier", model.pre_classifier),
                           act="relu")], "parts.")
        return _stack(HFLevel({"embeddings": body.embeddings}, _token_embeddings, "distilbert.embeddings",
                              transformer_spec=emb),
                      body.transformer.layer, "distilbert block", lambda layer: _distilbert_layer_spec(layer, heads),
                      HFLevel({"pre_classifier": model.pre_classifier, "dropout": model.dropout,
                               "classifier": model.classifier}, _distilbert_head,
                              "pre_classifier + ReLU + dropout + classifier (CLS)", transformer_spec=head))

    def example_input(self, config: Any, shape: Tuple[int, ...], gen: torch.Generator) -> Tensor:
        _check_tokens("DistilBERT", shape, "max_position_embeddings", int(config.max_position_embeddings))
        return HFAdapter.example_input(self, config, shape, gen)


@register_adapter("gpt2")
class GPT2Adapter(HFAdapter):
    """``GPT2ForSequenceClassification``: the embeddings (token + position); one level per
    decoder block (pre-LN, causal attention + MLP with their residuals; ``Conv1D`` weights,
    stored ``[in, out]``); the head is the final LayerNorm and the classifier on the last
    token.  Inputs are token ids ``[B, T]`` of one length, without padding and not ending with
    the pad token (the model then classifies the last token, as the head level does)."""

    model_classes = ("GPT2ForSequenceClassification",)
    input_kind = "tokens"

    def check_config(self, config: Any) -> None:
        if getattr(config, "add_cross_attention", False):
            raise IncompatibleModelsError("the 'gpt2' adapter cuts decoder-only models; this config "
                                          "has cross-attention (add_cross_attention)")
        if not getattr(config, "scale_attn_weights", True) or getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise IncompatibleModelsError(
                "the 'gpt2' adapter's attention scales by 1/sqrt(head width); this config sets "
                "scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True")
        if getattr(config, "pad_token_id", None) is None:
            raise IncompatibleModelsError(
                "GPT2ForSequenceClassification classifies batches of more than one sequence only with "
                "config.pad_token_id set; set it (e.g. to the EOS id) and pass unpadded inputs")

    def levels(self, model: nn.Module) -> List[Tuple[HFLevel, str]]:
        net = model.transformer
        heads, width = int(model.config.n_head), int(model.config.n_embd)
        emb = _spec([Embed("lookup", Proj("wte.weight", None, "wte"), pos="wpe.weight", pos_table=True)], "parts.")
        head = _spec([Head(_lin("score", model.score), norm=_ln("ln_f", net.ln_f), pool="last")], "parts.")
        return _stack(HFLevel({"wte": net.wte, "wpe": net.wpe, "drop": net.drop},
                              functools.partial(_gpt2_embeddings, pad=int(model.config.pad_token_id)),
                              "transformer.wte + wpe", transformer_spec=emb),
                      net.h, "gpt2 block", lambda layer: _gpt2_layer_spec(layer, heads, width),
                      HFLevel({"ln_f": net.ln_f, "score": model.score}, _last_token_head,
                              "transformer.ln_f + score (last token)", transformer_spec=head),
                      call=_causal_layer)

    def check_inputs(self, config: Any, x: Tensor) -> None:
        _refuse_padding(x, int(config.pad_token_id), "GPT-2", anywhere=False)

    def example_input(self, config: Any, shape: Tuple[int, ...], gen: torch.Generator) -> Tensor:
        _check_tokens("GPT-2", shape, "n_positions", int(config.n_positions))
        x = super().example_input(config, shape, gen)
        pad = int(config.pad_token_id)
        return torch.where(x == pad, (x + 1) % int(config.vocab_size), x)   # no pad token: unpadded
