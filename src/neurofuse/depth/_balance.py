r"""Depth balancing: bring a model to another depth without changing its function.

* :func:`insert_identity_levels` (``balance="add"``) inserts identity levels into a shallower
  model.  Level outputs are pre-activations and the next level starts with its non-linearity
  :math:`\sigma`, so an identity level after level :math:`i` is ``[σ, Linear(h, h) = I]`` (dense
  and token levels) or ``[σ, Conv2d(c, c, k) = δ]`` (conv levels; a centred delta kernel with
  same padding is the identity).  The model then computes :math:`\sigma(I\,\sigma(z)) =
  \sigma(\sigma(z))`, which equals :math:`\sigma(z)` exactly when :math:`\sigma` is idempotent
  (ReLU, ReLU6, Hardtanh, identity).  For a non-idempotent :math:`\sigma` (GELU, Tanh, Sigmoid,
  LeakyReLU...) the inserted level is the bare identity map ``[Identity, Linear = I]``, which is
  exact for any :math:`\sigma`; its output then repeats the previous pre-activation.
* :func:`merge_levels` (``balance="merge"``) groups consecutive levels of a deeper model into
  composite levels (an ``nn.Sequential`` of the original modules), which is always exact.  Two
  affine layers with nothing but ``nn.Identity`` between them (``Linear, Linear``; ``Conv2d``
  followed by a 1x1 ``Conv2d``) become one affine layer, so the composite stays affine in its
  parameters where possible (:func:`neurofuse.levels.split_affine`).

Both return a :class:`SequentialNet`, a :class:`~neurofuse.levels.LeveledNet` that is used as a
fusion input only.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ConfigError, IncompatibleModelsError
from ..levels import LeveledNet
from ..levels import Fn

__all__ = [
    "SequentialNet",
    "identity_level",
    "insert_identity_levels",
    "is_idempotent",
    "leading_activation",
    "merge_affine",
    "merge_levels",
]

log = logging.getLogger("neurofuse")

#: element-wise non-linearities that may start a level
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU,
    nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.PReLU,
)
_FN_ACTIVATIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.tanh, torch.sigmoid,
    torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.leaky_relu,
    torch.nn.functional.elu,
}


class SequentialNet(LeveledNet):
    """A model given directly by its list of levels (the output of depth balancing).

    Balanced models are fusion *inputs*: the fused model is always a clone of the reference
    model, which balancing leaves untouched.  A ``SequentialNet`` therefore has no zoo
    :meth:`config` and cannot change its widths.

    Parameters
    ----------
    levels, axes, input_shape, num_classes
        As :class:`~neurofuse.levels.LeveledNet`.
    source : str
        A short description of where the levels came from (shown by ``repr``).
    """

    arch = "sequential"

    def __init__(self, levels: Sequence[nn.Module], axes: Sequence[str], input_shape: Sequence[int],
                 num_classes: int, source: str = "") -> None:
        super().__init__(levels, axes, input_shape, num_classes)
        self.source = source

    def config(self) -> Dict[str, Any]:
        raise NotImplementedError(
            "a depth-balanced model has no zoo config: it is a fusion input only; save the "
            "original model (the fused model keeps the reference model's architecture)")

    def with_widths(self, widths: Sequence[int]) -> "LeveledNet":
        raise ConfigError(
            "a depth-balanced model cannot change its widths: put the reference model first "
            "(align_models does) so that the fused model is built from it")

    def extra_repr(self) -> str:
        return f"source={self.source!r}, axes={self.axes}"


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
def leading_activation(level: nn.Module) -> Optional[nn.Module]:
    """The element-wise non-linearity a level starts with, or ``None``."""
    first = level[0] if isinstance(level, nn.Sequential) and len(level) > 0 else level
    if isinstance(first, nn.Sequential):
        return leading_activation(first)
    if isinstance(first, _ACTIVATIONS):
        return first
    if isinstance(first, Fn) and first.fn in _FN_ACTIVATIONS:
        return first
    return None


def is_idempotent(act: nn.Module) -> bool:
    """Whether ``act(act(z)) == act(z)`` (checked on a grid of values in ``[-8, 8]``)."""
    try:
        p = next(act.parameters())
        dtype, device = p.dtype, p.device
    except StopIteration:
        dtype, device = torch.float32, torch.device("cpu")
    z = torch.linspace(-8.0, 8.0, 321, dtype=torch.float64).to(device=device, dtype=dtype)
    z = z.reshape(1, -1)
    with torch.no_grad():
        a = act(z)
        return bool(torch.allclose(act(a), a, rtol=1e-6, atol=1e-6))


# ---------------------------------------------------------------------------------------------
# identity levels (balance="add")
# ---------------------------------------------------------------------------------------------
def _last_affine(level: nn.Module) -> Optional[nn.Module]:
    mods = list(level.children()) if isinstance(level, nn.Sequential) else [level]
    return mods[-1] if mods and isinstance(mods[-1], (nn.Linear, nn.Conv2d)) else None


def _same_conv_kernel(template: Optional[nn.Module]) -> int:
    """The kernel size of ``template``'s conv when a delta kernel of that size is an identity."""
    conv = _last_affine(template) if template is not None else None
    if not isinstance(conv, nn.Conv2d):
        return 1
    k = conv.kernel_size
    if (k[0] == k[1] and k[0] % 2 == 1 and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding == (k[0] // 2, k[0] // 2)
            and conv.padding_mode == "zeros"):
        return int(k[0])
    return 1


def identity_level(shape: Sequence[int], axis: str, act: Optional[nn.Module] = None,
                   template: Optional[nn.Module] = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> nn.Sequential:
    """A level ``[act or Identity, affine identity]`` for a level output of ``shape`` and ``axis``.

    ``dense`` ``[B, h]`` and ``token`` ``[B, T, h]``: ``Linear(h, h)`` with identity weight and
    zero bias.  ``conv`` ``[B, c, H, W]``: ``Conv2d(c, c, k, padding=k//2)`` with a centred delta
    kernel and zero bias, where ``k`` is the kernel size of ``template``'s conv if that conv is a
    stride-1 "same" convolution (so the identity has the shape of its neighbours), else 1.
    """
    shape = [int(s) for s in shape]
    if axis == "dense":
        if len(shape) != 2:
            raise IncompatibleModelsError(
                f"cannot insert an identity level after a 'dense' level of output shape {shape}; "
                "use balance='merge'")
        affine: nn.Module = nn.Linear(shape[1], shape[1])
        with torch.no_grad():
            affine.weight.copy_(torch.eye(shape[1]))
            affine.bias.zero_()
    elif axis == "token":
        if len(shape) != 3:
            raise IncompatibleModelsError(
                f"cannot insert an identity level after a 'token' level of output shape {shape}")
        affine = nn.Linear(shape[2], shape[2])
        with torch.no_grad():
            affine.weight.copy_(torch.eye(shape[2]))
            affine.bias.zero_()
    elif axis == "conv":
        if len(shape) != 4:
            raise IncompatibleModelsError(
                f"cannot insert an identity level after a 'conv' level of output shape {shape}")
        c, k = shape[1], _same_conv_kernel(template)
        affine = nn.Conv2d(c, c, k, padding=k // 2)
        with torch.no_grad():
            affine.weight.zero_()
            affine.weight[torch.arange(c), torch.arange(c), k // 2, k // 2] = 1.0
            affine.bias.zero_()
    else:
        raise ValueError(f"unknown neuron axis {axis!r}")
    first = copy.deepcopy(act) if act is not None else nn.Identity()
    return nn.Sequential(first, affine).to(device=device, dtype=dtype)


def _output_shapes(model: LeveledNet) -> List[Tuple[int, ...]]:
    try:
        p = next(model.parameters())
        dtype, device = p.dtype, p.device
    except StopIteration:
        dtype, device = torch.float32, torch.device("cpu")
    was_training = model.training
    model.eval()
    shapes = []
    try:
        with torch.no_grad():
            h = torch.zeros((2, *model.input_shape), dtype=dtype, device=device)
            for level in model.levels:
                h = level(h)
                shapes.append(tuple(h.shape))
    finally:
        model.train(was_training)
    return shapes


def _check_alignment(alignment: Sequence[int], m: int, n: int,
                     first_to_first: bool = True) -> List[int]:
    a = [int(j) for j in alignment]
    ok = m > 0 and len(a) == m and all(0 <= j < n for j in a) and all(x < y for x, y in zip(a, a[1:]))
    if ok:
        ok = a[-1] == n - 1 and (m == 1 or a[0] == 0 or not first_to_first)
    if not ok:
        rule = "first to first, " if first_to_first else ""
        raise ConfigError(
            f"alignment {a} is not a monotone map of {m} levels onto {n} (strictly increasing, "
            f"{rule}last to last)")
    return a


def insert_identity_levels(shallow: LeveledNet, alignment: Sequence[int], depth: int,
                           deep: Optional[LeveledNet] = None) -> SequentialNet:
    """``shallow`` with identity levels at the deep positions no shallow level is aligned to.

    Parameters
    ----------
    shallow : LeveledNet
        The model with fewer levels (``m``).
    alignment : sequence of int
        For each of its levels, the deep level it is aligned to (:func:`align_levels`).
    depth : int
        Number of levels ``n`` of the deeper model (the result's depth).
    deep : LeveledNet, optional
        The deeper model; its conv kernel sizes shape the inserted conv identities.

    Returns
    -------
    SequentialNet
        A model with ``depth`` levels computing exactly the same function as ``shallow`` (the
        original levels are copied, not shared).  Inserted level ``k`` has the axis and width of
        the shallow level before it.
    """
    m = shallow.num_levels
    a = _check_alignment(alignment, m, depth)
    if m == 1 and depth > 1:
        raise IncompatibleModelsError(
            f"{type(shallow).__name__} has a single level: identity levels cannot be inserted "
            "before its first level; use balance='merge'")
    shapes = _output_shapes(shallow)
    try:
        p = next(shallow.parameters())
        dtype, device = p.dtype, p.device
    except StopIteration:
        dtype, device = torch.float32, torch.device("cpu")
    levels: List[nn.Module] = []
    axes: List[str] = []
    for i in range(m):
        levels.append(copy.deepcopy(shallow.levels[i]))
        axes.append(shallow.axes[i])
        if i == m - 1:
            break
        gap = range(a[i] + 1, a[i + 1])
        if not gap:
            continue
        act = leading_activation(shallow.levels[i + 1])
        if act is not None and not is_idempotent(act):
            log.info("level %d starts with %s, which is not idempotent: inserting bare identity "
                     "levels after level %d", i + 1, type(act).__name__, i)
            act = None
        for k in gap:
            template = deep.levels[k] if deep is not None else None
            if deep is not None and deep.axes[k] != shallow.axes[i]:
                raise IncompatibleModelsError(
                    f"an identity level after level {i} ({shallow.axes[i]!r}) would stand at level "
                    f"{k} of the deeper model, which is {deep.axes[k]!r}; use balance='merge'")
            levels.append(identity_level(shapes[i], shallow.axes[i], act, template, dtype, device))
            axes.append(shallow.axes[i])
    return SequentialNet(levels, axes, shallow.input_shape, shallow.num_classes,
                         source=f"{type(shallow).__name__} + {depth - m} identity levels")


# ---------------------------------------------------------------------------------------------
# merging levels (balance="merge")
# ---------------------------------------------------------------------------------------------
def _flat_modules(module: nn.Module) -> List[nn.Module]:
    if isinstance(module, nn.Sequential):
        out: List[nn.Module] = []
        for c in module.children():
            out.extend(_flat_modules(c))
        return out
    return [module]


def _compose_linear(a: nn.Linear, b: nn.Linear) -> nn.Linear:
    wa, wb = a.weight.detach().double(), b.weight.detach().double()
    bias = wb @ a.bias.detach().double() if a.bias is not None else None
    if b.bias is not None:
        bias = b.bias.detach().double() if bias is None else bias + b.bias.detach().double()
    out = nn.Linear(a.in_features, b.out_features, bias=bias is not None)
    out = out.to(device=b.weight.device, dtype=b.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(wb @ wa)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _is_pointwise_conv(c: nn.Module) -> bool:
    return (isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) and c.stride == (1, 1)
            and c.padding == (0, 0) and c.dilation == (1, 1) and c.groups == 1)


def _compose_conv(a: nn.Conv2d, b: nn.Conv2d) -> nn.Conv2d:
    """``b(a(x))`` for a pointwise ``b`` as one conv with ``a``'s geometry."""
    wa = a.weight.detach().double()                     # [c, i, kh, kw]
    wb = b.weight.detach().double()[:, :, 0, 0]         # [o, c]
    w = torch.einsum("oc,cikl->oikl", wb, wa)
    bias = wb @ a.bias.detach().double() if a.bias is not None else None
    if b.bias is not None:
        bias = b.bias.detach().double() if bias is None else bias + b.bias.detach().double()
    out = nn.Conv2d(a.in_channels, b.out_channels, a.kernel_size, stride=a.stride,
                    padding=a.padding, dilation=a.dilation, groups=a.groups,
                    bias=bias is not None, padding_mode=a.padding_mode)
    out = out.to(device=b.weight.device, dtype=b.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def merge_affine(modules: Sequence[nn.Module]) -> List[nn.Module]:
    """Replace ``Linear, [Identity...], Linear`` and ``Conv2d, [Identity...], Conv2d(1x1)`` runs
    by one equivalent affine layer (repeatedly); other modules are kept in order."""
    mods = [m for m in modules]
    changed = True
    while changed:
        changed = False
        for i, a in enumerate(mods):
            if not (isinstance(a, nn.Linear) or (isinstance(a, nn.Conv2d) and a.groups == 1)):
                continue
            j = i + 1
            while j < len(mods) and isinstance(mods[j], nn.Identity):
                j += 1
            if j >= len(mods):
                break
            b = mods[j]
            if isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and b.in_features == a.out_features:
                mods[i:j + 1] = [_compose_linear(a, b)]
            elif isinstance(a, nn.Conv2d) and _is_pointwise_conv(b) and b.in_channels == a.out_channels:
                mods[i:j + 1] = [_compose_conv(a, b)]
            else:
                continue
            changed = True
            break
    return mods


def merge_levels(deep: LeveledNet, alignment: Sequence[int]) -> SequentialNet:
    """``deep`` with consecutive levels grouped so that it has ``len(alignment)`` levels.

    Level ``i`` of the result is the composite of deep levels ``alignment[i-1]+1 .. alignment[i]``
    (level 0: ``0 .. alignment[0]``; :func:`align_levels` gives ``alignment[0] = 0``, but any
    strictly increasing map ending at the last level is accepted), so its output is deep level ``alignment[i]``'s output and the
    function is unchanged.  Composite levels are ``nn.Sequential`` of the copied original modules,
    with adjacent affine layers merged (:func:`merge_affine`).
    """
    n = deep.num_levels
    a = _check_alignment(alignment, len(alignment), n, first_to_first=False)
    levels: List[nn.Module] = []
    axes: List[str] = []
    start = 0
    for j in a:
        group = [copy.deepcopy(deep.levels[k]) for k in range(start, j + 1)]
        if len(group) == 1:
            levels.append(group[0])
        else:
            mods = merge_affine([m for g in group for m in _flat_modules(g)])
            levels.append(nn.Sequential(*mods))
        axes.append(deep.axes[j])
        start = j + 1
    return SequentialNet(levels, axes, deep.input_shape, deep.num_classes,
                         source=f"{type(deep).__name__} with {n} levels merged into {len(a)}")


def groups_of(alignment: Sequence[int]) -> List[List[int]]:
    """The deep levels in each composite level of :func:`merge_levels`."""
    out, start = [], 0
    for j in alignment:
        out.append(list(range(start, int(j) + 1)))
        start = int(j) + 1
    return out

