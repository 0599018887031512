r"""Fisher merging, plain (shared initialisation) and "align, then merge".

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.  The Fisher and
the weighted average are :func:`neurofuse.approximation.fisher_sums` and
:func:`neurofuse.approximation.fisher_merge`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

from torch import nn

from .._fusion_set import FusionSet
from ..approximation import FISHER_KINDS, FisherSums, fisher_merge, fisher_sums
from ..errors import DataError
from ._memory import estimated_by, fisher_working_set
from ._base import FusionRun, register_method
from ._merge import AlignFirst, StatisticsMerge
from ._options import Interval, MethodOptions, OneOf, option

__all__ = ["AlignedFisherMerging", "AlignedFisherOptions", "FisherMerging", "FisherOptions"]


@dataclasses.dataclass(frozen=True)
class FisherOptions(MethodOptions):
    """Settings of :class:`FisherMerging`.

    Attributes
    ----------
    fisher : str
        ``"expected"``: the Fisher's expectation over the labels taken exactly under each model's
        predictions (no labels needed); ``"empirical"``: at the fusion set's labels.
    fisher_floor : float
        Added to every Fisher entry, so that parameters no sample moves are averaged plainly.
    """

    fisher: str = option("expected", OneOf(*FISHER_KINDS))
    fisher_floor: float = option(1e-6, Interval(float, 0, closed="neither"))


@register_method("fisher")
@estimated_by(fisher_working_set)
class FisherMerging(StatisticsMerge):
    r"""Fisher merging: every parameter averaged with each model's diagonal Fisher information.

    :math:`\theta = \sum_k (F_k + \epsilon)\,\theta_k / \sum_k (F_k + \epsilon)` element by
    element, with :math:`F_k` the diagonal Fisher of model :math:`k` on the fusion set
    (:func:`neurofuse.approximation.fisher_sums`, per-sample gradients, the expectation over
    the classes exact by default); buffers (BatchNorm running statistics) are averaged.  Fisher
    merging assumes the models share an initialisation (the paper merges fine-tuned copies of
    one model): ``fisher`` merges them as they are, any architecture of identical shapes.  For
    independently initialised models use ``fisher-aligned``: every model is first permuted onto
    model 0, then merged.  The Fisher is a mean of per-sample terms, so a federated server
    merges from the sums its clients compute (:mod:`neurofuse.federated`).

    References
    ----------
    Matena, M., & Raffel, C. (2022). Merging Models with Fisher-Weighted Averaging. NeurIPS 2022.
    """

    summary = "Fisher merging (Matena & Raffel 2022): diagonal-Fisher-weighted average; shared init, no alignment"
    label = "Fisher merging"
    order = 14
    Options = FisherOptions
    ModelStats = FisherSums

    def model_statistics(self, net: nn.Module, data: FusionSet) -> FisherSums:
        """The sums of ``net``'s squared per-sample gradients over ``data`` (every parameter)."""
        if self.options.fisher == "empirical" and data.y is None:
            raise DataError("fisher='empirical' needs labels in the fusion set; pass (x, y) or use 'expected'")
        return fisher_sums(net, data.batches(self.device), self.options.fisher)

    def merge(self, run: FusionRun, nets: Sequence[nn.Module], stats: Sequence[FisherSums]) -> nn.Module:
        """The Fisher-weighted average; each model's Fisher is scaled by its sample count over the
        mean count: 1 when every model's Fisher comes from one fusion set, its client's share of
        the data when each comes from its own client's data (as FedFisher weighs them)."""
        names = [n for n, _ in nets[0].named_parameters()]
        counts = [float(s.count) for s in stats]
        mean = sum(counts) / len(counts)
        fishers = [{k: v * (n / mean) for k, v in s.fisher(names).items()} for s, n in zip(stats, counts)]
        merged = fisher_merge([net.state_dict() for net in nets], fishers, self.options.fisher_floor)
        fused = copy.deepcopy(nets[0])
        fused.load_state_dict(merged)
        return fused


@dataclasses.dataclass(frozen=True)
class AlignedFisherOptions(FisherOptions):
    """Settings of :class:`AlignedFisherMerging` (:class:`FisherOptions` and the alignment).

    Attributes
    ----------
    align : str
        ``"activations"`` (Git Re-Basin activation matching onto model 0 on the fusion set, the
        default) or ``"weights"`` (weight matching: no data for the alignment, so it also
        works from federated clients' statistics).
    """

    align: str = option("activations", OneOf("activations", "weights"))


@register_method("fisher-aligned")
class AlignedFisherMerging(AlignFirst, FisherMerging):
    """Fisher merging after aligning every model to model 0 ("align, then merge"): for
    independently initialised models of equal widths.  See :class:`FisherMerging`."""

    summary = "Fisher merging after Git Re-Basin alignment to model 0 (align, then merge): independent inits"
    label = "Fisher merging (aligned)"
    order = 56
    Options = AlignedFisherOptions
