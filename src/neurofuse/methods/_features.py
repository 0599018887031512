"""Joint feature statistics of N models at every neuron space, from one pass of each model.

What the correlation-based alignments (ZipIt!, CCA Merge) read: at every level output and every
internal space of a level (see :mod:`neurofuse.levels._layout`), the first and second moments of
all models' features concatenated (:class:`~neurofuse.grouping.JointMoments`), of the
pre-activations and of the post-activations.  The *original* models are run (each level's
statistics do not depend on the others' alignment), so all spaces come from one level stream.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..grouping import JointMoments
from ..levels import LeveledNet, LevelStream, flatten_neurons
from ..levels._layout import LevelLayout, capture_spaces, next_activation, space_activation

__all__ = ["FeatureMoments", "feature_moments", "part_moments"]

#: (pre-activation, post-activation) moments of one space
FeatureMoments = Tuple[JointMoments, JointMoments]


def feature_moments(nets: Sequence[LeveledNet], layouts: Sequence[LevelLayout], stream: LevelStream,
                    levels: int) -> Tuple[List[FeatureMoments], List[Dict[str, FeatureMoments]]]:
    """Moments of the concatenated features of every model at the output and the internal spaces
    of the first ``levels`` levels, streamed through ``stream`` (one stream per model).

    Returns ``(outputs, inner)``: ``outputs[lvl]`` and ``inner[lvl][space]`` are (pre, post)
    :class:`~neurofuse.grouping.JointMoments` over ``[rows, sum of the models' widths]``.
    """
    outputs: List[FeatureMoments] = []
    inner: List[Dict[str, FeatureMoments]] = []
    n = len(nets)
    with torch.no_grad():
        for lvl in range(levels):
            spaces = layouts[lvl].internal
            out_stats = (JointMoments(), JointMoments())
            in_stats = {sp.name: (JointMoments(), JointMoments()) for sp in spaces}
            acts = [space_activation(nets[0].levels[lvl], sp) for sp in spaces]
            nxt = next_activation(nets[0], lvl)
            axis = nets[0].axes[lvl]
            for b in stream:
                runs = []
                for i, (net, h) in enumerate(zip(nets, b.inputs)):
                    store: Dict[str, torch.Tensor] = {}
                    points = capture_spaces(net.levels[lvl], spaces,
                                            lambda: store.__setitem__("z", net.levels[lvl](h)), net.axes[lvl])
                    z = store["z"]
                    if lvl + 1 < levels:
                        b.keep(i, z)
                    runs.append((z, points))
                pre = torch.cat([flatten_neurons(z, axis) for z, _ in runs], 1)
                out_stats[0].update(pre)
                out_stats[1].update(nxt(pre))
                for s, (sp, act) in enumerate(zip(spaces, acts)):
                    pre = torch.cat([p[s] for _, p in runs], 1)   # inner spaces come flattened
                    in_stats[sp.name][0].update(pre)
                    in_stats[sp.name][1].update(act(pre))
            outputs.append(out_stats)
            inner.append(in_stats)
            if lvl + 1 < levels:
                stream.advance({i: nets[i].levels[lvl] for i in range(n)})
    return outputs, inner


def part_moments(moments: FeatureMoments, spans: Sequence[slice], widths: Sequence[int]) -> FeatureMoments:
    """The (pre, post) moments of one part of a concatenation.

    Parameters
    ----------
    moments : FeatureMoments
        The level output's moments, every model's neurons side by side.
    spans : sequence of slice
        Model ``k``'s neurons of the part, within its own level output.
    widths : sequence of int
        Model ``k``'s level width.

    Returns
    -------
    FeatureMoments
        The moments of the part's neurons alone, every model's in order.
    """
    offsets = np.cumsum([0] + list(widths[:-1]))
    index = torch.cat([torch.arange(int(o) + s.start, int(o) + s.stop) for o, s in zip(offsets, spans)])
    pre, post = moments
    return pre.select(index), post.select(index)
