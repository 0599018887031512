r"""Fisher merging, plain (shared initialisation) and "align, then merge".

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.  The Fisher and
the weighted average are :func:`neurofuse.approximation.diagonal_fisher` and
:func:`neurofuse.approximation.fisher_merge`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import List, Optional

from torch import nn

from .._fusion_set import FusionSet
from ..approximation import FISHER_KINDS, diagonal_fisher, fisher_merge
from ..errors import ConfigError
from ._align import ALIGNMENTS, merge_inputs
from ._base import FusionMethod, register_method

__all__ = ["AlignedFisherMerging", "AlignedFisherOptions", "FisherMerging", "FisherOptions"]


@dataclasses.dataclass(frozen=True)
class FisherOptions:
    """Settings of :class:`FisherMerging`.

    Attributes
    ----------
    fisher : str
        ``"expected"``: the Fisher's expectation over the labels taken exactly under each model's
        predictions (no labels needed); ``"empirical"``: at the fusion set's labels.
    fisher_floor : float
        Added to every Fisher entry, so that parameters no sample moves are averaged plainly.
    align : str
        ``"none"``: merge the models as they are (they share an initialisation, the paper's
        setting); ``"activations"``: first permute every model onto model 0 by Git Re-Basin
        activation matching; ``"weights"``: by weight matching.
    """

    fisher: str = "expected"
    fisher_floor: float = 1e-6
    align: str = "none"

    def __post_init__(self) -> None:
        if self.fisher not in FISHER_KINDS:
            raise ConfigError(f"fisher must be one of {list(FISHER_KINDS)}, got {self.fisher!r}")
        if not self.fisher_floor > 0:
            raise ConfigError(f"fisher_floor must be positive, got {self.fisher_floor}")
        if self.align not in ALIGNMENTS:
            raise ConfigError(f"align must be one of {list(ALIGNMENTS)}, got {self.align!r}")


@register_method("fisher")
class FisherMerging(FusionMethod):
    r"""Fisher merging: every parameter averaged with each model's diagonal Fisher information.

    :math:`\theta = \sum_k (F_k + \epsilon)\,\theta_k / \sum_k (F_k + \epsilon)` element by
    element, with :math:`F_k` the diagonal Fisher of model :math:`k` on the fusion set
    (:func:`neurofuse.approximation.diagonal_fisher`, per-sample gradients, the expectation over
    the classes exact by default); buffers (BatchNorm running statistics) are averaged.  Fisher
    merging assumes the models share an initialisation (the paper merges fine-tuned copies of
    one model): ``align="none"`` merges them as they are, any architecture of identical shapes.
    For independently initialised models use ``align="activations"`` (the registered
    ``fisher-aligned``) or ``align="weights"``: every model is first permuted onto model 0, then
    merged.

    After fusing, :attr:`groupings` holds (for leveled models), per hidden level, the ``[n, N n]``
    matrix with ``1/N`` at each model's neuron merged into fused neuron ``j``.

    References
    ----------
    Matena, M., & Raffel, C. (2022). Merging Models with Fisher-Weighted Averaging. NeurIPS 2022.
    """

    summary = "Fisher merging (Matena & Raffel 2022): diagonal-Fisher-weighted average; shared init, no alignment"
    Options = FisherOptions
    min_models = 2

    def _fuse(self, models: List[nn.Module], data: Optional[FusionSet]) -> nn.Module:
        assert data is not None
        nets, self.groupings = merge_inputs(models, data, self.options.align, self.name, seed=self.seed,
                                            device=str(self.device), batch_size=self.batch_size,
                                            memory_budget=self.memory_budget)
        fishers = [diagonal_fisher(net, data.batches(self.device), self.options.fisher) for net in nets]
        merged = fisher_merge([net.state_dict() for net in nets], fishers, self.options.fisher_floor)
        fused = copy.deepcopy(nets[0])
        fused.load_state_dict(merged)
        return fused


@dataclasses.dataclass(frozen=True)
class AlignedFisherOptions(FisherOptions):
    """Settings of :class:`AlignedFisherMerging` (:class:`FisherOptions`, aligned by default).

    Attributes
    ----------
    align : str
        ``"activations"`` (Git Re-Basin activation matching onto model 0, the default) or
        ``"weights"`` (weight matching).
    """

    align: str = "activations"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.align == "none":
            raise ConfigError("fisher-aligned aligns first: align must be 'activations' or 'weights' "
                              "(use method 'fisher' for models that share an initialisation)")


@register_method("fisher-aligned")
class AlignedFisherMerging(FisherMerging):
    """Fisher merging after aligning every model to model 0 ("align, then merge"): for
    independently initialised models of equal widths.  See :class:`FisherMerging`."""

    summary = "Fisher merging after Git Re-Basin alignment to model 0 (align, then merge): independent inits"
    Options = AlignedFisherOptions
