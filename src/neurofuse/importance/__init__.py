"""Neuron importance scores (uniform, Conductance, DeepLIFT) for the neurons of a level."""

from ._core import importance_methods, importance_sums, neuron_importance, normalize_scores, register_importance

__all__ = ["importance_methods", "importance_sums", "neuron_importance", "normalize_scores", "register_importance"]
