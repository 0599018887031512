"""Test helpers: function-preserving permutations of every neuron space, residual ones included."""

from __future__ import annotations

import numpy as np
import torch

from neurofuse.levels import check_same_levels
from neurofuse.levels._layout import NeuronMap, check_alignable
from neurofuse.methods._align import apply_maps, permutation_spec


def permute_spaces(model, seed=0):
    """``model`` with every permutable neuron space (residual streams and inner spaces included)
    randomly permuted: the same function; returns the copy and the permutation of every group."""
    nets = check_same_levels([model])
    layouts, heads = check_alignable(nets, "test")
    spec = permutation_spec(model, layouts, heads, model.level_widths())
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for n in spec.sizes]
    maps = [{s: (None if g is None else NeuronMap.from_permutation(perms[g])) for s, g in sp.items()}
            for sp in spec.groups]
    return apply_maps(model, layouts, maps), perms


def randomise_batchnorm(model, seed):
    """Non-trivial BatchNorm statistics and affine parameters (a fresh model's are the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return model.eval()
