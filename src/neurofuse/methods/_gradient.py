r"""K-means Gradient Fusion (``kf-gradient``, paper section 4.3.2(b), appendices B.2 and F).

For each level, from the input:

1. every base model's level outputs on the fusion set are collected and flattened to
   ``[rows, neurons]`` (conv: rows = samples x positions; tokens: samples x tokens);
2. the neurons of all models (points whose features are their values over all rows) are grouped
   by importance-weighted K-means into ``k`` clusters (the fused width), seeded from the neurons of
   the model the level is initialised from (default model 0) or by weighted k-means++; the
   targets are the importance-weighted cluster centres (computed on the raw outputs, even when
   ``normalize_acts`` normalises them for clustering);
3. the clusters are put in the order of that model's neurons (Hungarian matching of centres to
   its neurons, a neuron's own cluster first), so that warm-started weights and targets line up
   (the reference code seeded from model 1 but initialised from model 0, see paper-notes §15);
4. the fused level, initialised as :math:`(1-\varepsilon)\theta_{base} + \varepsilon\theta_{rand}`
   on every parameter, is trained with Adam or SGD to map the fused model's *own* previous-level
   outputs to the targets (plain MSE, or MSE weighted by each cluster's total importance), with a
   seeded validation split and early stopping that restores the best weights; batch-norm
   statistics are then re-estimated on the fusion set.

The output level uses the identity grouping: the target is the mean logit of the base models
(weighted per class by ``class_weights``), or, with ``head_kd``, their mean softmax at a
temperature, fitted with a true KL divergence.

Settings are per level (:class:`~neurofuse.approximation._gradient.LevelConfig`), grouped in
:class:`GradientOptions` with named presets from the paper's table 5.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..approximation import LevelConfig, fit_level, perturb_level
from ..grouping import OUTPUT_WEIGHTS, Correspondence, output_weights, weighted_kmeans
from ..errors import ConfigError, IncompatibleModelsError
from ..levels import LeveledNet, LevelStream, flatten_neurons, unflatten_neurons
from ._base import FusionRun, register_method
from ._levelwise import LevelRun, LevelwiseFusion
from ._options import Anything, Boolean, Interval, MethodOptions, OneOf, option

__all__ = ["GRADIENT_PRESETS", "GradientOptions", "KMeansGradientFusion", "LevelConfig"]

log = logging.getLogger("neurofuse")

#: named settings: (hidden levels, output level)
GRADIENT_PRESETS: Dict[str, Tuple[LevelConfig, LevelConfig]] = {
    # CPU-friendly default: warm start from the init model, short Adam fits with early stopping
    # (4 small MLPs on digits: ~0.6 s; 4 tiny VGG11s: ~3 s on one CPU thread)
    "default": (LevelConfig("adam", 1e-2, 0.0, 50, 32, 0.0, 10, 0.1),
                LevelConfig("adam", 1e-2, 0.0, 100, 32, 0.0, 20, 0.1)),
    # paper table 5, setting 1: far from the initialisation (fresh random levels)
    "setting1": (LevelConfig("adam", 1e-3, 1e-4, 100, 32, 1.0, 15, 0.1),
                 LevelConfig("adam", 1e-3, 1e-4, 100, 32, 1.0, 15, 0.1)),
    # paper table 5, setting 2: small SGD steps from a slightly perturbed base model
    "setting2": (LevelConfig("sgd", 1e-4, 1e-4, 50, 32, 0.1, 15, 0.1),
                 LevelConfig("adam", 1e-3, 1e-4, 100, 32, 0.1, 15, 0.1)),
}

LevelSpec = Union[None, LevelConfig, Mapping[str, Any]]


def _merge(base: LevelConfig, spec: LevelSpec, what: str) -> LevelConfig:
    if spec is None:
        return base
    if isinstance(spec, LevelConfig):
        return spec
    if isinstance(spec, Mapping):
        return base.replace(**dict(spec))
    raise ConfigError(f"{what} must be a LevelConfig or a dict of its fields, got {type(spec).__name__}")


@dataclasses.dataclass(frozen=True)
class GradientOptions(MethodOptions):
    """Settings of ``kf-gradient``.

    Attributes
    ----------
    preset : str
        ``"default"`` (CPU-friendly: Adam lr 1e-2, no weight decay, at most 50 epochs per
        hidden level and 100 for the head, patience 10/20, warm start from the init model without
        perturbation, batch 32, 10% validation; the warm start needs few steps and the early
        stopping, which keeps the initial weights if training never beats them, makes the high
        learning rate safe), ``"setting1"`` or ``"setting2"`` (paper table 5, see
        :data:`GRADIENT_PRESETS`; tuned for VGG11/ViT on CIFAR on a GPU).
    levels : LevelConfig or dict, optional
        Settings of the hidden levels; a dict changes only the given fields of the preset's.
    head : LevelConfig or dict, optional
        Settings of the output level; a dict changes only the given fields of the preset's.
    overrides : dict of int to dict
        Per-level changes on top of ``levels``/``head``, e.g. ``{0: {"epochs": 5}, -1: {"lr": 1e-4}}``
        (negative indices count from the end; string keys such as ``"0"`` from JSON are accepted).
    init_model : int
        Base model whose levels initialise the fused levels (and seed K-means).
    kmeans_init : str
        ``"model"`` (centres start at the init model's neurons; deterministic; falls back to
        k-means++ where the fused width differs from that model's) or ``"kmeans++"``.
    kmeans_n_init : int
        k-means++ restarts (the lowest-cost clustering is kept).
    kmeans_max_iter : int
        Lloyd iterations.
    normalize_acts : bool
        Cluster on level outputs divided, per model and row, by their L2 norm over that model's
        neurons; targets still use the raw outputs.
    normalize_importance : bool
        Scale each model's importance scores at a level to sum to one.
    weighted_loss : bool
        Weight each fused neuron's squared error by its cluster's total importance (normalised
        to mean one) instead of plain MSE; the paper uses plain MSE (appendix B.2).
    class_weights : array-like, optional
        ``[N, C]`` per-class weights of the models at the output level (the paper's "head
        weights", e.g. :func:`neurofuse.data.class_shares`); default: the mean logit.
    head_kd : bool
        Fit the output level by distillation: KL divergence between the fused model's
        log-softmax and the (class-weighted) mean softmax of the base models, both at
        ``temperature``, scaled by ``temperature²``.
    temperature : float
        Distillation temperature (> 0).
    output_weights : str
        ``"importance"``: the output target of class ``c`` weighs each model's class-``c`` logit
        (or probability, with ``head_kd``) also by the importance of that output neuron,
        normalised over the models; ``"mean"``: ``class_weights`` only.  Same with
        ``importance="uniform"``.  See :func:`neurofuse.grouping.output_weights`.
    """

    preset: str = option("default", OneOf(*GRADIENT_PRESETS))
    levels: LevelSpec = option(None, Anything("null, a LevelConfig or a dict of its fields"))
    head: LevelSpec = option(None, Anything("null, a LevelConfig or a dict of its fields"))
    overrides: Optional[Mapping[int, Mapping[str, Any]]] = option(
        None, Anything("null or a dict of level index to a dict of LevelConfig fields"))
    init_model: int = option(0, Interval(int, 0))
    kmeans_init: str = option("model", OneOf("model", "kmeans++"))
    kmeans_n_init: int = option(3, Interval(int, 1))
    kmeans_max_iter: int = option(100, Interval(int, 1))
    normalize_acts: bool = option(False, Boolean())
    normalize_importance: bool = option(False, Boolean())
    weighted_loss: bool = option(False, Boolean())
    class_weights: Optional[Any] = option(None, Anything("null or an [N, C] array of non-negative weights"))
    head_kd: bool = option(False, Boolean())
    temperature: float = option(1.0, Interval(float, 0, closed="neither"))
    output_weights: str = option("importance", OneOf(*OUTPUT_WEIGHTS))

    def __post_init__(self) -> None:
        super().__post_init__()
        lv, hd = GRADIENT_PRESETS[self.preset]
        object.__setattr__(self, "levels", _merge(lv, self.levels, "levels"))
        object.__setattr__(self, "head", _merge(hd, self.head, "head"))
        ov: Dict[int, Dict[str, Any]] = {}
        for key, change in dict(self.overrides or {}).items():
            if isinstance(key, str) and key.strip().lstrip("-").isdigit():
                key = int(key)   # JSON object keys (CLI --option overrides='{"0": {...}}')
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
                raise ConfigError(f"overrides keys must be level indices (int), got {key!r}")
            if not isinstance(change, Mapping):
                raise ConfigError(f"overrides[{key}] must be a dict of level settings, got {change!r}")
            self.levels.replace(**dict(change))   # validates names and values
            ov[int(key)] = dict(change)
        object.__setattr__(self, "overrides", ov)

    def level_config(self, level: int, num_levels: int) -> LevelConfig:
        """The settings of ``level`` in a model of ``num_levels`` levels."""
        base = self.head if level == num_levels - 1 else self.levels
        assert isinstance(base, LevelConfig) and isinstance(self.overrides, dict)
        bad = [k for k in self.overrides if not -num_levels <= k < num_levels]
        if bad:
            raise ConfigError(f"overrides name level(s) {bad} but the model has {num_levels} levels "
                              f"(0..{num_levels - 1}, or -1 for the last)")
        change = self.overrides.get(level, self.overrides.get(level - num_levels))
        return base.replace(**change) if change else base


def _per_neuron_view(w: Tensor, axis: str, ndim: int) -> Tensor:
    if axis == "conv":
        return w.view(1, -1, *([1] * (ndim - 2)))
    return w.view(*([1] * (ndim - 1)), -1)


@register_method("kf-gradient")
class KMeansGradientFusion(LevelwiseFusion):
    """K-means Gradient Fusion: N models of any architecture, each level trained to the targets.

    Luenam, Spanopoulos, Sant et al., "Model Fusion via Neuron Interpolation", 2025, section
    4.3.2(b) and appendix F.  Works on any level (residual blocks, attention blocks, batch norm),
    where ``kf-linear`` needs affine levels.  See :class:`GradientOptions` for the settings.
    """

    summary = "K-means Gradient Fusion (Luenam et al. 2025): N models, any architecture, per-level SGD/Adam"
    label = "KF Gradient"
    order = 80
    Options = GradientOptions
    min_models = 1

    # -- the level template -----------------------------------------------------------------
    def fuse_level(self, run: LevelRun, level: int, models: List[LeveledNet], fused: LeveledNet,
                   stream: LevelStream, k: int) -> None:
        opts: GradientOptions = self.options
        n_levels = fused.num_levels
        b = opts.init_model
        if b >= len(models):
            raise ConfigError(f"init_model is {b} but only {len(models)} models are fused")
        cfg = opts.level_config(level, n_levels)
        axis = fused.axes[level]
        # every base model's level output, once per batch (the stream moves on with it), and the
        # fused model's level input; gradient fitting needs all rows at once
        base_streams = list(range(1, len(models) + 1))
        chunks: List[List[Tensor]] = [[] for _ in models]
        fused_in: List[Tensor] = []
        with torch.no_grad():
            for batch in stream.batches([0, *base_streams]):
                fused_in.append(batch.inputs[0])
                for i, (m, h) in enumerate(zip(models, batch.inputs[1:])):
                    z = m.levels[level](h)
                    chunks[i].append(z)
                    batch.keep(i + 1, z)
        outs = [torch.cat(c) for c in chunks]
        x_in = torch.cat(fused_in)
        del chunks, fused_in
        if level == n_levels - 1:
            targets, neuron_w, info = self._head_targets(run, outs, models)
        else:
            targets, neuron_w, info = self._hidden_targets(run, level, models, outs, k, axis)
        seed = self.seed * 1_000_003 + level
        target_level = fused.levels[level]
        info["init"] = perturb_level(target_level, models[b].levels[level], cfg.perturbation, seed)
        loss_fn = self._loss(level == n_levels - 1, neuron_w, axis)
        hist = fit_level(target_level, x_in, targets, cfg, loss_fn, seed=seed,
                         progress=self.progress, desc=f"kf-gradient level {level}")
        if level < n_levels - 1:
            target_level.eval()
            stream.advance({0: target_level, **{i + 1: m.levels[level] for i, m in enumerate(models)}})
        hist.pop("val_index", None)
        run.report.append({"level": level, "k": k, **info, **{key: hist[key] for key in
                           ("epochs", "best_epoch", "best_val_loss", "stopped_early")},
                           "initial_val_loss": hist["val_loss"][0]})
        log.debug("kf-gradient level %d: %s", level, run.report[-1])

    # -- targets ------------------------------------------------------------------------------
    def _hidden_targets(self, run: FusionRun, level: int, models: List[LeveledNet], outs: List[Tensor],
                        k: int, axis: str) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
        opts: GradientOptions = self.options
        b = opts.init_model
        mats = [flatten_neurons(o, axis) for o in outs]                  # [rows, n_i] each
        widths = [m.shape[1] for m in mats]
        raw = torch.cat(mats, dim=1)                                        # [rows, M]
        if opts.normalize_acts:
            feats = torch.cat([m / m.norm(dim=1, keepdim=True).clamp_min(1e-12) for m in mats], dim=1)
        else:
            feats = raw
        points = feats.T.contiguous()                                       # neurons as points
        scores = torch.from_numpy(self.level_scores(run, models, level)).to(points)
        offset = sum(widths[:b])
        use_model = opts.kmeans_init == "model" and widths[b] == k
        init = points[offset:offset + k] if use_model else None
        labels, _, _ = weighted_kmeans(points, scores, k, init=init, n_init=opts.kmeans_n_init,
                                       max_iter=opts.kmeans_max_iter, seed=self.seed + 7919 * level)
        labels = labels.to(raw.device)
        # ordering: cluster i <-> neuron i of the init model (Hungarian, own cluster preferred)
        ordered = widths[b] == k
        targets = self._centres(raw, scores, labels, k)                     # [rows, k]
        if ordered:
            nb = raw[:, offset:offset + k]
            cost = ((nb * nb).sum(0)[:, None] + (targets * targets).sum(0)[None, :]
                    - 2.0 * nb.T @ targets).clamp_min(0).double()
            own = labels[offset:offset + k]
            cost[torch.arange(k, device=cost.device), own] -= float(cost.max()) + 1.0
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            new_index = torch.empty(k, dtype=torch.long)
            new_index[torch.as_tensor(cols)] = torch.as_tensor(rows)
            labels = new_index.to(labels.device)[labels]
            targets = self._centres(raw, scores, labels, k)
        run.record(level, Correspondence.hard(labels.cpu().numpy(), widths, k, scores.cpu().numpy()))
        cluster_w = torch.zeros(k, dtype=scores.dtype, device=scores.device).index_add_(0, labels, scores)
        g_err = float((scores * ((raw - targets[:, labels]) ** 2).sum(0)).sum())
        shaped = unflatten_neurons(targets, axis, outs[0].shape)
        info = {"grouping_error": g_err, "kmeans_init": "model" if use_model else "kmeans++",
                "ordered_like_model": b if ordered else None}
        return shaped.contiguous(), cluster_w, info

    @staticmethod
    def _centres(raw: Tensor, scores: Tensor, labels: Tensor, k: int) -> Tensor:
        assign = torch.zeros(raw.shape[1], k, dtype=raw.dtype, device=raw.device)
        assign[torch.arange(raw.shape[1], device=raw.device), labels] = scores
        return (raw @ assign) / assign.sum(0).clamp_min(1e-30)

    def _head_targets(self, run: FusionRun, outs: List[Tensor], models: Sequence[LeveledNet]
                      ) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
        opts: GradientOptions = self.options
        if any(o.shape != outs[0].shape for o in outs):
            raise IncompatibleModelsError(f"output levels have different shapes {[list(o.shape) for o in outs]}")
        z = torch.stack([o.reshape(o.shape[0], -1) for o in outs])           # [N_models, B, C]
        n, _, c = z.shape
        if opts.class_weights is None:
            w = torch.ones(n, c, dtype=z.dtype, device=z.device)
        else:
            w = torch.as_tensor(np.asarray(opts.class_weights, dtype=np.float64), dtype=z.dtype,
                                device=z.device)
            if w.shape != (n, c):
                raise ConfigError(f"class_weights must have shape [{n}, {c}], got {list(w.shape)}")
            w = w + 1e-12
        if opts.output_weights == "importance" and self.importance != "uniform":
            # importance share of every model per class (columns sum to one) times N keeps the
            # scale of ``w`` (the weighted loss reads its column sums)
            scores = torch.stack([run.importance_scores(m)[-1] for m in models]).numpy()
            share = output_weights(n, c, None, scores)
            w = w * torch.as_tensor(share * n, dtype=z.dtype, device=z.device)
        if opts.head_kd:
            p = torch.softmax(z / opts.temperature, dim=-1)
            t = (p * w[:, None, :]).sum(0) / w.sum(0)
            t = torch.log((t / t.sum(-1, keepdim=True)).clamp_min(1e-30))    # log-probabilities
        else:
            t = (z * w[:, None, :]).sum(0) / w.sum(0)
        return t.reshape(outs[0].shape), w.sum(0), {"head": "kd" if opts.head_kd else "mean-logit"}

    # -- loss -----------------------------------------------------------------------------------
    def _loss(self, is_head: bool, neuron_w: Tensor, axis: str):
        opts: GradientOptions = self.options
        if is_head and opts.head_kd:
            temp = float(opts.temperature)

            def kd(out: Tensor, log_t: Tensor) -> Tensor:
                log_q = F.log_softmax(out / temp, dim=-1)
                return F.kl_div(log_q, log_t, reduction="batchmean", log_target=True) * temp * temp

            return kd
        if opts.weighted_loss:
            w = (neuron_w / neuron_w.mean().clamp_min(1e-30)).float()

            def wmse(out: Tensor, t: Tensor) -> Tensor:
                return ((out - t) ** 2 * _per_neuron_view(w.to(out), axis, out.dim())).mean()

            return wmse
        return F.mse_loss
