"""Grouping the neurons of all base models into the fused model's neurons (paper section 4.3.1)."""

from ._core import (
    OUTPUT_WEIGHTS,
    Grouping,
    centroids,
    hungarian_grouping,
    identity_grouping,
    kmeans_grouping,
    kmeans_memory,
    output_weights,
    weighted_kmeans,
)
from ._correspondence import Correspondence
from ._heads import block_assignment, block_matching_costs, grouped_grouping, grouped_permutation, head_structured_plans, lap_inner, matching_cost
from ._theory import approximation_error, grouping_error, representation_cost
from ._cca import cca_alignment, grouped_cca_alignment
from ._weight_matching import MatchedTensor, WeightMatchingResult, weight_matching
from ._zipit import JointMoments, zip_features, zip_grouped_features, zip_matrices

__all__ = [
    "Correspondence",
    "OUTPUT_WEIGHTS",
    "Grouping",
    "JointMoments",
    "MatchedTensor",
    "WeightMatchingResult",
    "approximation_error",
    "block_assignment",
    "block_matching_costs",
    "cca_alignment",
    "centroids",
    "grouping_error",
    "grouped_cca_alignment",
    "grouped_grouping",
    "grouped_permutation",
    "head_structured_plans",
    "lap_inner",
    "matching_cost",
    "hungarian_grouping",
    "identity_grouping",
    "kmeans_grouping",
    "kmeans_memory",
    "output_weights",
    "representation_cost",
    "weight_matching",
    "weighted_kmeans",
    "zip_features",
    "zip_grouped_features",
    "zip_matrices",
]
