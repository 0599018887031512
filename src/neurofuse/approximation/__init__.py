"""Fitting a fused level to its targets (paper section 4.3.2): closed form for affine levels."""

from ._gradient import LevelConfig, fit_level, perturb_level
from ._grouped import DepthwiseStats, depthwise_design, group_means
from ._linear import LinearSolution, LinearStats, aligned_prior, assign_affine, design_matrix

__all__ = ["DepthwiseStats", "LevelConfig", "LinearSolution", "LinearStats", "aligned_prior", "assign_affine",
           "depthwise_design", "design_matrix", "fit_level", "group_means", "perturb_level"]
