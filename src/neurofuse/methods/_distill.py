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
from typing import List, Optional

import torch
from torch import nn

from .._loop import run_epochs, seeded_rng
from ..errors import IncompatibleModelsError
from ._base import FusionMethod, FusionRun, register_method
from ._kd import kd_loss
from ._options import Interval, option
from ._simple import VanillaOptions, average_states

__all__ = ["EnsembleDistillation", "EnsembleDistillationOptions"]


@dataclasses.dataclass(frozen=True)
class EnsembleDistillationOptions(VanillaOptions):
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

    epochs: int = option(50, Interval(int, 1))
    lr: float = option(1e-3, Interval(float, 0, closed="neither"))
    temperature: float = option(1.0, Interval(float, 0, closed="neither"))
    holdout: float = option(0.2, Interval(float, 0, 1, closed="left"))


@register_method("feddf")
class EnsembleDistillation(FusionMethod):
    """FedDF: distil the client ensemble into the averaged model on unlabelled server data."""

    summary = "FedDF (Lin et al. 2020): average, then distil the ensemble on unlabelled data"
    label = "FedDF"
    order = 25
    Options = EnsembleDistillationOptions
    listed_in_comparisons = False
    same_architecture = True

    def __init__(self, *, batch_size: int = 64, **kwargs) -> None:
        super().__init__(batch_size=batch_size, **kwargs)

    def _fuse(self, run: FusionRun) -> nn.Module:
        models, data = run.models, run.data
        assert data is not None
        opt = self.options
        student = copy.deepcopy(models[0])
        student.load_state_dict(average_states(models, opt.weights))
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
        history: List[float] = []
        run.extras["history"] = history

        def end_epoch(epoch: int, loss: float, lr: Optional[float]) -> None:
            nonlocal best, best_state
            if n_hold:
                student.eval()
                with torch.no_grad():
                    val = float(kd_loss(student(x[hold]), teacher[hold], opt.temperature))
                history.append(val)
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
