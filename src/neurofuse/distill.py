r"""Distillation after fusion: train the fused model toward the ensemble's soft predictions.

The fused model (student) is trained on the fusion set, and on optional extra *unlabelled* inputs,
toward the base models' class-share weighted ensemble (teacher), both at temperature :math:`T`:

.. math:: \bar p_c(x) \propto \sum_i w_{i,c}\,\operatorname{softmax}(z_i(x)/T)_c, \qquad
          \mathcal L = T^2\,\operatorname{KL}\bigl(\bar p(x)\,\Vert\,
          \operatorname{softmax}(z(x)/T)\bigr),

with :math:`w` the ``class_weights`` (e.g. class shares; default all alike, the mean softmax).
No labels are read.  Every step draws fresh inputs: random translations (pad and crop) and
horizontal flips for image inputs, and mixup between fusion samples (a convex combination of two
inputs, Zhang et al. 2018), which the teachers label anew, so the student learns the ensemble
also between the few hundred fusion points.  A held-out part of the inputs (never augmented)
scores the KL divergence to the teacher after every epoch; the best epoch is restored, and the
fused model as given is a candidate too, so distillation never returns a model that agrees less
with the ensemble on the held-out part than its input.

This is ensemble distillation after fusion as in FedDF (Lin, Kong, Stich & Jaggi, "Ensemble
Distillation for Robust Model Fusion in Federated Learning", NeurIPS 2020), which applies it to
FedAvg; here it follows any fusion method.  Distillation after Hinton, Vinyals & Dean, "Distilling
the Knowledge in a Neural Network", 2015.

Training runs through the one mini-batch loop of neurofuse, :func:`neurofuse._loop.run_epochs`;
augmentation and mixup are part of each batch's loss.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._loop import EpochEnd, run_epochs, seeded_rng
from ._validate import check_seed, is_int, is_number
from .errors import ConfigError, DataError
from .grouping import output_weights

__all__ = ["DistillConfig", "distill", "teacher_probs"]

log = logging.getLogger("neurofuse")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Settings of :func:`distill`.

    Attributes
    ----------
    epochs : int
        Passes over the training part of the inputs (each pass draws new augmentations).
    lr : float
        Peak Adam learning rate (cosine decay to zero over ``epochs``).  Small: the student
        starts from the fused model and should move little (on 2 MNIST MLPs, 400 fusion
        samples, validation accuracy from 94.8: 1e-3 loses 0.3 point at ``temperature=4``
        and 1.3 at 1, 1e-4 gains 0.3).
    weight_decay : float
        Adam L2 penalty.
    temperature : float
        Softmax temperature :math:`T` of teacher and student (loss scaled by :math:`T^2`).  A
        class-share ensemble's probabilities often have small margins (two members sure of two
        classes), which a student matches poorly at :math:`T = 1` (on the MLPs above: 2-3
        points lost); :math:`T = 4` conveys the members' logits.
    batch_size : int
        Inputs per step.
    mixup : float
        Share of each batch replaced by mixup inputs :math:`\\lambda x_a + (1-\\lambda) x_b`,
        :math:`\\lambda \\sim U(0, 1)`, of two random training inputs (0 = off).
    shift : int
        Image inputs (``[C, H, W]``) are shifted by up to ``shift`` pixels in each direction
        (zero padding, random crop; 0 = off).
    flip : bool
        Image inputs are flipped horizontally with probability 1/2 (off by default: digits are
        not mirror-symmetric; on for natural images such as CIFAR).
    val_fraction : float
        Share of the fusion inputs held out for early stopping (KL to the teacher, no labels).
    patience : int
        Stop after this many epochs without a better held-out KL.
    seed : int
        Seed of the hold-out, the data order and the augmentations (the global RNG is restored).
    device : str
        Where the student and the teachers run.
    """

    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    temperature: float = 4.0
    batch_size: int = 64
    mixup: float = 0.5
    shift: int = 2
    flip: bool = False
    val_fraction: float = 0.2
    patience: int = 20
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ConfigError(f"distill {name} must be an integer >= 1, got {v!r}")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if not is_number(v) or v <= 0:
                raise ConfigError(f"distill {name} must be a positive number, got {v!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"distill weight_decay must be >= 0, got {self.weight_decay!r}")
        if not is_number(self.mixup) or not 0 <= self.mixup <= 1:
            raise ConfigError(f"distill mixup must be in [0, 1], got {self.mixup!r}")
        if not is_int(self.shift) or self.shift < 0:
            raise ConfigError(f"distill shift must be an integer >= 0, got {self.shift!r}")
        if not isinstance(self.flip, bool):
            raise ConfigError(f"distill flip must be True or False, got {self.flip!r}")
        if not is_number(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ConfigError(f"distill val_fraction must be in [0, 1), got {self.val_fraction!r}")
        check_seed(self.seed, "distill seed")


def teacher_probs(teachers: Sequence[nn.Module], x: Tensor, temperature: float,
                  weights: Optional[Tensor] = None) -> Tensor:
    """``[B, C]`` class-weighted mean of the teachers' ``softmax(z / T)`` (rows sum to one).

    ``weights`` is ``[N, C]`` (e.g. class shares), used as :class:`neurofuse.models.Ensemble`
    uses its ``class_weights``; ``None`` is the mean softmax.
    """
    probs = torch.stack([torch.softmax(t(x) / temperature, dim=-1) for t in teachers])  # [N, B, C]
    if weights is None:
        p = probs.mean(0)
    else:
        p = (probs * weights.to(probs)[:, None, :]).sum(0)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)


def _augment(x: Tensor, cfg: DistillConfig, gen: torch.Generator) -> Tensor:
    """Random shifts / flips of image inputs ``[B, C, H, W]`` and mixup of a share of the batch."""
    b = x.shape[0]
    if x.dim() == 4 and cfg.shift > 0:
        s = cfg.shift
        padded = F.pad(x, (s, s, s, s))
        dx = torch.randint(0, 2 * s + 1, (b,), generator=gen)
        dy = torch.randint(0, 2 * s + 1, (b,), generator=gen)
        h, w = x.shape[-2:]
        rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)         # [B, H]
        cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)         # [B, W]
        bi = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if x.dim() == 4 and cfg.flip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if cfg.mixup > 0 and b > 1:
        m = int(round(cfg.mixup * b))
        if m > 0:
            partner = torch.randperm(b, generator=gen)[:m].to(x.device)
            lam = torch.rand(m, generator=gen).to(x)
            lam = lam.reshape(m, *([1] * (x.dim() - 1)))
            x = x.clone()
            x[:m] = lam * x[:m] + (1 - lam) * x[partner]
    return x.contiguous()


def _kl(student_logits: Tensor, p: Tensor, t: float) -> Tensor:
    logq = F.log_softmax(student_logits / t, dim=-1)
    return F.kl_div(logq, p, reduction="batchmean") * t * t


def _inputs(model: nn.Module, x: Any, name: str) -> Tensor:
    try:
        xt = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{name} cannot be converted to a tensor: {exc}") from None
    if xt.dim() < 2 or xt.shape[0] == 0:
        raise DataError(f"{name} is empty; pass inputs [N, ...]")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    xt = xt.to(dtype)
    if not torch.isfinite(xt).all():
        raise DataError(f"{name} contains NaN or infinite values")
    shape = getattr(model, "input_shape", None)
    if shape is not None and tuple(xt.shape[1:]) != tuple(shape):
        raise DataError(f"{name} has shape {list(xt.shape[1:])} per sample but the model takes {list(shape)}")
    return xt


def distill(student: nn.Module, teachers: Sequence[nn.Module], x: Any,
            config: Optional[DistillConfig] = None, class_weights: Optional[Any] = None,
            extra: Any = None, progress: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """Train a copy of ``student`` toward the teachers' class-weighted ensemble; no labels.

    Parameters
    ----------
    student : nn.Module
        The fused model (returns logits).  It is not modified.
    teachers : sequence of nn.Module
        The base models (return logits); they are only evaluated.
    x : Tensor or array-like
        The fusion inputs ``[N, ...]``; ``config.val_fraction`` of them are held out.
    config : DistillConfig, optional
        Settings (default :class:`DistillConfig()`).
    class_weights : array-like, optional
        ``[N_teachers, C]`` per-class weights of the teachers (e.g. class shares).
    extra : Tensor or array-like, optional
        More unlabelled inputs to train on (never held out).
    progress : bool
        Show a progress bar over epochs.

    Returns
    -------
    model : nn.Module
        The distilled copy, in eval mode, on ``student``'s device.
    history : dict
        ``train_loss`` per epoch, ``val_kl`` (index 0: before distillation, ``e``: after epoch
        ``e``), ``val_agreement`` (share of held-out inputs where the student's argmax is the
        teacher's), ``best_epoch`` and ``stopped_early``.
    """
    from .models.ensemble import Ensemble

    cfg = DistillConfig() if config is None else config
    if not isinstance(cfg, DistillConfig):
        raise ConfigError(f"config must be a DistillConfig, got {type(cfg).__name__}")
    if isinstance(student, Ensemble):
        raise ConfigError("cannot distill into an output ensemble; fuse with another method first")
    if len(teachers) == 0:
        raise ConfigError("distillation needs at least one teacher model")
    if not any(p.requires_grad for p in student.parameters()):
        raise ConfigError(f"{type(student).__name__} has no trainable parameters to distill into")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} is not available; use device='cpu'")
    xt = _inputs(student, x, "the distillation inputs")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(xt.shape[0])
    n_val = int(round(cfg.val_fraction * xt.shape[0]))
    n_val = min(n_val, xt.shape[0] - 1)
    x_va, x_tr = xt[order[:n_val]], xt[order[n_val:]]
    if extra is not None:
        x_tr = torch.cat([x_tr, _inputs(student, extra, "the extra distillation inputs")])
    t = float(cfg.temperature)

    home = next((p.device for p in student.parameters()), torch.device("cpu"))
    model = copy.deepcopy(student).to(device)
    states = [(m.training, next(iter(m.parameters()), torch.empty(0)).device) for m in teachers]
    teachers = [m.to(device).eval() for m in teachers]
    try:
        with torch.no_grad():
            num_classes = int(teachers[0](x_tr[:1].to(device)).shape[-1])
            w = None
            if class_weights is not None:
                output_weights(len(teachers), num_classes, class_weights)   # validates shape, values
                w = torch.as_tensor(np.asarray(class_weights, dtype=np.float64)).to(device)
            p_va = torch.cat([teacher_probs(teachers, x_va[i:i + 512].to(device), t, w)
                              for i in range(0, n_val, 512)]) if n_val else None
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        n, bs = x_tr.shape[0], min(cfg.batch_size, x_tr.shape[0])
        steps = math.ceil(n / bs)
        steps_total = cfg.epochs * steps
        gen = torch.Generator().manual_seed(cfg.seed)
        history: Dict[str, Any] = {"train_loss": [], "val_kl": [], "val_agreement": [],
                                   "best_epoch": cfg.epochs, "stopped_early": False}
        best = math.inf
        best_state: Optional[Dict[str, Tensor]] = None
        since = 0

        def score(epoch: int) -> None:
            nonlocal best, best_state, since
            assert p_va is not None
            model.eval()
            with torch.no_grad():
                out = torch.cat([model(x_va[i:i + 512].to(device)) for i in range(0, n_val, 512)])
                kl = float(_kl(out, p_va, t))
                agree = float((out.argmax(-1) == p_va.argmax(-1)).float().mean())
            history["val_kl"].append(kl)
            history["val_agreement"].append(agree)
            if kl < best:
                best, since = kl, 0
                history["best_epoch"] = epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since += 1

        def batch_loss(idx: Tensor) -> Tensor:
            xb = _augment(x_tr[idx].to(device), cfg, gen)
            with torch.no_grad():
                p = teacher_probs(teachers, xb, t, w)
            return _kl(model(xb), p, t)

        def end_epoch(epoch: int, loss: float, lr: Optional[float]) -> Optional[EpochEnd]:
            history["train_loss"].append(loss)
            if p_va is None:
                return None
            score(epoch + 1)
            stop = since >= cfg.patience
            if stop:
                history["stopped_early"] = True
            return EpochEnd({"val_kl": round(history["val_kl"][-1], 4)}, stop=stop)

        with seeded_rng(cfg.seed, device), torch.enable_grad():
            if p_va is not None:
                score(0)
            run_epochs(model, optim, n=n, batch_size=bs, epochs=cfg.epochs, generator=gen,
                       batch_loss=batch_loss, end_epoch=end_epoch,
                       lr_at=lambda epoch, b: 0.5 * cfg.lr * (1 + math.cos(
                           math.pi * (epoch * steps + b) / steps_total)),
                       diverged=lambda epoch, loss: f"distillation diverged at epoch {epoch}; "
                                                    f"lower lr (now {cfg.lr})",
                       desc="distill", progress=progress, leave=False)
    finally:
        for m, (training, dev) in zip(teachers, states):
            m.to(dev).train(training)
    if best_state is not None:
        model.load_state_dict(best_state)
        if history["best_epoch"] == 0:
            log.warning("distill: no epoch came closer to the ensemble on the %d held-out inputs than "
                        "the fused model (held-out KL %.4f): the fused model is returned unchanged; "
                        "distillation needs more inputs than the fusion set (distill_data=..., CLI "
                        "--distill-extra N)", n_val, best)
        else:
            log.info("distill: kept epoch %d (held-out KL %.4f, agreement %.4f)", history["best_epoch"],
                     best, history["val_agreement"][history["best_epoch"]])
    model.to(home).eval()
    return model, history
