r"""RegMean: merge linear layers by regression on every model's own layer inputs.

Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023.

For one linear layer (a ``Linear``, or a ``Conv2d`` on its unfolded input patches) with weights
:math:`W_k` (``[out, d]``) in model :math:`k` and that model's own inputs :math:`X_k` (rows of
``d``; a ones column when the bias is fitted too), RegMean asks for the weights whose outputs are
closest to every model's outputs on its own inputs,

.. math:: W = \arg\min_W \sum_k \lVert X_k W^\top - X_k W_k^\top \rVert_F^2
          = \Bigl(\sum_k W_k G_k\Bigr)\Bigl(\sum_k G_k\Bigr)^{-1}, \qquad G_k = X_k^\top X_k,

which needs only each model's Gram matrix :math:`G_k` (additive over samples, so it can be
accumulated in batches, on shards, or by federated clients).  The paper shrinks the off-diagonal
entries, :math:`\tilde G_k = \alpha G_k + (1-\alpha)\operatorname{diag}(G_k)`, which interpolates
between the regression (:math:`\alpha = 1`) and a per-input weighted mean (:math:`\alpha = 0`).
Where :math:`\sum_k \tilde G_k` is singular (an input no sample excites), :func:`regmean` takes
the solution closest to the plain mean :math:`\bar W`:
:math:`W = \bar W + (R - \bar W G)\,G^{+}`, :math:`R = \sum_k W_k \tilde G_k`,
:math:`G = \sum_k \tilde G_k`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleModelsError
from ..stats import AdditiveStats
from ._linear import _eigh_dense, design_matrix

__all__ = ["LayerGrams", "is_conv1d", "layer_rows", "regmean"]


class LayerGrams(AdditiveStats):
    """Per merged layer ``i`` of one model: the count ``n<i>`` of its input rows and their Gram
    matrix ``g<i>`` :math:`= X_i^\top X_i`.  Sums over samples, so the statistics of disjoint
    shards of the data (batches, ranks, federated clients) merge into those of their union.

    >>> s = LayerGrams(1)
    >>> s.update(0, torch.ones(3, 2))
    >>> LayerGrams.from_state(s.state()).merge(s).gram(0)[0, 0].item()
    6.0
    """

    def __init__(self, num_layers: int = 0) -> None:
        self.fields = tuple(f for i in range(int(num_layers)) for f in (f"n{i}", f"g{i}"))
        super().__init__()

    @classmethod
    def _empty_for(cls, state: Dict[str, Tensor], **kwargs: Any) -> "LayerGrams":
        return cls(num_layers=1 + max((int(k[1:]) for k in state if k.startswith("g")), default=-1))

    @property
    def num_layers(self) -> int:
        return len(self.fields) // 2

    def update(self, layer: int, x: Tensor) -> None:
        """Add the input rows ``x`` ``[rows, d]`` of layer ``layer``."""
        self._add(**{f"n{layer}": torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)})
        self._add_gram(f"g{layer}", x)

    def gram(self, layer: int) -> Optional[Tensor]:
        """The Gram matrix of layer ``layer`` (``None`` if no row reached it)."""
        return self._sum(f"g{layer}")


def is_conv1d(layer: nn.Module) -> bool:
    """Whether ``layer`` is a ``transformers`` ``Conv1D`` (GPT-2): a linear layer whose weight is
    stored ``[in, out]`` (:math:`y = xW + b`), recognised without importing ``transformers``."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and getattr(layer, "weight", None) is not None


def layer_rows(layer: nn.Module, u: Tensor, bias: bool) -> Tensor:
    """Input rows of a ``Linear`` or ``Conv1D`` (any leading axes) or ``Conv2d`` (unfolded
    patches) for the input ``u``, with a ones column when ``bias`` (and the layer has one)."""
    if isinstance(layer, nn.Linear) or is_conv1d(layer):
        x = u.reshape(-1, layer.in_features if isinstance(layer, nn.Linear) else layer.weight.shape[0])
        if bias and layer.bias is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        return x
    rows = design_matrix(layer, u)  # conv: unfolded patches, ones column if it has a bias
    return rows if bias or layer.bias is None else rows[:, :-1]


def regmean(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 1.0,
            rtol: float = 1e-12) -> Tensor:
    r"""The RegMean merge of one layer (see the module notes).

    Parameters
    ----------
    weights : sequence of Tensor
        ``[out, d]`` every model's weights (a bias as the last column when it is fitted).
    grams : sequence of Tensor
        ``[d, d]`` every model's Gram matrix of its own input rows.
    alpha : float
        Scale of the off-diagonal Gram entries, in ``[0, 1]``.
    rtol : float
        Eigenvalues of :math:`\sum_k \tilde G_k` below ``rtol`` times the largest count as zero.

    Returns
    -------
    Tensor
        ``[out, d]`` merged weights (float64).

    Examples
    --------
    >>> x = torch.randn(50, 3, dtype=torch.float64)
    >>> w1, w2 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    >>> torch.allclose(regmean([w1, w2], [x.T @ x, x.T @ x]), (w1 + w2) / 2)
    True
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    ws = [w.double() for w in weights]
    gs = []
    for g in grams:
        g = g.double()
        gs.append(alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g)))
    total = sum(gs)
    rhs = sum(w @ g for w, g in zip(ws, gs))
    mean = sum(ws) / len(ws)
    if not bool(torch.isfinite(total).all()):
        raise IncompatibleModelsError("a layer's Gram matrix has NaN or infinite entries: a model's "
                                      "activations overflow on the fusion set")
    vals, vecs = _eigh_dense((total + total.T) / 2)   # with a robust fallback where syevd fails
    keep = vals > rtol * vals.abs().max().clamp_min(1e-300)
    v = vecs[:, keep]
    pinv = (v / vals[keep]) @ v.T
    return mean + (rhs - mean @ total) @ pinv
