r"""Git Re-Basin weight matching: the neuron permutations of one network from the weights alone.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023, section 3.2 ("weight matching").

Problem
-------
Two networks :math:`A` and :math:`B` of one architecture are written as tensors
:math:`t = 1..T`, each viewed as a 3-D array :math:`[d_0, d_1, r]`: axis 0 (a layer's output
neurons), axis 1 (its input neurons; size 1 for vectors) and the rest (kernel taps, or the spatial
positions of a linear layer after a flattened feature map).  Each of the two neuron axes belongs
to a *permutation group* :math:`g_0(t), g_1(t)` (or to none: the network's input and output are
not permuted); every group :math:`g` has a permutation :math:`\pi_g` of its :math:`n_g` neurons.
Weight matching maximises the inner product of :math:`A` with the permuted :math:`B`,

.. math:: \max_{\pi_1,\dots,\pi_G}\; \sum_t \sum_{i,j,r} A_t[i,j,r]\;
          B_t[\pi_{g_0(t)}(i),\, \pi_{g_1(t)}(j),\, r]
          \;=\; \max_\pi \sum_t \langle A_t,\; P_{g_0} B_t P_{g_1}^\top\rangle,

which is :math:`\min_\pi \sum_t \lVert A_t - P_{g_0} B_t P_{g_1}^\top\rVert_F^2` (the norms do
not depend on :math:`\pi`).  It is NP-hard in general; with every permutation but
:math:`\pi_g` fixed it is the linear assignment problem

.. math:: \max_{\pi_g} \sum_i C^{(g)}_{i,\pi_g(i)}, \qquad
          C^{(g)} = \sum_{t:\,g_0(t)=g} A_t^{(0)} \bigl(B_t^{\pi}\bigr)^{(0)\top}
                  + \sum_{t:\,g_1(t)=g} A_t^{(1)} \bigl(B_t^{\pi}\bigr)^{(1)\top},

where :math:`X^{(a)}` unfolds a tensor along axis :math:`a` (``[n_g, rest]``) and
:math:`B_t^{\pi}` is :math:`B_t` with its *other* axis permuted by the current permutation.
The paper's algorithm is coordinate descent: visit the groups in a random order, solve each
assignment exactly (``scipy.optimize.linear_sum_assignment``, Crouse 2016), keep a new
permutation only if it raises the objective, and stop after a sweep that changes nothing.
Here the first sweep visits the groups in their numbering (from the input, when the caller numbers
them in forward order) and uses only the terms whose other axis is unpermuted or already matched
in that sweep: a greedy start, like matching layer by layer, instead of terms that read
permutations still at the identity.  The later sweeps are the paper's.

Cost
----
A term :math:`A_t^{(a)} (B_t^{\pi})^{(a)\top}` costs :math:`2\,\mathrm{numel}(A_t)\,n_g` flops and
depends only on the permutation of the tensor's other axis.  :func:`weight_matching` keeps every
term and, when that permutation changed, updates it with the changed positions only
(:math:`\Delta = A_{:,J}\,(B_{:,\pi'(J)} - B_{:,\pi(J)})^\top`), and skips the assignment of a
group none of whose terms changed since it was last solved (the answer would be the same).  So a
sweep costs a full pass over the weights only while the permutations still change everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..errors import ConfigError
from ._heads import head_structured_plans

__all__ = ["MatchedTensor", "WeightMatchingResult", "weight_matching"]

log = logging.getLogger("neurofuse")

#: below this fraction of changed positions a term is updated, above it recomputed
_INCREMENTAL = 0.5


@dataclasses.dataclass(frozen=True)
class MatchedTensor:
    """One tensor of the two networks, as a 3-D array ``[d0, d1, rest]``.

    Attributes
    ----------
    a, b : Tensor
        The tensor of network A and of network B, shape ``[d0, d1, rest]`` (``d1 = rest = 1``
        for a vector).
    axis0, axis1 : int or None
        The permutation group of axis 0 and of axis 1 (``None``: the axis is not permuted).
    """

    a: Tensor
    b: Tensor
    axis0: Optional[int]
    axis1: Optional[int]
    #: ``> 0``: the weight of a convolution of that many groups, ``[d0, d1 / groups, rest]``
    #: (output group ``a`` reads input group ``a`` only); both axes' permutations must then move
    #: the groups as units (:func:`weight_matching`'s ``units``)
    groups: int = 0

    def dense(self, t: Tensor) -> Tensor:
        """``t`` (:attr:`a` or :attr:`b`) as an ungrouped ``[d0, d1, rest]`` weight: block diagonal
        over the groups."""
        if not self.groups:
            return t
        rows, per = t.shape[0] // self.groups, t.shape[1]
        out = t.new_zeros(t.shape[0], per * self.groups, t.shape[2])
        for a in range(self.groups):
            out[a * rows:(a + 1) * rows, a * per:(a + 1) * per] = t[a * rows:(a + 1) * rows]
        return out


@dataclasses.dataclass(frozen=True)
class WeightMatchingResult:
    """What :func:`weight_matching` found.

    Attributes
    ----------
    perms : list of np.ndarray
        ``perms[g][i]``: the neuron of B matched to neuron ``i`` of A in group ``g`` (B permuted
        is ``B[perms[g]]`` along that group's axes).
    sweeps : int
        Sweeps over the groups, the last one changing nothing (unless ``max_sweeps`` stopped it).
    objective : float
        :math:`\\sum_t\\langle A_t, P B_t P^\\top\\rangle` at the end.
    converged : bool
        Whether the last sweep changed no permutation.
    """

    perms: List[np.ndarray]
    sweeps: int
    objective: float
    converged: bool


class _Term:
    """One tensor seen from one of its permuted axes: ``X [n, m, r]`` of A and ``Y`` of B
    (the group's axis first, the other axis second), and the cached ``X Y_pi^T`` ``[n, n]``."""

    def __init__(self, x: Tensor, y: Tensor, group: int, other: Optional[int]) -> None:
        self.x, self.y, self.group, self.other = x, y, group, other
        self.value: Optional[Tensor] = None
        self.seen: Optional[np.ndarray] = None  # the other axis' permutation it was computed with

    def current(self, perms: Sequence[np.ndarray]) -> Tensor:
        n = self.x.shape[0]
        if self.other is None:
            if self.value is None:
                self.value = self.x.reshape(n, -1) @ self.y.reshape(n, -1).T
            return self.value
        pi = perms[self.other]
        if self.value is not None and self.seen is not None:
            changed = np.flatnonzero(pi != self.seen)
            if len(changed) == 0:
                return self.value
            if len(changed) <= _INCREMENTAL * len(pi):
                idx = torch.from_numpy(changed)
                xs = self.x.index_select(1, idx).reshape(n, -1)
                dy = (self.y.index_select(1, torch.from_numpy(pi[changed]))
                      - self.y.index_select(1, torch.from_numpy(self.seen[changed]))).reshape(n, -1)
                self.value = self.value.addmm_(xs, dy.T)
                self.seen = pi.copy()
                return self.value
        yp = self.y.index_select(1, torch.from_numpy(pi)).reshape(n, -1)
        self.value = self.x.reshape(n, -1) @ yp.T
        self.seen = pi.copy()
        return self.value


class _GroupedTerm(_Term):
    """The term of a grouped convolution's weight (:attr:`MatchedTensor.groups`) seen from one
    axis, block by block: with the other axis' permutation moving group ``a`` to group
    ``sigma(a)`` (as every permutation of a unit of groups does), ``X Y_pi^T`` is zero but in the
    blocks ``(a, sigma(a))``, each the product of group ``a``'s rows of A with group
    ``sigma(a)``'s rows of B, their columns in the order the permutation gives them.  ``x`` and
    ``y`` are ``[n, m / groups, r]`` (this axis' neurons first) for axis 0, and the grouped weights
    themselves, ``[d0, d1 / groups, r]``, for axis 1."""

    def __init__(self, x: Tensor, y: Tensor, group: int, other: Optional[int], groups: int, axis: int) -> None:
        super().__init__(x, y, group, other)
        self.groups, self.axis = groups, axis

    def current(self, perms: Sequence[np.ndarray]) -> Tensor:
        pi = None if self.other is None else perms[self.other]
        if self.value is not None and (pi is None or np.array_equal(pi, self.seen)):
            return self.value
        g, (d0, per) = self.groups, self.x.shape[:2]
        rows = d0 // g
        n = d0 if self.axis == 0 else per * g
        value = self.x.new_zeros(n, n)
        for a in range(g):
            xa = self.x[a * rows:(a + 1) * rows]
            if self.axis == 0:   # the other axis is the input: its group a goes to group b
                b = a if pi is None else int(pi[a * per]) // per
                cols = torch.arange(per) if pi is None else torch.from_numpy(pi[a * per:(a + 1) * per] - b * per)
                yb = self.y[b * rows:(b + 1) * rows].index_select(1, cols)
                value[a * rows:(a + 1) * rows, b * rows:(b + 1) * rows] = xa.reshape(rows, -1) @ yb.reshape(rows, -1).T
            else:                # the other axis is the output: its group a goes to group b
                b = a if pi is None else int(pi[a * rows]) // rows
                local = torch.arange(rows) if pi is None else torch.from_numpy(pi[a * rows:(a + 1) * rows] - b * rows)
                yb = self.y[b * rows:(b + 1) * rows].index_select(0, local)
                value[a * per:(a + 1) * per, b * per:(b + 1) * per] = (
                    xa.transpose(0, 1).reshape(per, -1) @ yb.transpose(0, 1).reshape(per, -1).T)
        self.value, self.seen = value, None if pi is None else pi.copy()
        return value


def weight_matching(tensors: Sequence[MatchedTensor], sizes: Sequence[int], *, max_sweeps: int = 100,
                    seed: int = 0, units: Sequence[Tuple[Tuple[int, ...], int]] = (),
                    fixed: Sequence[int] = ()) -> WeightMatchingResult:
    r"""Permutations of network B's neurons that best match network A's weights.

    Coordinate descent over the permutation groups (see the module notes): each visit solves one
    linear assignment problem exactly; the first sweep visits the groups in order with the terms
    already determined, every later sweep visits every group once in a random order.

    Parameters
    ----------
    tensors : sequence of MatchedTensor
        The tensors of both networks with the group of each axis.  Pass the parameters (weights,
        biases, normalisation scales); running statistics are not part of the paper's objective.
    sizes : sequence of int
        ``sizes[g]``: the number of neurons of group ``g`` (number the groups from the input).
    max_sweeps : int
        Most sweeps (the paper's code uses 100; convergence usually takes a handful).
    seed : int
        Seed of the random visiting order.
    units : sequence of ((group, ...), heads)
        Groups whose neurons come in ``heads`` equal heads that move as units, sharing one
        assignment of heads (an attention's query/key and value/output spaces).  Such groups are
        solved together: every pair of heads is matched inside by its own assignment, the heads
        one to one on the sum of those profits over the unit's groups
        (:func:`neurofuse.grouping.head_structured_plans`), and the result kept if it
        raises the unit's objective.
    fixed : sequence of int
        Groups of ``units`` whose unit keeps every head in place: only the neurons inside each
        head are matched (a grouped convolution that reads the network input, which is not
        permuted).

    Returns
    -------
    WeightMatchingResult
        The permutations, the sweeps made, the objective and whether it converged.

    Raises
    ------
    ConfigError
        If a tensor's axis does not have its group's size, or ``max_sweeps < 1``.

    Examples
    --------
    >>> w = torch.randn(5, 3)
    >>> p = torch.randperm(5)
    >>> t = [MatchedTensor(w[:, :, None], w[p][:, :, None], 0, None)]
    >>> r = weight_matching(t, [5])
    >>> bool((w[p][r.perms[0]] == w).all())
    True
    """
    if max_sweeps < 1:
        raise ConfigError(f"max_sweeps must be at least 1, got {max_sweeps}")
    terms: Dict[int, List[_Term]] = {g: [] for g in range(len(sizes))}
    for k, t in enumerate(tensors):
        if t.a.shape != t.b.shape or t.a.dim() != 3:
            raise ConfigError(f"tensor {k}: A and B must have one 3-D shape, got {list(t.a.shape)} "
                              f"and {list(t.b.shape)}")
        for axis, g, other in ((0, t.axis0, t.axis1), (1, t.axis1, t.axis0)):
            if g is None:
                continue
            size = t.a.shape[axis] * (t.groups if axis == 1 and t.groups else 1)
            if size != sizes[g]:
                raise ConfigError(f"tensor {k}: axis {axis} has {size} entries but group "
                                  f"{g} has {sizes[g]} neurons")
            if t.groups:
                terms[g].append(_GroupedTerm(t.a, t.b, g, other, t.groups, axis))
                continue
            x, y = (t.a, t.b) if axis == 0 else (t.a.transpose(0, 1).contiguous(), t.b.transpose(0, 1).contiguous())
            terms[g].append(_Term(x, y, g, other))
    perms = [np.arange(n) for n in sizes]
    versions = [0] * len(sizes)
    solved_at: List[Optional[Tuple[int, ...]]] = [None] * len(sizes)
    neighbours = [sorted({tm.other for tm in terms[g] if tm.other is not None}) for g in range(len(sizes))]
    def stamp(g: int) -> Tuple[int, ...]:
        return tuple(versions[h] for h in neighbours[g])

    pinned = set(fixed)
    unit_of: Dict[int, Tuple[Tuple[int, ...], int]] = {}
    for groups, heads in units:
        for g in groups:
            if sizes[g] % heads:
                raise ConfigError(f"group {g} has {sizes[g]} neurons, not {heads} equal heads")
            unit_of[g] = (tuple(groups), int(heads))

    def profit(g: int, use: List[_Term]) -> np.ndarray:
        cost_t = use[0].current(perms).clone()
        for tm in use[1:]:
            cost_t += tm.current(perms)
        return cost_t.double().numpy()

    def accept(new: Dict[int, np.ndarray], costs: Dict[int, np.ndarray]) -> bool:
        rows = {g: np.arange(len(c)) for g, c in costs.items()}
        old = sum(float(c[rows[g], perms[g]].sum()) for g, c in costs.items())
        gain = sum(float(c[rows[g], new[g]].sum()) for g, c in costs.items()) - old
        if gain > 1e-12 * max(1.0, abs(old)) and any(not np.array_equal(new[g], perms[g]) for g in new):
            for g, cols in new.items():
                if not np.array_equal(cols, perms[g]):
                    perms[g] = cols.astype(np.int64)
                    versions[g] += 1
            return True
        return False

    def solve(g: int, use: List[_Term]) -> bool:
        if g in unit_of:
            return solve_unit(*unit_of[g], first=False)
        cost = profit(g, use)
        _, cols = linear_sum_assignment(cost, maximize=True)
        return accept({g: cols}, {g: cost})

    def solve_unit(groups: Tuple[int, ...], heads: int, first: bool) -> bool:
        costs = {}
        for h in groups:
            use = [tm for tm in terms[h] if not first or tm.other is None or tm.other in done]
            if use:
                costs[h] = profit(h, use)
        if not costs:
            return False

        def inner(c: np.ndarray) -> Tuple[np.ndarray, float]:
            r, c_ = linear_sum_assignment(c, maximize=True)
            plan = np.zeros_like(c)
            plan[r, c_] = 1.0 / len(r)
            return plan, -float(c[r, c_].sum())      # head_structured_plans minimises

        plans, _ = head_structured_plans([costs[h] for h in costs], heads, inner,
                                         np.arange(heads) if set(groups) & pinned else None)
        return accept({h: p.argmax(1) for h, p in zip(costs, plans)}, costs)

    # first sweep, from the input: only the terms whose other axis is fixed or already matched
    # (a greedy start; a term that reads a permutation still to be found would be recomputed)
    done: set = set()
    for g in range(len(sizes)):
        if g in done:                 # solved with its unit
            continue
        use = [tm for tm in terms[g] if tm.other is None or tm.other in done]
        if g in unit_of:
            solve_unit(*unit_of[g], first=True)
            done.update(unit_of[g][0])
            continue
        if use:
            solve(g, use)
        done.add(g)
    rng = np.random.default_rng(seed)
    sweeps, changed = 1, True
    while changed and sweeps < max_sweeps:
        changed = False
        sweeps += 1
        for g in rng.permutation(len(sizes)):
            if not terms[g] or solved_at[g] == stamp(g):
                continue  # no term changed since the last solve: the same assignment
            changed = solve(g, terms[g]) or changed
            for h in (unit_of[g][0] if g in unit_of else (g,)):
                solved_at[h] = stamp(h)
        log.debug("weight matching sweep %d: %s", sweeps, "changed" if changed else "converged")
    objective = 0.0
    for t in tensors:
        b = t.dense(t.b)
        if t.axis0 is not None:
            b = b.index_select(0, torch.from_numpy(perms[t.axis0]))
        if t.axis1 is not None:
            b = b.index_select(1, torch.from_numpy(perms[t.axis1]))
        objective += float(torch.dot(t.dense(t.a).reshape(-1), b.reshape(-1)))
    return WeightMatchingResult(perms, sweeps, objective, not changed)
