"""Vision Transformer split into one level per encoder block (paper appendix E and F.2)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..levels import LeveledNet
from ..levels._transformer import MLP, Attention, Embed, Head, Norm, Proj
from ._registry import register_model


class PatchEmbedding(nn.Module):
    """Image ``[B, C, H, W]`` to tokens ``[B, 1 + H*W/p², hidden]``: non-overlapping ``p x p``
    patches, a linear projection, a learned CLS token in front and a learned position embedding."""

    def __init__(self, input_shape: Sequence[int], patch: int, hidden: int) -> None:
        super().__init__()
        c, h, w = (int(s) for s in input_shape)
        self.patch = int(patch)
        self.num_patches = (h // patch) * (w // patch)
        self.proj = nn.Linear(c * patch * patch, hidden)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos = nn.Parameter(torch.zeros(1, 1 + self.num_patches, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def transformer_stages(self) -> list:
        """Its stages for the transformer layouts (:mod:`neurofuse.levels._transformer`)."""
        return [Embed("unfold", Proj("proj.weight", "proj.bias", "proj"), cls="cls", pos="pos",
                      patch=self.patch)]

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)   # [B, N, C*p*p]
        tok = self.proj(patches)
        cls = self.cls.expand(tok.shape[0], -1, -1)
        return torch.cat([cls, tok], dim=1) + self.pos


class SelfAttention(nn.Module):
    """Multi-head self-attention with the standard scale ``1/sqrt(head_dim)``."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = int(heads)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # scaled_dot_product_attention scales by 1/sqrt(q.shape[-1]) = 1/sqrt(head_dim)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + MSA(LN(x))``, then ``+ MLP(LN(.))``, MLP = Linear-GELU-Linear."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, hidden))

    def transformer_stages(self) -> list:
        """Its stages: a pre-norm attention (packed ``qkv``) and a pre-norm MLP."""
        c = self.attn.out.in_features
        q, k, v = (Proj("attn.qkv.weight", "attn.qkv.bias", "attn.qkv", i * c, (i + 1) * c) for i in range(3))
        n1 = Norm("ln1.weight", "ln1.bias", self.ln1.eps)
        n2 = Norm("ln2.weight", "ln2.bias", self.ln2.eps)
        return [Attention(q, k, v, Proj("attn.out.weight", "attn.out.bias", "attn.out"), self.attn.heads, pre=n1),
                MLP(Proj("mlp.0.weight", "mlp.0.bias", "mlp.0"), Proj("mlp.2.weight", "mlp.2.bias", "mlp.2"),
                    "mlp.1", pre=n2)]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ClassifierHead(nn.Module):
    """``LayerNorm`` and ``Linear`` on the CLS token: ``[B, T, hidden]`` to logits ``[B, C]``."""

    def __init__(self, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def transformer_stages(self) -> list:
        """Its stage: LayerNorm and Linear on the CLS token."""
        return [Head(Proj("fc.weight", "fc.bias", "fc"), norm=Norm("ln.weight", "ln.bias", self.ln.eps))]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.ln(x[:, 0]))


def _default_patch(input_shape: Sequence[int]) -> int:
    """Patch size giving about 4 patches per side for small images (<= 16 px), 8 for larger."""
    h, w = int(input_shape[1]), int(input_shape[2])
    target = 4 if min(h, w) <= 16 else 8
    divisors = [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]
    return min(divisors, key=lambda p: (abs(h // p - target), p))


@register_model("vit")
class ViT(LeveledNet):
    """The paper's ViT (pre-LN, CLS token), one level per encoder block.

    * level 0: patch embedding + CLS token + position embedding **and** the first block;
    * levels 1..depth-1: one encoder block each;
    * last level: LayerNorm + Linear on the CLS token.

    Every level but the last outputs tokens ``[B, T, hidden]`` (axis ``"token"``, hidden last), so
    with the residual stream all hidden levels have the same width.  The paper's model (appendix
    E) is ``ViT((3, 32, 32), C, patch=4, hidden=384, depth=7, heads=12, mlp_hidden=384)``.  Unlike
    the reference code (omihub777/ViT-CIFAR) attention is scaled by ``1/sqrt(head_dim)`` (not
    ``1/sqrt(hidden)``) and the MLP has a single GELU (none after its second linear layer); tokens
    are ``[B, T, hidden]``, not permuted to ``[B, hidden, T]``.  No dropout.

    Parameters
    ----------
    input_shape : sequence of int
        ``(channels, height, width)``; ``patch`` must divide height and width.
    num_classes : int
        Number of output classes.
    patch : int, optional
        Patch side in pixels; default: about 4 patches per side for images up to 16 px
        (2 for 8x8 digits), about 8 otherwise (4 for 28x28 and 32x32).
    hidden : int
        Token width (must be divisible by ``heads``).
    depth : int
        Number of encoder blocks (at least 1).
    heads : int
        Attention heads.
    mlp_hidden : int
        Hidden width of each block's MLP.
    """

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 patch: Optional[int] = None, hidden: int = 384, depth: int = 7, heads: int = 12,
                 mlp_hidden: int = 384) -> None:
        if len(input_shape) != 3:
            raise ConfigError(f"ViT needs (C, H, W) inputs, got {list(input_shape)}")
        if patch is None:
            patch = _default_patch(input_shape)
        patch, hidden, depth, heads, mlp_hidden = (int(v) for v in (patch, hidden, depth, heads, mlp_hidden))
        if patch < 1 or input_shape[1] % patch or input_shape[2] % patch:
            raise ConfigError(f"patch {patch} must divide the image size {list(input_shape[1:])}")
        if min(hidden, depth, heads, mlp_hidden) < 1:
            raise ConfigError("hidden, depth, heads and mlp_hidden must be positive, got "
                              f"{hidden}, {depth}, {heads}, {mlp_hidden}")
        if hidden % heads:
            raise ConfigError(f"hidden size {hidden} must be divisible by the {heads} attention heads")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        levels: List[nn.Module] = [nn.Sequential(PatchEmbedding(input_shape, patch, hidden),
                                                 EncoderBlock(hidden, heads, mlp_hidden))]
        levels += [EncoderBlock(hidden, heads, mlp_hidden) for _ in range(depth - 1)]
        levels.append(ClassifierHead(hidden, int(num_classes)))
        super().__init__(levels, ["token"] * depth + ["dense"], input_shape, num_classes)
        self.patch, self.hidden, self.depth, self.heads, self.mlp_hidden = patch, hidden, depth, heads, mlp_hidden

    @classmethod
    def preset(cls, size: str, input_shape: Sequence[int], num_classes: int) -> "ViT":
        """``tiny``: hidden 32, 2 blocks, 4 heads, MLP 64; ``small``: hidden 64, 4 blocks, 4 heads,
        MLP 128; ``paper``: hidden 384, 7 blocks, 12 heads, MLP 384 (patch 4 on 32x32)."""
        sizes = {"tiny": (32, 2, 4, 64), "small": (64, 4, 4, 128), "paper": (384, 7, 12, 384)}
        if size not in sizes:
            raise ConfigError(f"unknown size {size!r} for vit; choose one of {sorted(sizes)}")
        hidden, depth, heads, mlp = sizes[size]
        return cls(input_shape, num_classes, None, hidden, depth, heads, mlp)

    def config(self) -> Dict[str, Any]:
        return {"arch": "vit", "kwargs": {"input_shape": list(self.input_shape),
                                          "num_classes": self.num_classes, "patch": self.patch,
                                          "hidden": self.hidden, "depth": self.depth,
                                          "heads": self.heads, "mlp_hidden": self.mlp_hidden}}

    def with_widths(self, widths: Sequence[int]) -> "ViT":
        """The same ViT with hidden size ``widths[0]``; every level shares the residual stream, so
        all widths must be equal (and divisible by the number of heads)."""
        widths = [int(w) for w in widths]
        if len(widths) != self.depth:
            raise ConfigError(f"this ViT has {self.depth} token levels and needs {self.depth} widths, "
                              f"got {widths}")
        if len(set(widths)) != 1:
            raise ConfigError(
                f"ViT levels share the residual stream, so every level needs the same width; got "
                f"{widths} (pass width=<int>)"
            )
        return ViT(self.input_shape, self.num_classes, self.patch, widths[0], self.depth, self.heads,
                   self.mlp_hidden)
