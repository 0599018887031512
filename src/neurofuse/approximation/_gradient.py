r"""Fitting a fused level by gradient descent (paper section 4.3.2(b), appendix B.2 and F.1).

For a level that is not affine in its parameters (a residual block, an attention block, a level
with batch norm) the approximation error :math:`\sum_c S_c \lVert t_c - F_c\rVert^2` has no
closed form; the level is trained with Adam or SGD to reproduce the targets from the fused
model's own previous-level outputs.  This module holds the pieces, independent of grouping:

* :class:`LevelConfig`: the validated optimisation settings of one level;
* :func:`random_like` / :func:`perturb_level`: the initialisation
  :math:`\theta = (1-\varepsilon)\,\theta_{base} + \varepsilon\,\theta_{rand}` of *every*
  parameter of the level, nested modules included;
* :func:`fit_level`: mini-batch training with a seeded validation split, early stopping that
  restores the best weights, and batch-norm statistics re-estimated afterwards.

The grouping (importance-weighted K-means over neurons) is :func:`neurofuse.grouping.weighted_kmeans`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .._loop import EpochEnd, run_epochs
from .._phases import phase
from .._validate import is_int as _is_int
from .._validate import is_number as _is_num
from ..errors import ConfigError, IncompatibleModelsError

__all__ = [
    "LevelConfig",
    "fit_level",
    "perturb_level",
    "random_like",
    "reestimate_batchnorm",
]

log = logging.getLogger("neurofuse")

OPTIMIZERS = ("adam", "sgd")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclasses.dataclass(frozen=True)
class LevelConfig:
    """Optimisation settings of one level of ``kf-gradient``.

    Attributes
    ----------
    optimizer : str
        ``"adam"`` or ``"sgd"`` (plain SGD unless ``momentum`` > 0).
    lr : float
        Learning rate, > 0.
    weight_decay : float
        L2 penalty, >= 0.
    epochs : int
        Maximum passes over the training part of the fusion set, >= 1.
    batch_size : int
        Samples per step, >= 1.
    perturbation : float
        :math:`\\varepsilon \\in [0, 1]` of the initialisation
        :math:`(1-\\varepsilon)\\theta_{base} + \\varepsilon\\theta_{rand}`; 0 warm-starts from the
        base model's level, 1 is a fresh random level.
    patience : int
        Stop after this many epochs without a lower validation loss, >= 1.
    val_fraction : float
        Share of the fusion samples held out for early stopping, in ``[0, 1)``; with 0 the
        training loss decides.
    momentum : float
        SGD momentum in ``[0, 1)`` (ignored by Adam).

    The defaults are the hidden levels of ``kf-gradient``'s ``"default"`` preset.
    """

    optimizer: str = "adam"
    lr: float = 1e-2
    weight_decay: float = 0.0
    epochs: int = 50
    batch_size: int = 32
    perturbation: float = 0.0
    patience: int = 10
    val_fraction: float = 0.1
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}")
        object.__setattr__(self, "optimizer", self.optimizer.lower())
        if not _is_num(self.lr) or self.lr <= 0:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not _is_int(self.epochs) or self.epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not _is_num(self.perturbation) or not 0 <= self.perturbation <= 1:
            raise ConfigError(f"perturbation must be in [0, 1], got {self.perturbation!r}")
        if not _is_int(self.patience) or self.patience < 1:
            raise ConfigError(f"patience must be an integer >= 1, got {self.patience!r}")
        if not _is_num(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not _is_num(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")

    def replace(self, **changes: Any) -> "LevelConfig":
        """A copy with ``changes``; unknown keys are a :class:`ConfigError`."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - fields
        if unknown:
            raise ConfigError(f"unknown level setting(s) {sorted(unknown)}; valid: {sorted(fields)}")
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------
def _fallback_init(p: nn.Parameter) -> None:
    """Initialise a parameter whose module has no ``reset_parameters``."""
    if p.dim() >= 2:
        nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    else:
        nn.init.trunc_normal_(p, std=0.02)


def random_like(module: nn.Module, seed: int) -> nn.Module:
    """A copy of ``module`` with every parameter freshly initialised (deterministic in ``seed``).

    Every sub-module, at any depth, that defines ``reset_parameters`` (``Linear``, ``Conv2d``,
    ``BatchNorm``, ``LayerNorm``, custom modules) is reset; parameters held directly by a module
    without ``reset_parameters`` get Kaiming-uniform (matrices) or a truncated normal with std
    0.02 (vectors), PyTorch's and ViT's defaults.  The random draws come from a forked RNG seeded
    with ``seed``, on the CPU, so the caller's random state is left alone and the result does not
    depend on the device.
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    new = copy.deepcopy(module).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m in new.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                for p in m.parameters(recurse=False):
                    with torch.no_grad():
                        _fallback_init(p)
    return new.to(device)


def perturb_level(level: nn.Module, base: Optional[nn.Module], eps: float, seed: int) -> str:
    r"""Initialise ``level`` in place as :math:`(1-\varepsilon)\,\theta_{base} + \varepsilon\,\theta_{rand}`.

    Applied to every parameter of ``level`` (nested modules included); ``θ_rand`` comes from
    :func:`random_like` (``seed``).  Buffers (batch-norm statistics) are taken from ``base`` when
    ``eps < 1`` and from the random copy otherwise.  When ``base`` is ``None`` or its parameters do
    not have ``level``'s names and shapes (a fused level of another width), the level is a fresh
    random one whatever ``eps``.

    Returns
    -------
    str
        ``"base"`` (eps = 0), ``"perturbed"``, ``"random"`` (eps = 1) or ``"random (shapes differ
        from the base level)"``: how the level was initialised.
    """
    if not 0 <= eps <= 1:
        raise ConfigError(f"perturbation must be in [0, 1], got {eps}")
    rand = random_like(level, seed)
    compatible = base is not None and _same_shapes(level, base)
    if not compatible:
        level.load_state_dict(rand.state_dict())
        return "random (shapes differ from the base level)" if base is not None else "random"
    assert base is not None
    base_params = dict(base.named_parameters())
    rand_params = dict(rand.named_parameters())
    with torch.no_grad():
        for name, p in level.named_parameters():
            b = base_params[name].detach().to(p.device, p.dtype)
            r = rand_params[name].detach().to(p.device, p.dtype)
            p.copy_(b if eps == 0 else r if eps == 1 else (1.0 - eps) * b + eps * r)
        src = dict((rand if eps == 1 else base).named_buffers())
        for name, buf in level.named_buffers():
            if name in src:
                buf.copy_(src[name].to(buf.device))
    return "base" if eps == 0 else "random" if eps == 1 else "perturbed"


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    pa = {n: p.shape for n, p in a.named_parameters()}
    pb = {n: p.shape for n, p in b.named_parameters()}
    return pa == pb


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in module.modules())


@torch.no_grad()
def reestimate_batchnorm(level: nn.Module, inputs: Tensor, batch_size: int = 256) -> None:
    """Recompute the running statistics of every BatchNorm in ``level`` on ``inputs``.

    The statistics are reset and accumulated as the average of the statistics of near-equal
    chunks of ``inputs`` (momentum ``None``; equal chunks make the running mean the exact mean over
    all inputs); the level is left in eval mode.
    """
    bns = [m for m in level.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns or inputs.shape[0] == 0:
        level.eval()
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    level.train()
    chunks = max(1, min(-(-inputs.shape[0] // batch_size), inputs.shape[0] // 2))
    for xb in torch.tensor_split(inputs, chunks):
        level(xb)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    level.eval()


def _make_optimizer(params: List[nn.Parameter], cfg: LevelConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


LossFn = Callable[[Tensor, Tensor], Tensor]


def _mean_loss(level: nn.Module, x: Tensor, t: Tensor, loss_fn: LossFn, bs: int) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], bs):
            xb, tb = x[i:i + bs], t[i:i + bs]
            total += float(loss_fn(level(xb), tb)) * xb.shape[0]
            n += xb.shape[0]
    return total / max(n, 1)


@phase("solve")
def fit_level(level: nn.Module, inputs: Tensor, targets: Tensor, cfg: LevelConfig,
              loss_fn: Optional[LossFn] = None, *, seed: int = 0, progress: bool = False,
              desc: str = "level") -> Dict[str, Any]:
    """Train ``level`` in place so that ``level(inputs) ≈ targets``; keep the best weights.

    A share ``cfg.val_fraction`` of the samples (drawn with a ``torch.Generator`` seeded with
    ``seed``, which also draws the batch order) is held out.  After every epoch the validation
    loss is measured in eval mode (batch-norm statistics first re-estimated on the training part);
    the weights with the lowest validation loss, the initial weights included, are restored at the
    end, and training stops after ``cfg.patience`` epochs without improvement.  Finally the
    batch-norm statistics are re-estimated on all ``inputs``.

    Parameters
    ----------
    level : nn.Module
        The level to train (its parameters with ``requires_grad``).
    inputs, targets : Tensor
        ``[N, ...]`` level inputs and the outputs to reproduce (same device as ``level``).
    cfg : LevelConfig
        Optimiser, learning rate, epochs, batch size, patience, validation share.
    loss_fn : callable, optional
        ``loss_fn(output, target) -> scalar``; default mean squared error.
    seed : int
        Seed of the split and the batch order.
    progress : bool
        Show a tqdm bar over epochs.
    desc : str
        Label of the bar.

    Returns
    -------
    dict
        ``train_loss`` and ``val_loss`` per epoch (``val_loss[0]`` is the initial weights'),
        ``best_epoch`` (0 = the initial weights), ``best_val_loss``, ``epochs`` run,
        ``stopped_early`` and ``val_index`` (the held-out sample indices).

    Raises
    ------
    ConfigError
        If the loss becomes NaN or infinite (lower the learning rate).
    """
    loss_fn = loss_fn or nn.functional.mse_loss
    n = int(inputs.shape[0])
    if targets.shape[0] != n:
        raise IncompatibleModelsError(f"{n} level inputs but {targets.shape[0]} targets")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(cfg.val_fraction * n))
    n_val = min(n_val, n - 1) if n > 1 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    dev = inputs.device
    x_tr, t_tr = inputs[tr_idx.to(dev)], targets[tr_idx.to(dev)]
    x_va, t_va = (inputs[val_idx.to(dev)], targets[val_idx.to(dev)]) if n_val else (x_tr, t_tr)
    bn = has_batchnorm(level)
    eval_bs = max(cfg.batch_size, 256)

    def validate() -> float:
        if bn:
            reestimate_batchnorm(level, x_tr, eval_bs)
        level.eval()
        return _mean_loss(level, x_va, t_va, loss_fn, eval_bs)

    history: Dict[str, Any] = {"train_loss": [], "val_loss": [], "best_epoch": 0, "epochs": 0,
                               "stopped_early": False, "val_index": val_idx}
    params = [p for p in level.parameters() if p.requires_grad]
    best = validate()
    history["val_loss"].append(best)
    best_state = {k: v.detach().clone() for k, v in level.state_dict().items()}
    if not params:
        history["best_val_loss"] = best
        return history
    opt = _make_optimizer(params, cfg)
    bad = 0

    def batch_loss(idx: Tensor) -> Optional[Tensor]:
        if bn and idx.numel() < 2:   # a batch of one breaks BatchNorm in train mode
            return None
        return loss_fn(level(x_tr[idx]), t_tr[idx])

    def end_epoch(epoch: int, loss: float, lr: Optional[float]) -> EpochEnd:
        nonlocal best, bad, best_state
        history["train_loss"].append(loss)
        val = validate()
        history["val_loss"].append(val)
        history["epochs"] = epoch + 1
        postfix = {"loss": f"{loss:.4g}", "val": f"{val:.4g}"}
        if val < best:
            best, bad = val, 0
            history["best_epoch"] = epoch + 1
            best_state = {k: v.detach().clone() for k, v in level.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                history["stopped_early"] = True
                return EpochEnd(postfix, stop=True)
        return EpochEnd(postfix)

    run_epochs(level, opt, n=int(x_tr.shape[0]), batch_size=cfg.batch_size, epochs=cfg.epochs,
               generator=gen, batch_loss=batch_loss, end_epoch=end_epoch, index_device=dev,
               diverged=lambda epoch, loss: (f"{desc}: the fit diverged at epoch {epoch} (loss {loss}); "
                                             f"lower lr (now {cfg.lr})"),
               desc=desc, progress=progress, leave=False)
    level.load_state_dict(best_state)
    if bn:
        reestimate_batchnorm(level, inputs, eval_bs)
    level.eval()
    history["best_val_loss"] = best
    return history


# ---------------------------------------------------------------------------------------------
# importance-weighted K-means over neurons
# ---------------------------------------------------------------------------------------------
