r"""The closed form inside a level: the order in which its layers are fitted (*steps*).

A level whose every layer with parameters is a ``Linear`` / ``Conv2d`` after BatchNorm folding
is fitted in closed form one *step* at a time, each from the fused model's own values just
before it (:mod:`neurofuse.methods._steps`).  The steps follow the level's layout
(:func:`neurofuse.levels._layout.level_layout`):

* ``"new"``: a layer that opens a neuron space (an inner space ``h<i>``, the level output, one
  part ``out<b>`` of a concatenation) is fitted to the grouped outputs of the base models' layer;
  the grouping of that space is made here.  The two last layers of a residual block with a
  projection shortcut write one sum and are fitted together (one design matrix of both inputs);
* ``"depthwise"``: a depthwise convolution stays in the space it reads, so its channels keep that
  space's grouping and each fused channel is fitted from its own input channel
  (:class:`neurofuse.approximation.DepthwiseStats`);
* ``"grouped"``: a grouped convolution (``1 < groups``, not depthwise: ResNeXt) opens a space
  whose group ``b`` reads group ``b`` of the space it reads.  That space is grouped in ``groups``
  whole groups (as a GroupNorm's; the level input by the level before it:
  :func:`~neurofuse.levels._layout.output_groups`), and each fused group of outputs is grouped and
  fitted from its own fused group of inputs (one least squares per group);
* ``"residual"``: the last layer of a residual block with an identity shortcut writes
  ``shortcut + layer``, whose neurons are the input's: it keeps the input's grouping and is fitted
  to the grouped block outputs minus the fused shortcut (a residual target).  When that layer is
  a grouped convolution (a ``"grouped"`` step writing ``"in"``), the stream is grouped in its
  groups (by the level that starts it: :func:`~neurofuse.levels._layout.output_groups`), the space
  it reads is grouped with the stream's assignment of groups, and each fused group is fitted from
  its own fused input group to the residual target (to its own outputs, as its GroupNorm sees
  them, when one follows it; the norm then by a ``"norms"`` step).  With a projection shortcut
  (one convolution of the block input) both last layers are fitted together, group by group:
  the shortcut's rows of each output group beside the grouped convolution's.

A ``Linear`` followed by a ``LayerNorm`` over its outputs, or a ``Linear`` / ``Conv2d`` followed by
a ``GroupNorm`` over its channels, is one step with a *norm*: the norm removes the mean and scale
of each row (LayerNorm) or of each sample's group of channels (GroupNorm), so the layer is fitted
to the base models' pre-activations centred and scaled as the norm sees them, and the norm's
weight and bias per neuron afterwards (:func:`neurofuse.methods._steps.fit_level_in_steps`).  A
space normalised in groups of several channels is grouped group by group.  In a residual block
whose last layers are followed by norms, every last layer is a step of its own (``"new"`` for the
first that writes a new output space, ``"keep"`` when the space's grouping is already made: the
input's with an identity shortcut), fitted to its own base outputs, and a final ``"norms"`` step
fits the norms' weights and biases together, channel by channel, to the grouped block outputs
less the fused identity shortcut.  A ``LayerNorm`` over the inputs of a
path's first ``Linear`` (parameter-free ops before it, dropout-like identities between them: the
level ``[ReLU, LayerNorm, Linear]``, a pre-norm residual branch) is that step's *pre-norm*: its
affine is folded into the ``Linear`` (:math:`W \operatorname{diag}\gamma`, :math:`b + W\beta`),
which is fitted on the normalised input, the LayerNorm left with weight 1 and bias 0.

A path may end in dropout-like identities, in an element-wise activation (not in a residual
block, whose sum comes after: a concatenation branch ending in its ReLU, as torchvision's Inception)
and, at the end of the model, in a softmax or log-softmax over the classes (a *monotone head*: the
prediction is that of the logits).  The layer's own outputs (pre-activations, logits) are the
targets; what follows it is kept.  Anything else is refused with a one-line reason.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from torch import nn

from ..errors import IncompatibleModelsError
from ._core import _is_eval_identity, is_elementwise, is_monotone_head
from ._layout import LevelLayout, is_depthwise, level_layout, level_paths

__all__ = ["Step", "closed_form_steps"]

_AFFINE = (nn.Linear, nn.Conv2d)


@dataclasses.dataclass(frozen=True)
class Step:
    """One closed-form fit inside a level.

    Attributes
    ----------
    kind : str
        ``"new"``, ``"depthwise"``, ``"residual"``, ``"keep"`` or ``"norms"`` (see the module
        docstring).
    space : str
        The neuron space it writes (for ``"depthwise"``: the space it reads and keeps).
    modules : tuple of str
        Names, in the level, of the layers fitted together (their outputs add up).
    inputs : tuple of str
        The space each of ``modules`` reads.
    part : int or None
        ``None`` for an inner value; ``-1`` if it writes the level output; ``b`` if it writes part
        ``b`` of a concatenation.  Importance scores, which are defined for level outputs, weigh
        the neurons of such steps; inner neurons weigh alike.
    residual : str or None
        For ``"residual"``: the module whose output (the fused shortcut) is added.
    norm : str or None
        The ``LayerNorm`` / ``GroupNorm`` right after the (one) layer, normalising its outputs, if
        any.  Its weight and bias are fitted by the step itself unless a ``"norms"`` step lists it.
    pre_norm : str or None
        The ``LayerNorm`` right before the (one) layer, normalising its inputs, if any.
    joint : bool
        Whether the layers are a residual block's last layers fitted together to the block output.
    norms : tuple
        For ``"norms"``: the norm after each of ``modules`` (``None`` where a layer has none).
    groups : int
        For ``"grouped"``: the convolution's groups.
    """

    kind: str
    space: str
    modules: Tuple[str, ...]
    inputs: Tuple[str, ...]
    part: Optional[int] = None
    residual: Optional[str] = None
    norm: Optional[str] = None
    pre_norm: Optional[str] = None
    joint: bool = False
    norms: Tuple[Optional[str], ...] = ()
    groups: int = 0


def _conv_reason(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        return "convolution with non-zero or string padding: the closed-form refit unfolds zero-padded patches"
    return None


def _norm_over(end: nn.Module, nxt: nn.Module) -> bool:
    """Whether ``nxt`` normalises exactly the outputs of the layer ``end``: a LayerNorm over a
    Linear's outputs, a GroupNorm over a Linear's or a (not depthwise) Conv2d's channels, an
    InstanceNorm2d without running statistics (a GroupNorm of one channel per group) over a
    Conv2d's."""
    if isinstance(nxt, nn.LayerNorm):
        return isinstance(end, nn.Linear) and tuple(nxt.normalized_shape) == (end.out_features,)
    if isinstance(nxt, nn.GroupNorm) and not is_depthwise(end):
        width = end.out_features if isinstance(end, nn.Linear) else getattr(end, "out_channels", None)
        return isinstance(end, _AFFINE) and width == nxt.num_channels
    if isinstance(nxt, nn.InstanceNorm2d) and not nxt.track_running_stats:   # GroupNorm(C, C)
        return isinstance(end, nn.Conv2d) and not is_depthwise(end) and end.out_channels == nxt.num_features
    return False


def _pre_norm(kids: List[nn.Module], first: int) -> Optional[int]:
    """The index of a LayerNorm over the inputs of the Linear ``kids[first]`` that reads it (only
    dropout-like identities between them, only parameter-free modules before it), if any."""
    if not isinstance(kids[first], nn.Linear):
        return None
    before = [i for i in range(first) if not _is_eval_identity(kids[i])]
    if not before:
        return None
    i = before[-1]
    ln = kids[i]
    if not (isinstance(ln, nn.LayerNorm) and tuple(ln.normalized_shape) == (kids[first].in_features,)):
        return None
    if getattr(ln, "bias", None) is not None and kids[first].bias is None:
        return None    # the LayerNorm's bias would need the layer's, which it has not
    if any(any(True for _ in k.parameters()) for k in kids[:i]):
        return None
    return i


def _grouped_step(conv: nn.Module, name: str, space: str, reads: str, part: Optional[int], layout: LevelLayout,
                  norms: dict, output: bool) -> Step:
    """The step of a grouped convolution ``name``, or why the closed form does not fit it."""
    g = int(conv.groups)
    why = ("it writes the model's output" if output else
           "a GroupNorm splits a space it reads or writes into other groups"
           if {layout.groups_of(reads), layout.groups_of(space)} - {0, g} else None)
    if why:
        raise IncompatibleModelsError(
            f"its grouped convolution (groups={g}) {name!r} is not fitted by the closed form: {why}")
    return Step("grouped", space, (name,), (reads,), part, norm=norms.get(name), groups=g)


def _check_conv_groups(steps: List[Step]) -> None:
    """Every space that grouped convolutions read is grouped in their groups: refuse two of them
    that read one space in different groups, or one that reads a space a grouped convolution of
    other groups wrote."""
    need: dict = {}
    for s in steps:
        if s.kind != "grouped":
            continue
        have = need.setdefault(s.inputs[0], s.groups)
        wrote = [t.groups for t in steps if t.kind == "grouped" and t.space == s.inputs[0]]
        if have != s.groups or any(g != s.groups for g in wrote):
            raise IncompatibleModelsError(
                f"grouped convolutions split its {s.inputs[0]!r} channels into different groups "
                f"({sorted({have, s.groups, *wrote})}); one grouping cannot keep them all whole")


def closed_form_steps(level: nn.Module, index: int, last: bool = False
                      ) -> Tuple[LevelLayout, List[Step]]:
    """The layout and the closed-form steps of a (BatchNorm-folded) level.

    Parameters
    ----------
    level : nn.Module
        The level, its BatchNorms already folded (:func:`neurofuse.levels.fold_batchnorm`).
    index : int
        Its index (for messages).
    last : bool
        Whether it is the model's last level (which may end in a monotone head).

    Raises
    ------
    IncompatibleModelsError
        With the reason, if a layer of the level is not fitted by the closed form.
    """
    layout = level_layout(level, index, "the closed form", grouped=True)
    modules = dict(level.named_modules())
    block = hasattr(level, "shortcut")
    paths = level_paths(level)
    norms = {}     # layer -> name of the norm over its outputs
    pre_norms = {}  # first layer of a path -> name of the LayerNorm over its inputs
    last_of = {}   # path -> (its children's names, the children, the index of its last affine one)
    for name, root, _ in paths:
        kids = list(root.children()) if isinstance(root, nn.Sequential) else [root]
        names = [".".join(p for p in (name, n) if p) for n, _ in root.named_children()] \
            if isinstance(root, nn.Sequential) else [name]
        pos = [i for i, k in enumerate(kids) if any(isinstance(m, _AFFINE) for m in k.modules())]
        if not pos:
            continue
        last_of[name] = (names, kids, pos[-1])
        for p in pos:
            after = [i for i in range(p + 1, len(kids)) if not _is_eval_identity(kids[i])]
            if after and _norm_over(kids[p], kids[after[0]]):
                norms[names[p]] = names[after[0]]
        pre = _pre_norm(kids, pos[0])
        if pre is not None:
            pre_norms[names[pos[0]]] = names[pre]
    for key, _, _, kind in layout.tensors:
        name = key.rpartition(".")[0]
        m = modules[name]
        if not isinstance(m, _AFFINE) and name not in norms.values() and name not in pre_norms.values():
            raise IncompatibleModelsError(
                f"its {type(m).__name__} ({name}) holds parameters and is not folded into a "
                "Linear/Conv2d (only a BatchNorm right after one is, a LayerNorm over a Linear's "
                "outputs, a GroupNorm over a Linear's or Conv2d's channels, or a LayerNorm read by a "
                "path's first Linear that has a bias where the LayerNorm has one), so the level is not "
                "affine in its parameters")
        why = _conv_reason(m)
        if why:
            raise IncompatibleModelsError(why)
    if not any(isinstance(m, _AFFINE) for m in level.modules()):
        raise IncompatibleModelsError("it has no Linear/Conv2d layer for the closed form to fit")
    writers = {}   # path -> name of its last affine layer
    for name, (names, kids, last_affine) in last_of.items():
        end = kids[last_affine]
        tail = [k for k, n in zip(kids[last_affine + 1:], names[last_affine + 1:])
                if n != norms.get(names[last_affine])]
        if not isinstance(end, _AFFINE):
            raise IncompatibleModelsError(
                f"its layers are nested in a {type(end).__name__}, which the closed form does not open")
        head_ok = last and not block and not name.startswith("branches")
        for t in tail:
            if not (_is_eval_identity(t) or (head_ok and is_monotone_head(t)) or (not block and is_elementwise(t))):
                raise IncompatibleModelsError(
                    f"its output is not the output of its last Linear/Conv2d ({type(t).__name__} "
                    "follows it), so the level is not affine in its parameters")
        if block and is_depthwise(end):
            raise IncompatibleModelsError(
                "a residual block whose path ends in a depthwise convolution is not fitted by the "
                "closed form")
        writers[name] = names[last_affine]
    spec = {key.rpartition(".")[0]: (s0, s1, kind) for key, s0, s1, kind in layout.tensors
            if key.endswith(".weight") and kind in ("linear", "conv", "depthwise", "grouped")}
    path_of = {}
    for name, _, _ in paths:
        for mod in spec:
            if not name or mod == name or mod.startswith(name + "."):
                path_of.setdefault(mod, name)
    steps: List[Step] = []
    final: List[str] = []
    for mod, (s0, s1, kind) in spec.items():
        path = path_of[mod]
        ends = writers.get(path) == mod
        part = None
        if ends and not block:
            part = int(s0[3:]) if s0.startswith("out") and s0 != "out" else -1
            if layout.parts and s0 == "in":
                part = [n for n, _, _ in paths].index(path)
        if block and ends:
            final.append(mod)
            continue
        if kind == "depthwise":
            steps.append(Step("depthwise", s0, (mod,), (s0,), part))
        elif kind == "grouped":
            steps.append(_grouped_step(modules[mod], mod, s0, s1, part, layout, norms, last and ends))
        else:
            steps.append(Step("new", s0, (mod,), (s1,), part, norm=norms.get(mod), pre_norm=pre_norms.get(mod)))
    grouped_end = [m for m in final if spec[m][2] == "grouped"]
    if grouped_end and not layout.tied:   # a projection shortcut: both layers, group by group
        m = grouped_end[0]
        others = [o for o in final if o != m]
        if len(others) != 1 or spec[others[0]][2] != "conv" or spec[others[0]][1] != "in" or any(
                norms.get(o) or pre_norms.get(o) for o in final):
            raise IncompatibleModelsError(
                "a grouped convolution ends a residual block whose shortcut is not one convolution of the "
                "block input without a norm, which the closed form does not fit group by group")
        steps.append(Step("grouped", "out", (m, others[0]), (spec[m][1], "in"), -1, joint=True,
                          groups=int(modules[m].groups)))
        _check_conv_groups(steps)
        return layout, steps
    if grouped_end and len(final) > 1:
        raise IncompatibleModelsError(
            "a grouped convolution ends one of several paths of a residual block, which the closed form "
            "fits together, not group by group")
    if grouped_end and pre_norms.get(grouped_end[0]):
        raise IncompatibleModelsError(
            f"a LayerNorm ({pre_norms[grouped_end[0]]}) is read by the grouped convolution that ends the "
            "residual block, which the closed form does not fold")
    if grouped_end and any(t.kind == "grouped" and t.space == spec[grouped_end[0]][1] for t in steps):
        raise IncompatibleModelsError(
            "a grouped convolution that ends a residual block reads another grouped convolution's output, "
            "whose groups would have to follow both that one's input and the stream")
    if grouped_end:   # identity shortcut: the stream's groups, fitted group by group to the block output
        m = grouped_end[0]
        norm = norms.get(m)
        steps.append(Step("grouped", "in", (m,), (spec[m][1],), -1, None if norm else "shortcut", norm=norm,
                          groups=int(modules[m].groups)))
        if norm:   # its norm's weight and bias: to the block output less the shortcut
            steps.append(Step("norms", "in", (m,), (spec[m][1],), -1, "shortcut", norms=(norm,)))
        _check_conv_groups(steps)
        return layout, steps
    _check_conv_groups(steps)
    if final:
        ins = tuple(spec[m][1] for m in final)
        after = tuple(norms.get(m) for m in final)
        if any(after):   # each last layer on its own, then the norms together
            space = "in" if layout.tied else "out"
            for j, (m, u) in enumerate(zip(final, ins)):
                kind = "keep" if layout.tied or j else "new"
                steps.append(Step(kind, space, (m,), (u,), -1, norm=after[j], pre_norm=pre_norms.get(m)))
            steps.append(Step("norms", space, tuple(final), ins, -1, "shortcut" if layout.tied else None,
                              norms=after))
            return layout, steps
        pre = [pre_norms[m] for m in final if m in pre_norms]
        if pre and len(final) > 1:
            raise IncompatibleModelsError(
                f"its LayerNorm ({pre[0]}) is read by one of the two layers of a projection block, "
                "which are fitted together, so the closed form does not fold it")
        pre_norm = pre[0] if pre else None
        if layout.tied:
            steps.append(Step("residual", "in", tuple(final), ins, -1, "shortcut", pre_norm=pre_norm, joint=True))
        else:
            steps.append(Step("new", "out", tuple(final), ins, -1, pre_norm=pre_norm, joint=True))
    return layout, steps
