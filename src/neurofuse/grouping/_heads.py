"""Head-structured assignments: neurons that come in equal heads moving as units (attention).

Used by every alignment of transformer levels (OTFusion, Git Re-Basin activation and weight
matching): an attention's query/key and value/output spaces share one assignment of heads, and
inside a matched pair of heads each space's neurons get their own.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["InnerSolve", "grouped_permutation", "head_structured_plans", "lap_inner"]

#: ``inner(cost_block) -> (plan, cost)``: the within-head problem of one pair of heads
InnerSolve = Callable[[np.ndarray], Tuple[np.ndarray, float]]


def head_structured_plans(costs: Sequence[np.ndarray], heads: int, inner: InnerSolve
                          ) -> Tuple[List[np.ndarray], np.ndarray]:
    r"""Plans ``[n_k, n_0]`` for spaces whose neurons come in ``heads`` equal heads that move as
    units, sharing one assignment of heads.

    ``costs[s]`` is the ``[n_k, n_0]`` cost between the neurons of model :math:`k` and those of
    the anchor in space :math:`s` (e.g. ``qk`` and ``vo`` of one attention).  For every pair of
    heads :math:`(a, b)` and space :math:`s`, ``inner`` solves the within-head problem on the
    block :math:`C^s_{ab}` and returns its plan (total mass 1) and cost :math:`c^s_{ab}`; heads
    are then assigned one to one by the Hungarian algorithm on :math:`\sum_s c^s_{ab}`, and each
    space's plan is block-structured: the within-head plan of the chosen pair, scaled by
    ``1/heads``, in head :math:`a`'s rows and head :math:`b`'s columns.  Returns the plans and
    the head assignment ``sigma`` (``sigma[b]`` = model :math:`k`'s head matched to anchor head
    :math:`b`).
    """
    blocks = []
    total = np.zeros((heads, heads))
    for c in costs:
        nk, n0 = c.shape
        if nk % heads or n0 % heads:
            raise ValueError(f"{nk} and {n0} neurons do not split into {heads} heads")
        dk, d0 = nk // heads, n0 // heads
        sub: Dict[Tuple[int, int], np.ndarray] = {}
        for a in range(heads):
            for b in range(heads):
                plan, cost = inner(c[a * dk:(a + 1) * dk, b * d0:(b + 1) * d0])
                sub[a, b] = plan
                total[a, b] += cost
        blocks.append((sub, dk, d0, c.shape))
    rows, cols = linear_sum_assignment(total)
    sigma = np.empty(heads, dtype=np.int64)
    sigma[cols] = rows
    plans = []
    for sub, dk, d0, shape in blocks:
        plan = np.zeros(shape)
        for b in range(heads):
            a = sigma[b]
            plan[a * dk:(a + 1) * dk, b * d0:(b + 1) * d0] = sub[a, b] / heads
        plans.append(plan)
    return plans, sigma


def lap_inner(c: np.ndarray) -> Tuple[np.ndarray, float]:
    """The within-head problem as a one-to-one matching (Hungarian): the plan (mass 1) and its
    cost."""
    rows, cols = linear_sum_assignment(c)
    plan = np.zeros_like(c)
    plan[rows, cols] = 1.0 / len(rows)
    return plan, float(c[rows, cols].sum())


def grouped_permutation(cost: np.ndarray, groups: int) -> np.ndarray:
    """``perm[j]``: the column matched to row ``j`` by the cheapest one-to-one matching that keeps
    ``groups`` equal contiguous groups of rows and of columns together (a GroupNorm's groups):
    the Hungarian algorithm inside every pair of groups, then on the groups
    (:func:`head_structured_plans`)."""
    plans, _ = head_structured_plans([cost], groups, lap_inner)
    return plans[0].argmax(1)
