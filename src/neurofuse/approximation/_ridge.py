r"""Choosing the ridge penalty of a closed-form level fit by generalised cross-validation.

Every fit of a level is ridge regression of the targets on the design matrix :math:`X`
(:math:`n` rows, :math:`d` columns), shrunk toward a prior :math:`p_j` (the aligned base weights,
zero without one): with :math:`r_j = a_j - X p_j`,

.. math::  w_j(\lambda) = p_j + (X^\top X + \lambda I)^{-1} X^\top r_j .

With the eigendecomposition :math:`X^\top X = U E U^\top` (which the engine computes anyway) and
:math:`t_j = U^\top X^\top r_j = U^\top (X^\top a_j - X^\top X p_j)`, the residual sum of squares
and the effective degrees of freedom (the trace of the hat matrix) are

.. math::
    \mathrm{RSS}_j(\lambda) = \mathrm{RSS}_j(0)
        + \sum_i \frac{t_{ij}^2}{e_i} \Big(\frac{\lambda}{e_i + \lambda}\Big)^2, \qquad
    \mathrm{df}(\lambda) = \sum_i \frac{e_i}{e_i + \lambda},

where :math:`\mathrm{RSS}_j(0) = \lVert r_j\rVert^2 - \sum_i t_{ij}^2 / e_i` is the least-squares
residual, the part of the target no weights reach.  Generalised cross-validation (Golub, Heath &
Wahba, "Generalized cross-validation as a method for choosing a good ridge parameter",
Technometrics 21(2), 1979) estimates the error on new rows by

.. math::  \mathrm{GCV}(\lambda) = \frac{n \sum_j \mathrm{RSS}_j(\lambda)}{(n - \mathrm{df}(\lambda))^2},

the leave-one-out error of the fit with every row's leverage replaced by the mean leverage
:math:`\mathrm{df}/n`.  It needs :math:`n` (``count``), :math:`X^\top X`, :math:`X^\top A` and
:math:`\lVert a_j\rVert^2` (``sq``): sums over rows, the statistics the level already accumulates,
so merged, all-reduced and federated statistics choose the same penalty as one process on the
union, and nothing more travels.  :math:`\lVert r_j\rVert^2 = \lVert a_j\rVert^2 - 2 p_j^\top
X^\top a_j + p_j^\top X^\top X p_j` comes from the same sums and the prior, which the server has.

Where the least-squares fit is square (:math:`n` close to the numerical rank :math:`r`), it
interpolates: :math:`n - \mathrm{df}(0) \to 0` and GCV is large, so a penalty wins; where
:math:`n \gg d` the criterion is flat near zero and the smallest penalty wins.  :math:`\lambda = 0`
(the pseudo-inverse, :math:`\mathrm{df} = r`) is one of the candidates, so a level that needs no
penalty is fitted exactly as without one.  One penalty serves all the level's columns: chosen per
column (each base neuron its own), it was no better (kf-linear 0.04, hf-linear 0.07 point lower
on average over 24 MNIST fusions each, ``benchmarks/gcv_columns.py``, docs/results.md) and it
would break the linearity that lets a fused neuron's weights be one solve of its group's mean
cross column.

Rows are what GCV leaves out.  For a dense level a row is a sample.  For a conv level it is one
output position of one sample (an unfolded patch), so the criterion treats positions as
exchangeable: neighbouring positions share pixels, and leaving one out is less of a test than
leaving out a whole image, which would favour smaller penalties (a transformer's tokens, which
attention mixes, even more so).  The opposite extreme, ``n`` = the number of samples (a sample's
rows as copies of one), needs only a count but over-penalises: it was measured and dropped
(docs/results.md, "Leaving out whole samples in the ridge's cross-validation"); an exact
leave-one-sample-out would need per-sample leverages, which do not add up over shards.  Conv
levels usually have many more rows than inputs (samples x positions), where every criterion
picks a small penalty; the exception is the deep 1x1 and 3x3 levels of a VGG, where rows per
sample are few and the fit is as square as a dense level's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PENALTY_GRID", "FitDiagnostics", "fit_warning", "gcv_curve"]

#: candidate penalties, relative to the mean eigenvalue of X^T X (= mean(diag X^T X)): 0 and
#: 41 values from 1e-8 to 1e2, four per decade
PENALTY_GRID: tuple = (0.0,) + tuple(float(10.0 ** (k / 4.0)) for k in range(-32, 9))


def gcv_curve(evals: Tensor, t: Tensor, rss0: Tensor, rows: int, penalties: Tensor) -> Tensor:
    r"""``[G]`` GCV score of every penalty (pooled over the target columns), see the module.

    Parameters
    ----------
    evals : Tensor
        ``[r]`` the eigenvalues :math:`e_i` of :math:`X^\top X` above the numerical-rank cut
        (float64); the others count as zero.
    t : Tensor
        ``[r, M]`` :math:`U^\top X^\top r_j` on their eigenvectors.
    rss0 : Tensor
        ``[M]`` least-squares residuals :math:`\mathrm{RSS}_j(0)`.
    rows : int
        Rows :math:`n` of the design matrix.
    penalties : Tensor
        ``[G]`` absolute penalties :math:`\lambda \ge 0`.
    """
    s = (t ** 2).sum(1) / evals                                     # [r] sum_j t_ij^2 / e_i
    lam = penalties[:, None]
    shrink = lam / (evals[None, :] + lam)                           # [G, r] lambda / (e + lambda)
    rss = float(rss0.clamp_min(0.0).sum()) + (shrink ** 2) @ s      # [G]
    # n - df, written without cancellation: (n - r) + sum_i lambda / (e_i + lambda)
    free = max(rows - int(evals.numel()), 0) + shrink.sum(1)
    score = rows * rss / free.clamp_min(1e-300) ** 2
    return torch.where(free > 1e-9 * rows, score, torch.full_like(score, float("inf")))


@dataclass(frozen=True)
class FitDiagnostics:
    """How well posed one level's least-squares fit is.

    Attributes
    ----------
    rows : int
        Rows of the design matrix (samples, times output positions for a conv).
    columns : int
        Its columns that are not zero on every row.
    condition : float
        :math:`\\sigma_{\\max} / \\sigma_{\\min}` of the design matrix over its numerical rank.
    penalty : float
        The ridge, relative to :math:`\\overline{\\mathrm{diag}}\\,X^\\top X` (0: pseudo-inverse).
    dof : float
        Effective degrees of freedom :math:`\\sum_i e_i / (e_i + \\lambda)` (the rank at 0).
    """

    rows: int
    columns: int
    condition: float
    penalty: float
    dof: float


#: a fit is nearly square when rows / columns lies in [1/NEAR_SQUARE, NEAR_SQUARE]
NEAR_SQUARE = 1.25
#: and ill-conditioned above this condition number of the design matrix
ILL_CONDITIONED = 1e4


def fit_warning(diag: FitDiagnostics, ridge: "float | str" = "auto") -> "str | None":
    """A one-line explanation when the fit is nearly square or ill-conditioned, else ``None``.

    ``ridge`` is the setting the fit ran with (``"auto"``, or the fixed penalty).
    """
    ratio = diag.rows / max(diag.columns, 1)
    square = 1.0 / NEAR_SQUARE <= ratio <= NEAR_SQUARE
    if not square and not diag.condition > ILL_CONDITIONED:
        return None
    what = f"nearly square ({diag.rows} rows, {diag.columns} inputs)" if square else "ill-conditioned"
    msg = f"least-squares fit {what}, condition number {diag.condition:.3g}; "
    if diag.penalty > 0:
        how = "chosen by GCV" if ridge == "auto" else "fixed"
        return msg + (f"ridge {diag.penalty:.3g} {how} (effective degrees of freedom {diag.dof:.1f} "
                      f"of {diag.columns})")
    if ridge == "auto":
        return msg + "GCV chose no ridge"
    return msg + ("no ridge: the fused level may generalise poorly; use ridge='auto' or a fusion "
                  "set of other size")
