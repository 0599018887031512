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

from ._adapters import HFAdapter, adapter_for, list_adapters, register_adapter
from ._data import token_task
from ._io import load_pretrained, require_transformers, save_pretrained, unwrap, wrap
from ._net import HFLevel, HFLeveledNet
from ._tiny import tiny_model

__all__ = [
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


#: a small input of every family for :func:`method_table` (shape, extra ``tiny_model`` settings)
_EXAMPLE_INPUTS = {"vit": ((3, 8, 8), {}), "resnet": ((3, 16, 16), {}), "bert": ((8,), {"vocab_size": 16}),
                   "distilbert": ((8,), {"vocab_size": 16}), "roberta": ((8,), {"vocab_size": 16}),
                   "gpt2": ((8,), {"vocab_size": 16})}


def method_table() -> Dict[str, Dict[str, str]]:
    """For every family, every registered method: ``"yes: <summary>"`` or ``"no: <reason>"``.

    Each method is asked (:meth:`~neurofuse.methods.FusionMethod.check_models`) about a small
    model of the family (:func:`tiny_model`), so a method registered by anyone appears with its
    own answer.  Fine-tuning after fusion (``finetune=``) applies to every fused model but an
    output ensemble.
    """
    from ..errors import IncompatibleModelsError
    from ..methods import get_method, methods_by_order

    table: Dict[str, Dict[str, str]] = {}
    for family in list_adapters():
        shape, extra = _EXAMPLE_INPUTS.get(family, ((3, 16, 16), {}))
        net = tiny_model(family, shape, 2, hidden=8, layers=1, **extra)
        row: Dict[str, str] = {}
        for name in methods_by_order():
            cls = get_method(name)
            try:
                cls.check_models([net])
                row[name] = "yes: " + cls.summary
            except IncompatibleModelsError as exc:
                row[name] = "no: " + str(exc).split(" cannot fuse ", 1)[-1].split("; level-wise methods")[0]
        table[family] = row
    return table


def families() -> List[str]:
    """The registered families with the model classes each adapter cuts, e.g. ``vit (ViTFor...)``."""
    from ._adapters import _ADAPTERS

    return [f"{n} ({', '.join(_ADAPTERS.get(n).model_classes)})" for n in list_adapters()]
