"""Head-structured assignments: neurons that come in equal heads moving as units (attention).

Used by every alignment of transformer levels (OTFusion, Git Re-Basin activation and weight
matching): an attention's query/key and value/output spaces share one assignment of heads, and
inside a matched pair of heads each space's neurons get their own.  The closed form groups a
space normalised by a GroupNorm of several groups the same way (:func:`grouped_grouping`).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ._core import Grouping

__all__ = ["InnerSolve", "block_assignment", "block_matching_costs", "grouped_grouping", "grouped_permutation", "head_structured_plans", "lap_inner",
           "matching_cost"]

#: ``inner(cost_block) -> (plan, cost)``: the within-head problem of one pair of heads; with
#: marginals, ``inner(cost_block, mu_block, nu_block)`` (each summing to one)
InnerSolve = Callable[..., Tuple[np.ndarray, float]]


def head_structured_plans(costs: Sequence[np.ndarray], heads: int, inner: InnerSolve,
                          sigma: Optional[np.ndarray] = None,
                          marginals: Optional[Tuple[np.ndarray, np.ndarray]] = None
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
    :math:`b`).  Given ``sigma`` (an assignment fixed elsewhere: the groups of a grouped
    convolution's output follow those of its input), only the within-head problems of its pairs
    are solved.  Given ``marginals`` :math:`(\mu, \nu)` (one space's neuron weights, e.g.
    importance scores), each within-head problem takes its heads' shares of them, normalised, and
    the chosen pair's plan is scaled by anchor head :math:`b`'s mass :math:`\sum_{j\in b}\nu_j`
    instead of ``1/heads``, so the plan's column sums are :math:`\nu` (its row sums are
    :math:`\mu` inside every head, up to the heads' masses).
    """
    blocks = []
    total = np.zeros((heads, heads))
    pairs = ([(a, b) for a in range(heads) for b in range(heads)] if sigma is None
             else [(int(a), b) for b, a in enumerate(sigma)])
    for c in costs:
        nk, n0 = c.shape
        if nk % heads or n0 % heads:
            raise ValueError(f"{nk} and {n0} neurons do not split into {heads} heads")
        dk, d0 = nk // heads, n0 // heads
        sub: Dict[Tuple[int, int], np.ndarray] = {}
        for a, b in pairs:
            block = c[a * dk:(a + 1) * dk, b * d0:(b + 1) * d0]
            if marginals is None:
                plan, cost = inner(block)
            else:
                mu, nu = (np.asarray(w, dtype=np.float64) for w in marginals)
                plan, cost = inner(block, _share(mu[a * dk:(a + 1) * dk]), _share(nu[b * d0:(b + 1) * d0]))
            sub[a, b] = plan
            total[a, b] += cost
        blocks.append((sub, dk, d0, c.shape))
    if sigma is None:
        rows, cols = linear_sum_assignment(total)
        sigma = np.empty(heads, dtype=np.int64)
        sigma[cols] = rows
    plans = []
    for sub, dk, d0, shape in blocks:
        plan = np.zeros(shape)
        for b in range(heads):
            a = sigma[b]
            mass = 1.0 / heads if marginals is None else float(np.sum(marginals[1][b * d0:(b + 1) * d0]))
            plan[a * dk:(a + 1) * dk, b * d0:(b + 1) * d0] = sub[a, b] * mass
        plans.append(plan)
    return plans, sigma


def _share(w: np.ndarray) -> np.ndarray:
    """``w`` normalised to sum to one (uniform if it sums to zero)."""
    total = float(w.sum())
    return w / total if total > 0 else np.full(len(w), 1.0 / len(w))


def lap_inner(c: np.ndarray) -> Tuple[np.ndarray, float]:
    """The within-head problem as a one-to-one matching (Hungarian): the plan (mass 1) and its
    cost."""
    rows, cols = linear_sum_assignment(c)
    plan = np.zeros_like(c)
    plan[rows, cols] = 1.0 / len(rows)
    return plan, float(c[rows, cols].sum())


def grouped_permutation(cost: np.ndarray, groups: int, sigma: Optional[np.ndarray] = None) -> np.ndarray:
    """``perm[j]``: the column matched to row ``j`` by the cheapest one-to-one matching that keeps
    ``groups`` equal contiguous groups of rows and of columns together (a GroupNorm's groups):
    the Hungarian algorithm inside every pair of groups, then on the groups
    (:func:`head_structured_plans`); inside the pairs of groups ``sigma`` if given (``sigma[b]``:
    the group of rows matched to the group of columns ``b``)."""
    plans, _ = head_structured_plans([cost], groups, lap_inner, sigma)
    return plans[0].argmax(1)


def block_assignment(plan: np.ndarray, groups: int) -> np.ndarray:
    """The assignment of groups of a group-structured plan ``[n, m]``: ``sigma[b]`` is the group of
    rows whose block in the group of columns ``b`` holds that group's mass (the inverse of
    :func:`head_structured_plans`' construction).

    Raises
    ------
    ValueError
        If the plan moves a group of columns from more than one group of rows.
    """
    plan = np.abs(np.asarray(plan, dtype=np.float64))
    n, m = plan.shape
    if n % groups or m % groups:
        raise ValueError(f"a plan of {n} x {m} neurons does not split into {groups} groups")
    mass = plan.reshape(groups, n // groups, groups, m // groups).sum(axis=(1, 3))   # [row group, column group]
    sigma = mass.argmax(0)
    spill = mass.sum(0) - mass[sigma, np.arange(groups)]
    if np.any(spill > 1e-9 * max(float(mass.sum()), 1e-300)) or len(set(sigma.tolist())) != groups:
        raise ValueError(f"the plan does not move its {groups} groups as units")
    return sigma


def matching_cost(a: Tensor, b: Tensor) -> float:
    """The cost of the best one-to-one matching of the rows of ``a`` and ``b`` (squared
    distances; ``min(len(a), len(b))`` pairs)."""
    return float(block_matching_costs(a, b, 1)[0, 0])


def block_matching_costs(a: Tensor, b: Tensor, groups: int) -> np.ndarray:
    """``cost[p, q]``: :func:`matching_cost` of the ``p``-th of ``groups`` equal contiguous blocks
    of rows of ``a`` and the ``q``-th of ``b`` (one distance matrix for all pairs of blocks)."""
    d = torch.cdist(a.double(), b.double()).pow(2).cpu().numpy()
    da, db = len(a) // groups, len(b) // groups
    cost = np.zeros((groups, groups))
    for p in range(groups):
        for q in range(groups):
            block = d[p * da:(p + 1) * da, q * db:(q + 1) * db]
            r, c = linear_sum_assignment(block)
            cost[p, q] = block[r, c].sum()
    return cost


#: ``group(points, weights, widths, k) -> Grouping``: a grouping of some base neurons
GroupSolve = Callable[[Tensor, np.ndarray, List[int], int], Grouping]


def grouped_grouping(group: GroupSolve, points: Tensor, weights: np.ndarray, widths: Sequence[int], k: int,
                     groups: int, sigma: Optional[np.ndarray] = None) -> Grouping:
    r"""Group the :math:`M = \sum_i n_i` base neurons (rows of ``points``, model by model) into
    ``k`` fused neurons, keeping ``groups`` equal contiguous groups of every model's neurons
    together (a GroupNorm's groups: a fused neuron's members all sit in one group per model and
    fused group :math:`b` holds neurons :math:`b k/g \ldots (b+1) k/g - 1`).

    Every model's groups are matched one to one to model 0's by the Hungarian algorithm on the
    cost of the best one-to-one matching of their neurons' points (:func:`matching_cost`, as
    attention heads are), unless ``sigma`` (``[N, groups]``: ``sigma[i, b]`` is model ``i``'s group
    that goes to fused group ``b``) fixes them; then ``group`` groups the neurons of each matched
    set of groups into ``k / groups`` fused neurons.
    """
    if k % groups or any(w % groups for w in widths):
        raise ValueError(f"widths {list(widths)} and {k} fused neurons do not split into {groups} groups")
    offs = np.cumsum([0] + list(widths))
    size = [w // groups for w in widths]

    def rows(i: int, a: int) -> np.ndarray:
        return np.arange(offs[i] + a * size[i], offs[i] + (a + 1) * size[i])

    if sigma is None:
        sigma = np.zeros((len(widths), groups), dtype=np.int64)
        sigma[0] = np.arange(groups)
        for i in range(1, len(widths)):
            cost = block_matching_costs(points[offs[i]:offs[i + 1]], points[offs[0]:offs[1]], groups)
            r, c = linear_sum_assignment(cost)
            sigma[i, c] = r
    labels = np.zeros(int(offs[-1]), dtype=np.int64)
    out_w = np.zeros(int(offs[-1]))
    kg = k // groups
    for b in range(groups):
        idx = np.concatenate([rows(i, int(sigma[i, b])) for i in range(len(widths))])
        g = group(points[torch.from_numpy(idx).to(points.device)], weights[idx], size, kg)
        labels[idx] = b * kg + g.labels
        out_w[idx] = g.weights
    return Grouping(labels, k, out_w)
