"""Helpers for tests and self-checks (as ``captum.testing``): function-preserving permutations."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from .levels import LeveledNet

__all__ = ["permute_hidden"]


def permute_hidden(model: LeveledNet, seed: int = 0,
                   generator: Optional[torch.Generator] = None) -> LeveledNet:
    """A copy of ``model`` whose hidden neurons are randomly permuted at every level.

    For models whose levels each end in one ``Linear``/``Conv2d`` (MLP, VGG) the copy computes the
    same function: the output neurons of level ``l`` and the matching inputs of level ``l + 1`` are
    permuted together (including conv-to-linear transitions through a flatten).  Fusing a model with
    such a copy must give back the model; that is the standard self-check of alignment methods.
    """
    gen = generator or torch.Generator().manual_seed(seed)
    out = model.clone()
    affines: List[nn.Module] = []
    for level in out.levels:
        found = [m for m in level.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not found:
            raise ValueError("permute_hidden needs a Linear or Conv2d layer in every level")
        affines.append(found[-1])
    with torch.no_grad():
        for a, nxt in zip(affines[:-1], affines[1:]):
            perm = torch.randperm(a.weight.shape[0], generator=gen)
            a.weight.copy_(a.weight[perm])
            if a.bias is not None:
                a.bias.copy_(a.bias[perm])
            w = nxt.weight
            if isinstance(nxt, nn.Linear) and isinstance(a, nn.Conv2d):
                c = a.weight.shape[0]
                nxt.weight.copy_(w.reshape(w.shape[0], c, -1)[:, perm].reshape(w.shape))
            else:
                nxt.weight.copy_(w[:, perm])
    return out
