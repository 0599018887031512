"""Declaring the levels of a model the zoo does not know: :func:`levels_from`.

Any network that is a sequence of sub-networks can be fused level by level.  The user names the
pieces; neurofuse checks the declaration against the model's own ``forward`` on a random input and
wraps the pieces (shared, not copied) in a :class:`DeclaredNet`, a
:class:`~neurofuse.levels.LeveledNet`.

>>> net = levels_from(model, levels=["conv1", [F.relu, "pool", "conv2"],
...                                  [F.relu, nn.Flatten(), "fc"]],
...                   axes=["conv", "conv", "dense"], input_shape=(1, 8, 8))  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ._auto import auto_levels
from ._core import AXES
from ._wrapped import DeclaredNet, Fn, check_input_shape, check_not_shared

__all__ = ["DeclaredNet", "Fn", "levels_from"]

#: one piece of a level: a dotted sub-module name, a module, or a parameter-free callable
Part = Union[str, nn.Module, Callable[[Tensor], Tensor]]
LevelSpec = Union[Part, Sequence[Part]]

_AXIS_DIMS = {"dense": 2, "conv": 4, "token": 3}
_AXIS_SHAPE = {"dense": "[B, C]", "conv": "[B, C, H, W]", "token": "[B, T, C]"}


def _describe(part: Part) -> str:
    if isinstance(part, str):
        return repr(part)
    if isinstance(part, nn.Module):
        return type(part).__name__
    return getattr(part, "__name__", type(part).__name__)


def _resolve_part(model: nn.Module, part: Part, i: int) -> nn.Module:
    if isinstance(part, str):
        try:
            return model.get_submodule(part)
        except AttributeError:
            names = [n for n, _ in model.named_children()]
            raise ConfigError(
                f"level {i}: {type(model).__name__} has no sub-module {part!r} "
                f"(its top-level sub-modules are: {', '.join(names) or 'none'})"
            ) from None
    if isinstance(part, nn.Module):
        return part
    if callable(part):
        return Fn(part)
    raise ConfigError(
        f"level {i}: {part!r} is not a sub-module name, an nn.Module or a callable"
    )


def _build_level(model: nn.Module, spec: LevelSpec, i: int) -> Tuple[nn.Module, str, Optional[nn.Module]]:
    """(level module, its display name, the last declared *model* module of the level)."""
    parts: List[Part] = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not parts:
        raise ConfigError(f"level {i} is empty: declare at least one sub-module or callable")
    mods = [_resolve_part(model, p, i) for p in parts]
    name = " -> ".join(_describe(p) for p in parts)
    owned = {id(m) for m in model.modules()}
    last_model_mod = next((m for m in reversed(mods) if id(m) in owned), None)
    # the last part must be the level's final operation for the per-level check to apply
    if last_model_mod is not None and last_model_mod is not mods[-1]:
        last_model_mod = None
    if len(mods) == 1:
        level = mods[0]
    else:  # splice nn.Sequential parts in, so that [relu, conv, bn] stays a flat (foldable) chain
        flat: List[nn.Module] = []
        for m in mods:
            flat.extend(m.children() if type(m) is nn.Sequential else [m])
        level = nn.Sequential(*flat)
    return level, name, last_model_mod


def _shape(t: Any) -> str:
    return str(list(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def levels_from(model: nn.Module, levels: Optional[Sequence[LevelSpec]] = None,
                axes: Optional[Sequence[str]] = None,
                input_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                *, atol: float = 1e-5, seed: int = 0) -> DeclaredNet:
    """Declare the levels of ``model`` so that it can be fused by neurofuse.

    Parameters
    ----------
    model : nn.Module
        The user's network; ``model(x)`` must return the logits ``[B, num_classes]``.
    levels : sequence, optional
        ``None`` (the default): find the levels automatically with ``torch.fx`` (see
        :func:`neurofuse.levels.auto_levels`; ``axes`` must then be left out).
        Otherwise the levels in order from the input.  Each is a dotted sub-module name (``"layer1.0"``),
        an ``nn.Module``, a parameter-free callable (``torch.relu``, ``lambda x: x.flatten(1)``),
        or a list of those run in sequence (e.g. ``[F.relu, "pool", "conv2"]`` when the model
        applies a functional ReLU and a pool before ``conv2`` in its ``forward``).  Every module
        that holds parameters must be declared by name or as a module: callables must be
        parameter-free.  As in the zoo, a level should end at a pre-activation (put the
        non-linearity at the start of the next level).
    axes : sequence of str, optional
        The neuron axis of each level output: ``"dense"`` (``[B, C]``), ``"conv"``
        (``[B, C, H, W]``) or ``"token"`` (``[B, T, C]``).  Default: inferred from the number
        of dimensions of each output (2, 4, 3).
    input_shape : sequence of int
        Shape of one input sample, e.g. ``(3, 32, 32)``.
    num_classes : int, optional
        Width of the output; default: inferred from ``model(x)``.
    atol : float
        Tolerance of the check that the composed levels reproduce ``model(x)``
        (``|composed - model(x)| <= atol + atol * |model(x)|``).
    seed : int
        Seed of the random check input.

    Returns
    -------
    DeclaredNet
        A :class:`LeveledNet` whose levels are ``model``'s own modules.

    Raises
    ------
    ConfigError
        If a name does not exist, a level fails to run on the previous level's output, an output
        does not have its axis' dimensions, or the composition differs from ``model(x)``; the
        message names the level and the expected and actual shapes or the difference.

    Notes
    -----
    The check runs ``model`` in eval mode on two random inputs drawn from a seeded generator and
    compares each level whose last piece is a declared sub-module with that sub-module's output
    during ``model(x)`` (found with a forward hook), so a missing operation is reported at the
    first level where the outputs part ways.
    """
    if input_shape is None:
        raise ConfigError("levels_from needs input_shape, the shape of one input sample, e.g. (3, 32, 32)")
    if levels is None:
        if axes is not None:
            raise ConfigError("axes are found with the automatic levels; leave axes out or declare "
                              "the levels")
        return auto_levels(model, input_shape, num_classes, atol=atol, seed=seed)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"levels_from needs an nn.Module, got {type(model).__name__}")
    if isinstance(levels, (str, nn.Module)) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise ConfigError("levels must be a non-empty list of level declarations")
    if axes is not None:
        axes = list(axes)
        if len(axes) != len(levels):
            raise ConfigError(f"{len(levels)} levels declared but {len(axes)} axes given")
        for i, a in enumerate(axes):
            if a not in AXES:
                raise ConfigError(f"level {i}: unknown axis {a!r}; choose one of {list(AXES)}")
    shape = check_input_shape(input_shape)

    built = [_build_level(model, spec, i) for i, spec in enumerate(levels)]
    mods = [b[0] for b in built]
    names = [b[1] for b in built]

    try:
        ref_param = next(model.parameters())
        device, dtype = ref_param.device, ref_param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((2, *shape), generator=gen).to(device=device, dtype=dtype)

    # reference: the model's own forward, with the output of each level's last module recorded
    seen: Dict[int, List[Tensor]] = {}
    hooks = []
    for m in {id(b[2]): b[2] for b in built if b[2] is not None}.values():
        def hook(mod: nn.Module, inp: Any, out: Any, key: int = id(m)) -> None:
            if isinstance(out, Tensor):
                seen.setdefault(key, []).append(out.detach())
        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                ref = model(x)
            except Exception as exc:  # noqa: BLE001 - report any failure as a config problem
                raise ConfigError(
                    f"model(x) fails on a random input of shape {[2, *shape]}: {exc}; check input_shape"
                ) from None
            finally:
                for hk in hooks:   # record model(x) only, not the composition below
                    hk.remove()
        if not isinstance(ref, Tensor):
            raise ConfigError(f"model(x) returns a {type(ref).__name__}, not a logits tensor")
        inferred: List[str] = []
        h = x
        with torch.no_grad():
            for i, (level, name) in enumerate(zip(mods, names)):
                prev = _shape(h)
                try:
                    h = level(h)
                except Exception as exc:  # noqa: BLE001
                    raise ConfigError(
                        f"level {i} ({name}) fails on the output of the previous level "
                        f"(shape {prev}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                    ) from None
                if not isinstance(h, Tensor):
                    raise ConfigError(f"level {i} ({name}) returns a {type(h).__name__}, not a tensor")
                want = axes[i] if axes is not None else {2: "dense", 4: "conv", 3: "token"}.get(h.dim())
                if want is None:
                    raise ConfigError(
                        f"level {i} ({name}) outputs shape {_shape(h)} ({h.dim()}-D); a level output "
                        "must be [B, C] (dense), [B, C, H, W] (conv) or [B, T, C] (token)"
                    )
                if h.dim() != _AXIS_DIMS[want]:
                    raise ConfigError(
                        f"level {i} ({name}) is declared {want!r}, which needs an output "
                        f"{_AXIS_SHAPE[want]} ({_AXIS_DIMS[want]}-D), but it outputs shape "
                        f"{_shape(h)} ({h.dim()}-D)"
                    )
                inferred.append(want)
                last = built[i][2]
                rec = seen.get(id(last)) if last is not None else None
                if rec is not None and len(rec) == 1 and i < len(mods) - 1:
                    r = rec[0]
                    if r.shape != h.shape:
                        raise ConfigError(
                            f"level {i} ({name}) outputs shape {_shape(h)} but in model(x) its last "
                            f"module outputs {_shape(r)}: an operation of model.forward before it is "
                            "missing from the declaration (or declared twice)"
                        )
                    diff = float((h - r).abs().max())
                    if diff > atol + atol * float(r.abs().max()):
                        raise ConfigError(
                            f"level {i} ({name}) differs from what model(x) computes there by up to "
                            f"{diff:.3g} (tolerance {atol:g}): an operation of model.forward (e.g. a "
                            "functional relu or pool) is missing from this or an earlier level"
                        )
        if h.shape != ref.shape:
            raise ConfigError(
                f"the declared levels output shape {_shape(h)} but model(x) outputs {_shape(ref)}; "
                "check the last level"
            )
        diff = float((h - ref).abs().max())
        if diff > atol + atol * float(ref.abs().max()):
            raise ConfigError(
                f"the declared levels do not reproduce model(x): they differ by up to {diff:.3g} "
                f"(tolerance {atol:g}); an operation of model.forward is missing from the last "
                "level(s) or declared in the wrong place"
            )
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)

    if h.dim() != 2:
        raise ConfigError(f"the last level must output logits [B, classes], got shape {_shape(h)}")
    if num_classes is not None and int(num_classes) != h.shape[1]:
        raise ConfigError(f"num_classes is {num_classes} but the model outputs {h.shape[1]} classes")
    n_cls = int(h.shape[1])

    check_not_shared(mods, model)
    declared = {id(p) for m in mods for p in m.parameters()}
    missing = [n for n, p in model.named_parameters() if id(p) not in declared]
    if missing:
        warnings.warn(
            f"parameters {missing[:5]}{' ...' if len(missing) > 5 else ''} of {type(model).__name__} "
            "belong to no declared level: if model.forward uses them (e.g. through a callable), "
            "declare their module instead, or fusion will not change (or copy) them",
            stacklevel=2,
        )
    net = DeclaredNet(mods, inferred, shape, n_cls, names, type(model).__name__)
    net.train(was_training)
    return net
