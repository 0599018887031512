r"""Fisher merging: parameter averages weighted by each model's diagonal Fisher information.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.

Seen as a Laplace approximation, model :math:`k`'s posterior over its parameters is a Gaussian at
:math:`\theta_k` whose precision is the Fisher information; the parameters that maximise the
product of the :math:`N` posteriors, with the diagonal of the Fisher, are

.. math:: \theta^{(j)} = \frac{\sum_k F_k^{(j)}\, \theta_k^{(j)}}{\sum_k F_k^{(j)}},
          \qquad F_k = \mathbb{E}_x\, \mathbb{E}_{y\sim p_{\theta_k}(y\mid x)}
          \bigl[\nabla_\theta \log p_{\theta_k}(y\mid x)\bigr]^2,

element by element (:math:`j`).  :func:`diagonal_fisher` computes the expectation over the
classes exactly (``"expected"``, the paper's choice when there are few classes) or with the data's
labels (``"empirical"``), from per-sample gradients (``torch.func``).  A floor :math:`\epsilon` is
added to every :math:`F_k` so that parameters no sample moves are averaged plainly.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..errors import ConfigError, DataError
from ..stats import AdditiveStats

__all__ = ["FISHER_KINDS", "FisherSums", "diagonal_fisher", "fisher_merge", "fisher_sums"]

#: how the expectation over the labels is taken
FISHER_KINDS = ("expected", "empirical")


class FisherSums(AdditiveStats):
    """Per parameter ``i`` of one model (in ``named_parameters`` order): the sum ``p<i>`` over
    samples of the squared per-sample gradients (:func:`fisher_sums`), and the sample ``count``.
    Sums over samples, so the statistics of disjoint shards of the data (batches, federated
    clients) merge into those of their union; :meth:`fisher` is the diagonal Fisher."""

    def __init__(self, num_params: int = 0) -> None:
        self.fields = ("count",) + tuple(f"p{i}" for i in range(int(num_params)))
        super().__init__()

    @classmethod
    def _empty_for(cls, state: Dict[str, Tensor], **kwargs: Any) -> "FisherSums":
        return cls(num_params=sum(1 for k in state if k.startswith("p")))

    def update(self, sums: Sequence[Tensor], count: int) -> None:
        """Add the per-parameter sums of ``count`` samples."""
        self._add(count=torch.tensor(float(count), dtype=torch.float64),
                  **{f"p{i}": s for i, s in enumerate(sums)})

    def fisher(self, names: Sequence[str]) -> Dict[str, Tensor]:
        """The diagonal Fisher (mean over the samples) of the parameters ``names``, in order."""
        if len(names) != len(self.fields) - 1:
            raise ConfigError(f"the Fisher sums cover {len(self.fields) - 1} parameters, not {len(names)}")
        if self.count is None or float(self.count) <= 0:
            raise DataError("the Fisher information needs at least one sample")
        return {n: self._sums[f"p{i}"] / self.count for i, n in enumerate(names)}  # type: ignore[operator]


def fisher_sums(model: nn.Module, batches: Iterable[Tuple[Tensor, Optional[Tensor]]], kind: str = "expected",
                budget: int = 1 << 24) -> FisherSums:
    r"""The sums over ``batches`` of every parameter's squared per-sample gradients (see
    :func:`diagonal_fisher`, which divides them by the sample count)."""
    if kind not in FISHER_KINDS:
        raise ConfigError(f"fisher must be one of {list(FISHER_KINDS)}, got {kind!r}")
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    size = max(1, sum(p.numel() for p in params.values()))
    chunk = max(1, budget // size)

    def log_prob(p: Dict[str, Tensor], x: Tensor, c: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(out, dim=-1)[0].gather(0, c.reshape(1))[0]

    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for xb, yb in batches:
        if kind == "empirical" and yb is None:
            raise DataError("fisher='empirical' needs labels in the fusion set; pass (x, y) or use 'expected'")
        for start in range(0, xb.shape[0], chunk):
            x = xb[start:start + chunk]
            if kind == "empirical":
                terms = [(yb[start:start + chunk], None)]  # type: ignore[index]
            else:
                with torch.no_grad():
                    probs = torch.softmax(model(x), dim=-1)
                terms = [(torch.full((x.shape[0],), c, dtype=torch.long, device=x.device), probs[:, c])
                         for c in range(probs.shape[1])]
            for labels, weight in terms:
                for n, gn in per_sample(params, x, labels).items():
                    flat = gn.reshape(gn.shape[0], -1)
                    sq = flat * flat  # per-sample squares, summed over the chunk (weighted by p(c|x))
                    summed = sq.sum(0) if weight is None else weight.to(sq.dtype) @ sq
                    total[n] += summed.reshape(total[n].shape).double()
            count += x.shape[0]
    out = FisherSums(len(total))
    out.update(list(total.values()), count)
    return out


def diagonal_fisher(model: nn.Module, batches: Iterable[Tuple[Tensor, Optional[Tensor]]], kind: str = "expected",
                    budget: int = 1 << 24) -> Dict[str, Tensor]:
    r"""The diagonal Fisher information of every parameter of ``model`` over ``batches``.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits (evaluated as it is: call ``eval()`` first).
    batches : iterable of (x, y)
        Inputs and labels (``y`` may be ``None`` with ``kind="expected"``).
    kind : str
        ``"expected"``: :math:`\sum_c p(c\mid x)\,(\nabla \log p(c\mid x))^2`, exact over the
        classes; ``"empirical"``: :math:`(\nabla \log p(y\mid x))^2` at the labels.
    budget : int
        Most per-sample gradient entries held at once (samples per vectorised chunk).

    Returns
    -------
    dict of str to Tensor
        Per parameter name, the mean over samples (float64, on the parameter's device).

    Raises
    ------
    ConfigError
        If ``kind`` is unknown.
    DataError
        If ``kind="empirical"`` and a batch has no labels, or there are no samples.
    """
    return fisher_sums(model, batches, kind, budget).fisher([n for n, _ in model.named_parameters()])


def fisher_merge(states: Sequence[Dict[str, Tensor]], fishers: Sequence[Dict[str, Tensor]],
                 floor: float = 1e-6) -> Dict[str, Tensor]:
    r"""The Fisher-weighted average of ``states``: :math:`\sum_k (F_k+\epsilon)\theta_k /
    \sum_k (F_k+\epsilon)` for the entries ``fishers`` cover, the plain mean for the other
    floating-point entries (e.g. BatchNorm running statistics), model 0's for the rest.

    Parameters
    ----------
    states : sequence of dict
        Every model's state dict (same keys and shapes).
    fishers : sequence of dict
        Every model's diagonal Fisher per parameter name (:func:`diagonal_fisher`).
    floor : float
        :math:`\epsilon`, added to every Fisher entry (must be positive).
    """
    if not floor > 0:
        raise ConfigError(f"fisher_floor must be positive, got {floor}")
    out: Dict[str, Tensor] = {}
    for key, v in states[0].items():
        if not v.is_floating_point():
            out[key] = v.clone()
        elif key in fishers[0]:
            weights = [f[key].to(v.device) + floor for f in fishers]
            num = sum(w * s[key].double() for w, s in zip(weights, states))
            out[key] = (num / sum(weights)).to(v.dtype)
        else:
            out[key] = (sum(s[key].double() for s in states) / len(states)).to(v.dtype)
    return out
