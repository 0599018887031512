"""Output ensembles: the average of the members' softmax outputs."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ._registry import _MODELS

#: most members an ensemble config may list (a small file must not build thousands of models)
MAX_MEMBERS = 256


class Ensemble(nn.Module):
    r"""Average of the members' class probabilities, returned as log-probabilities.

    .. math:: p(c\mid x) \propto \sum_i w_{i,c}\,\mathrm{softmax}(z_i(x))_c

    With ``class_weights`` ``w`` (``[N, C]``, e.g. each model's share of class ``c`` in the
    training data, as the paper's ensemble rows use) the members are weighted per class; by default
    all weigh equally.  The output is ``log p``, so ``cross_entropy(output, y)`` is the ensemble's
    negative log-likelihood and ``argmax`` its prediction.
    """

    arch = "ensemble"

    def __init__(self, members: Sequence[nn.Module], class_weights: Optional[Any] = None) -> None:
        super().__init__()
        if len(members) == 0:
            raise ConfigError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        if class_weights is not None:
            src = class_weights.detach().cpu() if isinstance(class_weights, Tensor) else class_weights
            try:   # checked in numpy: a model built on the meta device has no values to check
                arr = np.asarray(src, dtype=np.float64)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise ConfigError("class_weights must be a [n_models, n_classes] array of numbers, got "
                                  f"{str(class_weights)[:60]}") from None
            if arr.ndim != 2 or arr.shape[0] != len(members):
                raise ConfigError(f"class_weights must be [n_models, n_classes], got {list(arr.shape)}")
            if not np.isfinite(arr).all() or (arr < 0).any():
                raise ConfigError("class_weights must be finite and non-negative (shares of each "
                                  "class's samples), got NaN, infinite or negative values")
            cw = torch.as_tensor(arr, dtype=torch.float32)
            self.register_buffer("class_weights", cw)
        else:
            self.class_weights = None
        first = members[0]
        self.input_shape = getattr(first, "input_shape", None)
        self.num_classes = getattr(first, "num_classes", None)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=-1) for m in self.members])  # [N, B, C]
        if self.class_weights is not None:
            probs = probs * self.class_weights[:, None, :]
        p = probs.sum(0)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        return torch.log(p.clamp_min(1e-30))

    def config(self) -> Dict[str, Any]:
        return {"arch": "ensemble", "kwargs": {
            "members": [m.config() for m in self.members],  # type: ignore[operator]
            "class_weights": None if self.class_weights is None else self.class_weights.tolist()}}


def _build_ensemble(members: Sequence[Dict[str, Any]], class_weights: Optional[Any] = None) -> Ensemble:
    from ._registry import build_model

    if not isinstance(members, (list, tuple)):
        raise ConfigError(f"an ensemble config lists its members, got a {type(members).__name__}")
    if len(members) > MAX_MEMBERS:
        raise ConfigError(f"an ensemble config lists {len(members)} members, more than "
                          f"{MAX_MEMBERS}; it is corrupt or hostile")
    return Ensemble([build_model(c) for c in members], class_weights)


_MODELS.register("ensemble")(_build_ensemble)  # type: ignore[arg-type]
