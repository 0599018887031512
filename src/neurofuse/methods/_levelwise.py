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
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import IncompatibleModelsError
from ..grouping import (OUTPUT_WEIGHTS, Grouping, centroids, grouped_grouping, hungarian_grouping, identity_grouping,
                        kmeans_grouping)
from ..approximation import LinearStats, aligned_prior, assign_affine, design_matrix, fit_warning
from ..importance import normalize_scores
from ..levels import (LeveledNet, LevelStream, affine_reason, check_same_levels, flatten_neurons,
                      fold_batchnorm, has_batchnorm, split_affine, unfold_state)
from ..levels._layout import is_depthwise, output_groups
from ._base import FusionMethod, FusionRun, register_method
from ._steps import fit_level_in_steps
from ..levels._transformer import describe as describe_transformer
from ._blockfit import TransformerFit, closed_form_reason
from ._options import Anything, AnyOf, Boolean, Interval, MethodOptions, OneOf, Optional_, option
from ._memory import estimated_by, linear_working_set

__all__ = ["HungarianLinearFusion", "KMeansLinearFusion", "LevelRun", "LevelwiseFusion", "LinearFusion"]

log = logging.getLogger("neurofuse")


class LevelRun(FusionRun):
    """The per-call state of level-wise fusion: :class:`~neurofuse.methods.FusionRun` plus the
    widths and the previous level's assignment of base neurons to fused neurons.

    Attributes
    ----------
    base_widths : list of list of int
        Every base model's level widths.
    widths : list of int
        The fused width of every level.
    prev_labels : list of np.ndarray, optional
        Per base model, the fused neuron of each of its neurons at the level just fitted.
    prev_k : int
        The fused width of the level just fitted.
    """

    def __init__(self, method: FusionMethod, models: Sequence[nn.Module], data: Optional[Any]) -> None:
        super().__init__(method, models, data)
        self.base_widths: List[List[int]] = []
        self.widths: List[int] = []
        self.prev_labels: Optional[List[np.ndarray]] = None
        self.prev_k = 0
        #: the closed-form fit of transformer levels (:mod:`neurofuse.methods._blockfit`): made at
        #: the first level, ``False`` when the model has no transformer level
        self.blocks: Any = None
        #: the grouping the next level must use (a plain level that starts a transformer stream)
        self.forced_grouping: Optional[Grouping] = None


class LevelwiseFusion(FusionMethod):
    """Template for level-by-level neuron interpolation; override :meth:`fuse_level`.

    :meth:`_fuse` checks the models (:meth:`prepare`), resolves the fused widths, and then walks
    the levels from the input with a :class:`~neurofuse.levels.LevelStream` that holds the level
    inputs of the fused model (stream 0) and of every base model (streams ``1..N``), so each model
    runs each level once per fusion batch.  ``fuse_level`` reads the stream and advances it.
    """

    uses_importance = True
    supports_width = True
    fuses_levels = True
    Run = LevelRun

    def prepare(self, nets: List[LeveledNet]) -> List[LeveledNet]:
        """Conversions of the base models before any work (default: none)."""
        return nets

    def _fuse(self, run: FusionRun) -> nn.Module:
        assert isinstance(run, LevelRun) and run.data is not None
        nets, fused, widths = self.setup(run)
        levels = range(fused.num_levels)
        with self.stream(run.data, 1 + len(nets)) as stream:
            for lvl in tqdm(levels, desc=f"fuse {self.name}", disable=not self.progress, leave=False):
                self.fuse_level(run, lvl, nets, fused, stream, widths[lvl])
        return fused

    def setup(self, run: LevelRun) -> "tuple[List[LeveledNet], LeveledNet, List[int]]":
        """Check and prepare the base models and make the fused model, before any level.

        Returns ``(nets, fused, widths)``: the prepared base models, the fused model (model 0's
        architecture at the fused widths, on the fusion device, its levels still to be fitted)
        and the fused width of every level (also kept in ``run``).  Federated fusion
        (:mod:`neurofuse.federated`) calls it on the server and then fits the levels from
        statistics the clients send.
        """
        nets = self.prepare(check_same_levels(list(run.models)))
        base_widths = [m.level_widths() for m in nets]
        widths = self.resolve_widths(base_widths[0])
        for lvl, k in enumerate(widths[:-1]):
            available = sum(bw[lvl] for bw in base_widths)
            if k > available:
                raise IncompatibleModelsError(
                    f"fused width {k} at level {lvl} is larger than the {available} neurons the "
                    "base models have there; choose a smaller width"
                )
        run.base_widths, run.widths = base_widths, widths
        fused = nets[0].clone() if widths == base_widths[0] else nets[0].with_widths(widths[:-1])
        return nets, fused.to(self.device).eval(), widths

    @abstractmethod
    def fuse_level(self, run: LevelRun, level: int, models: List[LeveledNet], fused: LeveledNet,
                   stream: LevelStream, k: int) -> None:
        """Fit ``fused.levels[level]`` (``k`` neurons) to the grouped base outputs, in place, and
        record the level's correspondence (hidden levels) and report in ``run``.

        ``stream`` holds the inputs of level ``level`` of the fused model (stream 0) and of every
        base model (stream ``i + 1``); the method advances every stream past the level.
        """

    def level_scores(self, run: FusionRun, models: Sequence[LeveledNet], level: int) -> np.ndarray:
        """Concatenated importance scores of every base model's neurons at ``level``."""
        scores = []
        for m in models:
            s = run.importance_scores(m)[level]
            if getattr(self.options, "normalize_importance", False):
                s = normalize_scores(s)
            scores.append(s.cpu().numpy())
        return np.concatenate(scores)


@dataclasses.dataclass(frozen=True)
class LinearOptions(MethodOptions):
    """Settings of the closed-form methods.

    Attributes
    ----------
    rtol : float, optional
        Singular values of the design matrix below ``rtol`` times the largest are treated as zero
        (pseudo-inverse).  Default: ``max(rows, d) * eps(float32)``, as ``torch.linalg.pinv``.
    ridge : float or "auto"
        Penalty of each level's least-squares fit: ``"auto"`` (default) chooses it per level by
        generalised cross-validation, ``0`` is the pseudo-inverse (the paper's fit), a number
        fixes it (relative to the mean diagonal of :math:`X^\\top X`).  The fit solves
        :math:`(X^\\top X + \\lambda\\,\\overline{\\mathrm{diag}}\\,I) w = X^\\top a + \\lambda\\,\\overline{\\mathrm{diag}}\\,p`
        (shrunk toward the prior :math:`p`); GCV (Golub, Heath & Wahba 1979) picks
        :math:`\\lambda` from 0 and 41 values in :math:`[10^{-8}, 10^2]` using the level's
        statistics alone (:mod:`neurofuse.approximation._ridge`).  Without it the fit
        interpolates where the fusion set has about as many samples as the level has inputs, and
        the fused model can lose tens of points there.
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
    queries : str
        Attention's queries and keys (transformer levels), which act only through the softmax of
        their products: ``"fit"``, each fitted by least squares to the grouped base queries or
        keys from the fused model's inputs, or ``"align"``, the weighted mean of the weights of
        the base heads and neurons grouped together, in the fused inputs' coordinates (the
        alignment of Imfeld et al., "Transformer Fusion with Optimal Transport", ICLR 2024).
    attention_steps : int
        Gradient steps (Adam) on attention's queries and keys after their closed-form start
        (transformer levels): the attention pattern is not affine in them, so the steps fit them
        through the softmax to the stage's residual target; the values and the output projection
        are then fitted again in closed form given the new pattern.  ``0``: the closed form alone.
    """

    rtol: Optional[float] = option(None, Optional_(Interval(float, 0, closed="neither")))
    ridge: Union[float, str] = option("auto", AnyOf(OneOf("auto"), Interval(float, 0)))
    normalize_importance: bool = option(False, Boolean())
    prior: bool = option(True, Boolean())
    class_weights: Optional[Any] = option(None, Anything("null or an [N, C] array of non-negative weights"))
    output_weights: str = option("importance", OneOf(*OUTPUT_WEIGHTS))
    queries: str = option("fit", OneOf("fit", "align"))
    attention_steps: int = option(0, Interval(int, 0))


@dataclasses.dataclass(frozen=True)
class KMeansOptions(LinearOptions):
    """:class:`LinearOptions` plus K-means restarts (``n_init``), iterations (``max_iter``) and
    Hartigan refinement (``refine``).

    ``refine=True`` runs batched Hartigan single-point moves after Lloyd's iterations
    (:func:`neurofuse.grouping.weighted_kmeans`): about 6 % lower K-means cost on 8 MNIST MLPs
    (2,048 neurons, k = 256), but twice the fusion time and no change in fused accuracy
    (92.09 / 92.03 / 93.06 % with it, 92.11 / 91.95 / 93.07 % without, for 2 / 4 / 8 models;
    docs/results.md), so it is off by default; plain Lloyd with k-means++ restarts is what the
    paper's reference code (scikit-learn) runs.  Re-checked on the validation protocol of
    ``benchmarks/recipe.py`` (24 settings, digits and MNIST): +0.06 point on average, better in 11
    and worse in 6, -0.03 on MNIST; it stays off.

    Attributes
    ----------
    n_init : int
        K-means restarts (k-means++ seeds); the lowest-cost grouping is kept.  Default 3, chosen
        on the validation protocol of ``benchmarks/recipe.py`` (24 settings: digits and MNIST,
        four MLP sizes, 2/4/8-way Dirichlet splits, 3 fusion sets each): 3 restarts scored +0.04
        point against 10 on average (worst -0.22, -0.09 on MNIST; better in 6 settings, worse
        in 6) and 1 restart +0.01 (worst -0.67), while K-means is most of the fusion's time with
        many models (90-95 % from 16 MLPs on; docs/results.md).  scikit-learn's own default
        for k-means++ (``n_init="auto"``) is one run.
    max_iter : int
        Lloyd iterations per restart at most.
    refine : bool
        Batched Hartigan single-point moves after Lloyd's iterations.
    """

    n_init: int = option(3, Interval(int, 1))
    max_iter: int = option(300, Interval(int, 1))
    refine: bool = option(False, Boolean())


@estimated_by(linear_working_set)
class LinearFusion(LevelwiseFusion):
    """Closed-form (Linear) neuron interpolation; subclasses choose the grouping (:meth:`group`)."""

    Options = LinearOptions
    supports_distributed = True
    supports_statistics = True
    checks_models = "first"

    @classmethod
    def check_level(cls, net: nn.Module, index: int) -> Optional[str]:
        """The closed form fits levels that are affine in their parameters after BatchNorm
        folding (:func:`neurofuse.levels.affine_reason`) and transformer levels sub-level by
        sub-level (:mod:`neurofuse.methods._blockfit`); others need gradient steps."""
        why = affine_reason(net, index)
        if why is not None and closed_form_reason(net, index) is None:
            return None
        return why

    @staticmethod
    def one_pass(level: nn.Module) -> bool:
        """Whether ``level`` (BatchNorm folded) is ``[parameter-free ops..., Linear|Conv2d]``,
        fitted from one pass of statistics (:meth:`level_statistics`); the closed form fits other
        levels one layer at a time (:mod:`neurofuse.methods._steps`)."""
        try:
            _, affine = split_affine(level)
        except IncompatibleModelsError:
            return False
        return not is_depthwise(affine) and getattr(affine, "groups", 1) == 1

    def prepare(self, nets: List[LeveledNet]) -> List[LeveledNet]:
        """Fold BatchNorm into the preceding Conv2d/Linear (on copies)."""
        return [fold_batchnorm(m) if has_batchnorm(m) else m for m in nets]  # type: ignore[misc]

    def setup(self, run: LevelRun) -> "tuple[List[LeveledNet], LeveledNet, List[int]]":
        """As :meth:`LevelwiseFusion.setup`; a fused model of other widths (a new model of the
        family) has its BatchNorms folded like the base models'."""
        nets, fused, widths = super().setup(run)
        if has_batchnorm(fused):
            fused = fold_batchnorm(fused)  # type: ignore[assignment]
        return nets, fused, widths

    def _fuse(self, run: FusionRun) -> nn.Module:
        """As :meth:`LevelwiseFusion._fuse`; a model whose class keeps its architecture
        (``keeps_architecture``: a Hugging Face model, whose levels are the wrapped model's own
        modules) gets its BatchNorms back, holding what the folded fit computes
        (:func:`neurofuse.levels.unfold_state`)."""
        fused = super()._fuse(run)
        like = run.models[0]
        if not (getattr(like, "keeps_architecture", False) and has_batchnorm(like)):
            return fused
        out = like.clone().to(self.device)
        out.load_state_dict(unfold_state(fused, out))
        return out.eval()

    @abstractmethod
    def group(self, features: torch.Tensor, scores: np.ndarray, widths: Sequence[int], k: int,
              level: int) -> Grouping:
        """Group the ``M`` base neurons (rows of ``features``, float32 on the fusion device) into
        ``k`` fused neurons."""

    def grouped(self, features: torch.Tensor, scores: np.ndarray, widths: Sequence[int], k: int, level: int,
                groups: int, sigma: Optional[np.ndarray] = None) -> Grouping:
        """:meth:`group`, keeping ``groups`` equal groups of neurons together if ``groups`` (a
        GroupNorm's, a grouped convolution's: :func:`~neurofuse.grouping.grouped_grouping`), the
        groups assigned as ``sigma`` says if given."""
        if not groups:
            return self.group(features, scores, widths, k, level)
        return grouped_grouping(lambda f, w, ws, kk: self.group(f, w, ws, kk, level), features, scores, widths,
                                k, groups, sigma)

    def _prior(self, run: LevelRun, level: int, models: List[LeveledNet], affine: nn.Module) -> Optional[torch.Tensor]:
        """Every base neuron's weights in the fused input coordinates (see :func:`aligned_prior`)."""
        d = affine.weight[0].numel() + (affine.bias is not None)
        priors = []
        for i, m in enumerate(models):
            try:
                _, base_affine = split_affine(m.levels[level])
            except IncompatibleModelsError:
                return None
            if level == 0 or run.prev_labels is None:
                p = aligned_prior(base_affine, None, 0)
            else:
                p = aligned_prior(base_affine, torch.from_numpy(run.prev_labels[i]), run.prev_k)
            if p is None or p.shape[0] != d:
                return None
            priors.append(p)
        return torch.cat(priors, dim=1).to(self.device)

    def shares_inputs(self, level: int, models: List[LeveledNet], fused: LeveledNet) -> bool:
        """Whether the fused and every base model see the same design matrix at ``level`` (the
        first level, with the same input ops and layer geometry) and the options ask for the
        prior's least-squares solution, which is then the base weights themselves: no
        :math:`X^\top A` and no eigendecomposition (:meth:`LinearStats._solve_shared`), whatever
        the ridge (shrinking toward the prior leaves it there); with no
        more samples than design columns the base outputs themselves are the grouping
        coordinates (``LinearStats(rows=True)``) and no Gram matrix is formed."""
        if level != 0 or not self.options.prior:
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
        if describe_transformer(fused.levels[level]) is not None:
            raise _statistics_refusal(level)
        if not self.one_pass(fused.levels[level]):
            raise IncompatibleModelsError(
                f"level {level} is fitted one layer at a time (a residual block, a depthwise "
                "convolution, a concatenation or a softmax head), which one pass of level statistics "
                "does not carry; fuse this model with the data in one place")
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

    def solve_level(self, run: LevelRun, level: int, models: List[LeveledNet], fused: LeveledNet,
                    stats: LinearStats, k: int) -> None:
        """Group the level's base neurons and write the fused level's weights, from ``stats``
        (merged over all the data) alone; ``run.data`` is read only for importance scores (with no
        data, ``run`` must know them: :meth:`FusionRun.set_importance_scores`)."""
        if getattr(run, "blocks", None) is None and TransformerFit.applies(fused):
            raise _statistics_refusal(level)   # statistics only (federated): no stage-by-stage fit
        _, affine = split_affine(fused.levels[level])
        last = level == fused.num_levels - 1
        prior = self._prior(run, level, models, affine) if self.options.prior else None
        sol = stats.solve(self.options.rtol, self.options.ridge, prior)
        widths = [bw[level] for bw in run.base_widths]
        # grouping sees the features in float32, on the fusion device: float64 statistics summed in
        # another order (other batches, shards, ranks) differ in the last bits, which float32
        # rounds away, and K-means is a discrete search that such bits can send elsewhere
        feats = sol.features.float()
        if last:
            grouping = identity_grouping(widths, self.output_level_weights(run, models))
        elif getattr(run, "forced_grouping", None) is not None:   # the grouping of its stream
            grouping, run.forced_grouping = run.forced_grouping, None
        else:
            grouping = self.grouped(feats, self.level_scores(run, models, level), widths, k, level,
                                    output_groups(fused.levels, level))
            run.record(level, grouping.correspondence(widths))
        run.prev_labels = np.split(grouping.labels, np.cumsum(widths)[:-1])
        gw = torch.from_numpy(grouping.weights).to(self.device)
        labels = torch.from_numpy(grouping.labels).to(self.device)
        assign_affine(affine, sol.combine(gw, labels, grouping.k))    # [d, k], float64
        f64 = feats.double()
        t = centroids(f64, gw, labels, grouping.k)
        g_err = float((gw * ((f64 - t[labels]) ** 2).sum(1)).sum())
        r_err = float((gw * sol.residual.to(gw.device)).sum())
        run.prev_k = grouping.k
        fit = sol.diagnostics
        run.report.append({"level": level, "rank": sol.rank, "rows": stats.rows,
                           "grouping_error": g_err, "unreachable_error": r_err,
                           # condition number, effective degrees of freedom, penalty (None: the
                           # first level's exact solution, which no penalty changes)
                           **(dataclasses.asdict(fit) if fit is not None else
                              {"columns": None, "condition": None, "penalty": 0.0, "dof": None})})
        log.debug("level %d: rank %d, grouping error %.4g, unreachable %.4g", level, sol.rank, g_err, r_err)
        warning = fit_warning(fit, self.options.ridge) if fit is not None else None
        if warning:
            log.warning("level %d: %s", level, warning)

    def fuse_level(self, run: LevelRun, level: int, models: List[LeveledNet], fused: LeveledNet,
                   stream: LevelStream, k: int) -> None:
        if run.blocks is None:
            run.blocks = TransformerFit(self, run, models, fused) if TransformerFit.applies(fused) else False
        if run.blocks:
            if run.blocks.handles(level):     # a transformer level: stage by stage
                run.blocks.fit_level(level, stream, k)
                return
            if run.blocks.starts_stream(level):
                run.forced_grouping = run.blocks.stream_grouping(level, stream, k)
        if not self.one_pass(fused.levels[level]):
            fit_level_in_steps(self, run, level, models, fused, stream)
            return
        stats = self.reduce(self.level_statistics(level, models, fused, stream))
        self.solve_level(run, level, models, fused, stats, k)
        if level < fused.num_levels - 1:
            stream.advance({0: fused.levels[level], **{i: m.levels[level] for i, m in enumerate(models, 1)}})


def _statistics_refusal(level: int) -> IncompatibleModelsError:
    return IncompatibleModelsError(
        f"level {level} belongs to a transformer: its closed form fits one sub-level after the other "
        "from the fused model's values, which one round of level statistics does not carry; fuse "
        "transformers where the fusion data is (kf-linear, also distributed) or with kf-gradient")


@register_method("hf-linear")
class HungarianLinearFusion(LinearFusion):
    """Hungarian Linear Fusion: two equal-width models, optimal one-to-one matching, closed-form fit.

    Luenam, Spanopoulos, Sant et al., "Model Fusion via Neuron Interpolation", 2025, section 4.3.
    """

    summary = "Hungarian Linear Fusion (Luenam et al. 2025): 2 models, equal widths, closed form"
    label = "HF Linear"
    order = 60
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

    def grouped(self, features: torch.Tensor, scores: np.ndarray, widths: Sequence[int], k: int, level: int,
                groups: int, sigma: Optional[np.ndarray] = None) -> Grouping:
        if groups and (len(set(widths)) > 1 or k != widths[0]):
            return self.group(features, scores, widths, k, level)   # refuses, naming the whole widths
        return super().grouped(features, scores, widths, k, level, groups, sigma)


@register_method("kf-linear")
class KMeansLinearFusion(LinearFusion):
    """K-means Linear Fusion: N models of any widths, importance-weighted K-means, closed-form fit.

    Luenam, Spanopoulos, Sant et al., "Model Fusion via Neuron Interpolation", 2025, section 4.3.
    """

    summary = "K-means Linear Fusion (Luenam et al. 2025): N models, any widths, closed form"
    label = "KF Linear"
    order = 70
    Options = KMeansOptions
    min_models = 1

    def group(self, features: torch.Tensor, scores: np.ndarray, widths: Sequence[int], k: int,
              level: int) -> Grouping:
        return kmeans_grouping(features, scores, k, n_init=self.options.n_init,
                               max_iter=self.options.max_iter, seed=self.seed + 7919 * level,
                               refine=self.options.refine)
