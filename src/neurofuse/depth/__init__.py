"""Fusing models of different depths: cross-layer alignment and depth balancing (CLAFusion).

Nguyen, Nguyen, Ho, Nguyen and Than, "On Cross-Layer Alignment for Model Fusion of Heterogeneous
Neural Networks", ICASSP 2023.  Reimplemented from the paper.

1. :func:`level_cost_matrix`: a level-to-level dissimilarity (``1 - linear CKA`` or a Euclidean
   comparison of sample-distance matrices) between two models, from their level outputs on the
   fusion set.
2. :func:`align_levels`: the optimal monotone alignment of the shallower model's levels onto the
   deeper model's levels by dynamic programming in ``O(m n)``.
3. :func:`insert_identity_levels` (``balance="add"``) / :func:`merge_levels` (``"merge"``): bring a
   model to the reference depth without changing its function.
4. :func:`align_models`: all of it for N models against a reference; then fuse with any method:

>>> balanced, info = align_models([deep, shallow], (x, y), balance="add")  # doctest: +SKIP
>>> fused = neurofuse.fuse(balanced, (x, y), method="kf-linear")           # doctest: +SKIP
"""

from ._align import (
    BALANCE,
    DepthAlignment,
    PairAlignment,
    align_levels,
    align_models,
    alignment_cost,
    alignment_report,
    plot_cost_matrix,
)
from ._balance import (
    SequentialNet,
    groups_of,
    identity_level,
    insert_identity_levels,
    is_idempotent,
    leading_activation,
    merge_affine,
    merge_levels,
)
from ._cka import (
    METRICS,
    centered_gram,
    cka_dissimilarity,
    level_cost_matrix,
    level_features,
    level_grams,
    linear_cka,
)

__all__ = [
    "BALANCE",
    "DepthAlignment",
    "METRICS",
    "PairAlignment",
    "SequentialNet",
    "align_levels",
    "align_models",
    "alignment_cost",
    "alignment_report",
    "centered_gram",
    "cka_dissimilarity",
    "groups_of",
    "identity_level",
    "insert_identity_levels",
    "is_idempotent",
    "leading_activation",
    "level_cost_matrix",
    "level_features",
    "level_grams",
    "linear_cka",
    "merge_affine",
    "merge_levels",
    "plot_cost_matrix",
]
