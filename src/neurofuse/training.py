"""Training and evaluating classifiers (the models that are later fused).

:func:`train_model` trains with Adam under a linear-warmup + cosine learning-rate schedule and
selects the epoch with the best *validation* accuracy (never a test set); :func:`evaluate` reports
accuracy, cross entropy and macro F1.  Runs are reproducible: the data order comes from a
``torch.Generator`` seeded with :attr:`TrainConfig.seed`, and any other randomness during training
(dropout) is drawn from a forked, seeded global generator that leaves the caller's state alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._loop import EpochEnd, run_epochs, seeded_rng
from ._validate import check_seed
from ._validate import is_int as _is_int
from ._validate import is_number as _is_number
from .errors import ConfigError, DataError

__all__ = [
    "TrainConfig",
    "evaluate",
    "predict_logits",
    "seed_everything",
    "train_model",
]

logger = logging.getLogger(__name__)


def _parse_device(device: Any) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_model`.

    Parameters
    ----------
    epochs : int
        Number of passes over the training data (at least 1).
    lr : float
        Peak learning rate of Adam (positive).
    weight_decay : float
        L2 penalty of Adam (non-negative).
    batch_size : int
        Mini-batch size (at least 1).
    warmup_epochs : int
        Epochs of linear warmup from ``lr / warmup_steps`` to ``lr``; afterwards the rate follows
        a cosine from ``lr`` to ``lr_min``.  The schedule is updated every step.
    lr_min : float
        Final learning rate of the cosine (``0 <= lr_min <= lr``).
    seed : int
        Seed of the data order (and of dropout, drawn inside a forked RNG).
    label_smoothing : float
        Label smoothing of the cross-entropy loss, in ``[0, 1)``.
    device : str
        Torch device to train on, e.g. ``"cpu"`` or ``"cuda"``.

    Raises
    ------
    ConfigError
        If a value is out of range.
    """

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 5e-5
    batch_size: int = 64
    warmup_epochs: int = 2
    lr_min: float = 1e-5
    seed: int = 0
    label_smoothing: float = 0.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not _is_int(self.epochs) or self.epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if (not _is_number(self.weight_decay) or not math.isfinite(self.weight_decay)
                or self.weight_decay < 0):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not _is_int(self.warmup_epochs) or self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be an integer >= 0, got {self.warmup_epochs!r}")
        if not _is_number(self.lr_min) or not 0 <= self.lr_min <= self.lr:
            raise ConfigError(f"lr_min must be in [0, lr={self.lr}], got {self.lr_min!r}")
        check_seed(self.seed)
        if not _is_number(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        _parse_device(self.device)

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """Learning rate of optimisation step ``step`` (0-based) with ``steps_per_epoch`` steps.

        Linear warmup over the first ``warmup_epochs * steps_per_epoch`` steps (reaching ``lr`` at
        the last warmup step), then a cosine from ``lr`` down to ``lr_min`` at the last step.
        """
        total = self.epochs * steps_per_epoch
        warmup = min(self.warmup_epochs * steps_per_epoch, total)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        span = total - warmup - 1
        progress = (step - warmup) / span if span > 0 else 1.0
        progress = min(max(progress, 0.0), 1.0)
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    """Seed Python's :mod:`random`, numpy's legacy global generator and torch (CPU and CUDA).

    Prefer explicit generators (``torch.Generator``, ``numpy.random.default_rng``); this helper is
    for code paths that draw from global state, such as weight initialisation of new modules.
    """
    check_seed(seed)
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))


# ---------------------------------------------------------------------------------------------
# data and device helpers
# ---------------------------------------------------------------------------------------------
def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _resolve_device(device: Any) -> torch.device:
    dev = _parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} is not available on this machine; use device='cpu'")
    return dev


def _inputs(x: Any, model: nn.Module, name: str) -> Tensor:
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{name} cannot be converted to a tensor: {exc}") from None
    if t.dim() == 0 or t.shape[0] == 0:
        raise DataError(f"{name} is empty; give at least one sample")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    t = t.to(_param_dtype(model))
    input_shape = getattr(model, "input_shape", None)
    if input_shape is not None and math.prod(t.shape[1:]) != math.prod(input_shape):
        raise DataError(
            f"{name} has samples of shape {list(t.shape[1:])} but the model takes "
            f"{list(input_shape)}; reshape the data or use a model for this input shape"
        )
    return t


def _labels(y: Any, n: int, name: str, num_classes: Optional[int]) -> Tensor:
    try:
        t = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{name} cannot be converted to a tensor: {exc}") from None
    if t.dim() != 1:
        raise DataError(f"{name} must be a 1-D vector of class indices, got shape {list(t.shape)}")
    if t.shape[0] != n:
        raise DataError(f"{name} has {t.shape[0]} labels but there are {n} samples")
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise DataError(f"{name} holds non-integer labels; give class indices 0..C-1")
    t = t.to(torch.long)
    if t.numel() and int(t.min()) < 0:
        raise DataError(f"{name} holds a negative label {int(t.min())}; give class indices 0..C-1")
    if num_classes is not None and t.numel() and int(t.max()) >= num_classes:
        raise DataError(
            f"{name} holds label {int(t.max())} but the model has {num_classes} classes; "
            "give class indices 0..C-1"
        )
    return t


@contextlib.contextmanager
def _running_on(model: nn.Module, device: torch.device, train: bool) -> Iterator[None]:
    """Move ``model`` to ``device`` in the given mode; restore its device and mode afterwards."""
    home = _model_device(model)
    was_training = model.training
    model.to(device)
    model.train(train)
    try:
        yield
    finally:
        model.to(home)
        model.train(was_training)


def _forward_batches(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    outs = [model(x[i:i + batch_size].to(device)).detach().to("cpu")
            for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs)


def _check_batch_size(batch_size: Any) -> int:
    if not _is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
def predict_logits(model: nn.Module, x: Any, batch_size: int = 512,
                   device: str = "cpu") -> Tensor:
    """Outputs of ``model`` on ``x`` in eval mode, without gradients, in batches.

    The model's device and train/eval mode are restored afterwards.

    Parameters
    ----------
    model : nn.Module
        The classifier.
    x : Tensor or array-like
        Inputs ``[N, ...]``.
    batch_size : int
        Samples per forward pass.
    device : str
        Device to run on.

    Returns
    -------
    Tensor
        ``[N, C]`` outputs on the CPU.

    Raises
    ------
    DataError
        If ``x`` is empty or its samples do not have the model's input size.
    """
    bs = _check_batch_size(batch_size)
    dev = _resolve_device(device)
    xt = _inputs(x, model, "x")
    with _running_on(model, dev, train=False), torch.no_grad():
        return _forward_batches(model, xt, bs, dev)


def evaluate(model: nn.Module, x: Any, y: Any, batch_size: int = 512,
             device: str = "cpu") -> Dict[str, float]:
    """Accuracy, mean cross entropy and macro F1 of ``model`` on ``(x, y)``.

    The outputs are treated as logits: ``loss = F.cross_entropy(outputs, y)``.  For models that
    output log-probabilities (ensembles) this is the same negative log-likelihood, since
    ``log_softmax`` leaves log-probabilities unchanged.

    Parameters
    ----------
    model : nn.Module
        The classifier.
    x : Tensor or array-like
        Inputs ``[N, ...]``.
    y : Tensor or array-like
        Class indices ``[N]``.
    batch_size : int
        Samples per forward pass.
    device : str
        Device to run on.

    Returns
    -------
    dict
        ``{"accuracy": float in [0, 1], "loss": float, "macro_f1": float in [0, 1], "n": int}``.

    Raises
    ------
    DataError
        If ``x`` is empty, if ``x`` and ``y`` differ in length, or if a label is out of range.
    """
    from sklearn.metrics import f1_score

    xt = _inputs(x, model, "x")
    yt = _labels(y, xt.shape[0], "y", getattr(model, "num_classes", None))
    outputs = predict_logits(model, xt, batch_size=batch_size, device=device)
    if outputs.dim() != 2:
        raise DataError(f"the model outputs shape {list(outputs.shape)}, not [N, classes]")
    if int(yt.max()) >= outputs.shape[1]:
        raise DataError(f"y holds label {int(yt.max())} but the model outputs "
                        f"{outputs.shape[1]} classes; give class indices 0..C-1")
    outputs = outputs.float()
    pred = outputs.argmax(dim=1)
    return {
        "accuracy": float((pred == yt).double().mean()),
        "loss": float(F.cross_entropy(outputs, yt)),
        "macro_f1": float(f1_score(yt.numpy(), pred.numpy(), average="macro", zero_division=0)),
        "n": int(yt.shape[0]),
    }


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
              device: torch.device) -> float:
    """Validation accuracy used for model selection (model already on ``device``, eval mode)."""
    with torch.no_grad():
        pred = _forward_batches(model, x, batch_size, device).argmax(dim=1)
    return float((pred == y).double().mean())


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def train_model(model: nn.Module, x_train: Any, y_train: Any, x_val: Any = None,
                y_val: Any = None, config: TrainConfig = TrainConfig(),
                progress: bool = False) -> Dict[str, Any]:
    """Train ``model`` in place with Adam and keep the weights of the best validation epoch.

    Every epoch visits the training data in an order drawn from a ``torch.Generator`` seeded with
    ``config.seed``; the learning rate follows :meth:`TrainConfig.lr_at` step by step.  After each
    epoch the model is scored on the validation split and a copy of its weights is kept when the
    accuracy beats every earlier epoch (ties keep the earlier epoch).  At the end those best
    weights are loaded back, so model selection never looks at a test set.  Without validation
    data the last epoch's weights are kept.  The model ends on its original device, in eval mode.

    Parameters
    ----------
    model : nn.Module
        The classifier to train (modified in place).
    x_train, y_train : Tensor or array-like
        Training inputs ``[N, ...]`` and class indices ``[N]``.
    x_val, y_val : Tensor or array-like, optional
        Validation split for model selection; give both or neither.
    config : TrainConfig
        Optimisation settings.
    progress : bool
        Show a tqdm progress bar over epochs.

    Returns
    -------
    dict
        ``"train_loss"`` (mean loss of each epoch), ``"val_accuracy"`` (accuracy of each epoch,
        empty without validation data), ``"lr"`` (learning rate at the end of each epoch),
        ``"best_epoch"`` (0-based index into those lists of the weights kept) and
        ``"best_val_accuracy"`` (``None`` without validation data).

    Raises
    ------
    DataError
        If the data is empty, mislabelled or of the wrong shape, or only half of the validation
        split is given.
    ConfigError
        If the device is unavailable, or if the loss becomes NaN or infinite (lower ``lr``).
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    if (x_val is None) != (y_val is None):
        raise DataError("give both x_val and y_val, or neither")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters")
    device = _resolve_device(config.device)
    num_classes = getattr(model, "num_classes", None)
    xt = _inputs(x_train, model, "x_train")
    yt = _labels(y_train, xt.shape[0], "y_train", num_classes)
    has_val = x_val is not None
    if has_val:
        xv = _inputs(x_val, model, "x_val")
        yv = _labels(y_val, xv.shape[0], "y_val", num_classes)

    n = xt.shape[0]
    bs = config.batch_size
    steps_per_epoch = math.ceil(n / bs)
    generator = torch.Generator().manual_seed(int(config.seed))
    optimizer = torch.optim.Adam(params, lr=config.lr_at(0, steps_per_epoch),
                                 weight_decay=config.weight_decay)

    history: Dict[str, Any] = {"train_loss": [], "val_accuracy": [], "lr": [],
                               "best_epoch": config.epochs - 1, "best_val_accuracy": None}
    best_acc = -math.inf
    best_state: Optional[Dict[str, Tensor]] = None
    logger.info("training %s on %d samples for %d epochs (%d steps/epoch) on %s",
                type(model).__name__, n, config.epochs, steps_per_epoch, device)

    def batch_loss(idx: Tensor) -> Tensor:
        xb, yb = xt[idx].to(device), yt[idx].to(device)
        return F.cross_entropy(model(xb), yb, label_smoothing=config.label_smoothing)

    def end_epoch(epoch: int, loss: float, lr: Optional[float]) -> EpochEnd:
        nonlocal best_acc, best_state
        history["train_loss"].append(loss)
        history["lr"].append(lr)
        postfix: Dict[str, float] = {"loss": round(loss, 4)}
        if has_val:
            model.eval()
            acc = _accuracy(model, xv, yv, max(bs, 512), device)
            history["val_accuracy"].append(acc)
            postfix["val_acc"] = round(acc, 4)
            if acc > best_acc:
                best_acc = acc
                history["best_epoch"] = epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return EpochEnd(postfix)

    with _running_on(model, device, train=True), seeded_rng(config.seed, device):
        run_epochs(model, optimizer, n=n, batch_size=bs, epochs=config.epochs, generator=generator,
                   batch_loss=batch_loss, end_epoch=end_epoch,
                   lr_at=lambda epoch, b: config.lr_at(epoch * steps_per_epoch + b, steps_per_epoch),
                   diverged=lambda epoch, loss: (
                       f"training diverged at epoch {epoch} (loss is {loss}); lower lr (now "
                       f"{config.lr}) or check the data for NaN values"),
                   desc="train", progress=progress)
        if best_state is not None:
            model.load_state_dict(best_state)
            history["best_val_accuracy"] = best_acc
            logger.info("kept epoch %d/%d (validation accuracy %.4f)",
                        history["best_epoch"] + 1, config.epochs, best_acc)
    model.eval()
    return history
