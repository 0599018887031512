"""The one mini-batch training loop of neurofuse.

Base-model training (:func:`neurofuse.training.train_model`), fine-tuning
(:func:`neurofuse.finetune.finetune`), last-layer distillation (``kd-head``) and the level fits of
``kf-gradient`` (:func:`neurofuse.approximation._gradient.fit_level`) differ only in what a batch's
loss is, how the learning rate moves and what happens after an epoch (validation, keeping the best
weights, early stopping).  :func:`run_epochs` owns everything else, in one order that is part of
the results' bits:

for every epoch: ``module.train()``; draw the batch order ``torch.randperm(n, generator)``; for
every batch of ``batch_size`` indices: set the learning rate (``lr_at``), compute the loss
(``batch_loss``), stop with a :class:`~neurofuse.errors.ConfigError` if it is NaN or infinite,
``zero_grad`` / ``backward`` / ``step``, and add ``loss * batch`` to the epoch's sum; then
``end_epoch`` (validation, checkpointing, the progress-bar postfix, early stopping).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["EpochEnd", "LoopResult", "run_epochs", "seeded_rng"]

log = logging.getLogger("neurofuse")


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """What an ``end_epoch`` hook reports: the progress-bar postfix and whether to stop now."""

    postfix: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    stop: bool = False


@dataclasses.dataclass
class LoopResult:
    """Per-epoch mean training loss and last learning rate (``None`` without ``lr_at``)."""

    train_loss: List[float]
    lr: List[Optional[float]]

    @property
    def epochs(self) -> int:
        """Epochs run (fewer than asked for after an early stop)."""
        return len(self.train_loss)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Fork torch's global RNG (CPU, and ``device`` when it is CUDA) and seed it with ``seed``.

    Draws inside (dropout, new modules) are reproducible and the caller's RNG state is restored.
    """
    devices: List[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def run_epochs(module: nn.Module, optimizer: torch.optim.Optimizer, *, n: int, batch_size: int,
               epochs: int, generator: torch.Generator,
               batch_loss: Callable[[Tensor], Optional[Tensor]],
               diverged: Callable[[int, float], str],
               lr_at: Optional[Callable[[int, int], float]] = None,
               end_epoch: Optional[Callable[[int, float, Optional[float]], Optional[EpochEnd]]] = None,
               index_device: Optional[torch.device] = None, desc: str = "train",
               progress: bool = False, leave: bool = True) -> LoopResult:
    """Train for up to ``epochs`` passes over ``n`` samples in shuffled mini-batches.

    Parameters
    ----------
    module : nn.Module
        Put in train mode at the start of every epoch (the hooks may switch it to eval).
    optimizer : torch.optim.Optimizer
        Stepped once per batch; its learning rate is set from ``lr_at`` before each batch.
    n : int
        Number of training samples (indices ``0..n-1``).
    batch_size : int
        Indices per batch (the last batch of an epoch may be smaller).
    epochs : int
        Maximum number of epochs.
    generator : torch.Generator
        Draws every epoch's order, ``torch.randperm(n, generator=generator)``.
    batch_loss : callable
        ``batch_loss(idx) -> loss`` for a batch of sample indices (on ``index_device``), or
        ``None`` to skip the batch (it is not counted in the epoch's mean loss).
    diverged : callable
        ``diverged(epoch, loss) -> message`` of the :class:`ConfigError` raised when a batch loss
        is NaN or infinite (``epoch`` is 1-based).
    lr_at : callable, optional
        ``lr_at(epoch, batch) -> learning rate`` (both 0-based); default: leave the rate alone.
    end_epoch : callable, optional
        ``end_epoch(epoch, mean_train_loss, last_lr) -> EpochEnd or None``, called after every
        epoch (0-based ``epoch``): validation, keeping the best weights, early stopping.
    index_device : torch.device, optional
        Device the batch indices are moved to (default: they stay on the CPU).
    desc : str
        Label of the progress bar and of the debug log lines.
    progress : bool
        Show a tqdm progress bar over epochs.
    leave : bool
        Keep the finished progress bar on screen.

    Returns
    -------
    LoopResult
        The mean training loss and last learning rate of every epoch run.

    Raises
    ------
    ConfigError
        If a batch loss is NaN or infinite.
    """
    from tqdm.auto import trange

    result = LoopResult([], [])
    bar = trange(epochs, desc=desc, unit="epoch", disable=not progress, leave=leave)
    try:
        for epoch in bar:
            module.train()
            order = torch.randperm(n, generator=generator)
            if index_device is not None:
                order = order.to(index_device)
            total = 0.0
            lr: Optional[float] = None
            for b, start in enumerate(range(0, n, batch_size)):
                idx = order[start:start + batch_size]
                if lr_at is not None:
                    lr = lr_at(epoch, b)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                loss = batch_loss(idx)
                if loss is None:
                    continue
                if not torch.isfinite(loss):
                    raise ConfigError(diverged(epoch + 1, float(loss.detach())))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * idx.numel()
            mean = total / max(n, 1)
            result.train_loss.append(mean)
            result.lr.append(lr)
            report = end_epoch(epoch, mean, lr) if end_epoch is not None else None
            postfix: Dict[str, Any] = dict(report.postfix) if report is not None else {"loss": round(mean, 4)}
            bar.set_postfix(postfix)
            log.debug("%s: epoch %d/%d: %s", desc, epoch + 1, epochs, postfix)
            if report is not None and report.stop:
                break
    finally:
        bar.close()
    return result
