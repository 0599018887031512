"""The level abstraction shared by every fusion method."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Literal, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import IncompatibleModelsError

NeuronAxis = Literal["dense", "conv", "token"]
AXES: Tuple[str, ...] = ("dense", "conv", "token")

def flatten_neurons(t: Tensor, axis: str) -> Tensor:
    r"""Reshape a level output to a ``[rows, neurons]`` matrix.

    ``dense`` ``[B, C]`` is returned as is; ``conv`` ``[B, C, H, W]`` becomes ``[B*H*W, C]``
    (every spatial position is a sample); ``token`` ``[B, T, C]`` becomes ``[B*T, C]``.
    """
    if axis == "dense":
        return t.reshape(t.shape[0], -1) if t.dim() != 2 else t
    if axis == "conv":
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    if axis == "token":
        return t.reshape(-1, t.shape[-1])
    raise ValueError(f"unknown neuron axis {axis!r}; choose one of {AXES}")


def unflatten_neurons(m: Tensor, axis: str, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`flatten_neurons` for an output of ``shape`` (with any neuron count)."""
    if axis == "dense":
        return m
    if axis == "conv":
        b, _, h, w = shape
        return m.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    if axis == "token":
        b, t = shape[0], shape[1]
        return m.reshape(b, t, -1)
    raise ValueError(f"unknown neuron axis {axis!r}; choose one of {AXES}")


def split_affine(level: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """Split an affine-terminal level into ``(pre, affine)``.

    A level is *affine in its parameters* when it is an ``nn.Sequential`` whose last child is an
    ``nn.Linear`` or ``nn.Conv2d`` (trailing eval-mode identities such as ``Dropout`` are ignored:
    they stay in the level and do nothing in eval mode) and whose other children hold no parameters (activations,
    pooling, flattening, any parameter-free module: they only transform the input).  The closed-form methods need this; other levels need ``kf-gradient``.

    Raises
    ------
    IncompatibleModelsError
        If the level is not affine in its parameters.
    """
    children = list(level.children()) if isinstance(level, nn.Sequential) else [level]
    while len(children) > 1 and _is_eval_identity(children[-1]):
        children.pop()  # a trailing Dropout / Identity does nothing in eval mode
    last = children[-1] if children else None
    pre = children[:-1]
    ok = isinstance(last, (nn.Linear, nn.Conv2d)) and all(
        not any(True for _ in c.parameters()) for c in pre
    )
    if not ok:
        raise IncompatibleModelsError(
            f"level {type(level).__name__} is not affine in its parameters (it is not "
            "[parameter-free ops..., Linear|Conv2d]); the closed-form methods 'hf-linear' and "
            "'kf-linear' cannot fit it: use method='kf-gradient'"
        )
    return nn.Sequential(*pre), last  # type: ignore[return-value]


def is_monotone_head(m: nn.Module) -> bool:
    """A softmax or log-softmax over the neurons (``nn.Softmax`` / ``nn.LogSoftmax``, or glue
    marked ``monotone_head``): at the end of a model it keeps the prediction of the logits."""
    return (isinstance(m, (nn.Softmax, nn.LogSoftmax)) and m.dim in (1, -1)) or bool(
        getattr(m, "monotone_head", False))


#: element-wise activations (a layer followed by one still has its neurons' pre-activations inside)
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
               nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus)


def is_elementwise(m: nn.Module) -> bool:
    """An element-wise activation module, or glue marked ``elementwise`` (such activations and
    eval-mode identities only)."""
    return isinstance(m, ELEMENTWISE) or bool(getattr(m, "elementwise", False))


def _is_eval_identity(m: nn.Module) -> bool:
    """``Dropout`` and friends, a plain ``nn.Identity`` or glue marked ``eval_identity``."""
    drop = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
    return isinstance(m, drop) or type(m) is nn.Identity or bool(getattr(m, "eval_identity", False))


class LeveledNet(nn.Module):
    """A network that is the composition of its levels: ``forward = levels[-1] ∘ … ∘ levels[0]``.

    Subclasses (the model zoo) build ``self.levels`` and ``self.axes`` in ``__init__`` and
    implement :meth:`config` (the JSON architecture description that rebuilds them) and
    :meth:`with_widths` (the same architecture with other level widths).

    Attributes
    ----------
    levels : nn.ModuleList
        The sub-networks, in order from the input.
    axes : list of str
        The neuron axis of each level output: ``"dense"``, ``"conv"`` or ``"token"``.
    input_shape : tuple of int
        The shape of one input sample (without the batch dimension).
    num_classes : int
        The width of the last level (the logits).
    """

    arch: str = "leveled"

    def __init__(self, levels: Sequence[nn.Module], axes: Sequence[str], input_shape: Sequence[int],
                 num_classes: int) -> None:
        super().__init__()
        if len(levels) != len(axes):
            raise ValueError(f"{len(levels)} levels but {len(axes)} neuron axes")
        for a in axes:
            if a not in AXES:
                raise ValueError(f"unknown neuron axis {a!r}; choose one of {AXES}")
        self.levels = nn.ModuleList(levels)
        self.axes: List[str] = list(axes)
        self.input_shape: Tuple[int, ...] = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)

    # -- running -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        for level in self.levels:
            x = level(x)
        return x

    def forward_until(self, x: Tensor, level: int) -> Tensor:
        """Output of level ``level`` (0-based, inclusive; negative counts from the end)."""
        n = len(self.levels)
        stop = level % n if level < 0 else level
        if not 0 <= stop < n:
            raise IndexError(f"level {level} out of range for a model with {n} levels")
        for i in range(stop + 1):
            x = self.levels[i](x)
        return x

    def forward_from(self, h: Tensor, start: int) -> Tensor:
        """Run levels ``start, start+1, …`` on ``h`` (the output of level ``start - 1``)."""
        for i in range(start, len(self.levels)):
            h = self.levels[i](h)
        return h

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    # -- architecture --------------------------------------------------------------------
    def level_widths(self) -> List[int]:
        """Number of neurons at each level output (found with one forward pass on zeros)."""
        return [int(s[1] if a == "conv" else s[-1]) for s, a in zip(self.level_shapes(), self.axes)]

    def level_shapes(self) -> List[Tuple[int, ...]]:
        """Shape of each level's output for a batch of one sample (one forward pass on zeros)."""
        device = next(iter(self.parameters()), torch.empty(0)).device
        was_training = self.training
        self.eval()
        shapes: List[Tuple[int, ...]] = []
        with torch.no_grad():
            x = torch.zeros((1, *self.input_shape), device=device)
            for level in self.levels:
                x = level(x)
                shapes.append(tuple(int(d) for d in x.shape))
        self.train(was_training)
        return shapes

    def config(self) -> Dict[str, Any]:
        """JSON-serialisable description ``{"arch": name, "kwargs": {...}}`` that rebuilds the model."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its architecture")

    def with_widths(self, widths: Sequence[int]) -> "LeveledNet":
        """A new, randomly initialised model of this family whose levels have ``widths``.

        ``widths`` lists every level but the last (whose width is the number of classes).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot change its level widths")

    @classmethod
    def preset(cls, size: str, input_shape: Sequence[int], num_classes: int) -> "LeveledNet":
        """A model of this family at a named size: ``"tiny"`` (tests), ``"small"`` (demo, CPU
        benchmarks) or ``"paper"`` (the paper's configuration)."""
        raise NotImplementedError(f"{cls.__name__} has no presets")

    def clone(self) -> "LeveledNet":
        return copy.deepcopy(self)


#: largest weight magnitude accepted for fusion: trained weights are many orders smaller, so a
#: larger finite value is a flipped exponent bit or a broken training run, and is refused like NaN
MAX_ABS_WEIGHT = 1e30


def check_weights(model: nn.Module, index: int) -> None:
    """Refuse NaN, infinite or absurdly large (``|w| > MAX_ABS_WEIGHT``) floating-point values in
    the parameters and buffers of ``model`` (the ``index``-th model, for the message).

    Raises
    ------
    IncompatibleModelsError
        Naming the model, the tensor and the bad value.
    """
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if not torch.isfinite(t).all():
            raise IncompatibleModelsError(
                f"model {index} has NaN or infinite values in {name!r}; retrain or repair that "
                "checkpoint before fusing"
            )
        big = float(t.detach().abs().max())
        if big > MAX_ABS_WEIGHT:
            raise IncompatibleModelsError(
                f"model {index} has a value of magnitude {big:.3g} in {name!r} (more than "
                f"{MAX_ABS_WEIGHT:g}): the checkpoint is corrupt or the training diverged; retrain "
                "or re-download it before fusing"
            )


def not_leveled_error(model: object, index: int) -> IncompatibleModelsError:
    """The error for model ``index`` that is not a :class:`LeveledNet`, with what to do: a
    ``transformers`` classifier is wrapped by :func:`neurofuse.hf.wrap`, any other model is
    declared with :func:`neurofuse.levels_from`."""
    if getattr(getattr(model, "config", None), "model_type", None) is not None:
        how = "wrap it with neurofuse.hf.wrap(model, input_shape) (a Hugging Face model)"
    else:
        how = "build it from the zoo (neurofuse.models) or declare its levels with neurofuse.levels_from"
    return IncompatibleModelsError(f"model {index} is a {type(model).__name__}, not a neurofuse LeveledNet; {how}")


def check_same_levels(models: Sequence[nn.Module]) -> List[LeveledNet]:
    """Check that ``models`` can be fused level by level and return them typed.

    Raises
    ------
    IncompatibleModelsError
        If a model is not a :class:`LeveledNet`, if level counts, neuron axes, input shapes or
        class counts differ, or if a weight is NaN or infinite.
    """
    if len(models) == 0:
        raise IncompatibleModelsError("no models to fuse: pass at least one model")
    out: List[LeveledNet] = []
    for i, m in enumerate(models):
        if not isinstance(m, LeveledNet):
            raise not_leveled_error(m, i)
        check_weights(m, i)
        out.append(m)
    ref = out[0]
    for i, m in enumerate(out[1:], start=1):
        if m.num_levels != ref.num_levels:
            raise IncompatibleModelsError(
                f"model {i} has {m.num_levels} levels but model 0 has {ref.num_levels}; layer-wise "
                "fusion needs equal level counts (for models of different depth use depth='align', on the command line --depth align)"
            )
        if m.axes != ref.axes:
            raise IncompatibleModelsError(
                f"model {i} has level neuron axes {m.axes} but model 0 has {ref.axes}"
            )
        if m.input_shape != ref.input_shape:
            raise IncompatibleModelsError(
                f"model {i} takes inputs of shape {list(m.input_shape)} but model 0 takes "
                f"{list(ref.input_shape)}"
            )
        if m.num_classes != ref.num_classes:
            raise IncompatibleModelsError(
                f"model {i} has {m.num_classes} output classes but model 0 has {ref.num_classes}"
            )
    ref_shapes = ref.level_shapes()
    for i, m in enumerate(out[1:], start=1):
        for lvl, (a, b, axis) in enumerate(zip(ref_shapes, m.level_shapes(), ref.axes)):
            rows_a = a[2:] if axis == "conv" else a[1:-1]
            rows_b = b[2:] if axis == "conv" else b[1:-1]
            if rows_a != rows_b:
                raise IncompatibleModelsError(
                    f"level {lvl} of model {i} outputs {list(b)} per sample but model 0's outputs "
                    f"{list(a)}: the {'spatial' if axis == 'conv' else 'token'} sizes differ"
                )
    return out
