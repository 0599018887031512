"""A Hugging Face model seen as a :class:`~neurofuse.levels.LeveledNet`: :class:`HFLeveledNet`.

The levels are thin wrappers (:class:`HFLevel`) around the model's own sub-modules, so the
leveled view and the Hugging Face model hold the *same* parameters: a fusion method that changes
a level of (a copy of) the view changes (the copy of) the Hugging Face model, which
:func:`neurofuse.hf.save_pretrained` then writes with ``save_pretrained``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleModelsError
from ..levels import LeveledNet
from ..levels._transformer import TransformerSpec

__all__ = ["HFLevel", "HFLeveledNet"]

#: how a level runs its parts: ``call(parts, x) -> output``
LevelCall = Callable[[nn.ModuleDict, Tensor], Tensor]


class HFLevel(nn.Module):
    """One level: named sub-modules of a Hugging Face model and how the model runs them.

    Parameters
    ----------
    parts : dict of str to nn.Module
        The model's own modules that make up the level (shared, not copied), e.g.
        ``{"layernorm": vit.layernorm, "classifier": classifier}``.
    call : callable
        ``call(parts, x)`` computes the level's output from its input exactly as the model's
        ``forward`` does (e.g. ``parts["classifier"](parts["layernorm"](x)[:, 0])``).
    name : str
        Where the level sits in the model (shown in ``repr`` and error messages).
    not_alignable : str
        Why the level's neurons cannot be aligned by one map per neuron space (its sub-modules
        do not run as one chain: attention, residual sums); read by
        :func:`neurofuse.levels.alignment_reason`.  Empty: nothing is known against it.
    transformer_spec : TransformerSpec, optional
        The level's transformer stages (:mod:`neurofuse.levels._transformer`; keys relative to
        the level, ``parts.<name>...``): what its tensors are for the alignment methods and the
        closed-form block fit.  :func:`neurofuse.hf.wrap` checks that they recompute the level.
    """

    def __init__(self, parts: Dict[str, nn.Module], call: LevelCall, name: str, not_alignable: str = "",
                 transformer_spec: Optional[TransformerSpec] = None) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self._call = call
        self.level_name = name
        self.not_alignable = not_alignable
        self.transformer_spec = transformer_spec

    def forward(self, x: Tensor) -> Tensor:
        return self._call(self.parts, x)

    def extra_repr(self) -> str:
        return self.level_name


class HFLeveledNet(LeveledNet):
    """A ``transformers`` classifier as a sequence of levels (built by :func:`neurofuse.hf.wrap`).

    The Hugging Face model is kept as ``hf_model`` (not a registered sub-module: every one of its
    parameters is in exactly one level, so ``state_dict`` has each tensor once, under
    ``levels.<i>.parts.<name>``).  Copies (``clone``, ``copy.deepcopy``) copy the model and keep
    the sharing.  ``forward`` takes what the adapter's family takes (images ``[B, C, H, W]``, or
    token ids ``[B, T]``, as floats or integers) and returns the logits.

    Attributes
    ----------
    hf_model : transformers.PreTrainedModel
        The wrapped model; its parameters are the levels'.
    family : str
        The adapter's name (the ``config.model_type``, e.g. ``"vit"``).
    level_names : list of str
        Where each level sits in the model.
    """

    arch = "hf"
    #: the family's :class:`~neurofuse.hf.HFAdapter` (set by :func:`neurofuse.hf.wrap`)
    adapter: Any = None
    #: a fusion method returns this class with the wrapped model's architecture (its levels are the
    #: model's own modules): BatchNorms a closed form folds are written back, not dropped
    keeps_architecture = True

    def __init__(self, hf_model: nn.Module, levels: Sequence[HFLevel], axes: Sequence[str],
                 input_shape: Sequence[int], num_classes: int, family: str) -> None:
        super().__init__(levels, axes, input_shape, num_classes)
        object.__setattr__(self, "hf_model", hf_model)   # not registered: no duplicate tensors
        self.family = family
        self.level_names: List[str] = [lv.level_name for lv in levels]
        owned = {id(p) for lv in levels for p in lv.parameters()}
        stray = [n for n, p in hf_model.named_parameters() if id(p) not in owned]
        if stray:
            raise IncompatibleModelsError(
                f"the {family!r} adapter leaves parameters {stray[:4]} of "
                f"{type(hf_model).__name__} out of every level; fix the adapter's levels"
            )

    # -- mode and architecture --------------------------------------------------------------
    def train(self, mode: bool = True) -> "HFLeveledNet":
        super().train(mode)
        self.hf_model.train(mode)   # the top-level flag (the levels set their own)
        return self

    def with_widths(self, widths: Sequence[int]) -> "LeveledNet":
        raise ConfigError(
            "Hugging Face models keep the widths of their config: fuse them with width=None "
            "(the fused model has model 0's config)"
        )

    def config(self) -> Dict[str, Any]:
        raise NotImplementedError(
            "Hugging Face models are saved with neurofuse.hf.save_pretrained (config.json + weights)"
        )

    def extra_repr(self) -> str:
        return f"family={self.family}, levels={self.level_names}, axes={self.axes}"

    def check_inputs(self, x: Tensor) -> None:
        """Refuse inputs the levels do not describe (RoBERTa's and GPT-2's padding), with a
        one-line :class:`~neurofuse.errors.DataError`: the fusion methods call it on the fusion
        set before any work (:meth:`HFAdapter.check_inputs`)."""
        if self.adapter is not None:
            self.adapter.check_inputs(self.hf_model.config, x)
