"""Helpers for tests and self-checks (as ``captum.testing``): function-preserving permutations."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .levels import LeveledNet

__all__ = ["permute_hidden", "permute_spaces"]


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


def _perm_map(perm: torch.Tensor):  # type: ignore[no-untyped-def]
    from .levels._layout import NeuronMap

    n = len(perm)
    plan = np.zeros((n, n))
    plan[perm.numpy(), np.arange(n)] = 1.0 / n
    return NeuronMap.from_plan(plan, np.full(n, 1.0 / n))


def _derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    for _ in range(100):
        p = torch.randperm(n, generator=gen)
        if n < 2 or not torch.equal(p, torch.arange(n)):
            return p
    return p  # pragma: no cover


def permute_spaces(model: LeveledNet, seed: int = 0) -> LeveledNet:
    """A copy of ``model`` with every neuron space of its alignment layout randomly permuted.

    Every residual stream (one permutation for all the levels it ties, with the embeddings, CLS
    token, position embedding and LayerNorms that follow it), every hidden level output and every
    internal space (an MLP's hidden neurons, a residual block's inner channels) gets its own
    permutation; attention spaces are permuted as heads (a random order of the heads, shared by a
    head's queries, keys, values and output columns) and inside every head (one permutation for
    the queries and keys, one for the values).  The copy computes the same function (for every
    model :func:`neurofuse.levels.alignment_reason` accepts); fusing a model with it must give
    the model back.
    """
    from .levels._layout import align_level, check_alignable, space_sizes

    gen = torch.Generator().manual_seed(seed)
    layouts, heads = check_alignable([model], "permute_spaces")
    widths = model.level_widths()
    out = model.clone()
    stream: Dict[int, object] = {}
    for lvl, lay in enumerate(layouts):
        maps: Dict[str, object] = {}
        last = model.num_levels - 1
        if lvl < last and heads[lvl] >= 0 and heads[last] != heads[lvl]:   # a stream tied to the input or output keeps its order
            if heads[lvl] not in stream:
                stream[heads[lvl]] = _perm_map(_derangement(widths[lvl], gen))
            maps["out"] = stream[heads[lvl]]
        if lvl > 0 and heads[lvl - 1] in stream:
            maps["in"] = stream[heads[lvl - 1]]
        sizes = space_sizes(model.levels[lvl], lay)
        order: Dict[str, torch.Tensor] = {}
        for sp in lay.internal:
            n = sizes[sp.name]
            if sp.heads:
                hd = n // sp.heads
                hp = order.setdefault(sp.unit, _derangement(sp.heads, gen))
                perm = torch.cat([hp[b] * hd + _derangement(hd, gen) for b in range(sp.heads)])
            else:
                perm = _derangement(n, gen)
            maps[sp.name] = _perm_map(perm)
        out.levels[lvl].load_state_dict(align_level(model.levels[lvl], lay, lvl, maps))  # type: ignore[arg-type]
    return out
