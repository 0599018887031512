r"""A shared trunk with one head per model: the output of ZipIt!'s partial zipping.

Stoica et al. (ICLR 2024, section 4.3) zip two models only up to a level and keep the rest of
each model as a separate head: the zipped trunk's features are *unmerged* into each model's own
basis (:math:`h_k = \mathcal U_k h`, :mod:`neurofuse.grouping._zipit`) and fed to that model's
remaining levels.  Here the heads share the label space, so the output is their ensemble: the
log of the mean of the heads' class probabilities, like :class:`~neurofuse.models.Ensemble`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..levels import LeveledNet, flatten_neurons, unflatten_neurons
from ._registry import _MODELS, build_model

__all__ = ["MultiHead", "NeuronMix"]


class NeuronMix(nn.Module):
    r"""A fixed linear map of the neurons of a level output: :math:`h \mapsto U h` per row
    (positions of a feature map, tokens), ``U`` ``[n_out, n_in]`` a buffer."""

    def __init__(self, n_out: int, n_in: int, axis: str) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("matrix", torch.zeros(n_out, n_in))

    def forward(self, h: Tensor) -> Tensor:
        flat = flatten_neurons(h, self.axis) @ self.matrix.to(h.dtype).T
        return unflatten_neurons(flat, self.axis, h.shape).contiguous()


class MultiHead(nn.Module):
    """Levels ``< stop_at`` of ``trunk``, then for every head ``k``: ``NeuronMix`` ``U_k`` and
    levels ``>= stop_at`` of ``heads[k]``; output ``log mean_k softmax(head_k)``.

    Parameters
    ----------
    trunk : LeveledNet
        The zipped model; only its first ``stop_at`` levels are kept.
    heads : sequence of LeveledNet
        The base models; only their levels from ``stop_at`` on are kept.
    stop_at : int
        The first level that is not shared, ``1 <= stop_at < num_levels``.

    The unmerge matrices are buffers (``mix.<k>.matrix``), zero until loaded.
    """

    arch = "multihead"

    def __init__(self, trunk: LeveledNet, heads: Sequence[LeveledNet], stop_at: int) -> None:
        super().__init__()
        if not 1 <= stop_at < trunk.num_levels:
            raise ConfigError(f"stop_at must be in 1..{trunk.num_levels - 1}, got {stop_at}")
        n_fused = trunk.level_widths()[stop_at - 1]
        axis = trunk.axes[stop_at - 1]
        self.stop_at = int(stop_at)
        self.trunk = nn.ModuleList(list(trunk.levels)[:stop_at])
        #: the neuron axis of every trunk level (what REPAIR reads to rescale the fused trunk)
        self.trunk_axes = list(trunk.axes[:stop_at])
        self.mix = nn.ModuleList([NeuronMix(h.level_widths()[stop_at - 1], n_fused, axis) for h in heads])
        self.heads = nn.ModuleList([nn.ModuleList(list(h.levels)[stop_at:]) for h in heads])
        try:
            self._configs: Optional[Dict[str, Any]] = {"trunk": trunk.config(), "heads": [h.config() for h in heads]}
        except NotImplementedError:   # automatic or declared levels: no architecture to describe
            self._configs = None
        self.input_shape = trunk.input_shape
        self.num_classes = trunk.num_classes

    def forward(self, x: Tensor) -> Tensor:
        for level in self.trunk:
            x = level(x)
        probs = []
        for mix, head in zip(self.mix, self.heads):
            h = mix(x)
            for level in head:
                h = level(h)
            probs.append(torch.softmax(h, dim=-1))
        p = torch.stack(probs).mean(0)
        return torch.log(p.clamp_min(1e-30))

    def config(self) -> Dict[str, Any]:
        if self._configs is None:
            raise NotImplementedError(
                "this multi-head model was built from models that do not describe their architecture "
                "(automatic or declared levels); keep its state_dict() instead")
        return {"arch": "multihead", "kwargs": {**self._configs, "stop_at": self.stop_at}}


def _build_multihead(trunk: Dict[str, Any], heads: Sequence[Dict[str, Any]], stop_at: int) -> MultiHead:
    if not isinstance(heads, (list, tuple)) or not heads or len(heads) > 256:
        raise ConfigError("a multihead config lists 1 to 256 head models")
    if isinstance(stop_at, bool) or not isinstance(stop_at, int):
        raise ConfigError(f"a multihead config's stop_at must be a level index, got {stop_at!r}")
    return MultiHead(build_model(trunk), [build_model(h) for h in heads], stop_at)


_MODELS.register("multihead")(_build_multihead)  # type: ignore[arg-type]
