"""Fusing Hugging Face ``transformers`` classifiers (optional extra: ``pip install 'neurofuse[hf]'``).

``transformers`` 5 models cannot be traced with ``torch.fx``, so each model family has an explicit
*level adapter* (:mod:`neurofuse.hf._adapters`): the embeddings, every encoder layer (ResNet:
every residual layer of every stage) and the head are the levels.  :func:`wrap` views a model as
a :class:`~neurofuse.levels.LeveledNet` that shares its parameters, so every neurofuse method
that applies to the family fuses it, and :func:`save_pretrained` writes the fused model as a
folder that ``from_pretrained`` loads back.

>>> from transformers import ViTConfig, ViTForImageClassification          # doctest: +SKIP
>>> nets = [neurofuse.hf.wrap(ViTForImageClassification(cfg)) for _ in range(2)]
>>> fused = neurofuse.fuse(nets, (x, y), method="kf-gradient")
>>> neurofuse.hf.save_pretrained(fused, "fused-vit")      # ViTForImageClassification.from_pretrained

Families: ``vit`` (``ViTForImageClassification``), ``resnet``
(``ResNetForImageClassification``), ``bert`` (``BertForSequenceClassification``).  Which
methods fuse which family: :func:`method_table`.  Nothing here imports ``transformers`` until a
function needs it.
"""

from typing import Dict, List

from ._adapters import COMMON_METHODS, HFAdapter, adapter_for, list_adapters, register_adapter
from ._data import token_task
from ._io import load_pretrained, require_transformers, save_pretrained, unwrap, wrap
from ._net import HFLevel, HFLeveledNet
from ._tiny import tiny_model

__all__ = [
    "COMMON_METHODS",
    "HFAdapter",
    "HFLevel",
    "HFLeveledNet",
    "adapter_for",
    "families",
    "list_adapters",
    "load_pretrained",
    "method_table",
    "register_adapter",
    "require_transformers",
    "save_pretrained",
    "tiny_model",
    "token_task",
    "unwrap",
    "wrap",
]


def method_table() -> Dict[str, Dict[str, str]]:
    """For every family, every registered method: ``"yes: <note>"`` or ``"no: <reason>"``.

    Fine-tuning after fusion (``finetune=``) applies to every fused model but an ensemble.
    """
    from ..methods import list_methods
    from ._adapters import _ADAPTERS

    table: Dict[str, Dict[str, str]] = {}
    for family in list_adapters():
        ad = _ADAPTERS.get(family)
        row: Dict[str, str] = {}
        for name in list_methods():
            if name in ad.methods:
                row[name] = "yes: " + ad.methods[name]
            else:
                row[name] = "no: " + ad.refused.get(name, "not validated on Hugging Face models")
        table[family] = row
    return table


def families() -> List[str]:
    """The registered families with the model classes each adapter cuts, e.g. ``vit (ViTFor...)``."""
    from ._adapters import _ADAPTERS

    return [f"{n} ({', '.join(_ADAPTERS.get(n).model_classes)})" for n in list_adapters()]
