"""Multi-layer perceptron of any depth and widths."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

from torch import nn

from ..errors import ConfigError
from ..levels import LeveledNet
from ._registry import register_model


@register_model("mlp")
class MLP(LeveledNet):
    """MLP split into one level per linear layer, each ending at its pre-activation.

    Level 0 is ``[Flatten, Linear(in, h_1)]``; level ``i`` is ``[ReLU, Linear(h_i, h_{i+1})]``;
    the last level outputs the logits.  This is the paper's MLPNet (``use_activations=False``),
    generalised to any number of hidden layers.

    Parameters
    ----------
    input_shape : sequence of int
        Shape of one input sample, e.g. ``(1, 8, 8)``.
    num_classes : int
        Number of output classes.
    hidden : sequence of int
        Width of each hidden layer (at least one).
    bias : bool
        Whether linear layers have biases.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10,
                 hidden: Sequence[int] = (64,), bias: bool = True) -> None:
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1:
            raise ConfigError(f"MLP hidden widths must be positive integers, got {hidden}")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        d_in = int(math.prod(input_shape))
        widths = [d_in, *hidden, int(num_classes)]
        levels: List[nn.Module] = [nn.Sequential(nn.Flatten(1), nn.Linear(widths[0], widths[1], bias=bias))]
        for a, b in zip(widths[1:-1], widths[2:]):
            levels.append(nn.Sequential(nn.ReLU(), nn.Linear(a, b, bias=bias)))
        super().__init__(levels, ["dense"] * len(levels), input_shape, num_classes)
        self.hidden = hidden
        self.bias = bias

    @classmethod
    def preset(cls, size: str, input_shape: Sequence[int], num_classes: int) -> "MLP":
        hidden = {"tiny": [32, 32], "small": [64, 64], "paper": [256]}
        if size not in hidden:
            raise ConfigError(f"unknown size {size!r} for mlp; choose one of {sorted(hidden)}")
        return cls(input_shape, num_classes, hidden[size])

    def config(self) -> Dict[str, Any]:
        return {"arch": "mlp", "kwargs": {"input_shape": list(self.input_shape),
                                          "num_classes": self.num_classes,
                                          "hidden": list(self.hidden), "bias": self.bias}}

    def with_widths(self, widths: Sequence[int]) -> "MLP":
        if len(widths) != len(self.hidden):
            raise ConfigError(f"an MLP with {len(self.hidden)} hidden layers needs "
                              f"{len(self.hidden)} widths, got {list(widths)}")
        return MLP(self.input_shape, self.num_classes, widths, self.bias)
