"""Levels: an ordered partition of a network into sub-networks (paper section 3).

A level's output is a tensor whose *neurons* are features (``dense``: ``[B, C]``), channels
(``conv``: ``[B, C, H, W]``, spatial positions become rows) or hidden units (``token``:
``[B, T, C]``, tokens become rows).  Level outputs are pre-activations: the non-linearity starts the
next level.
"""

from ._core import (
    AXES,
    LeveledNet,
    NeuronAxis,
    check_same_levels,
    check_weights,
    flatten_neurons,
    not_leveled_error,
    split_affine,
    unflatten_neurons,
)
from ._bn import fold_batchnorm, has_batchnorm
from ._unfold import unfold_state
from ._declare import DeclaredNet, levels_from
from ._wrapped import Fn
from ._auto import AutoBlock, AutoConcat, AutoGraph, AutoNet, Glue, auto_levels
from ._support import affine_reason, alignment_reason, layout_traits, level_kind, traits_reason
from ._maps import NeuronMapInfo, format_maps, neuron_maps
from ._steps import Step, closed_form_steps
from ._stream import DEFAULT_MEMORY_BUDGET, LevelStream, StreamBatch

__all__ = [
    "AXES",
    "AutoBlock",
    "AutoConcat",
    "AutoGraph",
    "NeuronMapInfo",
    "AutoNet",
    "Glue",
    "affine_reason",
    "alignment_reason",
    "auto_levels",
    "layout_traits",
    "level_kind",
    "traits_reason",
    "DEFAULT_MEMORY_BUDGET",
    "LevelStream",
    "Step",
    "StreamBatch",
    "DeclaredNet",
    "Fn",
    "LeveledNet",
    "NeuronAxis",
    "check_same_levels",
    "check_weights",
    "closed_form_steps",
    "flatten_neurons",
    "format_maps",
    "fold_batchnorm",
    "has_batchnorm",
    "levels_from",
    "neuron_maps",
    "not_leveled_error",
    "split_affine",
    "unflatten_neurons",
    "unfold_state",
]
