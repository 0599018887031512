r"""Which base neurons a fused neuron stands for, at one level: :class:`Correspondence`.

Every fusion method that builds one network relates each fused neuron :math:`j` of a level to
the neurons of the base models it was made from.  Whatever the method (a K-means cluster, a
Hungarian or Git Re-Basin permutation, an optimal-transport plan, plain averaging of equal
indices), that relation is one non-negative matrix

.. math:: B \in \mathbb R_{\ge 0}^{k \times M}, \qquad M = \textstyle\sum_i n_i,

with one row per fused neuron and one column per base neuron (the base models' neurons
concatenated in model order); :math:`B_{jm} > 0` when base neuron :math:`m` takes part in fused
neuron :math:`j`, with that weight.  A *hard* correspondence gives every base neuron at most one
fused neuron (clusters, permutations) and is stored as a label and a weight per base neuron; a
soft one (transport plans) as the dense matrix.  REPAIR (:func:`neurofuse.repair.repair`),
partial fusion and the plots read only this type.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError

__all__ = ["Correspondence"]


class Correspondence:
    """A non-negative ``[n_fused, sum(widths)]`` matrix: fused neurons by base neurons.

    Build it with :meth:`hard`, :meth:`from_blocks`, :meth:`from_matrix` or :meth:`same_index`;
    read it with :meth:`matrix`, :meth:`block`, :meth:`normalized` or :attr:`labels`.

    Parameters
    ----------
    n_fused : int
        Neurons of the fused level (rows).
    widths : sequence of int
        Neurons of the level in every base model, in model order (the columns, concatenated).
    labels, weights : np.ndarray, optional
        Hard form: ``[M]`` fused neuron of every base neuron (``-1``: none) and ``[M]`` its weight.
    matrix : np.ndarray, optional
        Soft form: the dense ``[n_fused, M]`` matrix.
    """

    __slots__ = ("n_fused", "widths", "_labels", "_weights", "_matrix")

    def __init__(self, n_fused: int, widths: Sequence[int], *, labels: Optional[np.ndarray] = None,
                 weights: Optional[np.ndarray] = None, matrix: Optional[np.ndarray] = None) -> None:
        self.n_fused = int(n_fused)
        self.widths: Tuple[int, ...] = tuple(int(w) for w in widths)
        total = sum(self.widths)
        if (labels is None) == (matrix is None):
            raise ConfigError("a correspondence is either hard (labels) or soft (matrix)")
        if labels is not None:
            lab = np.asarray(labels, dtype=np.int64).reshape(-1)
            w = np.ones(total) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
            if lab.shape != (total,) or w.shape != (total,):
                raise ConfigError(f"a hard correspondence labels all {total} base neurons, got "
                                  f"{lab.shape[0]} labels and {w.shape[0]} weights")
            if total and (lab.min() < -1 or lab.max() >= self.n_fused):
                raise ConfigError(f"labels must be fused neurons 0..{self.n_fused - 1} or -1, got "
                                  f"{int(lab.min())}..{int(lab.max())}")
            self._labels, self._weights, self._matrix = lab, w, None
        else:
            m = np.asarray(matrix, dtype=np.float64)
            if m.shape != (self.n_fused, total):
                raise ConfigError(f"the correspondence matrix must be [{self.n_fused}, {total}], "
                                  f"got {list(m.shape)}")
            self._labels, self._weights, self._matrix = None, None, m
        w = self._weights if self._matrix is None else self._matrix
        if not np.isfinite(w).all() or (w < 0).any():
            raise ConfigError("correspondence weights must be finite and non-negative")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def hard(cls, labels: Any, widths: Sequence[int], n_fused: int,
             weights: Optional[Any] = None) -> "Correspondence":
        """Every base neuron ``m`` stands in fused neuron ``labels[m]`` (``-1``: in none) with
        weight ``weights[m]`` (default 1): a clustering or a matching."""
        return cls(n_fused, widths, labels=np.asarray(labels), weights=weights)

    @classmethod
    def from_permutations(cls, perms: Sequence[Optional[Any]], widths: Sequence[int]) -> "Correspondence":
        """Fused neuron ``j`` is neuron ``perms[i][j]`` of model ``i`` (``None``: neuron ``j``);
        every model has the fused width."""
        n = int(widths[0])
        labels = []
        for p, w in zip(perms, widths):
            if int(w) != n:
                raise ConfigError(f"a permutation correspondence needs equal widths, got {list(widths)}")
            lab = np.empty(n, dtype=np.int64)
            lab[np.arange(n) if p is None else np.asarray(p, dtype=np.int64)] = np.arange(n)
            labels.append(lab)
        return cls.hard(np.concatenate(labels), widths, n)

    @classmethod
    def from_blocks(cls, blocks: Sequence[Any]) -> "Correspondence":
        """One non-negative ``[n_fused, n_i]`` matrix per base model (e.g. transport maps)."""
        mats = [np.asarray(b, dtype=np.float64) for b in blocks]
        if not mats or any(m.ndim != 2 or m.shape[0] != mats[0].shape[0] for m in mats):
            raise ConfigError("correspondence blocks must be [n_fused, n_i] matrices with one n_fused")
        return cls(mats[0].shape[0], [m.shape[1] for m in mats], matrix=np.concatenate(mats, axis=1))

    @classmethod
    def from_matrix(cls, matrix: Any, widths: Sequence[int]) -> "Correspondence":
        """The dense ``[n_fused, sum(widths)]`` matrix."""
        m = np.asarray(matrix, dtype=np.float64)
        return cls(m.shape[0] if m.ndim == 2 else -1, widths, matrix=m)

    @classmethod
    def same_index(cls, widths: Sequence[int], n_fused: int,
                   models: Optional[Sequence[int]] = None) -> "Correspondence":
        """Fused neuron ``j`` is neuron ``j`` of every model in ``models`` (default: all) whose
        width is ``n_fused``: what averaging without alignment (or keeping one model) means."""
        chosen = set(range(len(widths)) if models is None else models)
        labels = [np.arange(w) if (i in chosen and int(w) == n_fused) else np.full(int(w), -1)
                  for i, w in enumerate(widths)]
        return cls.hard(np.concatenate(labels) if labels else np.zeros(0), widths, n_fused)

    # -- reading --------------------------------------------------------------------------------
    @property
    def is_hard(self) -> bool:
        """Whether every base neuron stands in at most one fused neuron (stored compactly)."""
        return self._matrix is None

    @property
    def labels(self) -> Optional[np.ndarray]:
        """Hard form: the fused neuron of every base neuron (``-1``: none); ``None`` if soft."""
        return None if self._labels is None else self._labels.copy()

    @property
    def num_base(self) -> int:
        """Number of base neurons (columns)."""
        return sum(self.widths)

    def matrix(self) -> np.ndarray:
        """The dense ``[n_fused, sum(widths)]`` float64 matrix."""
        if self._matrix is not None:
            return self._matrix.copy()
        out = np.zeros((self.n_fused, self.num_base))
        on = self._labels >= 0
        out[self._labels[on], np.flatnonzero(on)] = self._weights[on]
        return out

    def block(self, model: int) -> np.ndarray:
        """The ``[n_fused, widths[model]]`` columns of model ``model``."""
        start = sum(self.widths[:model])
        return self.matrix()[:, start:start + self.widths[model]]

    def normalized(self) -> np.ndarray:
        """The dense matrix with every non-empty row summing to one (each fused neuron a weighted
        mean of its base neurons); rows of fused neurons that stand for nothing stay zero."""
        m = self.matrix()
        return m / np.maximum(m.sum(1, keepdims=True), 1e-300)

    def covered(self) -> np.ndarray:
        """``[n_fused]`` whether each fused neuron stands for at least one base neuron."""
        return self.matrix().sum(1) > 0

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able form (``from_dict`` reads it back)."""
        d: Dict[str, Any] = {"n_fused": self.n_fused, "widths": list(self.widths)}
        if self.is_hard:
            d.update(labels=self._labels.tolist(), weights=self._weights.tolist())
        else:
            d["matrix"] = self._matrix.tolist()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Correspondence":
        if "matrix" in d:
            return cls(d["n_fused"], d["widths"], matrix=np.asarray(d["matrix"]))
        return cls(d["n_fused"], d["widths"], labels=np.asarray(d["labels"]), weights=np.asarray(d["weights"]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Correspondence):
            return NotImplemented
        return (self.n_fused, self.widths) == (other.n_fused, other.widths) and \
            np.array_equal(self.matrix(), other.matrix())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        kind = "hard" if self.is_hard else "soft"
        return f"Correspondence({kind}, n_fused={self.n_fused}, widths={list(self.widths)})"

