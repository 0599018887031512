r"""Closed-form weighted least squares from streamed sufficient statistics (appendix B.2).

For an affine level the fused output of neuron :math:`c` is :math:`X w_c`, where :math:`X` is the
design matrix of the fused model's own previous-level outputs (inputs of a linear layer, or
unfolded patches of a conv, plus a ones column for the bias).  The least-squares weights of every
base neuron :math:`a_j` are :math:`w_j = X^+ a_j = (X^\top X)^+ X^\top a_j`, so only

.. math::  G = X^\top X, \qquad C = X^\top A, \qquad q_j = \lVert a_j \rVert^2

are needed; they are accumulated over mini-batches, so memory does not grow with the number of
fusion samples.  With the eigendecomposition :math:`G = U \Lambda U^\top` restricted to eigenvalues
above ``rtol² * max(eigenvalue)`` (the pseudo-inverse's cut-off on singular values), the projections
:math:`P a_j = X w_j` of the base outputs onto the image of :math:`X` (section 4.3.2(a)) have the
coordinates :math:`f_j = \Lambda^{-1/2} U^\top C_j` in an orthonormal basis of that image, so
:math:`\lVert P a_i - P a_j\rVert = \lVert f_i - f_j\rVert`; grouping runs on these :math:`f_j`.
The weights of a fused neuron are the importance-weighted mean of its members' :math:`w_j`, which
makes :math:`X w_c` the projection of the weighted cluster centre.  A ``ridge`` > 0 adds
``ridge * mean(diag G)`` to the diagonal instead of truncating (Tikhonov regularisation, toward
the prior), applied in the same eigenbasis; ``ridge="auto"`` chooses it by generalised
cross-validation from these statistics alone (:mod:`neurofuse.approximation._ridge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._phases import phase
from ..errors import ConfigError, IncompatibleModelsError
from ..stats import AdditiveStats, row_chunks
from ._ridge import PENALTY_GRID, FitDiagnostics, gcv_curve

__all__ = ["LinearSolution", "LinearStats", "aligned_prior", "assign_affine", "design_matrix", "fold_layernorm",
           "reset_layernorm"]


@phase("statistics")
def design_matrix(affine: nn.Module, u: Tensor) -> Tensor:
    """Rows of inputs that ``affine`` (Linear or Conv2d) maps to its output rows, with a ones
    column appended when it has a bias.  Conv rows are ordered (sample, h, w), as
    :func:`neurofuse.levels.flatten_neurons` orders output rows; a Linear maps the last axis, so
    on tokens ``[B, T, C]`` every token is a row (sample, token)."""
    if isinstance(affine, nn.Linear):
        x = u.reshape(-1, u.shape[-1])
    elif isinstance(affine, nn.Conv2d):
        if affine.groups != 1 or affine.padding_mode != "zeros" or isinstance(affine.padding, str):
            raise IncompatibleModelsError(
                "closed-form fusion supports Conv2d with groups=1, zero padding and numeric "
                "padding only; use method='kf-gradient'"
            )
        cols = F.unfold(u, affine.kernel_size, dilation=affine.dilation, padding=affine.padding,
                        stride=affine.stride)
        x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        raise IncompatibleModelsError(f"{type(affine).__name__} is not a Linear or Conv2d layer")
    if affine.bias is not None:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    return x


def assign_affine(affine: nn.Module, w: Tensor) -> None:
    """Write solved weights ``w`` (``[d, out]``, bias in the last row if any) into ``affine``."""
    wt = w.T.to(affine.weight.dtype).to(affine.weight.device)
    with torch.no_grad():
        if affine.bias is not None:
            affine.bias.copy_(wt[:, -1])
            wt = wt[:, :-1]
        affine.weight.copy_(wt.reshape(affine.weight.shape))


def fold_layernorm(weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor],
                   beta: Optional[Tensor]) -> "tuple[Tensor, Tensor]":
    r"""A layer ``(weight [out, in], bias [out] or None)`` that reads a LayerNorm of affine
    ``(gamma, beta)`` (either ``None``: absent), as one layer on the normalised input (float64):
    :math:`W \operatorname{diag}\gamma` and :math:`b + W\beta` (``b`` 0 without a bias)."""
    w = weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if bias is None else bias.detach().double()
    if beta is not None:
        b = b + w @ beta.detach().double()
    if gamma is not None:
        w = w * gamma.detach().double()[None, :]
    return w, b


def reset_layernorm(gamma: Optional[Tensor], beta: Optional[Tensor]) -> None:
    """A LayerNorm's affine after it was folded into the layers that read it: weight 1, bias 0."""
    with torch.no_grad():
        if gamma is not None:
            gamma.fill_(1.0)
        if beta is not None:
            beta.zero_()


def aligned_prior(affine: nn.Module, assign: "Tensor | None", k_prev: int) -> Tensor | None:
    r"""A base layer's weights rewritten in the fused layer's input coordinates, ``[d, out]``.

    Input neuron :math:`i` of the base layer was grouped into fused neuron :math:`c(i)` at the
    previous level, so its incoming weight is added to fused input :math:`c(i)`
    (:math:`\tilde W_{:,c} = \sum_{i: c(i)=c} W_{:,i}`, per spatial tap for convs and per position
    after a flatten).  ``assign=None`` means the inputs are shared (the first level).  Returns
    ``None`` when the shapes do not allow the mapping.
    """
    w = affine.weight.detach().double()
    out_dim = w.shape[0]
    if assign is None:
        mapped = w.reshape(out_dim, -1)
    else:
        c_in = int(assign.numel())
        per = w.reshape(out_dim, -1).shape[1]
        if per % c_in:
            return None
        w3 = w.reshape(out_dim, c_in, per // c_in)
        mapped = torch.zeros(out_dim, k_prev, per // c_in, dtype=w.dtype, device=w.device)
        mapped.index_add_(1, assign.to(w.device), w3)
        mapped = mapped.reshape(out_dim, -1)
    if affine.bias is not None:
        mapped = torch.cat([mapped, affine.bias.detach().double()[:, None]], dim=1)
    return mapped.T


@dataclass
class LinearSolution:
    r"""Image coordinates and residuals of every base neuron, and their least-squares weights.

    The weights :math:`w_j = (X^\top X)^+ X^\top a_j` (plus the prior's null-space part) are
    linear in the cross statistics :math:`X^\top a_j`, so the weighted mean of a group's weights,
    which is all the fused level needs, is the solve applied to the group's weighted mean cross
    column: :meth:`combine` forms ``k`` columns instead of the ``M`` of :attr:`weights`.

    Attributes
    ----------
    features : Tensor
        ``[M, r]`` coordinates :math:`f_j` of the projections :math:`P a_j`.
    residual : Tensor
        ``[M]`` :math:`\lVert (I - P) a_j \rVert^2`, the part no fused level can reproduce.
    rank : int
        Numerical rank ``r`` of the design matrix.
    """

    features: Tensor
    residual: Tensor
    rank: int
    cross: Optional[Tensor] = field(repr=False)  # [d, M] X^T A (None: shared inputs, see solve)
    prior: Optional[Tensor] = field(repr=False)  # [d, M] or None
    apply: Callable[[Tensor, Optional[Tensor]], Tensor] = field(repr=False)
    #: condition, penalty and degrees of freedom of the fit (``None``: exact, shared inputs)
    diagnostics: Optional[FitDiagnostics] = None

    @property
    def weights(self) -> Tensor:
        """``[d, M]`` least-squares weights :math:`w_j` of each base neuron (float64)."""
        return self.apply(self.cross, self.prior)

    @phase("solve")
    def combine(self, weights: Tensor, labels: Tensor, k: int) -> Tensor:
        r"""``[d, k]`` weighted means :math:`\sum_{j \in c} s_j w_j / \sum_{j \in c} s_j` of
        the groups' least-squares weights (zeros for an empty group).

        Parameters
        ----------
        weights : Tensor
            ``[M]`` weights :math:`s_j` of the base neurons (importance scores).
        labels : Tensor
            ``[M]`` group of every base neuron, in ``0..k-1``.
        k : int
            Number of groups.
        """
        ref = self.cross if self.cross is not None else self.prior
        assert ref is not None
        w = weights.to(ref.device, ref.dtype)
        lab = labels.to(ref.device, torch.long)
        den = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, lab, w)
        scale = torch.where(den > 0, 1.0 / den.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(den))

        def mean(c: Tensor) -> Tensor:
            num = torch.zeros(c.shape[0], k, dtype=c.dtype, device=c.device)
            return num.index_add_(1, lab, c * w).mul_(scale)

        return self.apply(None if self.cross is None else mean(self.cross),
                          None if self.prior is None else mean(self.prior))


@phase("eigh")
def _eigh_dense(g: Tensor) -> tuple[Tensor, Tensor]:
    if g.device.type != "cpu":
        try:
            return torch.linalg.eigh(g)
        except RuntimeError:  # syevd did not converge: the robust driver below, on the host
            pass
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    # On the CPU: scipy's LAPACK dsyevd on one BLAS thread.  One thread, because a multi-threaded
    # eigh slows down 10-20x as soon as another process competes for the cores (d=2305: 40 s on
    # 2 threads, 2.3 s on 1; at worst ~2x slower on an idle machine); scipy's, because on one
    # thread it took 2.1 s against torch's 3.7 s at d = 2,305 and 19 s against 28 s at d = 4,609
    # (benchmarks/eigh_threads.py --backends).
    a = g.detach().cpu().numpy()
    with threadpool_limits(limits=1, user_api="blas"):
        try:
            w, v = scipy.linalg.eigh(a, driver="evd", check_finite=False)
        except (scipy.linalg.LinAlgError, ValueError):  # not converged: the slower, robust driver
            w, v = scipy.linalg.eigh(a, driver="evr", check_finite=False)
    return torch.from_numpy(w).to(g.device), torch.from_numpy(v).to(g.device)


class LinearStats(AdditiveStats):
    r"""Accumulates :math:`X^\top X`, :math:`X^\top A` and :math:`\lVert a_j\rVert^2` in float64.

    Additive statistics (:class:`neurofuse.stats.AdditiveStats`): shards of the fusion set can be
    accumulated separately and merged (or all-reduced across processes) before :meth:`solve`.

    Parameters
    ----------
    cross : bool
        Accumulate :math:`X^\top A` (``False``: a level whose inputs the base models share, see
        :meth:`solve`).
    rows : bool
        With ``cross=False``, also keep the base outputs :math:`A` themselves (float32) while the
        fusion set has at most as many rows as the design matrix has columns
        (:math:`n \le d`).  They are then the smaller exact grouping coordinates:
        :math:`A^\top A = P^\top X^\top X P`, so the columns of :math:`A` are at the pairwise
        distances of the neurons' outputs in :math:`n` dimensions instead of :math:`d`, and no
        Cholesky factor is needed; while they are kept, :math:`X^\top X` is formed only when it
        is asked for (:meth:`state`, :meth:`merge`, more than ``d`` rows).  The rows are not part
        of :meth:`state` (statistics that travel, e.g. to a federated server, carry sums only);
        :meth:`merge` concatenates them and :meth:`all_reduce` gathers them in rank order while
        the union still has at most ``d`` rows, so a distributed fusion uses the same
        coordinates as one process on the union.
    """

    fields: tuple = ("count", "gram", "cross", "sq")

    def __init__(self, cross: bool = True, rows: bool = False) -> None:
        if not cross:
            self.fields = ("count", "gram", "sq")
        super().__init__()
        self._rows_wanted = bool(rows and not cross)
        #: kept (x, a) row blocks (``None``: not kept); the first ``_in_gram`` are in ``gram``.
        #: With ``cross`` only the design rows are kept (``a`` is ``None``), while there are at
        #: most ``d`` of them: the eigenpairs then come from the smaller ``X Xᵀ`` (see :meth:`_eigh`)
        self._rows: Optional[list] = [] if (self._rows_wanted or cross) else None
        self._in_gram = 0

    @classmethod
    def _empty_for(cls, state: dict, **kwargs: object) -> "LinearStats":
        return cls(cross="cross" in state)

    @property
    def has_cross(self) -> bool:
        """Whether :math:`X^\\top A` is accumulated (``False``: shared inputs, see :meth:`solve`)."""
        return "cross" in self.fields

    @property
    def rows(self) -> int:
        """Rows of the design matrix seen so far."""
        return 0 if self.count is None else int(self.count)

    @phase("statistics")
    def update(self, x: Tensor, a: "Tensor | Sequence[Tensor]", row_scale: Optional[Tensor] = None) -> None:
        """Add one batch of rows.

        Parameters
        ----------
        x : Tensor
            ``[n, d]`` design rows (any float dtype; the sums are float64).
        a : Tensor or sequence of Tensor
            ``[n, M]`` base outputs, or column blocks ``[n, M_i]`` of them in order (they are
            joined chunk by chunk, never as a whole).
        row_scale : Tensor, optional
            ``[n]`` factors of the rows of ``x`` and ``a`` (weighted least squares: the square
            roots of the row weights), applied in float64.

        The rows are converted to float64 and added a few MB at a time
        (:func:`neurofuse.stats.row_chunks`), never as a whole batch."""
        blocks = [a] if isinstance(a, Tensor) else list(a)
        for b in blocks:
            if x.shape[0] != b.shape[0]:
                raise IncompatibleModelsError(
                    f"fused level produces {x.shape[0]} rows but the base models {b.shape[0]}; the "
                    "level's spatial shapes differ between models"
                )
        x = x.detach()
        blocks = [b.detach() for b in blocks]
        scale = None if row_scale is None else row_scale.detach().to(x.device, torch.float64)
        self._add(count=torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
        if self._rows is not None and self.rows <= x.shape[1]:
            # the Gram matrix is formed only if it is asked for (state, merge, a larger set);
            # until then it is a zero placeholder of its shape that holds no memory
            x = x.double() if scale is None else x.double() * scale[:, None]
            outs = torch.cat(blocks, 1) if len(blocks) > 1 else blocks[0]
            if scale is not None:
                outs = outs.double() * scale[:, None]
            self._rows.append((x, None if self.has_cross else outs.float()))
            if self.gram is None:
                self._sums["gram"] = x.new_zeros(1).expand(x.shape[1], x.shape[1])
            self._add_rows(x, [outs], None, gram=False)
            return
        self._drop_rows()
        self._add_rows(x, blocks, scale, gram=True)

    def scale_targets(self, factors: Tensor) -> None:
        """Multiply every base output column :math:`a_j` by ``factors[j]``, as if the outputs had
        been scaled before :meth:`update` (``cross`` and ``sq`` are linear and quadratic in them).

        Parameters
        ----------
        factors : Tensor
            ``[M]`` one factor per base output column (e.g. a per-model constant repeated over
            that model's neurons), on any device.
        """
        f = factors.detach().to(torch.float64)
        if self.sq is not None:
            self._sums["sq"] = self._sums["sq"] * f.to(self._sums["sq"].device) ** 2
        if self.has_cross and self._sums["cross"] is not None:
            self._sums["cross"] = self._sums["cross"] * f.to(self._sums["cross"].device)[None, :]
        if self._rows and not self.has_cross:
            self._rows = [(x, a * f.to(a.device, a.dtype)[None, :]) for x, a in self._rows]

    def _add_rows(self, x: Tensor, blocks: List[Tensor], scale: Optional[Tensor], gram: bool) -> None:
        """``sq``, ``cross`` and (with ``gram``) ``gram`` of these rows, each times its ``scale``,
        in float64 chunks (:func:`neurofuse.stats.row_chunks`)."""
        width = max(sum(b.shape[1] for b in blocks), x.shape[1])
        for rows in row_chunks(x.shape[0], width):
            parts = [b[rows] for b in blocks]
            ac = (torch.cat(parts, 1) if len(parts) > 1 else parts[0]).double()
            xc = x[rows].double()
            if scale is not None:
                ac, xc = ac * scale[rows, None], xc * scale[rows, None]
            self._add(sq=(ac * ac).sum(0))
            if gram:
                self._add_gram("gram", xc)
            if self.has_cross:
                self._add_product("cross", xc.T, ac)

    @phase("statistics")
    def _flush(self) -> None:
        """Add the kept design rows not yet in ``gram`` to it."""
        if self._rows and self._in_gram < len(self._rows):
            x = torch.cat([xb for xb, _ in self._rows[self._in_gram:]], 0)
            if self.gram is not None and self.gram.stride() == (0, 0):   # the placeholder
                self._sums["gram"] = torch.zeros(self.gram.shape, dtype=x.dtype, device=x.device)
            self._add_gram("gram", x)
            self._in_gram = len(self._rows)

    def _drop_rows(self) -> None:
        """Stop keeping rows (their design rows go into ``gram`` first)."""
        self._flush()
        self._rows = None

    @property
    def kept_rows(self) -> Optional[Tensor]:
        """``[n, M]`` the base outputs kept with ``rows=True`` (``None``: not kept or too many)."""
        if not self._rows or self.has_cross:
            return None
        return torch.cat([ab for _, ab in self._rows], 0)

    def _kept_design(self) -> Optional[Tensor]:
        """``[n, d]`` every design row seen, when all were kept (with ``cross``; else ``None``)."""
        if not self.has_cross or not self._rows or sum(xb.shape[0] for xb, _ in self._rows) != self.rows:
            return None
        return torch.cat([xb for xb, _ in self._rows], 0)

    def state(self) -> dict:
        self._flush()
        return super().state()

    def merge(self, other: "AdditiveStats") -> "LinearStats":
        """Add another shard's sums; kept rows are concatenated (``self``'s first) while the union
        has at most ``d`` rows."""
        self._flush()
        if isinstance(other, LinearStats):
            other._flush()
        mine, theirs = self._rows, getattr(other, "_rows", None)
        super().merge(other)
        if (mine is not None and theirs is not None and self.gram is not None
                and self.rows <= self.gram.shape[0]):
            self._rows = mine + list(theirs)
            self._in_gram = len(self._rows)
        else:
            self._rows = None
        return self

    def all_reduce(self, group: Any = None) -> "LinearStats":
        """Sum over the processes of ``group``; kept rows (base outputs, or with ``cross`` the
        design rows) are gathered in rank order when every process kept them and the union has
        at most ``d`` rows (otherwise none are kept), so the ranks solve like one process."""
        import torch.distributed as dist

        self._flush()
        if (self._rows_wanted or self.has_cross) and self.gram is not None:   # alike on every rank
            a = self._kept_design() if self.has_cross else self.kept_rows
            info = torch.tensor([-1.0 if a is None else float(a.shape[0]), float(self.gram.shape[0])],
                                dtype=torch.float64, device=self.gram.device)
            sizes = [torch.zeros_like(info) for _ in range(dist.get_world_size(group))]
            dist.all_gather(sizes, info, group=group)
            counts = [int(t[0]) for t in sizes]
            self._rows = None
            if min(counts) > 0 and sum(counts) <= int(sizes[0][1]):
                assert a is not None
                pad = torch.zeros(max(counts), a.shape[1], dtype=a.dtype, device=a.device)
                pad[:a.shape[0]] = a
                parts = [torch.empty_like(pad) for _ in counts]
                dist.all_gather(parts, pad, group=group)
                self._rows = [(p[:c], None) if self.has_cross else (None, p[:c]) for p, c in zip(parts, counts)]
                self._in_gram = len(self._rows)
        super().all_reduce(group)
        return self

    def default_rtol(self) -> float:
        """``torch.linalg.pinv``'s default for float32 data: ``max(rows, d) * eps(float32)``."""
        assert self.gram is not None
        return max(self.rows, self.gram.shape[0]) * float(torch.finfo(torch.float32).eps)

    def _gram(self) -> Tensor:
        self._flush()
        assert self.gram is not None
        g = 0.5 * (self.gram + self.gram.T)
        if not torch.isfinite(g).all():
            raise IncompatibleModelsError(
                "the fused model's previous level produced NaN or infinite outputs; try a larger "
                "rtol or a ridge (options rtol=..., ridge=...)"
            )
        return g

    def _solve_shared(self, prior: Optional[Tensor]) -> LinearSolution:
        r"""The exact solution when every base output is :math:`a_j = X p_j` (shared inputs).

        At a level whose design matrix is the same for the fused and every base model (the first
        level: all read the model input), the least-squares weights with the prior's null-space
        part are the base weights themselves, :math:`(X^\top X)^+ X^\top X p_j + (I - UU^\top)
        p_j = p_j`, and the residuals are zero.  Grouping needs coordinates with
        :math:`\lVert f_i - f_j\rVert = \lVert a_i - a_j\rVert`: :math:`f_j = L^\top p_j` with
        the Cholesky factor :math:`G = LL^\top` of the Gram matrix (inputs that are zero on every
        row left out, a jitter of ``10 d eps`` relative to its largest diagonal entry), an
        isometry up to that jitter that is continuous in :math:`G` (no eigenvector signs or
        bases) and costs a fraction of the eigendecomposition.  With the outputs kept
        (``rows=True`` and :math:`n \le d`) the coordinates are :math:`f_j = a_j` itself: exact,
        in :math:`n` dimensions, with no factorisation (the reported rank is then the upper bound
        :math:`\min(n, d')`, :math:`d'` the inputs that are not zero on every row).
        """
        if prior is None:
            raise ConfigError("statistics without X^T A (shared inputs) need the base weights (prior)")
        kept = self.kept_rows
        if kept is not None:
            if self._in_gram == len(self._rows or ()):
                active = torch.diagonal(self._gram()) > 0
            else:
                active = torch.cat([xb for xb, _ in self._rows or ()], 0).ne(0).any(0)
            if not bool(torch.isfinite(kept).all()):
                raise IncompatibleModelsError("the base models' first level produced NaN or "
                                              "infinite outputs; check the models' weights")
            rank = min(self.rows, int(active.sum()))
            feats = kept.T.contiguous()                                   # [M, n], float32
            zero = torch.zeros(feats.shape[0], dtype=torch.float64, device=feats.device)
            return LinearSolution(feats, zero, rank, None, prior, lambda c, p: p)  # type: ignore[arg-type,return-value]
        g = self._gram()
        diag = torch.diagonal(g)
        idx = torch.nonzero(diag > 0).flatten()
        if idx.numel() == 0:
            feats = torch.zeros(prior.shape[1], 1, dtype=torch.float32, device=prior.device)
            return LinearSolution(feats, self.sq.clamp_min(0.0), 0, None, prior, lambda c, p: p)  # type: ignore[arg-type]
        ga = g[idx][:, idx]
        scale = float(torch.diagonal(ga).max())
        jitter = 10.0 * ga.shape[0] * float(torch.finfo(torch.float64).eps) * scale
        eye = torch.eye(ga.shape[0], dtype=ga.dtype, device=ga.device)
        for _ in range(6):  # a rounding-negative pivot: more jitter (the fit is exact regardless)
            chol, info = torch.linalg.cholesky_ex(ga + jitter * eye)
            if int(info) == 0:
                break
            jitter *= 100.0
        else:
            raise IncompatibleModelsError("the Gram matrix of the model inputs is not positive "
                                          "semi-definite; check the fusion set for extreme values")
        p = prior[idx.to(prior.device)]
        feats = chol.T.float() @ p.float()                            # [d', M], float32 suffices
        residual = (self.sq - (feats.double() ** 2).sum(0)).clamp_min(0.0)
        # numerical rank, as the eigenvalue cut of the general path applied to the pivots
        piv = torch.diagonal(chol) ** 2
        cut = max(self.default_rtol() ** 2, 10.0 * g.shape[0] * float(torch.finfo(torch.float64).eps))
        rank = min(self.rows, int((piv > cut * float(piv.max())).sum()))
        return LinearSolution(feats.T.contiguous(), residual, rank, None, prior, lambda c, p: p)  # type: ignore[arg-type,return-value]

    def _eigh(self) -> tuple[Tensor, Tensor, int]:
        """Eigenpairs of the Gram matrix, less those of the inputs that are zero on every row,
        and the number ``d'`` of the other inputs (the design's columns that are not all zero).

        An input that is exactly zero on the whole fusion set (a pixel that is always black, a
        neuron that never fires) has a zero row and column in :math:`G`: it spans an exact null
        direction, so the decomposition runs on the other inputs only (``[d, d']`` eigenvectors
        with zero rows there) — the same pseudo-inverse, at :math:`(d'/d)^3` of the cost.  With
        fewer rows than those inputs the eigenpairs come from :math:`X X^\top` instead
        (:meth:`_eigh_rows`: only the positive ones, all that the fit and GCV use).
        """
        x = self._kept_design()
        if x is not None:
            columns = int(x.ne(0).any(0).sum())
            if x.shape[0] < columns:
                return (*self._eigh_rows(x), columns)
        g = self._gram()
        active = torch.diagonal(g) > 0
        if bool(active.all()) or not bool(active.any()):
            return (*_eigh_dense(g), g.shape[0])
        idx = torch.nonzero(active).flatten()
        w, v = _eigh_dense(g[idx][:, idx])
        full = torch.zeros(g.shape[0], v.shape[1], dtype=v.dtype, device=v.device)
        full[idx] = v
        return w, full, len(idx)

    def _eigh_rows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""The positive eigenpairs of :math:`G = X^\top X` from the kept design rows, with fewer
        rows than active inputs (:math:`n < d'`): :math:`X X^\top = V \Lambda V^\top` has the same
        positive eigenvalues and :math:`U = X^\top V \Lambda^{-1/2}` the eigenvectors, at
        :math:`n^2 d + n^3` instead of :math:`n d^2 + d'^3` (a conv level late in a network: 1,600
        rows of 4,609 inputs in VGG11 at 32x32 with 400 samples).  The zero eigenvalues are left
        out: every use of the eigenpairs cuts them."""
        if not bool(torch.isfinite(x).all()):
            raise IncompatibleModelsError(
                "the fused model's previous level produced NaN or infinite outputs; try a larger "
                "rtol or a ridge (options rtol=..., ridge=...)"
            )
        k = x @ x.T
        w, v = _eigh_dense(0.5 * (k + k.T))
        pos = w > 0
        w, v = w[pos], v[:, pos]
        return w, (x.T @ v).div_(torch.sqrt(w))

    @phase("solve")
    def solve(self, rtol: float | None = None, ridge: "float | str" = 0.0,
              prior: Tensor | None = None) -> LinearSolution:
        r"""Least-squares weights, image coordinates and residuals of every base neuron.

        Parameters
        ----------
        rtol : float, optional
            Singular values of :math:`X` below ``rtol`` times the largest are treated as zero, as
            in ``torch.linalg.pinv``; default :meth:`default_rtol`.
        ridge : float or "auto"
            The penalty :math:`\lambda` of Tikhonov regularisation relative to
            :math:`\overline{\mathrm{diag}}\,X^\top X` (the mean eigenvalue):
            :math:`w_j = (X^\top X + \lambda I)^{-1} (X^\top a_j + \lambda p_j)`.  ``0`` is the
            pseudo-inverse (truncated at ``rtol``); ``"auto"`` chooses :math:`\lambda` from
            :data:`~neurofuse.approximation._ridge.PENALTY_GRID` (0 included) by generalised
            cross-validation, one penalty for all the level's columns
            (:mod:`neurofuse.approximation._ridge`).
        prior : Tensor, optional
            ``[d, M]`` prior weights :math:`p_j`.  With truncation, the components of the
            solution in the null space of :math:`X` (input directions the fusion set never
            excites) are taken from the prior instead of being zero; the fitted values
            :math:`X w_j` do not change.  With a ridge, the solution is shrunk towards the prior
            instead of towards zero.  Statistics accumulated without :math:`X^\top A`
            (``LinearStats(cross=False)``, for a level whose inputs the base models share) hold
            the exact solution :math:`w_j = p_j`, whatever the ridge: ``prior`` is required
            (:meth:`_solve_shared`).
        """
        if self.empty:
            raise ValueError("no statistics accumulated")
        auto = isinstance(ridge, str)
        if auto and ridge != "auto":
            raise ConfigError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}")
        if not self.has_cross:
            return self._solve_shared(prior)
        rtol = self.default_rtol() if rtol is None else rtol
        if rtol <= 0 or (not auto and not ridge >= 0):
            raise ConfigError(f"need rtol > 0 and ridge >= 0 or 'auto', got rtol={rtol}, ridge={ridge}")
        # eigenvalues of X^T X are squared singular values of X; below ~d * eps(float64) they are
        # rounding noise of the accumulated Gram matrix, whatever rtol asks for
        d = self.gram.shape[0]
        cut = max(rtol * rtol, 10.0 * d * float(torch.finfo(torch.float64).eps))
        evals, evecs, columns = self._eigh()
        keep = evals > cut * evals.max().clamp_min(1e-300)
        scale = float(evals.clamp_min(0.0).sum()) / d                    # mean(diag X^T X)
        kept = evals[keep]
        condition = float(torch.sqrt(kept.max() / kept.min())) if kept.numel() else float("inf")
        penalty = 0.0 if auto else float(ridge)
        u, e = evecs[:, keep], kept
        if auto or penalty > 0:
            # ridge regression of the residual targets a_j - X p_j (toward the prior), in the
            # eigenbasis of the numerical rank (eigenvalues below the cut count as zero, as in
            # the pseudo-inverse): t_j = U^T X^T (a_j - X p_j) = U^T c_j - E U^T p_j
            if prior is None:
                uc = t = u.T @ self.cross                                  # [r, M]
            else:
                uc, pu = (u.T @ torch.cat([self.cross, prior], 1)).split(self.cross.shape[1], 1)
                t = uc - e[:, None] * pu
        if auto:
            r_sq = self.sq if prior is None else (
                self.sq - 2.0 * (prior * self.cross).sum(0) + (e[:, None] * pu * pu).sum(0))
            rss0 = r_sq - (t ** 2 / e[:, None]).sum(0)
            grid = torch.tensor(PENALTY_GRID, dtype=evals.dtype, device=evals.device)
            scores = gcv_curve(e, t, rss0, self.rows, grid * scale)
            # the first minimum: among equal scores (a flat criterion), the smallest penalty
            penalty = float(grid[int(torch.argmin(scores))])
        if penalty == 0:
            lam = kept
            proj = uc.clone() if auto else u.T @ self.cross   # [r, M]
            # U Λ^{-1/2} U^T C: coordinates of P a_j (an isometry of the image), written back in
            # the input basis so that they do not depend on the eigenvectors' signs or on the
            # basis LAPACK picks inside a (near-)degenerate eigenspace; the grouping then sees the
            # same points whatever the summation order of the statistics (shards, ranks, batches)
            feats = u @ proj.div_(torch.sqrt(lam)[:, None])
            residual = self.sq - (feats * feats).sum(0)
            rank = int(keep.sum())
            dof = float(rank)

            def apply(c: Tensor, p: Optional[Tensor]) -> Tensor:
                w = u @ ((u.T @ c) / lam[:, None])            # (X^T X)^+ X^T A
                if p is not None:
                    w = w + p - u @ (u.T @ p)                 # null-space part from the prior
                return w
        else:
            inv = 1.0 / (e + penalty * scale)                 # (E + lambda I)^-1

            def apply(c: Tensor, p: Optional[Tensor]) -> Tensor:
                # p + U (E + lambda)^-1 U^T X^T (a - X p): shrunk toward the prior (toward zero
                # without one); directions the fusion set does not excite keep the prior
                if p is None:
                    return u @ ((u.T @ c) * inv[:, None])
                uc_, up_ = (u.T @ torch.cat([c, p], 1)).split(c.shape[1], 1)
                return p + u @ ((uc_ - e[:, None] * up_) * inv[:, None])

            # X w_j is no longer an orthogonal projection: coordinates of the fitted values
            # X w_j in an orthonormal basis of the image, E^{1/2} U^T w_j, written back in the
            # input basis as in the pseudo-inverse path
            y = t * inv[:, None] if prior is None else pu + t * inv[:, None]   # U^T w_j
            feats = u @ (torch.sqrt(e)[:, None] * y)
            residual = self.sq - 2.0 * (y * uc).sum(0) + (e[:, None] * y * y).sum(0)
            rank = int(keep.sum())
            dof = float((e / (e + penalty * scale)).sum())
        diagnostics = FitDiagnostics(self.rows, columns, condition, penalty, dof)
        return LinearSolution(feats.T.contiguous(), residual.clamp_min(0.0), rank, self.cross, prior,
                              apply, diagnostics)
