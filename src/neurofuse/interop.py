"""Checkpoints people already have: pickled modules, foreign state-dict names, factories.

The one documented path from a third-party checkpoint to a model neurofuse can fuse:

>>> model = make_net()                                     # your own class  # doctest: +SKIP
>>> load_state_dict(model, "ckpt.pt")                      # names matched   # doctest: +SKIP
>>> net = neurofuse.levels_from(model, input_shape=(3, 32, 32))  # automatic levels  # doctest: +SKIP

* :func:`read_state_dict` reads a ``.pt``/``.pth`` file with ``torch.load(weights_only=True)``
  (never plain unpickling) or a ``.safetensors`` file;
* :func:`match_state_dict` puts its tensors under the model's own names: unchanged when the names
  agree, through a ``key_map`` (exact names or prefixes), or automatically by shapes and order
  (``level1.1.weight`` -> ``levels.0.1.weight``); when nothing fits, the error shows both key lists
  side by side;
* :func:`load_pickled_module` loads a *whole pickled* ``nn.Module`` safely: ``weights_only=True``
  with the classes you trust allow-listed through ``torch.serialization.safe_globals`` (and
  renamed classes remapped), so no other code can run, and on the meta device, so that a file
  that calls an allowed class with huge sizes (instead of storing a module) allocates nothing
  and is refused;
* :func:`load_factory` imports ``FILE.py:function`` (the CLI's ``--model-factory``).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._tensorfile import (DATA_FACTOR, DATA_SLACK, SafetensorsHeader, check_exists, check_torch_zip,
                          data_bytes, file_format, format_error, is_state_dict, load_torch)
from .errors import CheckpointError, ConfigError

__all__ = [
    "KeyMatchError",
    "load_factory",
    "load_pickled_module",
    "load_state_dict",
    "match_state_dict",
    "read_state_dict",
    "side_by_side",
]

PathLike = Union[str, "os.PathLike[str]"]
#: entries of a training checkpoint that may hold the model's state dict
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "module")
KeyMap = Union[Mapping[str, str], Callable[[str], str]]


class KeyMatchError(CheckpointError):
    """The tensor names of a checkpoint cannot be matched onto a model's.

    ``str(exc)`` is one line; :attr:`table` shows both key lists (with shapes) side by side, and
    is attached as an exception note, so a traceback shows it under the message (the CLI prints
    it before its one-line error).
    """

    def __init__(self, message: str, table: str) -> None:
        super().__init__(message)
        self.table = table
        if hasattr(self, "add_note"):  # Python >= 3.11
            self.add_note(table)


def _shape(t: Tensor) -> List[int]:
    return [int(s) for s in t.shape]


def side_by_side(left: Mapping[str, Tensor], right: Mapping[str, Tensor],
                 titles: Tuple[str, str] = ("checkpoint", "model"), limit: int = 60) -> str:
    """Two state dicts' keys and shapes in two columns, in order; ``!`` marks rows whose shapes
    differ and ``<`` / ``>`` keys that only one side has."""
    a = [f"{k} {_shape(v)}" for k, v in left.items()]
    b = [f"{k} {_shape(v)}" for k, v in right.items()]
    la, lb = list(left.values()), list(right.values())
    w = max([len(titles[0])] + [len(s) for s in a[:limit]]) + 2
    rows = [f"  {titles[0]:<{w}}  {titles[1]}", f"  {'-' * (w - 2):<{w}}  {'-' * 20}"]
    for i in range(min(max(len(a), len(b)), limit)):
        sa = a[i] if i < len(a) else ""
        sb = b[i] if i < len(b) else ""
        if i >= len(a):
            mark = ">"
        elif i >= len(b):
            mark = "<"
        else:
            mark = " " if _shape(la[i]) == _shape(lb[i]) else "!"
        rows.append(f"{mark} {sa:<{w}}  {sb}")
    if max(len(a), len(b)) > limit:
        rows.append(f"  ... ({len(a)} and {len(b)} tensors in all)")
    return "\n".join(rows)


def _apply_map(keys: Sequence[str], key_map: KeyMap) -> Dict[str, str]:
    if callable(key_map):
        return {k: str(key_map(k)) for k in keys}
    out = {}
    prefixes = sorted(((s, d) for s, d in key_map.items() if s.endswith(".")), key=lambda t: -len(t[0]))
    for k in keys:
        if k in key_map:
            out[k] = key_map[k]
            continue
        for src, dst in prefixes:
            if k.startswith(src):
                out[k] = dst + k[len(src):]
                break
        else:
            out[k] = k
    return out


def match_state_dict(state: Mapping[str, Tensor], model: Union[nn.Module, Mapping[str, Tensor]],
                     key_map: Optional[KeyMap] = None, *, source: str = "the checkpoint"
                     ) -> Dict[str, Tensor]:
    """``state`` under the tensor names of ``model``.

    Parameters
    ----------
    state : mapping of str to Tensor
        The checkpoint's tensors.
    model : nn.Module or mapping
        The model (or its state dict) whose names the result must have.
    key_map : mapping or callable, optional
        ``None`` (default): the names are kept when they are the model's; otherwise tensors are
        matched **by order and shape** (the checkpoint's i-th tensor is the model's i-th; every
        pair must have the same shape; ``num_batches_tracked`` counters the checkpoint lacks are
        taken from the model).  A mapping renames exact keys (``{"fc.weight": "head.weight"}``)
        and prefixes ending in ``.`` (``{"level1.": "levels.0."}``); a callable renames each key.
    source : str
        How ``state`` is named in error messages.

    Returns
    -------
    dict
        A state dict that ``model.load_state_dict(..., strict=True)`` accepts.

    Raises
    ------
    KeyMatchError
        If the names cannot be matched; :attr:`KeyMatchError.table` shows both key lists.
    """
    ref = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    what = type(model).__name__ if isinstance(model, nn.Module) else "the model"
    state = dict(state)
    if key_map is not None:
        renamed = _apply_map(list(state), key_map)
        mapped = {renamed[k]: v for k, v in state.items()}
        _check_exact(mapped, ref, source, what, "after the key map")
        return _check_kinds(mapped, ref, source, what)
    if set(state) == set(ref):
        _check_exact(state, ref, source, what, "")
        return _check_kinds({k: state[k] for k in ref}, ref, source, what)
    counters = [k for k in ref if k.endswith("num_batches_tracked")]
    if not any(k.endswith("num_batches_tracked") for k in state):
        ref_keys = [k for k in ref if k not in counters]
    else:
        counters, ref_keys = [], list(ref)
    src_keys = list(state)
    if len(src_keys) == len(ref_keys) and all(
            _shape(state[s]) == _shape(ref[d]) for s, d in zip(src_keys, ref_keys)):
        out = {d: state[s] for s, d in zip(src_keys, ref_keys)}
        out.update({k: ref[k].clone() for k in counters})
        return _check_kinds({k: out[k] for k in ref}, ref, source, what)
    table = side_by_side(state, {k: ref[k] for k in ref_keys}, (source, what))
    bad = next((i for i, (s, d) in enumerate(zip(src_keys, ref_keys))
                if _shape(state[s]) != _shape(ref[d])), None)
    why = (f"{len(src_keys)} tensors against {len(ref_keys)}" if len(src_keys) != len(ref_keys)
           else f"tensor {bad} ({src_keys[bad]!r} {_shape(state[src_keys[bad]])} vs "
                f"{ref_keys[bad]!r} {_shape(ref[ref_keys[bad]])}) differs in shape")
    raise KeyMatchError(
        f"cannot match the tensor names of {source} onto {what}'s by shapes and order: {why}; "
        "pass a key_map (exact names or prefixes such as {'level1.': 'levels.0.'}); both key lists "
        "side by side are in the note below (exc.table)", table)


def _kind(t: Tensor) -> str:
    if t.is_complex():
        return "complex"
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.is_floating_point() else "integer"


def _check_kinds(state: Dict[str, Tensor], ref: Mapping[str, Tensor], source: str,
                 what: str) -> Dict[str, Tensor]:
    """Refuse tensors that ``load_state_dict`` would cast silently (integer data into float
    weights) or cannot copy at all (sparse, quantized): name the tensor and say what to do."""
    for k, t in state.items():
        if t.layout != torch.strided or t.is_quantized:
            kind = "quantized" if t.is_quantized else f"{str(t.layout).replace('torch.', '')}"
            raise CheckpointError(f"tensor {k!r} of {source} is {kind}; {what} takes dense tensors: "
                                  "convert it (t.dequantize() / t.to_dense()) and re-save")
        if _kind(t) != _kind(ref[k]):
            raise CheckpointError(
                f"tensor {k!r} of {source} holds {str(t.dtype).replace('torch.', '')} values but "
                f"{what} has {str(ref[k].dtype).replace('torch.', '')} there; refusing to cast them: "
                "re-save the checkpoint with the model's dtypes")
    return state


def _check_exact(state: Mapping[str, Tensor], ref: Mapping[str, Tensor], source: str, what: str,
                 when: str) -> None:
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    wrong = [k for k in ref if k in state and _shape(state[k]) != _shape(ref[k])]
    if missing or extra or wrong:
        table = side_by_side(state, ref, (source, what))
        parts = ([f"missing {missing[:3]}"] if missing else []) + (
            [f"unexpected {extra[:3]}"] if extra else []) + (
            [f"shape of {wrong[0]!r} is {_shape(state[wrong[0]])}, not {_shape(ref[wrong[0]])}"]
            if wrong else [])
        raise KeyMatchError(
            f"the tensors of {source} do not fit {what}{' ' + when if when else ''}: {'; '.join(parts)}; both key lists "
            "side by side are in the note below (exc.table)", table)


def read_state_dict(path: PathLike, max_bytes: Optional[int] = None) -> Dict[str, Tensor]:
    """The tensors of a PyTorch state dict (``weights_only=True``; a training checkpoint
    ``{"state_dict" | "model_state_dict" | "model" | "net" | "module": {...}, "epoch": ...}`` is
    unwrapped) or of a ``.safetensors`` file, the format recognised by content (a ``.bin`` or
    ``.ckpt`` written by ``torch.save`` is read as PyTorch).

    Parameters
    ----------
    path : str or path-like
        The file.
    max_bytes : int, optional
        Most bytes of data the file may hold (checked on its zip directory or safetensors header
        before any data is read); :func:`load_state_dict` passes a small multiple of the model's.

    Raises
    ------
    CheckpointError
        If the file is missing or corrupt, holds more data than ``max_bytes``, or holds pickled
        objects other than tensors (a whole pickled module: use :func:`load_pickled_module`).
    """
    p = Path(path)
    check_exists(p)
    kind = file_format(p)
    if kind == "safetensors":
        return SafetensorsHeader(p).read(max_bytes)
    if kind != "torch":
        raise format_error(p, kind)
    try:
        obj = load_torch(p, max_bytes)
    except CheckpointError as exc:
        if "pickled Python objects" in str(exc):
            raise CheckpointError(
                f"{p} holds pickled Python objects (a whole nn.Module?), not a state dict; load it "
                "with neurofuse.interop.load_pickled_module(path, classes=[YourNet]) or re-save "
                "it with torch.save(model.state_dict(), path)"
            ) from None
        raise
    if is_state_dict(obj) and obj:
        return dict(obj)
    for key in ("state_dict",) + _WRAPPERS:
        inner = obj.get(key) if isinstance(obj, Mapping) else None
        if isinstance(inner, Mapping) and inner and is_state_dict(inner):
            return dict(inner)
    raise CheckpointError(
        f"{p} does not hold a state dict (a mapping of names to tensors); re-save it with "
        "torch.save(model.state_dict(), path)"
    )


def load_state_dict(model: nn.Module, path: PathLike, key_map: Optional[KeyMap] = None) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` under its own names (see
    :func:`match_state_dict`) and return ``model`` in eval mode.  A file holding more than a small
    multiple of the model's data is refused before its data is read."""
    limit = DATA_FACTOR * data_bytes(model.state_dict()) + DATA_SLACK
    state = read_state_dict(path, limit)
    model.load_state_dict(match_state_dict(state, model, key_map, source=str(path)), strict=True)
    return model.eval()


def _torch_nn_classes() -> List[type]:
    out = []
    for name in dir(nn):
        obj = getattr(nn, name)
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            out.append(obj)
    return out


def load_pickled_module(path: PathLike, classes: Sequence[type] = (),
                        remap: Optional[Mapping[str, type]] = None) -> nn.Module:
    """Load a whole pickled ``nn.Module`` (``torch.save(model, path)``) without plain unpickling.

    The file is read with ``torch.load(weights_only=True)``; only tensors, containers, the
    ``torch.nn`` layer classes and the classes you pass are allowed
    (``torch.serialization.safe_globals``), so a file that names any other class or function is
    refused before anything of it runs.

    Parameters
    ----------
    path : str or path-like
        The ``.pt``/``.pth`` file.
    classes : sequence of type
        Your own module classes the file holds (e.g. ``[ResNet, BasicBlock]``), trusted by you.
    remap : mapping of str to type, optional
        Classes pickled under another name: ``{"__main__.Net": my_models.Net}`` (a class defined
        in a script is pickled as ``__main__.<name>``).

    Returns
    -------
    nn.Module
        The module, on the CPU, in eval mode.

    Raises
    ------
    CheckpointError
        If the file names a class or function that is not allowed (the message lists them), or
        does not hold an ``nn.Module``.
    """
    p = Path(path)
    check_exists(p)
    kind = file_format(p)
    if kind != "torch":
        raise format_error(p, kind)
    check_torch_zip(p)   # every entry inside the file: no storage larger than the file
    allowed: List[Any] = _torch_nn_classes() + list(classes)
    allowed += [(cls, name) for name, cls in (remap or {}).items()]
    try:
        # a pickle may *call* an allowed class (nn.Linear(100000, 100000)): on the meta device
        # that allocates nothing, and such a module is refused below
        with torch.serialization.safe_globals(allowed), torch.device("meta"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/runtime errors for bad files
        msg = str(exc)
        if "weights only load failed" in msg.lower() or "unsupported global" in msg.lower():
            try:
                names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
                         if not n.startswith("torch.")]
            except Exception:  # noqa: BLE001
                names = re.findall(r"GLOBAL ([\w.]+)", msg)
            known = {f"{c.__module__}.{c.__qualname__}" for c in classes} | set(remap or {})
            names = [n for n in names if n not in known] or re.findall(r"GLOBAL ([\w.]+)", msg)
            raise CheckpointError(
                f"{p} names {', '.join(names[:5]) or 'objects'} which are not allowed; if you trust "
                "the file, pass those classes (classes=[...], or remap={'old.Name': NewClass} for "
                "renamed ones); nothing else is unpickled"
            ) from None
        raise CheckpointError(f"{p}: cannot read it ({msg.splitlines()[0] if msg else type(exc).__name__})") from None
    if not isinstance(obj, nn.Module):
        raise CheckpointError(
            f"{p} holds a {type(obj).__name__}, not a pickled nn.Module; for a state dict use "
            "neurofuse.interop.load_state_dict(model, path)"
        )
    built = [n for n, t in obj.state_dict(keep_vars=True).items() if t is not None and t.is_meta]
    if built:
        raise CheckpointError(
            f"{p} builds modules by calling their classes (tensor {built[0]!r} has no stored data) "
            "instead of storing them as torch.save does; it is not a saved model (or hostile): "
            "re-save the model with torch.save")
    return obj.eval()


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The function named by ``FILE.py:function`` (the CLI's ``--model-factory``).

    The file is imported as a module (it is your own code and runs as such).

    Raises
    ------
    ConfigError
        If ``spec`` is not ``FILE.py:function``, the file does not exist or the function is missing.
    """
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name or not path.endswith(".py"):
        raise ConfigError(f"--model-factory {spec!r} must be FILE.py:function, e.g. my_models.py:make_net")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--model-factory: {p} does not exist")
    mod_name = f"_neurofuse_factory_{p.stem}"
    loader = importlib.util.spec_from_file_location(mod_name, p)
    if loader is None or loader.loader is None:  # pragma: no cover - a .py file always loads
        raise ConfigError(f"--model-factory: cannot import {p}")
    module = importlib.util.module_from_spec(loader)
    sys.modules[mod_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file failed to import
        raise ConfigError(f"--model-factory: importing {p} fails: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ConfigError(f"--model-factory: {p} has no function {name!r} (it defines: "
                          f"{', '.join(found[:10]) or 'nothing callable'})")

    def make() -> nn.Module:
        try:
            model = fn()
        except Exception as exc:  # noqa: BLE001 - the user's function failed
            text = str(exc).splitlines()[0][:160] if str(exc) else ""
            raise ConfigError(f"--model-factory {spec}: {name}() raises {type(exc).__name__}"
                              f"{': ' + text if text else ''}; fix the function") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"--model-factory {spec} returns a {type(model).__name__}, not a "
                              "torch.nn.Module")
        return model

    make.__name__ = name
    return make
