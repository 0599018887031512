"""Fitting a fused level to its targets (paper section 4.3.2): closed form for affine levels."""

from ._fisher import FISHER_KINDS, diagonal_fisher, fisher_merge
from ._linear import LinearSolution, LinearStats, aligned_prior, assign_affine, design_matrix
from ._regmean import InputGram, layer_rows, regmean

__all__ = ["FISHER_KINDS", "InputGram", "LinearSolution", "LinearStats", "aligned_prior", "assign_affine",
           "design_matrix", "diagonal_fisher", "fisher_merge", "layer_rows", "regmean"]
