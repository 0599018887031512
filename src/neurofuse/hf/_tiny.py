"""Small ``transformers`` models built from configs (tests, benchmarks, examples): :func:`tiny_model`."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ._io import require_transformers, wrap
from ._net import HFLeveledNet

__all__ = ["tiny_model"]


def tiny_model(family: str, input_shape: Sequence[int], num_classes: int, *, seed: int = 0,
               hidden: int = 32, layers: int = 2, vocab_size: int = 0, **config: Any) -> HFLeveledNet:
    """A small, randomly initialised Hugging Face classifier of ``family``, wrapped.

    Parameters
    ----------
    family : str
        ``"vit"`` (``ViTForImageClassification``: patch 2 on images up to 16 px, else 4; 4 heads;
        MLP ``2 * hidden``), ``"resnet"`` (``ResNetForImageClassification``: basic layers, stage
        widths ``hidden // 2, hidden``, ``layers`` stages of one layer each), ``"bert"``
        (``BertForSequenceClassification``: 4 heads, MLP ``2 * hidden``, no dropout) or
        ``"distilbert"`` (``DistilBertForSequenceClassification``, as BERT), ``"roberta"``
        (``RobertaForSequenceClassification``, as BERT; its padding id is one extra
        token id, ``vocab_size``, and its position table counts from after it), or ``"gpt2"``
        (``GPT2ForSequenceClassification``: 4 heads, MLP ``2 * hidden``, no dropout; one extra
        token id, ``vocab_size``, is the pad token, so that inputs drawn from
        ``0 .. vocab_size - 1`` are never padding).
    input_shape : sequence of int
        ``(C, H, W)`` for images, ``(T,)`` for token ids.
    num_classes : int
        Number of labels.
    seed : int
        Seed of the initialisation (the global RNG is forked and restored).
    hidden : int
        Hidden size (ViT, BERT) or the last stage's width (ResNet).
    layers : int
        Encoder layers (ViT, BERT) or stages (ResNet).
    vocab_size : int
        The vocabulary of the token families (BERT, DistilBERT, RoBERTa, GPT-2; required there).
    **config
        Further fields of the family's config (they win over the ones above).
    """
    tf = require_transformers()
    shape = tuple(int(s) for s in input_shape)
    if family in ("bert", "distilbert", "roberta", "gpt2") and (len(shape) != 1 or vocab_size < 2):
        raise ConfigError(f"{family} needs input_shape (T,) and vocab_size >= 2, got {list(shape)} and {vocab_size}")
    if family == "vit":
        if len(shape) != 3:
            raise ConfigError(f"vit needs input_shape (C, H, W), got {list(shape)}")
        kw = dict(image_size=shape[1], patch_size=2 if shape[1] <= 16 else 4, num_channels=shape[0],
                  hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=2 * hidden, num_labels=num_classes)
        cfg_cls, model_cls = tf.ViTConfig, tf.ViTForImageClassification
    elif family == "resnet":
        if len(shape) != 3:
            raise ConfigError(f"resnet needs input_shape (C, H, W), got {list(shape)}")
        widths = [max(1, hidden // 2 ** (layers - 1 - i)) for i in range(layers)]
        kw = dict(num_channels=shape[0], embedding_size=widths[0], hidden_sizes=widths,
                  depths=[1] * layers, layer_type="basic", num_labels=num_classes)
        cfg_cls, model_cls = tf.ResNetConfig, tf.ResNetForImageClassification
    elif family == "bert":
        kw = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, intermediate_size=2 * hidden,
                  max_position_embeddings=max(16, shape[0]), num_labels=num_classes,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cfg_cls, model_cls = tf.BertConfig, tf.BertForSequenceClassification
    elif family == "distilbert":
        kw = dict(vocab_size=vocab_size, dim=hidden, n_layers=layers, n_heads=4, hidden_dim=2 * hidden,
                  max_position_embeddings=max(16, shape[0]), num_labels=num_classes, dropout=0.0,
                  attention_dropout=0.0, seq_classif_dropout=0.0)
        cfg_cls, model_cls = tf.DistilBertConfig, tf.DistilBertForSequenceClassification
    elif family == "roberta":
        kw = dict(vocab_size=vocab_size + 1, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, intermediate_size=2 * hidden, type_vocab_size=1,
                  max_position_embeddings=max(16, shape[0]) + vocab_size + 1, num_labels=num_classes,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=vocab_size,
                  bos_token_id=vocab_size, eos_token_id=vocab_size)
        cfg_cls, model_cls = tf.RobertaConfig, tf.RobertaForSequenceClassification
    elif family == "gpt2":
        kw = dict(vocab_size=vocab_size + 1, n_embd=hidden, n_layer=layers, n_head=4, n_inner=2 * hidden,
                  n_positions=max(16, shape[0]), num_labels=num_classes, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, pad_token_id=vocab_size, bos_token_id=vocab_size, eos_token_id=vocab_size)
        cfg_cls, model_cls = tf.GPT2Config, tf.GPT2ForSequenceClassification
    else:
        raise ConfigError(f"unknown family {family!r}; choose 'vit', 'resnet', 'bert', 'distilbert', 'roberta' "
                          "or 'gpt2'")
    kw.update(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = model_cls(cfg_cls(**kw))
    return wrap(model.eval(), shape)
