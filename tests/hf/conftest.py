"""Fixtures of the Hugging Face tests: tiny transformers classifiers, trained per module."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F

pytest.importorskip("transformers")

import neurofuse.hf as nh  # noqa: E402
from neurofuse.data import Dataset, balanced_subset, load_dataset, partition  # noqa: E402
from neurofuse.training import TrainConfig, train_model  # noqa: E402

#: test-scale training: 4 models per family on a 4-way Dirichlet split (the paper's, ratio 0.2);
#: BERT needs its 15 epochs on 2,000 sequences (at 12 epochs on 1,500 its base models stay at chance)
EPOCHS = {"vit": 15, "resnet": 10, "bert": 15, "gpt2": 15}
LR = 3e-3


def family_data(family: str) -> Dataset:
    """Digits for the image families (16x16 for ResNet's strided stem), the token task for BERT
    and GPT-2."""
    if family in ("bert", "gpt2"):
        return nh.token_task(n_train=2000, n_test=600, seed=0)
    ds = load_dataset("digits")
    if family == "resnet":
        def up(x):  # type: ignore[no-untyped-def]
            return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        ds = Dataset("digits16", up(ds.x_train), ds.y_train, up(ds.x_test), ds.y_test,
                     ds.num_classes, (1, 16, 16))
    return ds


def make(family: str, ds: Dataset, seed: int) -> nh.HFLeveledNet:
    vocab = int(ds.x_train.max()) + 1 if family in ("bert", "gpt2") else 0
    return nh.tiny_model(family, ds.input_shape, ds.num_classes, seed=seed, vocab_size=vocab)


def train_split(family: str, n: int = 4):  # type: ignore[no-untyped-def]
    """``(dataset, models, fusion set)``: ``n`` models, each from its own initialisation, trained
    on the parts of a Dirichlet split; a 200-sample class-balanced fusion set from the training data."""
    ds = family_data(family)
    y = ds.y_train.numpy()
    models = []
    for i, part in enumerate(partition(y, n, "dirichlet", seed=0)):
        m = make(family, ds, seed=i)
        train_model(m, ds.x_train[part], ds.y_train[part], config=TrainConfig(epochs=EPOCHS[family], lr=LR, seed=i))
        models.append(m.eval())
    idx = balanced_subset(y, np.arange(len(y)), 200, seed=0)
    return ds, models, (ds.x_train[idx], ds.y_train[idx])
