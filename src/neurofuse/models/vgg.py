"""VGG family (VGG11 layout by default) for 8x8, 28x28 and 32x32 inputs."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from torch import nn

from ..errors import ConfigError
from ..levels import LeveledNet
from ._registry import register_model

#: conv widths and "M" (2x2 max-pool) of the standard layouts
LAYOUTS: Dict[str, List[Union[int, str]]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


@register_model("vgg")
class VGG(LeveledNet):
    """VGG with one level per conv layer plus a linear classifier level (paper section F.2).

    The ReLU (and max-pool) after each conv starts the next level, so every level ends at a conv
    pre-activation: for VGG11 on 32x32 inputs that is the paper's 9 levels.  A max-pool is skipped
    where the feature map is already 1x1, which makes the same layout work on 8x8 (digits) and
    28x28 (MNIST) inputs.  No batch norm, biases on (as in the paper's trained models).

    Parameters
    ----------
    input_shape : sequence of int
        ``(channels, height, width)``; height must equal width.
    num_classes : int
        Number of output classes.
    layout : str or list
        A name from :data:`LAYOUTS` or a list of conv widths and ``"M"``.
    width_multiplier : float
        Scales every conv width (rounded, at least 1).
    widths : list of int, optional
        Explicit conv widths (overrides the layout's widths and the multiplier).
    """

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10,
                 layout: Union[str, Sequence[Union[int, str]]] = "vgg11",
                 width_multiplier: float = 1.0, widths: Optional[Sequence[int]] = None) -> None:
        if isinstance(layout, str):
            if layout not in LAYOUTS:
                raise ConfigError(f"unknown VGG layout {layout!r}; choose one of {sorted(LAYOUTS)}")
            cfg = list(LAYOUTS[layout])
        else:
            cfg = list(layout)
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise ConfigError(f"VGG needs square (C, H, W) inputs, got {list(input_shape)}")
        if width_multiplier <= 0:
            raise ConfigError(f"width_multiplier must be positive, got {width_multiplier}")
        n_conv = sum(1 for c in cfg if c != "M")
        if widths is None:
            widths = [max(1, int(round(int(c) * width_multiplier))) for c in cfg if c != "M"]
        widths = [int(w) for w in widths]
        if len(widths) != n_conv or min(widths) < 1:
            raise ConfigError(f"VGG layout has {n_conv} conv layers; got widths {widths}")

        levels: List[nn.Module] = []
        pending: List[nn.Module] = []
        size = int(input_shape[1])
        c_in = int(input_shape[0])
        wi = iter(widths)
        for item in cfg:
            if item == "M":
                if size >= 2:
                    pending.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            c_out = next(wi)
            ops = ([nn.ReLU()] if levels else []) + pending + [nn.Conv2d(c_in, c_out, 3, padding=1)]
            levels.append(nn.Sequential(*ops))
            pending = []
            c_in = c_out
        head = [nn.ReLU(), *pending, nn.Flatten(1), nn.Linear(c_in * size * size, int(num_classes))]
        levels.append(nn.Sequential(*head))
        super().__init__(levels, ["conv"] * (len(levels) - 1) + ["dense"], input_shape, num_classes)
        self.layout = layout if isinstance(layout, str) else list(layout)
        self.widths = widths

    @classmethod
    def preset(cls, size: str, input_shape: Sequence[int], num_classes: int) -> "VGG":
        mult = {"tiny": 0.125, "small": 0.25, "paper": 1.0}
        if size not in mult:
            raise ConfigError(f"unknown size {size!r} for vgg; choose one of {sorted(mult)}")
        return cls(input_shape, num_classes, "vgg11", width_multiplier=mult[size])

    def config(self) -> Dict[str, Any]:
        return {"arch": "vgg", "kwargs": {"input_shape": list(self.input_shape),
                                          "num_classes": self.num_classes,
                                          "layout": self.layout, "widths": list(self.widths)}}

    def with_widths(self, widths: Sequence[int]) -> "VGG":
        return VGG(self.input_shape, self.num_classes, self.layout, widths=list(widths))
