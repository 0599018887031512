r"""Last-layer knowledge distillation: retrain model 0's classifier head on the ensemble's softmax.

The "Last-layer KD" baseline of Luenam et al., "Model Fusion via Neuron Interpolation", 2025
(tables 1-2), with a true KL divergence (the reference code fed raw outputs to ``KLDivLoss``).
Distillation after Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._loop import run_epochs, seeded_rng
from ..errors import IncompatibleModelsError
from ..grouping import output_weights
from ..levels import LeveledNet
from ._base import FusionMethod, FusionRun, register_method
from ._options import Anything, Interval, MethodOptions, option
from ._simple import record_single_model

__all__ = ["KDHead", "KDHeadOptions"]

log = logging.getLogger("neurofuse")


@dataclasses.dataclass(frozen=True)
class KDHeadOptions(MethodOptions):
    r"""Settings of :class:`KDHead`.

    The mini-batch size and the seed are the common ``batch_size`` (default 32 for this method)
    and ``seed`` arguments of every method.

    Attributes
    ----------
    temperature : float
        Softmax temperature :math:`T` of teacher and student (the loss is scaled by :math:`T^2`).
    lr : float
        Adam learning rate.
    epochs : int
        Passes over the fusion set.
    weight_decay : float
        Adam L2 penalty.
    class_weights : array-like, optional
        ``[N, C]`` per-class weights of the teachers (e.g. class shares): the teacher is
        :math:`\bar p_c \propto \sum_i w_{i,c}\,\operatorname{softmax}(z_i/T)_c`, as the
        class-share ensemble.  Default: all teachers alike.
    """

    temperature: float = option(1.0, Interval(float, 0, closed="neither"))
    lr: float = option(1e-3, Interval(float, 0, closed="neither"))
    epochs: int = option(150, Interval(int, 1))
    weight_decay: float = option(0.0, Interval(float, 0))
    class_weights: Optional[Any] = option(None, Anything("null or an [N, C] array of non-negative weights"))


@register_method("kd-head")
class KDHead(FusionMethod):
    r"""Model 0 with only its classifier head retrained to match the base models' mean softmax.

    The head is the last level of model 0 (its parameters only; the body is frozen and its
    features are computed once).  With teacher distribution
    :math:`\bar p(x) = \frac1N\sum_i \operatorname{softmax}(z_i(x)/T)` over the base models and
    student logits :math:`z(x)`, Adam minimises on the fusion set

    .. math:: \mathcal L = T^2\, \frac1B \sum_{x}
              \operatorname{KL}\bigl(\bar p(x)\,\Vert\,\operatorname{softmax}(z(x)/T)\bigr)
              = T^2\,\frac1B\sum_x\sum_c \bar p_c(x)\bigl(\log\bar p_c(x) - \log
              \operatorname{softmax}(z(x)/T)_c\bigr).

    Deterministic for a given ``seed`` (data order from a seeded ``torch.Generator``; the global
    RNG is forked and restored).

    References
    ----------
    Luenam, Spanopoulos, Sant et al. (2025). Model Fusion via Neuron Interpolation ("last-layer
    KD" baseline).  Hinton, Vinyals & Dean (2015). Distilling the Knowledge in a Neural Network.
    """

    summary = "last-layer KD (Luenam et al. 2025): retrain model 0's head on the mean softmax"
    label = "Last-layer KD"
    order = 20
    Options = KDHeadOptions
    min_models = 1

    def __init__(self, *, batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, **kwargs)

    def _fuse(self, run: FusionRun) -> nn.Module:
        models, data = run.models, run.data
        assert data is not None
        student = models[0]
        if not isinstance(student, LeveledNet):
            raise IncompatibleModelsError(
                f"model 0 is a {type(student).__name__}, not a LeveledNet: 'kd-head' needs to know "
                "its head (last level)"
            )
        for i, m in enumerate(models):
            for name, p in m.named_parameters():
                if not torch.isfinite(p).all():
                    raise IncompatibleModelsError(f"model {i} has NaN or infinite values in {name!r}")
        opt = self.options
        t = float(opt.temperature)
        fused = student.clone().to(self.device).eval()
        head = fused.levels[-1]
        params = [p for p in head.parameters()]
        if not params:
            raise IncompatibleModelsError("model 0's last level has no parameters to train")
        feats, targets = [], []
        w: Optional[Tensor] = None
        with torch.no_grad():
            for xb, _ in data.batches(self.device):
                feats.append(fused.forward_until(xb, fused.num_levels - 2) if fused.num_levels > 1 else xb)
                outs = [m(xb) for m in models]
                for i, o in enumerate(outs):
                    if o.shape != outs[0].shape:
                        raise IncompatibleModelsError(
                            f"model {i} outputs shape {list(o.shape[1:])} but model 0 outputs "
                            f"{list(outs[0].shape[1:])}"
                        )
                probs = torch.stack([torch.softmax(o / t, dim=-1) for o in outs])     # [N, B, C]
                if w is None:
                    w = torch.from_numpy(output_weights(len(outs), probs.shape[-1], opt.class_weights)
                                         ).to(probs)
                p_bar = (probs * w[:, None, :]).sum(0)
                targets.append(p_bar / p_bar.sum(-1, keepdim=True).clamp_min(1e-30))
        x, p = torch.cat(feats), torch.cat(targets)
        n = x.shape[0]
        bs = min(self.batch_size, n)
        gen = torch.Generator().manual_seed(self.seed)
        optim = torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)
        with seeded_rng(self.seed, torch.device("cpu")), torch.enable_grad():
            result = run_epochs(
                head, optim, n=n, batch_size=bs, epochs=opt.epochs, generator=gen,
                batch_loss=lambda idx: kd_loss(head(x[idx]), p[idx], t), index_device=x.device,
                diverged=lambda epoch, loss: f"kd-head diverged at epoch {epoch}; lower lr (now {opt.lr})",
                desc="kd-head", progress=self.progress, leave=False)
        run.extras["history"] = list(result.train_loss)
        record_single_model(run, fused, 0)
        head.eval()
        return fused


def kd_loss(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    r""":math:`T^2\,\mathrm{KL}(p \Vert \operatorname{softmax}(z/T))`, averaged over the batch."""
    logq = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(logq, teacher_probs, reduction="batchmean") * temperature ** 2
