r"""Fine-tuning a fused model on training data, with validation-based checkpoint selection.

The schedule by default is the one the neuron-interpolation paper uses for its fine-tuning table
(Luenam et al. 2025, appendix F): Adam at ``lr = 1e-4`` with cosine annealing and warm restarts
(Loshchilov & Hutter, "SGDR", ICLR 2017), :math:`T_0 = 10` epochs and :math:`T_{\text{mult}} = 2`
down to :math:`10^{-6}`,

.. math:: \eta(t) = \eta_{\min} + \tfrac12(\eta - \eta_{\min})
          \bigl(1 + \cos(\pi\, T_{\text{cur}} / T_i)\bigr),

updated every step with the fractional epoch :math:`t` (cycles of 10, 20, 40, ... epochs, which
end at epochs 10, 30, 70, 150).  Unlike the reference code, which kept the checkpoint with the best
*test* accuracy, :func:`finetune` holds out a stratified validation split of the *training* data
it is given and restores the best-validation checkpoint; it never receives test data.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._loop import EpochEnd, run_epochs, seeded_rng
from ._validate import check_seed
from ._validate import is_int as _is_int
from ._validate import is_number as _is_num
from .errors import ConfigError, DataError

__all__ = ["FinetuneConfig", "finetune", "schedule_lr", "stratified_holdout"]

log = logging.getLogger("neurofuse")

SCHEDULES = ("warm-restarts", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Settings of :func:`finetune`.

    Attributes
    ----------
    epochs : int
        Passes over the training part of the data (the paper fine-tunes for 200; 30 ends the
        second warm-restart cycle).
    lr : float
        Peak Adam learning rate (paper: 1e-4).
    lr_min : float
        Lowest learning rate of the schedule (paper: 1e-6).
    schedule : str
        ``"warm-restarts"`` (``CosineAnnealingWarmRestarts(T_0, T_mult)``, the paper's),
        ``"cosine"`` (one cosine from ``lr`` to ``lr_min`` over all epochs) or ``"constant"``.
    t_0, t_mult : int
        Length of the first warm-restart cycle in epochs and its growth factor.
    batch_size : int
        Mini-batch size.
    weight_decay : float
        Adam L2 penalty.
    label_smoothing : float
        Label smoothing of the cross entropy, in ``[0, 1)``.
    seed : int
        Seed of the validation split, the data order and any dropout.
    val_fraction : float
        Share of every class held out for checkpoint selection, in ``[0, 1)``; ``0`` keeps the
        last epoch (no selection).
    device : str
        Where to train.
    """

    epochs: int = 30
    lr: float = 1e-4
    lr_min: float = 1e-6
    schedule: str = "warm-restarts"
    t_0: int = 10
    t_mult: int = 2
    batch_size: int = 128
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    val_fraction: float = 0.1
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not _is_int(self.epochs) or self.epochs < 1:
            raise ConfigError(f"finetune epochs must be an integer >= 1, got {self.epochs!r}")
        if not _is_num(self.lr) or self.lr <= 0:
            raise ConfigError(f"finetune lr must be a positive number, got {self.lr!r}")
        if not _is_num(self.lr_min) or not 0 <= self.lr_min <= self.lr:
            raise ConfigError(f"finetune lr_min must be in [0, lr={self.lr}], got {self.lr_min!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"finetune schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not _is_int(self.t_0) or self.t_0 < 1 or not _is_int(self.t_mult) or self.t_mult < 1:
            raise ConfigError(f"t_0 and t_mult must be integers >= 1, got {self.t_0!r}, {self.t_mult!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"finetune batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"finetune weight_decay must be >= 0, got {self.weight_decay!r}")
        if not _is_num(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        check_seed(self.seed)
        if not _is_num(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise ConfigError(f"unknown device {self.device!r}; use 'cpu' or 'cuda'") from None


def schedule_lr(config: FinetuneConfig, epoch: float) -> float:
    """Learning rate at fractional epoch ``epoch`` (0-based) under ``config.schedule``.

    ``"warm-restarts"`` follows ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts``.
    """
    lo, hi = config.lr_min, config.lr
    if config.schedule == "constant":
        return hi
    if config.schedule == "cosine":
        frac = min(max(epoch / config.epochs, 0.0), 1.0)
        return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * frac))
    t0, tm = config.t_0, config.t_mult
    if tm == 1:
        t_cur, t_i = epoch % t0, float(t0)
    else:
        n = int(math.floor(math.log(epoch / t0 * (tm - 1) + 1.0, tm) + 1e-12))
        t_cur = epoch - t0 * (tm ** n - 1) / (tm - 1)
        t_i = float(t0 * tm ** n)
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * t_cur / t_i))


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)``: ``round(fraction * n_c)`` samples of every class ``c`` held out
    (at least one for classes with two or more samples when ``fraction > 0``)."""
    rng = np.random.default_rng(seed)
    tr: List[np.ndarray] = []
    va: List[np.ndarray] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(fraction * len(idx)))
        if fraction > 0 and k == 0 and len(idx) >= 2:
            k = 1
        k = min(k, len(idx) - 1) if len(idx) > 1 else 0
        va.append(idx[:k])
        tr.append(idx[k:])
    train = np.sort(np.concatenate(tr)) if tr else np.zeros(0, dtype=np.int64)
    val = np.sort(np.concatenate(va)) if va else np.zeros(0, dtype=np.int64)
    return train.astype(np.int64), val.astype(np.int64)


def _as_xy(model: nn.Module, x: Any, y: Any) -> Tuple[Tensor, Tensor]:
    try:
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"fine-tuning data cannot be converted to tensors: {exc}") from None
    if xt.dim() < 2 or xt.shape[0] == 0:
        raise DataError("fine-tuning data is empty; pass training samples (x, y)")
    if yt.dim() != 1 or yt.shape[0] != xt.shape[0]:
        raise DataError(f"fine-tuning data has {xt.shape[0]} inputs but labels of shape {list(yt.shape)}")
    if yt.is_floating_point() and not torch.equal(yt, yt.round()):
        raise DataError("fine-tuning labels must be class indices 0..C-1")
    yt = yt.long()
    nc = getattr(model, "num_classes", None)
    if int(yt.min()) < 0 or (nc is not None and int(yt.max()) >= nc):
        raise DataError(f"fine-tuning labels must be class indices 0..{(nc or 0) - 1}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    xt = xt.to(dtype)
    if not torch.isfinite(xt).all():
        raise DataError("fine-tuning inputs contain NaN or infinite values")
    shape = getattr(model, "input_shape", None)
    if shape is not None and tuple(xt.shape[1:]) != tuple(shape):
        raise DataError(
            f"fine-tuning inputs have shape {list(xt.shape[1:])} per sample but the model takes {list(shape)}")
    return xt, yt


def _val_metrics(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, bs: int) -> Tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], bs):
            out = model(x[i:i + bs].to(device))
            yb = y[i:i + bs].to(device)
            correct += int((out.argmax(1) == yb).sum())
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
    n = max(1, x.shape[0])
    return correct / n, loss / n


def finetune(model: nn.Module, x: Any, y: Any, config: Optional[FinetuneConfig] = None,
             progress: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """Fine-tune a copy of ``model`` on training data and keep its best-validation checkpoint.

    A stratified ``config.val_fraction`` of ``(x, y)`` is held out; the rest is trained on with
    Adam under :func:`schedule_lr` (updated every step) and cross entropy.  After every epoch the
    model is scored on the held-out part; the weights with the highest validation accuracy (ties:
    lower validation loss, then the earlier epoch) are restored at the end.  The model as given
    (epoch 0) is a candidate too, so fine-tuning never returns a model that validates worse than
    its input.  Pass only training data: there is no test-set argument.

    Parameters
    ----------
    model : nn.Module
        The fused classifier (returns logits).  It is not modified.
    x, y : Tensor or array-like
        Training inputs ``[N, ...]`` and class indices ``[N]``.
    config : FinetuneConfig, optional
        Settings (default :class:`FinetuneConfig()`).
    progress : bool
        Show a progress bar over epochs (``tqdm.auto``).

    Returns
    -------
    model : nn.Module
        The fine-tuned copy, in eval mode, on ``model``'s device.
    history : dict
        ``train_loss`` (per epoch), ``val_accuracy`` and ``val_loss`` (index 0: before
        fine-tuning, index ``e``: after epoch ``e``), ``lr`` (at the end of each epoch),
        ``best_epoch`` (index into the validation lists of the weights kept),
        ``best_val_accuracy``, ``train_indices`` and ``val_indices`` (rows of ``x``).

    Raises
    ------
    ConfigError
        If ``model`` is an output ensemble (its members are separate models: fine-tune them, or
        fuse them first), has no trainable parameters, or training diverges.
    DataError
        If the data is empty, mislabelled or of the wrong shape.
    """
    from .models.ensemble import Ensemble

    config = FinetuneConfig() if config is None else config
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    if isinstance(model, Ensemble):
        raise ConfigError(
            "cannot fine-tune an output ensemble: it has no fused model (its outputs are "
            "log-probabilities of separate members); fuse with another method first"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{type(model).__name__} has no trainable parameters to fine-tune")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device!r} is not available; use device='cpu'")
    xt, yt = _as_xy(model, x, y)
    train_idx, val_idx = stratified_holdout(yt.numpy(), config.val_fraction, config.seed)
    if len(train_idx) == 0:
        raise DataError("no samples left to train on after the validation hold-out")
    has_val = len(val_idx) > 0
    if config.val_fraction > 0 and not has_val:
        log.warning("finetune: too few samples for a validation split; keeping the last epoch")
    x_tr, y_tr = xt[train_idx], yt[train_idx]
    x_va, y_va = xt[val_idx], yt[val_idx]

    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    tuned = copy.deepcopy(model).to(device)
    params = [p for p in tuned.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=schedule_lr(config, 0.0), weight_decay=config.weight_decay)
    n, bs = x_tr.shape[0], config.batch_size
    steps = math.ceil(n / bs)
    gen = torch.Generator().manual_seed(int(config.seed))
    eval_bs = max(bs, 512)

    history: Dict[str, Any] = {"train_loss": [], "val_accuracy": [], "val_loss": [], "lr": [],
                               "best_epoch": config.epochs, "best_val_accuracy": None,
                               "train_indices": train_idx, "val_indices": val_idx}
    best_key = (-math.inf, -math.inf)
    best_state: Optional[Dict[str, Tensor]] = None

    def consider(epoch: int) -> None:
        nonlocal best_key, best_state
        acc, loss = _val_metrics(tuned, x_va, y_va, device, eval_bs)
        history["val_accuracy"].append(acc)
        history["val_loss"].append(loss)
        if (acc, -loss) > best_key:
            best_key = (acc, -loss)
            history["best_epoch"] = epoch
            best_state = {k: v.detach().clone() for k, v in tuned.state_dict().items()}

    def batch_loss(idx: Tensor) -> Tensor:
        out = tuned(x_tr[idx].to(device))
        return F.cross_entropy(out, y_tr[idx].to(device), label_smoothing=config.label_smoothing)

    def end_epoch(epoch: int, loss: float, lr: Optional[float]) -> EpochEnd:
        history["train_loss"].append(loss)
        history["lr"].append(lr)
        post = {"loss": round(loss, 4)}
        if has_val:
            consider(epoch + 1)
            post["val_acc"] = round(history["val_accuracy"][-1], 4)
        return EpochEnd(post)

    with seeded_rng(config.seed, device):
        if has_val:
            consider(0)
        run_epochs(tuned, optim, n=n, batch_size=bs, epochs=config.epochs, generator=gen,
                   batch_loss=batch_loss, end_epoch=end_epoch,
                   lr_at=lambda epoch, b: schedule_lr(config, epoch + b / steps),
                   diverged=lambda epoch, loss: f"fine-tuning diverged at epoch {epoch}; lower lr "
                                                f"(now {config.lr})",
                   desc="finetune", progress=progress)
    if best_state is not None:
        tuned.load_state_dict(best_state)
        history["best_val_accuracy"] = best_key[0]
        log.info("finetune: kept epoch %d/%d (validation accuracy %.4f)", history["best_epoch"],
                 config.epochs, best_key[0])
    tuned.to(home).eval()
    return tuned, history
