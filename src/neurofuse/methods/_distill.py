r"""Ensemble distillation into the averaged model (FedDF, Lin et al., NeurIPS 2020).

The server model starts as the (sample-weighted) average of the client models, as FedAvg makes
it, and is then trained on *unlabelled* server data to match the ensemble of the client models:
with the teacher :math:`\bar z(x) = \frac1N\sum_i z_i(x)` (the mean logits, as FedDF),

.. math:: \mathcal L = T^2\,\mathrm{KL}\bigl(\operatorname{softmax}(\bar z/T)\,\Vert\,
          \operatorname{softmax}(z/T)\bigr),

minimised with Adam; a held-out part of the server data picks the epoch with the lowest loss
(FedDF's early stopping on the distillation loss).  All parameters are trained (``kd-head``
trains only model 0's classifier).

Reference: T. Lin, L. Kong, S. U. Stich, M. Jaggi, "Ensemble Distillation for Robust Model
Fusion in Federated Learning", NeurIPS 2020.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from .._fusion_set import FusionSet
from .._loop import run_epochs, seeded_rng
from .._validate import is_int, is_number
from ..errors import ConfigError, IncompatibleModelsError
from ._base import FusionMethod, register_method
from ._kd import kd_loss
from ._simple import VanillaAveraging

__all__ = ["EnsembleDistillation", "EnsembleDistillationOptions"]


@dataclasses.dataclass(frozen=True)
class EnsembleDistillationOptions:
    """Settings of :class:`EnsembleDistillation`.

    Attributes
    ----------
    epochs : int
        Passes over the server data.
    lr : float
        Adam learning rate.
    temperature : float
        Softmax temperature of teacher and student.
    holdout : float
        Share of the server data held out to pick the best epoch (0: keep the last).
    weights : sequence of float, optional
        Weights of the models in the initial average (e.g. their sample counts); default equal.
    """

    epochs: int = 50
    lr: float = 1e-3
    temperature: float = 1.0
    holdout: float = 0.2
    weights: Optional[Sequence[float]] = None

    def __post_init__(self) -> None:
        if not is_int(self.epochs) or self.epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if not is_number(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        if not is_number(self.holdout) or not 0 <= self.holdout < 1:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout!r}")


@register_method("feddf")
class EnsembleDistillation(FusionMethod):
    """FedDF: distil the client ensemble into the averaged model on unlabelled server data."""

    summary = "FedDF (Lin et al. 2020): average, then distil the ensemble on unlabelled data"
    Options = EnsembleDistillationOptions
    listed_in_comparisons = False

    def __init__(self, *, batch_size: int = 64, **kwargs) -> None:
        super().__init__(batch_size=batch_size, **kwargs)

    def _fuse(self, models: List[nn.Module], data: Optional[FusionSet]) -> nn.Module:
        assert data is not None
        opt = self.options
        student = VanillaAveraging(progress=False, device=str(self.device))._fuse(models, None)
        if opt.weights is not None:
            w = torch.as_tensor(list(opt.weights), dtype=torch.float64)
            if w.numel() != len(models) or not bool((w > 0).all()):
                raise ConfigError(f"weights must be {len(models)} positive numbers, got {list(opt.weights)}")
            w = w / w.sum()
            states = [m.state_dict() for m in models]
            avg = {k: (sum(wi * sd[k].double() for wi, sd in zip(w, states)).to(v.dtype)
                       if v.is_floating_point() else v) for k, v in states[0].items()}
            student.load_state_dict(avg)
        x = data.x.to(self.device)
        with torch.no_grad():
            logits = [m(x) for m in models]
            if any(z.shape != logits[0].shape for z in logits):
                raise IncompatibleModelsError("the models' outputs differ in shape; FedDF needs one class set")
            teacher = torch.softmax(torch.stack(logits).mean(0) / opt.temperature, dim=-1)
        n = x.shape[0]
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=gen).to(self.device)
        n_hold = int(n * opt.holdout)
        hold, train = perm[:n_hold], perm[n_hold:]
        bs = min(self.batch_size, len(train))
        optim = torch.optim.Adam(student.parameters(), lr=opt.lr)
        best, best_state = math.inf, None
        self.history: List[float] = []

        def end_epoch(epoch: int, loss: float, lr: Optional[float]) -> None:
            nonlocal best, best_state
            if n_hold:
                student.eval()
                with torch.no_grad():
                    val = float(kd_loss(student(x[hold]), teacher[hold], opt.temperature))
                self.history.append(val)
                if val < best:
                    best, best_state = val, copy.deepcopy(student.state_dict())

        with seeded_rng(self.seed, torch.device("cpu")), torch.enable_grad():
            run_epochs(
                student, optim, n=len(train), batch_size=bs, epochs=opt.epochs, generator=gen,
                batch_loss=lambda idx: kd_loss(student(x[train[idx]]), teacher[train[idx]],
                                               opt.temperature),
                end_epoch=end_epoch, index_device=self.device,
                diverged=lambda epoch, loss: f"feddf diverged at epoch {epoch}; lower lr (now {opt.lr})",
                desc="feddf", progress=self.progress, leave=False)
        if best_state is not None:
            student.load_state_dict(best_state)
        return student.eval()
