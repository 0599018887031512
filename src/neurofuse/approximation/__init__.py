"""Fitting a fused level to its targets (paper section 4.3.2): closed form for affine levels."""

from ._linear import LinearSolution, LinearStats, aligned_prior, assign_affine, design_matrix
from ._ridge import FitDiagnostics, fit_warning, gcv_curve

__all__ = ["FitDiagnostics", "LinearSolution", "LinearStats", "aligned_prior", "assign_affine", "design_matrix",
           "fit_warning", "gcv_curve"]
