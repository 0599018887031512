"""Fitting a fused level to its targets (paper section 4.3.2): closed form for affine levels."""

from ._blocks import GramStats, NeuronRegression, TokenSums
from ._gradient import LevelConfig, fit_level, perturb_level
from ._linear import LinearSolution, LinearStats, aligned_prior, assign_affine, design_matrix

__all__ = ["GramStats", "LevelConfig", "LinearSolution", "LinearStats", "NeuronRegression", "TokenSums",
           "aligned_prior", "assign_affine", "design_matrix", "fit_level", "perturb_level"]
