r"""Statistics that merge: the additive sums every level-wise fusion step is built from.

Each level's fusion is "accumulate additive statistics over the fusion set, then solve":
least-squares moments :math:`X^\top X`, :math:`X^\top A`, :math:`\lVert a_j\rVert^2`
(kf-linear, hf-linear), pairwise neuron moments (OTFusion, Git Re-Basin), importance sums and
per-neuron means and variances (REPAIR).  They are sums over samples, so statistics computed on
disjoint shards of the data add up to the statistics of their union.  :class:`AdditiveStats` gives
them one protocol:

``update(...)``
    add one batch;
``merge(other)``
    add another shard's statistics;
``state()`` / ``from_state(state)``
    a ``dict`` of tensors and back (what travels between processes or Flower clients);
``all_reduce(group)``
    sum over the processes of a ``torch.distributed`` group, in place.

The same fusion code therefore runs in one process, across processes (:mod:`neurofuse.distributed`)
and across federated clients.

>>> s = MomentStats()
>>> s.update(torch.ones(3, 2))
>>> t = MomentStats.from_state(s.state()).merge(s)
>>> int(t.count)
6
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Type, TypeVar

import torch
from torch import Tensor

from ._phases import phase

__all__ = [
    "AdditiveStats",
    "CrossMoments",
    "ImportanceSums",
    "MomentStats",
]

S = TypeVar("S", bound="AdditiveStats")


class AdditiveStats:
    """Base class: named float64 sums that add across batches, shards and processes.

    Subclasses implement ``update`` with calls to :meth:`_add` and read their sums as
    attributes (``self.name``, ``None`` before the first batch).
    """

    #: names of the sums, in the fixed order used by :meth:`all_reduce`
    fields: tuple = ()

    def __init__(self) -> None:
        self._sums: Dict[str, Optional[Tensor]] = {name: None for name in self.fields}

    def __getattr__(self, name: str) -> Any:
        sums = self.__dict__.get("_sums")
        if sums is not None and name in sums:
            return sums[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # -- accumulation -----------------------------------------------------------------------
    def _add(self, **values: Tensor) -> None:
        for name, value in values.items():
            if name not in self._sums:
                raise KeyError(f"{type(self).__name__} has no statistic {name!r}")
            v = value.detach().double()
            cur = self._sums[name]
            self._sums[name] = v.clone() if cur is None else cur.add_(v.to(cur.device))

    def _add_product(self, name: str, a: Tensor, b: Tensor) -> None:
        """Add ``a @ b`` (float64) to the sum ``name`` in place (``addmm_``): no temporary of the
        sum's size per batch, which on the CPU would fragment the allocator's heap."""
        cur = self._sums[name]
        a, b = a.detach().double(), b.detach().double()
        if cur is None:
            self._sums[name] = a @ b
        else:
            cur.addmm_(a.to(cur.device), b.to(cur.device))

    @property
    def empty(self) -> bool:
        """Whether no batch has been added yet."""
        return any(v is None for v in self._sums.values())

    def merge(self: S, other: "AdditiveStats") -> S:
        """Add ``other``'s sums (statistics of another shard of the data) to these; returns self."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        for name, value in other._sums.items():
            if value is not None:
                self._add(**{name: value})
        return self

    def state(self) -> Dict[str, Tensor]:
        """The sums as a ``dict`` of CPU tensors (``{}`` entries are left out while empty)."""
        return {k: v.detach().cpu().clone() for k, v in self._sums.items() if v is not None}

    @classmethod
    def from_state(cls: Type[S], state: Dict[str, Tensor], **kwargs: Any) -> S:
        """Statistics holding the sums of ``state`` (as returned by :meth:`state`)."""
        out = cls._empty_for(state, **kwargs)
        unknown = set(state) - set(out._sums)
        if unknown:
            raise KeyError(f"{cls.__name__} has no statistic(s) {sorted(unknown)}")
        for k, v in state.items():
            out._sums[k] = torch.as_tensor(v).double().clone()
        return out

    @classmethod
    def _empty_for(cls: Type[S], state: Dict[str, Tensor], **kwargs: Any) -> S:
        """Empty statistics that can hold ``state`` (subclasses whose fields depend on it override)."""
        return cls(**kwargs)

    def all_reduce(self: S, group: Any = None) -> S:
        """Sum the statistics over every process of ``group`` (``torch.distributed``), in place.

        Every process must have added at least one batch; afterwards all hold identical sums.
        """
        import torch.distributed as dist

        if self.empty:
            raise ValueError(f"{type(self).__name__}: no batch on this process to reduce")
        for name in self.fields:
            t = self._sums[name]
            assert t is not None
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return self


class MomentStats(AdditiveStats):
    r"""Per-neuron first and second moments of a ``[rows, neurons]`` block.

    ``count`` rows, ``total`` :math:`\sum_r a_{rj}`, ``sq`` :math:`\sum_r a_{rj}^2`; the mean is
    ``total / count`` and the (population) variance ``sq / count - mean**2``.
    """

    fields = ("count", "total", "sq")

    @phase("statistics")
    def update(self, a: Tensor) -> None:
        a = a.double()
        self._add(count=torch.tensor(float(a.shape[0]), dtype=torch.float64, device=a.device),
                  total=a.sum(0), sq=(a * a).sum(0))

    def mean_std(self) -> "tuple[Tensor, Tensor]":
        n = self.count.clamp_min(1.0)
        mean = self.total / n
        var = (self.sq / n - mean * mean).clamp_min(0.0)
        return mean, var.sqrt()


class CrossMoments(AdditiveStats):
    r"""First and second moments of two row blocks ``a`` ``[rows, n]`` and ``b`` ``[rows, m]``.

    From the sums ``sa, sb, aa, bb, ab`` (:math:`\sum a`, :math:`\sum b`, :math:`\sum a^2`,
    :math:`\sum b^2`, :math:`a^\top b`) come the squared distances
    :math:`\lVert a_i - b_j\rVert^2 = aa_i + bb_j - 2\,ab_{ij}` and the correlations between
    the columns, streamed in memory that does not grow with the rows.
    """

    fields = ("count", "sa", "sb", "aa", "bb", "ab")

    @phase("statistics")
    def update(self, a: Tensor, b: Tensor) -> None:
        a, b = a.double(), b.double()
        self._add(count=torch.tensor(float(a.shape[0]), dtype=torch.float64, device=a.device),
                  sa=a.sum(0), sb=b.sum(0), aa=(a * a).sum(0), bb=(b * b).sum(0))
        self._add_product("ab", a.T, b)

    def sq_dist(self) -> Tensor:
        """``[n, m]`` squared Euclidean distances between the columns of ``a`` and ``b``."""
        return (self.aa[:, None] + self.bb[None, :] - 2.0 * self.ab).clamp_min(0.0)

    def correlation(self) -> Tensor:
        """``[n, m]`` Pearson correlations between the columns of ``a`` and ``b``."""
        n = self.count.clamp_min(1.0)
        ma, mb = self.sa / n, self.sb / n
        cov = self.ab / n - ma[:, None] * mb[None, :]
        va = (self.aa / n - ma * ma).clamp_min(0.0)
        vb = (self.bb / n - mb * mb).clamp_min(0.0)
        return cov / (va.sqrt()[:, None] * vb.sqrt()[None, :]).clamp_min(1e-12)


class ImportanceSums(AdditiveStats):
    r"""Sums of per-sample attributions of every level of one model, and the sample count.

    The importance score of neuron :math:`j` at level :math:`\ell` is
    :math:`s_j = \frac1N \sum_n r_{n,j} + 10^{-8}` (:mod:`neurofuse.importance`); the sums
    :math:`\sum_n r_{n,j}` of the shards add up.
    """

    def __init__(self, num_levels: int = 0) -> None:
        self.fields = ("count",) + tuple(f"level{i}" for i in range(int(num_levels)))
        super().__init__()

    @classmethod
    def _empty_for(cls, state: Dict[str, Tensor], **kwargs: Any) -> "ImportanceSums":
        return cls(num_levels=sum(1 for k in state if k.startswith("level")))

    def update(self, sums: List[Tensor], count: int) -> None:
        self._add(count=torch.tensor(float(count), dtype=torch.float64),
                  **{f"level{i}": s for i, s in enumerate(sums)})

    def scores(self, eps: float = 1e-8) -> List[Tensor]:
        n = self.count.clamp_min(1.0)
        return [self._sums[f"level{i}"] / n + eps for i in range(len(self.fields) - 1)]  # type: ignore[operator]
