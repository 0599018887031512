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

from typing import Any, Dict, List, Optional, Set, Type, TypeVar

import numpy as np
import torch
from torch import Tensor

from ._phases import phase

__all__ = [
    "CHUNK_BYTES",
    "AdditiveStats",
    "CrossMoments",
    "ImportanceSums",
    "MomentStats",
    "row_chunks",
]

S = TypeVar("S", bound="AdditiveStats")

#: a Gram sum at least this wide is accumulated on the CPU by BLAS ``dsyrk`` (one triangle: half
#: the flops of the matrix product; 2.0x faster than ``addmm_`` on one thread from 577 to 4,609
#: columns, ``benchmarks/syrk.py``); narrower ones by ``addmm_`` (no gain below ~200 columns)
SYRK_MIN = 256

#: Largest float64 chunk, in bytes, of one tensor that the statistics convert at a time
#: (:func:`row_chunks`): float64 copies of a whole batch are fresh allocations of tens to hundreds
#: of MB that the allocator maps and unmaps every time (page faults: converting 20,000 x 768
#: float32 values took 78 ms where the product they fed took 34), while chunks of a few MB are
#: reused (the least-squares statistics of 20,000 rows of 65 inputs and 768 outputs: 104 against
#: 255 ms on one thread)
CHUNK_BYTES = 16 * 2**20


def row_chunks(rows: int, width: int) -> List[slice]:
    """Row slices of at most :data:`CHUNK_BYTES` of float64 for ``width`` columns (at least 256
    rows each; one empty slice for no rows, so that sums of an empty batch are zeros)."""
    step = max(256, CHUNK_BYTES // (8 * max(width, 1)))
    return [slice(lo, lo + step) for lo in range(0, max(rows, 1), step)]


class AdditiveStats:
    """Base class: named float64 sums that add across batches, shards and processes.

    Subclasses implement ``update`` with calls to :meth:`_add` and read their sums as
    attributes (``self.name``, ``None`` before the first batch).
    """

    #: names of the sums, in the fixed order used by :meth:`all_reduce`
    fields: tuple = ()

    def __init__(self) -> None:
        self._sums: Dict[str, Optional[Tensor]] = {name: None for name in self.fields}
        #: symmetric sums whose upper triangle is stale (:meth:`_add_gram` adds the lower one)
        self._half: Set[str] = set()

    def __getattr__(self, name: str) -> Any:
        sums = self.__dict__.get("_sums")
        if sums is not None and name in sums:
            return self._sum(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _sum(self, name: str) -> Optional[Tensor]:
        """The sum ``name``, with the upper triangle of a :meth:`_add_gram` sum filled in."""
        half = self.__dict__.get("_half", ())
        if name in half:
            _mirror_lower(self._sums[name])  # type: ignore[arg-type]
            half.discard(name)
        return self._sums[name]

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

    def _add_gram(self, name: str, x: Tensor) -> None:
        r"""Add :math:`x^\top x` (float64) to the symmetric sum ``name`` in place.

        On the CPU, from :data:`SYRK_MIN` columns, BLAS ``dsyrk`` adds the lower triangle only
        (half the flops) and the upper one is filled in when the sum is read (:meth:`_sum`).
        Everything else added to such a sum is symmetric, so the lower triangle stays exact.
        """
        x = x.detach().double()
        d = x.shape[1]
        cur = self._sums[name]
        if x.device.type != "cpu" or d < SYRK_MIN or (cur is not None and not _syrk_target(cur)):
            self._add_product(name, x.T, x)
            return
        if cur is None:
            cur = self._sums[name] = torch.zeros(d, d, dtype=torch.float64)
        from scipy.linalg.blas import dsyrk
        from threadpoolctl import threadpool_limits

        # column-major views, which dsyrk reads and writes without a copy: x's rows as the columns
        # of a [d, n] matrix a (a aᵀ = xᵀ x), and cur, whose "upper" triangle is cur's lower one
        a, c = x.contiguous().numpy().T, cur.numpy().T
        with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
            out = dsyrk(1.0, a, trans=0, beta=1.0, c=c, overwrite_c=1, lower=0)
        if not np.shares_memory(out, c):  # pragma: no cover - f2py copied: keep the result
            cur.copy_(torch.from_numpy(np.ascontiguousarray(out.T)))
        self._half.add(name)

    @property
    def empty(self) -> bool:
        """Whether no batch has been added yet."""
        return any(v is None for v in self._sums.values())

    def merge(self: S, other: "AdditiveStats") -> S:
        """Add ``other``'s sums (statistics of another shard of the data) to these; returns self."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        for name in other._sums:
            value = other._sum(name)
            if value is not None:
                self._add(**{name: value})
        return self

    def state(self) -> Dict[str, Tensor]:
        """The sums as a ``dict`` of CPU tensors (``{}`` entries are left out while empty)."""
        return {k: v.detach().cpu().clone() for k in self._sums if (v := self._sum(k)) is not None}

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
            t = self._sum(name)   # whole, so that every rank adds the same entries
            assert t is not None
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return self


def _syrk_target(t: Tensor) -> bool:
    """Whether ``dsyrk`` can accumulate into ``t`` in place (a contiguous float64 CPU square)."""
    return (t.device.type == "cpu" and t.dtype == torch.float64 and t.dim() == 2
            and t.shape[0] == t.shape[1] and t.is_contiguous())


def _mirror_lower(t: Tensor, block: int = 512) -> None:
    """Copy the lower triangle of the square ``t`` onto its upper one, in place (by blocks of
    rows: no temporary of ``t``'s size)."""
    d = t.shape[0]
    for i0 in range(0, d, block):
        i1 = min(i0 + block, d)
        t[i0:i1, i1:].copy_(t[i1:, i0:i1].T)
        tile = t[i0:i1, i0:i1]
        tile.copy_(torch.tril(tile) + torch.tril(tile, -1).T)


class MomentStats(AdditiveStats):
    r"""Per-neuron first and second moments of a ``[rows, neurons]`` block.

    ``count`` rows, ``total`` :math:`\sum_r a_{rj}`, ``sq`` :math:`\sum_r a_{rj}^2`; the mean is
    ``total / count`` and the (population) variance ``sq / count - mean**2``.
    """

    fields = ("count", "total", "sq")

    @phase("statistics")
    def update(self, a: Tensor) -> None:
        self._add(count=torch.tensor(float(a.shape[0]), dtype=torch.float64, device=a.device))
        for rows in row_chunks(a.shape[0], a.shape[1]):
            c = a[rows].double()
            self._add(total=c.sum(0), sq=(c * c).sum(0))

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
        self._add(count=torch.tensor(float(a.shape[0]), dtype=torch.float64, device=a.device))
        for rows in row_chunks(a.shape[0], max(a.shape[1], b.shape[1])):
            ac, bc = a[rows].double(), b[rows].double()
            self._add(sa=ac.sum(0), sb=bc.sum(0), aa=(ac * ac).sum(0), bb=(bc * bc).sum(0))
            self._add_product("ab", ac.T, bc)

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
