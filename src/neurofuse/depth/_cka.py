r"""Level-to-level dissimilarity between two models, from their level outputs on the fusion set.

Every level output is first turned into one feature vector per *sample* (:func:`level_features`):

* ``dense`` ``[B, C]``: as is;
* ``conv`` ``[B, C, H, W]``: average-pooled to at most ``spatial x spatial`` positions
  (``adaptive_avg_pool2d``), then flattened to ``[B, C * h * w]``.  With the default ``spatial=4``
  an 8x8 map keeps a coarse 4x4 layout, a 2x2 map is kept whole, ``spatial=1`` is global average
  pooling and ``spatial=None`` flattens the full map.  Pooling bounds the memory to
  ``samples x C x spatial**2`` numbers per level while keeping where in the image a feature fires;
* ``token`` ``[B, T, C]``: flattened to ``[B, T * C]``.

Both metrics compare the *samples x samples* geometry of two levels, so levels of any widths,
spatial sizes and neuron axes are comparable, and neither depends on the order of the neurons.

``"cka"``: :math:`1 - \mathrm{CKA}` with linear CKA in its Gram (HSIC) form (Kornblith et al.
2019), for features :math:`X \in \mathbb{R}^{n\times p}`, :math:`Y \in \mathbb{R}^{n\times q}`:

.. math::  K = XX^\top,\; L = YY^\top,\; H = I - \tfrac1n \mathbf 1\mathbf 1^\top,\quad
           \mathrm{HSIC}(K, L) = \langle HKH, HLH\rangle_F,\quad
           \mathrm{CKA} = \frac{\mathrm{HSIC}(K, L)}{\sqrt{\mathrm{HSIC}(K, K)\,\mathrm{HSIC}(L, L)}}.

It is 1 for a level with itself and invariant to orthogonal transforms of the neurons (hence
to permutations), isotropic scaling and translation.

``"euclidean"``: the root-mean-square difference between the two levels' pairwise sample
distance matrices, each divided by its own root-mean-square entry:

.. math::  D_{ij} = \lVert x_i - x_j\rVert_2,\quad \hat D = D / \mathrm{rms}(D),\quad
           d(X, Y) = \mathrm{rms}(\hat D^X - \hat D^Y) \in [0, \sqrt 2].

Comparing distance matrices rather than activations sidesteps the neuron correspondence (no
matching is needed, and widths may differ); it has the same invariances as CKA but weighs
distances rather than inner products.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._fusion_set import as_fusion_set
from ..errors import ConfigError, IncompatibleModelsError
from ..levels import LeveledNet

__all__ = [
    "METRICS",
    "centered_gram",
    "level_cost_matrix",
    "level_features",
    "level_grams",
    "linear_cka",
    "cka_dissimilarity",
]

#: names of the level dissimilarity metrics
METRICS: Tuple[str, ...] = ("cka", "euclidean")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown level metric {metric!r}; choose one of {list(METRICS)}")


def sample_features(t: Tensor, axis: str, spatial: Optional[int] = 4) -> Tensor:
    """One row per sample: a level output ``t`` as ``[B, features]`` (see the module docstring)."""
    if axis == "conv":
        if t.dim() != 4:
            raise IncompatibleModelsError(
                f"a 'conv' level must output [B, C, H, W], got shape {list(t.shape)}")
        if spatial is not None:
            h, w = t.shape[2], t.shape[3]
            if h > spatial or w > spatial:
                t = F.adaptive_avg_pool2d(t, (min(h, spatial), min(w, spatial)))
    return t.reshape(t.shape[0], -1)


def level_features(model: LeveledNet, data: Any, *, spatial: Optional[int] = 4,
                   max_samples: Optional[int] = 1000) -> List[Tensor]:
    """Per-sample features ``[n, d_l]`` (float32, CPU) of every level of ``model`` on ``data``.

    The fusion set is streamed in its batches (``data.batches()``); each batch runs through the
    levels once.  At most ``max_samples`` samples (the first ones) are used.  ``data`` is
    anything the fusion methods accept (tensor, ``(x, y)`` pair, DataLoader, FusionSet).
    """
    data = as_fusion_set(data)
    if spatial is not None and (isinstance(spatial, bool) or int(spatial) < 1):
        raise ConfigError(f"spatial must be a positive integer or None, got {spatial!r}")
    if max_samples is not None and int(max_samples) < 2:
        raise ConfigError(f"max_samples must be at least 2, got {max_samples}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    feats: List[List[Tensor]] = [[] for _ in range(model.num_levels)]
    seen = 0
    limit = len(data) if max_samples is None else min(len(data), int(max_samples))
    try:
        with torch.no_grad():
            for xb, _ in data.batches(device):
                if seen >= limit:
                    break
                xb = xb[: limit - seen]
                seen += xb.shape[0]
                h = xb
                for lvl, (level, axis) in enumerate(zip(model.levels, model.axes)):
                    h = level(h)
                    feats[lvl].append(sample_features(h, axis, spatial).float().cpu())
    finally:
        model.train(was_training)
    out = [torch.cat(f) for f in feats]
    for lvl, f in enumerate(out):
        if not torch.isfinite(f).all():
            raise IncompatibleModelsError(
                f"level {lvl} of {type(model).__name__} outputs NaN or infinite values on the "
                "fusion set; check the model's weights")
    if seen < 2:
        raise ConfigError(f"comparing levels needs at least 2 fusion samples, got {seen}")
    return out


def centered_gram(x: Tensor) -> Tensor:
    """:math:`HXX^\\top H` in float64 (``x`` is ``[n, d]``; computed from the centred features)."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def _rms_distances(x: Tensor) -> Tensor:
    x = x.double()
    d = torch.cdist(x, x)
    n = d.shape[0]
    rms = torch.sqrt((d ** 2).sum() / max(n * (n - 1), 1))
    return d / rms if rms > 0 else d


def level_grams(features: Sequence[Tensor], metric: str = "cka") -> Tensor:
    """``[L, n*n]`` float64: each level's centred Gram (``"cka"``) or normalised distances."""
    _check_metric(metric)
    fn = centered_gram if metric == "cka" else _rms_distances
    return torch.stack([fn(f).reshape(-1) for f in features])


def _cross(ga: Tensor, gb: Tensor, metric: str, n: int) -> np.ndarray:
    inner = ga @ gb.T
    if metric == "cka":
        na = torch.sqrt((ga * ga).sum(1)).clamp_min(0)
        nb = torch.sqrt((gb * gb).sum(1)).clamp_min(0)
        denom = na[:, None] * nb[None, :]
        cka = torch.where(denom > 0, inner / denom.clamp_min(1e-300), torch.zeros_like(inner))
        return (1.0 - cka.clamp(-1.0, 1.0)).numpy()
    sa = (ga * ga).sum(1)
    sb = (gb * gb).sum(1)
    total = sa[:, None] + sb[None, :]
    raw = total - 2 * inner
    # |a - b|^2 by expansion cancels: below the rounding of its terms it is zero (else its square
    # root turns 1e-16 of rounding into 1e-8, which depends on the BLAS's summation order)
    raw = torch.where(raw <= 64 * torch.finfo(raw.dtype).eps * total, torch.zeros_like(raw), raw)
    return torch.sqrt(raw / max(n * (n - 1), 1)).numpy()


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two representations of the same ``n`` samples (``[n, p]`` and ``[n, q]``)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples: got {x.shape[0]} and {y.shape[0]} rows")
    gx, gy = centered_gram(x.reshape(x.shape[0], -1)), centered_gram(y.reshape(y.shape[0], -1))
    return float(1.0 - _cross(gx.reshape(1, -1), gy.reshape(1, -1), "cka", x.shape[0])[0, 0])


def cka_dissimilarity(x: Tensor, y: Tensor, metric: str = "cka") -> float:
    """The dissimilarity of two representations ``[n, p]``, ``[n, q]`` under ``metric``."""
    ga = level_grams([x.reshape(x.shape[0], -1)], metric)
    gb = level_grams([y.reshape(y.shape[0], -1)], metric)
    return float(_cross(ga, gb, metric, x.shape[0])[0, 0])


def level_cost_matrix(model_a: LeveledNet, model_b: LeveledNet, data: Any, *,
                      metric: str = "cka", spatial: Optional[int] = 4,
                      max_samples: Optional[int] = 1000,
                      grams_a: Optional[Tensor] = None) -> np.ndarray:
    """``[levels of a, levels of b]`` dissimilarities between every pair of levels.

    ``grams_a`` (from :func:`level_grams`) may be passed to reuse ``model_a``'s work when one
    model is compared with many.
    """
    _check_metric(metric)
    data = as_fusion_set(data)
    if grams_a is None:
        grams_a = level_grams(level_features(model_a, data, spatial=spatial,
                                             max_samples=max_samples), metric)
    feats_b = level_features(model_b, data, spatial=spatial, max_samples=max_samples)
    grams_b = level_grams(feats_b, metric)
    n = feats_b[0].shape[0]
    return _cross(grams_a, grams_b, metric, n)
