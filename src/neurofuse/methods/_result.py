"""What one fusion call returns: :class:`FusionResult` (Flower's ``Result``, POT's ``coupling_`` / ``log_``).

A result is a plain record, rebuilt by every call: the fused model, the method, one
:class:`~neurofuse.grouping.Correspondence` per hidden level, the per-level report, what else the
method produced (``extras``: transport plans, permutations, training history) and the steps
applied around the fusion (depth alignment before it; REPAIR, distillation, fine-tuning after
it), each as a :class:`Step`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

from torch import nn

from ..grouping import Correspondence

__all__ = ["FusionResult", "Step"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One step applied around the fusion.

    Attributes
    ----------
    name : str
        ``"depth"`` (levels aligned and balanced before fusing), ``"repair"``, ``"distill"`` or
        ``"finetune"`` (after fusing).
    seconds : float
        Wall-clock time of the step.
    info : mapping
        What the step produced (the depth alignment, a training history, ...).
    """

    name: str
    seconds: float
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FusionResult:
    """The outcome of one fusion call (:meth:`neurofuse.methods.FusionMethod.run`,
    ``neurofuse.fuse(..., return_result=True)``).

    Attributes
    ----------
    model : nn.Module
        The fused model (after every step), in eval mode.
    method : str
        The fusion method's registered name.
    correspondences : tuple of Correspondence
        Per hidden level (every level but the output), which base neurons each fused neuron
        stands for; empty for an output ensemble (nothing is fused) or models without levels; for
        a multi-head model (:class:`~neurofuse.models.MultiHead`), of its shared levels only.
    report : tuple of dict
        One entry per fitted level: what the method measured there (e.g. the rank of the
        closed-form fit, the grouping error, a training history summary).
    extras : mapping
        Anything else the method produced (``"transports"``, ``"permutations"``, ``"history"``).
    steps : tuple of Step
        The steps applied around the fusion, in order.
    seconds : float
        Wall-clock time of the fusion itself (steps not included).
    """

    model: nn.Module
    method: str
    correspondences: Tuple[Correspondence, ...] = ()
    report: Tuple[Mapping[str, Any], ...] = ()
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps: Tuple[Step, ...] = ()
    seconds: float = 0.0

    def step(self, name: str) -> Optional[Step]:
        """The last step called ``name`` (``None`` if it was not applied)."""
        return next((s for s in reversed(self.steps) if s.name == name), None)
