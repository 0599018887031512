"""The experiment pipeline shared by ``neurofuse demo``, ``neurofuse train`` and the benchmarks.

Split a dataset's training set among ``n`` models (iid / Dirichlet / sharded), train each base model
on its part with a validation split for checkpoint selection, draw a class-balanced fusion set from
the training data (never the test set), fuse with a list of methods and score on the test set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._validate import check_seed
from .api import fuse
from .data import Dataset, balanced_subset, class_shares, partition, train_val_split
from .errors import ConfigError, NeurofuseError
from .importance import importance_methods
from .levels import LeveledNet
from .methods import get_method, list_methods
from .models import make_model
from .training import TrainConfig, evaluate, train_model

__all__ = ["BaseModels", "SplitConfig", "fusion_set", "method_variants", "run_methods",
           "train_base_models"]

log = logging.getLogger("neurofuse")

#: base-model training epochs that reach a useful accuracy on CPU, per dataset
DEFAULT_EPOCHS = {"digits": 60, "mnist": 8, "fashion-mnist": 8, "cifar10": 60, "cifar100": 60}


@dataclass(frozen=True)
class SplitConfig:
    """How base models are made.

    Attributes
    ----------
    arch, size : str
        Zoo architecture and named size (see :func:`neurofuse.models.make_model`).
    n_models : int
        Number of base models.
    partition : str
        ``"iid"``, ``"dirichlet"`` or ``"sharded"``.
    ratio : float
        Dirichlet min/max concentration ratio (appendix D; 0.2 in the paper).
    seed : int
        Seed of the split, the initialisations and the data order.
    epochs : int, optional
        Training epochs (default: :data:`DEFAULT_EPOCHS` of the dataset).
    lr : float
        Adam learning rate.
    val_fraction : float
        Share of each model's data held out to select its checkpoint.
    """

    arch: str = "mlp"
    size: str = "small"
    n_models: int = 4
    partition: str = "dirichlet"
    ratio: float = 0.2
    seed: int = 0
    epochs: Optional[int] = None
    lr: float = 1e-3
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.n_models < 1:
            raise ConfigError(f"need at least one model, got n_models={self.n_models}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int)
                                        or self.epochs < 1):
            raise ConfigError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        check_seed(self.seed)


@dataclass
class BaseModels:
    """Trained base models with their data parts and scores."""

    models: List[LeveledNet]
    parts: List[np.ndarray]
    class_shares: np.ndarray
    histories: List[Dict[str, Any]] = field(default_factory=list)


def train_base_models(ds: Dataset, cfg: SplitConfig, progress: bool = True,
                      device: str = "cpu") -> BaseModels:
    """Split ``ds``'s training set and train one model per part (checkpoint chosen on validation)."""
    y = ds.y_train.numpy()
    parts = partition(y, cfg.n_models, cfg.partition, seed=cfg.seed, ratio=cfg.ratio)
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS.get(ds.name, 20)
    models, histories = [], []
    bar = tqdm(list(enumerate(parts)), desc="train base models", disable=not progress, leave=False)
    for i, part in bar:
        torch.manual_seed(cfg.seed * 1000 + i)
        model = make_model(cfg.arch, cfg.size, ds.input_shape, ds.num_classes)
        tr, val = train_val_split(part, cfg.val_fraction, seed=cfg.seed * 1000 + i)
        xv = ds.x_train[val] if len(val) else None
        yv = ds.y_train[val] if len(val) else None
        hist = train_model(model, ds.x_train[tr], ds.y_train[tr], xv, yv,
                           config=TrainConfig(epochs=epochs, lr=cfg.lr, seed=cfg.seed * 1000 + i,
                                              device=device))
        models.append(model.eval())
        histories.append(hist)
    shares = class_shares(y, parts, ds.num_classes)
    return BaseModels(models, parts, shares, histories)


def fusion_set(ds: Dataset, size: int = 400, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced fusion set of ``size`` samples from the training data (never the test set)."""
    check_seed(seed)
    idx = balanced_subset(ds.y_train.numpy(), np.arange(len(ds.y_train)), size, seed=seed)
    return ds.x_train[idx], ds.y_train[idx]


def method_variants(methods: Optional[Sequence[str]] = None,
                    importances: Optional[Sequence[str]] = None) -> Iterator[Tuple[str, str, str]]:
    """``(key, method, importance)`` for every method and every importance score it uses.

    The key is ``"<method>/<importance>"`` for methods that use importance, else ``"<method>"``.
    """
    names = methods or [n for n in list_methods() if get_method(n).listed_in_comparisons]
    for name in names:
        cls = get_method(name)
        if cls.uses_importance:
            for imp in importances or importance_methods():
                yield f"{name}/{imp}", name, imp
        else:
            yield name, name, "uniform"


def run_methods(models: Sequence[nn.Module], fusion: Tuple[torch.Tensor, torch.Tensor], ds: Dataset,
                variants: Sequence[Tuple[str, str, str]], seed: int = 0, progress: bool = True,
                options: Optional[Dict[str, Dict[str, Any]]] = None,
                ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, str], Dict[str, nn.Module]]:
    """Fuse with every variant and score on the test set.

    Returns ``(results, skipped, fused_models)``: ``results[key]`` has ``accuracy``, ``loss``,
    ``macro_f1`` and ``seconds`` (wall-clock time of fusion); ``skipped[key]`` says why a variant
    does not apply (e.g. ``hf-linear`` with four models).
    """
    results: Dict[str, Dict[str, float]] = {}
    skipped: Dict[str, str] = {}
    fused_models: Dict[str, nn.Module] = {}
    bar = tqdm(variants, desc="fuse", disable=not progress, leave=False)
    for key, method, imp in bar:
        bar.set_postfix_str(key)
        kwargs = dict((options or {}).get(method, {}))
        start = time.perf_counter()
        try:
            fused = fuse(models, fusion, method=method, importance=imp, seed=seed, progress=False,
                         **kwargs)
        except NeurofuseError as exc:
            skipped[key] = str(exc)
            log.info("%s skipped: %s", key, exc)
            continue
        seconds = time.perf_counter() - start
        scores = evaluate(fused, ds.x_test, ds.y_test)
        results[key] = {"accuracy": scores["accuracy"], "loss": scores["loss"],
                        "macro_f1": scores["macro_f1"], "seconds": seconds}
        fused_models[key] = fused
    return results, skipped, fused_models


# -- added for the benchmarks (neurofuse.bench) -------------------------------------------------

def split_parts(ds: Dataset, cfg: SplitConfig) -> List[np.ndarray]:
    """The training-set indices of each base model: :func:`neurofuse.data.partition`, or, for
    ``cfg.partition == "full"``, the whole training set for every model (the models then differ
    only by their seed, as in the paper's full-dataset setup)."""
    y = ds.y_train.numpy()
    if cfg.partition == "full":
        return [np.arange(len(y)) for _ in range(cfg.n_models)]
    return partition(y, cfg.n_models, cfg.partition, seed=cfg.seed, ratio=cfg.ratio)


def train_models_on_parts(ds: Dataset, parts: Sequence[np.ndarray], cfg: SplitConfig,
                          progress: bool = True, device: str = "cpu",
                          train_options: Optional[Dict[str, Any]] = None) -> BaseModels:
    """Train one model per part exactly as :func:`train_base_models` does (same seeds, same
    validation split for checkpoint selection), with extra :class:`TrainConfig` settings
    (``batch_size``, ``weight_decay``, ...) and a progress bar over each model's epochs."""
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS.get(ds.name, 20)
    extra = dict(train_options or {})
    extra.pop("epochs", None)
    extra.pop("lr", None)
    models, histories = [], []
    for i, part in enumerate(parts):
        torch.manual_seed(cfg.seed * 1000 + i)
        model = make_model(cfg.arch, cfg.size, ds.input_shape, ds.num_classes)
        tr, val = train_val_split(np.asarray(part), cfg.val_fraction, seed=cfg.seed * 1000 + i)
        xv = ds.x_train[val] if len(val) else None
        yv = ds.y_train[val] if len(val) else None
        tc = TrainConfig(epochs=epochs, lr=cfg.lr, seed=cfg.seed * 1000 + i, device=device, **extra)
        if progress:
            log.info("training base model %d/%d (%d samples, %d epochs)", i + 1, len(parts), len(tr), epochs)
        hist = train_model(model, ds.x_train[tr], ds.y_train[tr], xv, yv, config=tc, progress=progress)
        models.append(model.eval())
        histories.append(hist)
    shares = class_shares(ds.y_train.numpy(), list(parts), ds.num_classes)
    return BaseModels(models, list(parts), shares, histories)
