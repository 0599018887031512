"""Neuron interpolation fusion, level by level (paper Algorithm 1).

For each level from the input: collect every base model's level outputs on the fusion set,
group their neurons (importance-weighted), take the weighted cluster centres as targets and fit
the fused model's level to them from the fused model's *own* previous-level outputs.
:class:`LevelwiseFusion` is the template; subclasses choose how to fit a level.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import abstractmethod
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._fusion_set import FusionSet
from ..errors import ConfigError, IncompatibleModelsError
from ..grouping import Grouping, centroids, hungarian_grouping, identity_grouping, kmeans_grouping
from ..approximation import LinearStats, aligned_prior, assign_affine, design_matrix
from ..importance import normalize_scores
from ..levels import LeveledNet, LevelStream, check_same_levels, flatten_neurons, split_affine
from ..levels._bn import fold_batchnorm, has_batchnorm
from ._base import FusionMethod, check_output_weights, register_method
from ._memory import estimated_by, linear_working_set

__all__ = ["HungarianLinearFusion", "KMeansLinearFusion", "LevelwiseFusion", "LinearFusion"]

log = logging.getLogger("neurofuse")


class LevelwiseFusion(FusionMethod):
    """Template for level-by-level neuron interpolation; override :meth:`fuse_level`.

    :meth:`_fuse` checks the models (:meth:`prepare`), resolves the fused widths, and then walks
    the levels from the input with a :class:`~neurofuse.levels.LevelStream` that holds the level
    inputs of the fused model (stream 0) and of every base model (streams ``1..N``), so each model
    runs each level once per fusion batch.  ``fuse_level`` reads the stream and advances it.
    """

    uses_importance = True
    supports_width = True

    def prepare(self, nets: List[LeveledNet]) -> List[LeveledNet]:
        """Checks or conversions of the base models before any work (default: none)."""
        return nets

    def _fuse(self, models: List[nn.Module], data: Optional[FusionSet]) -> nn.Module:
        assert data is not None
        nets, fused, widths = self.setup(models)
        levels = range(fused.num_levels)
        with self.stream(data, 1 + len(nets)) as stream:
            for lvl in tqdm(levels, desc=f"fuse {self.name}", disable=not self.progress, leave=False):
                self.fuse_level(lvl, nets, fused, stream, widths[lvl])
        return fused

    def setup(self, models: Sequence[nn.Module]) -> "tuple[List[LeveledNet], LeveledNet, List[int]]":
        """Check and prepare the base models and make the fused model, before any level.

        Returns ``(nets, fused, widths)``: the prepared base models, the fused model (model 0's
        architecture at the fused widths, on the fusion device, its levels still to be fitted)
        and the fused width of every level.  Federated fusion (:mod:`neurofuse.federated`) calls
        it on the server and then fits the levels from statistics the clients send.
        """
        nets = self.prepare(check_same_levels(list(models)))
        base_widths = [m.level_widths() for m in nets]
        widths = self.resolve_widths(base_widths[0])
        for lvl, k in enumerate(widths[:-1]):
            available = sum(bw[lvl] for bw in base_widths)
            if k > available:
                raise IncompatibleModelsError(
                    f"fused width {k} at level {lvl} is larger than the {available} neurons the "
                    "base models have there; choose a smaller width"
                )
        self.base_widths = base_widths
        fused = nets[0].clone() if widths == base_widths[0] else nets[0].with_widths(widths[:-1])
        fused = fused.to(self.device).eval()
        self.report: List[dict] = []
        #: the grouping of every hidden level (REPAIR uses them to find each fused neuron's parents)
        self.groupings: List[Grouping] = []
        return nets, fused, widths

    @abstractmethod
    def fuse_level(self, level: int, models: List[LeveledNet], fused: LeveledNet,
                   stream: LevelStream, k: int) -> None:
        """Fit ``fused.levels[level]`` (``k`` neurons) to the grouped base outputs, in place.

        ``stream`` holds the inputs of level ``level`` of the fused model (stream 0) and of every
        base model (stream ``i + 1``); the method advances every stream past the level.
        """

    def level_scores(self, models: Sequence[LeveledNet], level: int, data: FusionSet) -> np.ndarray:
        """Concatenated importance scores of every base model's neurons at ``level``."""
        scores = []
        for m in models:
            s = self.importance_scores(m, data)[level]
            if getattr(self.options, "normalize_importance", False):
                s = normalize_scores(s)
            scores.append(s.cpu().numpy())
        return np.concatenate(scores)


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    """Settings of the closed-form methods.

    Attributes
    ----------
    rtol : float, optional
        Singular values of the design matrix below ``rtol`` times the largest are treated as zero
        (pseudo-inverse).  Default: ``max(rows, d) * eps(float32)``, as ``torch.linalg.pinv``.
    ridge : float
        If > 0, solve :math:`(X^\\top X + \\text{ridge}\\cdot\\overline{\\mathrm{diag}}\\,I) w = X^\\top a`
        instead of using the pseudo-inverse.
    normalize_importance : bool
        Scale each model's scores at a level to sum to one.
    prior : bool
        Input directions that the fusion set never excites (e.g. pixels that are always zero,
        neurons that never fire on it) are left undetermined by least squares.  With ``prior`` they
        keep the base models' weights, aligned through the previous level's grouping and averaged
        like the rest; without it they are zero (the minimum-norm solution).  Either way the fit
        on the fusion set is the same.
    class_weights : array-like, optional
        ``[N, C]`` weights of each model for each class at the output level ("head weights", e.g.
        each model's share of the class's training samples).  Default: all models alike.
    output_weights : str
        How the output target of class ``c`` weighs the models: ``"importance"`` (the paper's
        rule: each model's class-``c`` logit weighted by the importance score of that output
        neuron, normalised over the models, times ``class_weights``) or ``"mean"`` (the mean
        logit, times ``class_weights``).  With ``importance="uniform"`` both are the mean
        (:func:`neurofuse.grouping.output_weights`).
    """

    rtol: Optional[float] = None
    ridge: float = 0.0
    normalize_importance: bool = False
    prior: bool = True
    class_weights: Optional[Any] = None
    output_weights: str = "importance"

    def __post_init__(self) -> None:
        check_output_weights(self.output_weights)
        if self.rtol is not None and not self.rtol > 0:
            raise ConfigError(f"rtol must be positive, got {self.rtol}")
        if self.ridge < 0:
            raise ConfigError(f"ridge must be non-negative, got {self.ridge}")


@dataclasses.dataclass(frozen=True)
class KMeansOptions(LinearOptions):
    """:class:`LinearOptions` plus K-means restarts (``n_init``), iterations (``max_iter``) and
    Hartigan refinement (``refine``).

    ``refine=True`` runs batched Hartigan single-point moves after Lloyd's iterations
    (:func:`neurofuse.grouping.weighted_kmeans`): about 6 % lower K-means cost on 8 MNIST MLPs
    (2,048 neurons, k = 256), but twice the fusion time and no change in fused accuracy
    (92.09 / 92.03 / 93.06 % with it, 92.11 / 91.95 / 93.07 % without, for 2 / 4 / 8 models;
    docs/results.md), so it is off by default; plain Lloyd with k-means++ restarts is what the
    paper's reference code (scikit-learn) runs.

    Attributes
    ----------
    n_init : int
        K-means restarts (k-means++ seeds); the lowest-cost grouping is kept.  3 is the option
        for speed: 93.63 against 93.70 % on held-out data at 8 MLPs (docs/results.md).
    max_iter : int
        Lloyd iterations per restart at most.
    refine : bool
        Batched Hartigan single-point moves after Lloyd's iterations.
    """

    n_init: int = 10
    max_iter: int = 300
    refine: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_init < 1 or self.max_iter < 1:
            raise ConfigError(f"n_init and max_iter must be >= 1, got {self.n_init}, {self.max_iter}")


@estimated_by(linear_working_set)
class LinearFusion(LevelwiseFusion):
    """Closed-form (Linear) neuron interpolation; subclasses choose the grouping (:meth:`group`)."""

    Options = LinearOptions
    supports_distributed = True

    def prepare(self, nets: List[LeveledNet]) -> List[LeveledNet]:
        """Fold BatchNorm into the preceding Conv2d/Linear (on copies) and check that every level
        is affine, so a residual or attention level fails at once with the one-line error that
        suggests kf-gradient (see :func:`neurofuse.levels.split_affine`)."""
        nets = [fold_batchnorm(m) if has_batchnorm(m) else m for m in nets]  # type: ignore[misc]
        for lvl, level in enumerate(nets[0].levels):
            try:
                split_affine(level)
            except IncompatibleModelsError as exc:
                raise IncompatibleModelsError(f"level {lvl} of {type(nets[0]).__name__}: {exc}") from None
        return nets

    @abstractmethod
    def group(self, features: torch.Tensor, scores: np.ndarray, widths: Sequence[int], k: int,
              level: int) -> Grouping:
        """Group the ``M`` base neurons (rows of ``features``, float32 on the fusion device) into
        ``k`` fused neurons."""

    def _prior(self, level: int, models: List[LeveledNet], affine: nn.Module) -> Optional[torch.Tensor]:
        """Every base neuron's weights in the fused input coordinates (see :func:`aligned_prior`)."""
        d = affine.weight[0].numel() + (affine.bias is not None)
        priors = []
        for i, m in enumerate(models):
            try:
                _, base_affine = split_affine(m.levels[level])
            except IncompatibleModelsError:
                return None
            if level == 0:
                p = aligned_prior(base_affine, None, 0)
            else:
                p = aligned_prior(base_affine, torch.from_numpy(self._assign[i]), self._k_prev)
            if p is None or p.shape[0] != d:
                return None
            priors.append(p)
        return torch.cat(priors, dim=1).to(self.device)

    def shares_inputs(self, level: int, models: List[LeveledNet], fused: LeveledNet) -> bool:
        """Whether the fused and every base model see the same design matrix at ``level`` (the
        first level, with the same input ops and layer geometry) and the options ask for the
        prior's least-squares solution, which is then the base weights themselves: no
        :math:`X^\top A` and no eigendecomposition (:meth:`LinearStats._solve_shared`); with no
        more samples than design columns the base outputs themselves are the grouping
        coordinates (``LinearStats(rows=True)``) and no Gram matrix is formed."""
        if level != 0 or not self.options.prior or self.options.ridge != 0:
            return False
        pre, affine = split_affine(fused.levels[level])

        def geometry(a: nn.Module) -> tuple:
            keys = ("in_features", "in_channels", "kernel_size", "stride", "padding", "dilation",
                    "groups", "padding_mode")
            return (type(a), a.bias is not None) + tuple(getattr(a, k, None) for k in keys)

        for m in models:
            try:
                p, a = split_affine(m.levels[level])
            except IncompatibleModelsError:
                return False
            if repr(p) != repr(pre) or any(True for _ in p.buffers()) or geometry(a) != geometry(affine):
                return False
        return True

    def level_statistics(self, level: int, models: List[LeveledNet], fused: LeveledNet,
                         stream: LevelStream) -> LinearStats:
        """Accumulate the level's least-squares statistics over ``stream`` (this process's data).

        Reads the fused model's level inputs (stream 0) and every base model's (streams ``1..N``),
        and keeps the base models' level outputs in the stream for the next level.  The result is
        additive: statistics of disjoint shards (ranks, Flower clients) merge into those of the
        union (:meth:`neurofuse.stats.AdditiveStats.merge`).
        """
        pre, affine = split_affine(fused.levels[level])
        shared = self.shares_inputs(level, models, fused)
        stats = LinearStats(cross=not shared, rows=shared)
        last = level == fused.num_levels - 1
        with torch.no_grad():
            for b in stream:
                x = design_matrix(affine, pre(b.inputs[0]))
                outs = []
                for i, (m, h) in enumerate(zip(models, b.inputs[1:]), start=1):
                    z = m.levels[level](h)
                    if not last:
                        b.keep(i, z)
                    outs.append(flatten_neurons(z, m.axes[level]))
                stats.update(x, torch.cat(outs, dim=1))
        return stats

    def solve_level(self, level: int, models: List[LeveledNet], fused: LeveledNet,
                    stats: LinearStats, k: int, data: Optional[FusionSet]) -> None:
        """Group the level's base neurons and write the fused level's weights, from ``stats``
        (merged over all the data) alone; ``data`` is used only for importance scores (``None``:
        uniform importance is required)."""
        _, affine = split_affine(fused.levels[level])
        last = level == fused.num_levels - 1
        prior = self._prior(level, models, affine) if self.options.prior else None
        sol = stats.solve(self.options.rtol, self.options.ridge, prior)
        widths = [bw[level] for bw in self.base_widths]
        # grouping sees the features in float32, on the fusion device: float64 statistics summed in
        # another order (other batches, shards, ranks) differ in the last bits, which float32
        # rounds away, and K-means is a discrete search that such bits can send elsewhere
        feats = sol.features.float()
        if last:
            grouping = identity_grouping(widths, self.output_level_weights(models, data))
        else:
            grouping = self.group(feats, self.level_scores(models, level, data), widths, k, level)
        self._assign = np.split(grouping.labels, np.cumsum(widths)[:-1])
        if not last:
            self.groupings.append(grouping)
        gw = torch.from_numpy(grouping.weights).to(self.device)
        labels = torch.from_numpy(grouping.labels).to(self.device)
        assign_affine(affine, sol.combine(gw, labels, grouping.k))    # [d, k], float64
        f64 = feats.double()
        t = centroids(f64, gw, labels, grouping.k)
        g_err = float((gw * ((f64 - t[labels]) ** 2).sum(1)).sum())
        r_err = float((gw * sol.residual.to(gw.device)).sum())
        self._k_prev = grouping.k
        self.report.append({"level": level, "rank": sol.rank, "rows": stats.rows,
                            "grouping_error": g_err, "unreachable_error": r_err})
        log.debug("level %d: rank %d, grouping error %.4g, unreachable %.4g", level, sol.rank, g_err, r_err)

    def fuse_level(self, level: int, models: List[LeveledNet], fused: LeveledNet,
                   stream: LevelStream, k: int) -> None:
        stats = self.reduce(self.level_statistics(level, models, fused, stream))
        self.solve_level(level, models, fused, stats, k, stream.data)
        if level < fused.num_levels - 1:
            stream.advance({0: fused.levels[level], **{i: m.levels[level] for i, m in enumerate(models, 1)}})


@register_method("hf-linear")
class HungarianLinearFusion(LinearFusion):
    """Hungarian Linear Fusion: two equal-width models, optimal one-to-one matching, closed-form fit.

    Luenam, Spanopoulos, Sant et al., "Model Fusion via Neuron Interpolation", 2025, section 4.3.
    """

    summary = "Hungarian Linear Fusion (Luenam et al. 2025): 2 models, equal widths, closed form"
    min_models = 2
    max_models = 2
    supports_width = False  # one-to-one matching keeps the models' width

    def group(self, features: torch.Tensor, scores: np.ndarray, widths: Sequence[int], k: int,
              level: int) -> Grouping:
        if k != widths[0]:
            raise IncompatibleModelsError(
                f"'hf-linear' matches neurons one to one, so the fused width must equal the models' "
                f"width {widths[0]} at level {level}, got {k}; use 'kf-linear' to change widths"
            )
        return hungarian_grouping(features, scores, widths)  # only the [k, k] costs go to scipy


@register_method("kf-linear")
class KMeansLinearFusion(LinearFusion):
    """K-means Linear Fusion: N models of any widths, importance-weighted K-means, closed-form fit.

    Luenam, Spanopoulos, Sant et al., "Model Fusion via Neuron Interpolation", 2025, section 4.3.
    """

    summary = "K-means Linear Fusion (Luenam et al. 2025): N models, any widths, closed form"
    Options = KMeansOptions
    min_models = 1

    def group(self, features: torch.Tensor, scores: np.ndarray, widths: Sequence[int], k: int,
              level: int) -> Grouping:
        return kmeans_grouping(features, scores, k, n_init=self.options.n_init,
                               max_iter=self.options.max_iter, seed=self.seed + 7919 * level,
                               refine=self.options.refine)
