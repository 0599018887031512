"""Fitting a fused level to its targets (paper section 4.3.2): closed form for affine levels."""

from ._blocks import GramStats, NeuronRegression, RowScale, TokenSums, norm_units, normalise
from ._fisher import FISHER_KINDS, FisherSums, diagonal_fisher, fisher_merge, fisher_sums
from ._gradient import LevelConfig, fit_level, perturb_level
from ._grouped import DepthwiseStats, depthwise_design, group_means
from ._linear import (LinearSolution, LinearStats, aligned_prior, assign_affine, design_matrix, fold_layernorm,
                      reset_layernorm)
from ._regmean import LayerGrams, is_conv1d, layer_rows, regmean
from ._ridge import FitDiagnostics, fit_warning, gcv_curve

__all__ = ["DepthwiseStats", "FISHER_KINDS", "FisherSums", "FitDiagnostics", "GramStats", "LayerGrams",
           "LevelConfig", "LinearSolution", "LinearStats", "NeuronRegression", "RowScale", "TokenSums",
           "aligned_prior", "assign_affine", "depthwise_design", "design_matrix", "diagonal_fisher", "fisher_merge",
           "fisher_sums", "fit_level", "fit_warning", "fold_layernorm", "gcv_curve", "group_means", "is_conv1d",
           "layer_rows", "norm_units", "normalise", "perturb_level", "regmean", "reset_layernorm"]
