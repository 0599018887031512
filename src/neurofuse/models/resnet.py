"""CIFAR-style ResNets (ResNet-20, ResNet-18) split into one level per residual block."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from torch import Tensor, nn

from ..errors import ConfigError
from ..levels import LeveledNet
from ._registry import register_model

#: (blocks per stage, base width of each stage, stride of each stage)
DEPTHS: Dict[int, Dict[str, List[int]]] = {
    20: {"blocks": [3, 3, 3], "widths": [16, 32, 64], "strides": [1, 2, 2]},
    18: {"blocks": [2, 2, 2, 2], "widths": [64, 128, 256, 512], "strides": [1, 2, 2, 2]},
}


def _conv3x3(c_in: int, c_out: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    r"""A residual block whose input and output are pre-activations.

    ``forward(h) = branch(relu(h)) + shortcut(relu(h))`` with
    ``branch = [conv3x3, BN, ReLU, conv3x3, BN]`` and ``shortcut`` the identity, or
    ``[conv1x1, BN]`` when the stride is not 1 or the widths differ.  The ReLU that ends a
    standard ResNet block starts the next one, so a chain of these blocks computes exactly the
    standard (post-activation) ResNet, and each block's output is the pre-activation sum.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.branch = nn.Sequential(
            _conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out), nn.ReLU(),
            _conv3x3(c_out, c_out, 1), nn.BatchNorm2d(c_out),
        )
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        a = self.act(h)
        return self.branch(a) + self.shortcut(a)


@register_model("resnet")
class ResNet(LeveledNet):
    """CIFAR ResNet: a stem level, one level per residual block, a classifier level.

    * level 0 (stem): ``[Conv3x3, BatchNorm2d]``, a pre-activation;
    * levels 1..B: :class:`BasicBlock` (ReLU at its start, pre-activation sum at its end);
    * last level: ``[ReLU, AdaptiveAvgPool2d(1), Flatten, Linear]``.

    ``depth=20`` is He et al.'s CIFAR ResNet-20 (3 stages of 3 blocks, widths 16/32/64);
    ``depth=18`` is the CIFAR ResNet-18 (4 stages of 2 blocks, widths 64/128/256/512, 3x3 stem,
    no max-pool).  Stages after the first halve the spatial size, except where it is already 1
    (so 8x8 digits work).  Any widths are valid: a block whose input and output widths differ
    (or that downsamples) gets a 1x1-conv projection shortcut, otherwise the identity.

    Parameters
    ----------
    input_shape : sequence of int
        ``(channels, height, width)``.
    num_classes : int
        Number of output classes.
    depth : int
        20 or 18.
    width_multiplier : float
        Scales every width (rounded, at least 1).
    widths : list of int, optional
        Explicit width of every level but the last (stem, then each block); overrides the
        multiplier.
    """

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 depth: int = 20, width_multiplier: float = 1.0,
                 widths: Optional[Sequence[int]] = None) -> None:
        if depth not in DEPTHS:
            raise ConfigError(f"unknown ResNet depth {depth!r}; choose one of {sorted(DEPTHS)}")
        if len(input_shape) != 3:
            raise ConfigError(f"ResNet needs (C, H, W) inputs, got {list(input_shape)}")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        if not width_multiplier > 0:
            raise ConfigError(f"width_multiplier must be positive, got {width_multiplier}")
        spec = DEPTHS[depth]
        stage_of_block = [s for s, n in enumerate(spec["blocks"]) for _ in range(n)]
        if widths is None:
            base = [spec["widths"][0]] + [spec["widths"][s] for s in stage_of_block]
            widths = [max(1, int(round(w * width_multiplier))) for w in base]
        widths = [int(w) for w in widths]
        if len(widths) != 1 + len(stage_of_block) or min(widths) < 1:
            raise ConfigError(
                f"ResNet-{depth} has {1 + len(stage_of_block)} levels before the classifier "
                f"(stem + {len(stage_of_block)} blocks) and needs that many positive widths, got {widths}"
            )
        levels: List[nn.Module] = [nn.Sequential(_conv3x3(int(input_shape[0]), widths[0], 1),
                                                 nn.BatchNorm2d(widths[0]))]
        size = min(int(input_shape[1]), int(input_shape[2]))
        prev_stage = 0
        for b, stage in enumerate(stage_of_block):
            stride = 1
            if stage != prev_stage:
                prev_stage = stage
                if spec["strides"][stage] == 2 and size >= 2:
                    stride = 2
                    size = (size + 1) // 2
            levels.append(BasicBlock(widths[b], widths[b + 1], stride))
        levels.append(nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                    nn.Linear(widths[-1], int(num_classes))))
        super().__init__(levels, ["conv"] * (len(levels) - 1) + ["dense"], input_shape, num_classes)
        self.depth = int(depth)
        self.widths = widths

    @classmethod
    def preset(cls, size: str, input_shape: Sequence[int], num_classes: int) -> "ResNet":
        """``tiny``: ResNet-20 at 1/4 width (4/8/16); ``small``: ResNet-20 at 1/2 width
        (8/16/32); ``paper``: ResNet-18 (64..512)."""
        sizes = {"tiny": (20, 0.25), "small": (20, 0.5), "paper": (18, 1.0)}
        if size not in sizes:
            raise ConfigError(f"unknown size {size!r} for resnet; choose one of {sorted(sizes)}")
        depth, mult = sizes[size]
        return cls(input_shape, num_classes, depth, width_multiplier=mult)

    def config(self) -> Dict[str, Any]:
        return {"arch": "resnet", "kwargs": {"input_shape": list(self.input_shape),
                                             "num_classes": self.num_classes, "depth": self.depth,
                                             "widths": list(self.widths)}}

    def with_widths(self, widths: Sequence[int]) -> "ResNet":
        if len(widths) != len(self.widths):
            raise ConfigError(f"ResNet-{self.depth} needs {len(self.widths)} widths (stem + blocks), "
                              f"got {list(widths)}")
        return ResNet(self.input_shape, self.num_classes, self.depth, widths=list(widths))
