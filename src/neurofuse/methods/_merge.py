"""Merges that read the data only through additive statistics of each model: the template.

RegMean (Gram matrices of every layer's inputs) and Fisher merging (squared per-sample
gradients) combine models of one architecture from one statistic per model.  The statistics are
sums over samples, so the same merge runs on a fusion set in one process or on the sums that
federated clients compute on their own data (:mod:`neurofuse.federated`, with no sample on the
server).  :class:`StatisticsMerge` is the template: :meth:`~StatisticsMerge.merge_inputs` (the
models, aligned onto model 0 first where the method aligns), :meth:`~StatisticsMerge.model_statistics`
(one model's statistics on some data) and :meth:`~StatisticsMerge.merge` (the merged model from
every model's statistics).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, List, Sequence

from torch import nn

from .._fusion_set import FusionSet
from ..errors import ConfigError
from ..stats import AdditiveStats
from ._align import LayoutAlignment, merge_inputs, record_levels
from ._base import FusionMethod, FusionRun

__all__ = ["AlignFirst", "StatisticsMerge"]


class StatisticsMerge(FusionMethod):
    """Template of the merges of models of one architecture from one additive statistic per model.

    :meth:`_fuse` is ``merge(run, nets, [model_statistics(net, run.data) for net in nets])`` with
    ``nets = merge_inputs(run)``; a federated server calls the same three with statistics its
    clients computed (:class:`neurofuse.federated.ModelStatisticsAggregation`).  The method's
    ``align`` option (when it has one: ``"activations"``, ``"weights"``) aligns every model onto
    model 0 first; without one the models are merged as they are (they share an initialisation).
    """

    min_models = 2
    same_architecture = True
    supports_model_statistics = True
    #: the :class:`~neurofuse.stats.AdditiveStats` type of one model's statistics
    ModelStats: ClassVar[type] = AdditiveStats

    @property
    def alignment(self) -> str:
        """How the models are aligned before the merge: ``"none"``, ``"activations"`` or ``"weights"``."""
        return str(getattr(self.options, "align", "none"))

    def check_statistics_only(self) -> None:
        """Refuse, with the option to change, a configuration that needs the samples on the
        server besides the statistics (activation matching)."""
        if self.alignment == "activations":
            raise ConfigError(f"{self.name!r} with align='activations' matches activations on the "
                              "server's fusion data; from client statistics alone use align='weights' "
                              "(weight matching needs no data)")

    def merge_inputs(self, run: FusionRun) -> List[nn.Module]:
        """The models the merge combines (aligned onto model 0 where the method aligns), with the
        correspondence of every hidden level (and of the internal spaces an alignment moved)
        recorded in ``run``."""
        if run.data is None:
            self.check_statistics_only()
        nets, corrs, inner = merge_inputs(run.models, run.data, self.alignment, self.name, seed=self.seed,
                                          device=str(self.device), batch_size=self.batch_size,
                                          memory_budget=self.memory_budget)
        record_levels(run, corrs)
        if inner:   # REPAIR inside transformer levels
            run.extras["inner_correspondences"] = inner
        return nets

    @abstractmethod
    def model_statistics(self, net: nn.Module, data: FusionSet) -> AdditiveStats:
        """``net``'s statistics over ``data`` (sums over its samples: shards add up)."""

    @abstractmethod
    def merge(self, run: FusionRun, nets: Sequence[nn.Module], stats: Sequence[AdditiveStats]) -> nn.Module:
        """The merged model from ``nets`` (:meth:`merge_inputs`) and their statistics over all the data."""

    def _fuse(self, run: FusionRun) -> nn.Module:
        assert run.data is not None
        nets = self.merge_inputs(run)
        return self.merge(run, nets, [self.model_statistics(net, run.data) for net in nets])


class AlignFirst(LayoutAlignment):
    """Mixin of the "align, then merge" classes: level-wise alignment needs one map per neuron
    space at every level (:func:`neurofuse.levels.alignment_reason`; a grouped convolution's
    groups move as units, and the merge then averages or Fisher-weighs its weight as any tensor
    it does not regress); with ``align="weights"`` weight matching's limits apply too (a
    concatenation is refused when the alignment runs)."""

    aligns_grouped = True
