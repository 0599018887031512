"""Neuron importance scores (uniform, Conductance, DeepLIFT) for the neurons of every level."""

from ._core import (
    EPS,
    all_level_importance,
    importance_methods,
    importance_sums,
    neuron_importance,
    normalize_scores,
    register_importance,
)

__all__ = [
    "EPS",
    "all_level_importance",
    "importance_methods",
    "importance_sums",
    "neuron_importance",
    "normalize_scores",
    "register_importance",
]
