"""Saving and loading models as self-describing ``.safetensors`` checkpoints.

A neurofuse checkpoint is one ``.safetensors`` file: the tensors are the model's state dict and the
safetensors metadata holds, under the key ``"neurofuse"``, the JSON document::

    {"format": "neurofuse-checkpoint", "version": 1,
     "config": {"arch": ..., "kwargs": {...}},   # LeveledNet.config()
     "metadata": {...}}                          # free-form, given to save_model

so :func:`load_model` rebuilds the architecture with :func:`neurofuse.models.build_model` and
needs nothing else.  Legacy PyTorch state dicts (``.pt`` / ``.pth``) are read too, only with
``torch.load(..., weights_only=True)`` (no arbitrary code runs) and only together with an
architecture config.

Every write is atomic and durable (:mod:`neurofuse._io`: a uniquely named temporary file in the
same directory, fsynced, then :func:`os.replace` and an fsync of the directory; the file gets the
usual umask-derived mode) and refuses to overwrite an existing file unless ``force=True``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ._io import write_safetensors, write_text
from ._tensorfile import (DATA_FACTOR, DATA_SLACK, DIGEST_KEY, METADATA_KEY, SafetensorsHeader,
                          check_exists, corrupt_error, data_bytes, digest, file_format, first_line,
                          format_error, read_torch)
from .errors import CheckpointError, ConfigError, NeurofuseError, OutputExistsError
from .levels import LeveledNet

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DIGEST_KEY",
    "MAX_CONFIG_BYTES",
    "MAX_DOCUMENT_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MODULES",
    "MAX_PARAMETERS",
    "FACTORY_KEY",
    "METADATA_KEY",
    "WEIGHTS_FORMAT",
    "load_model",
    "load_weights",
    "read_config",
    "read_factory_metadata",
    "save_factory_state",
    "save_json",
    "save_model",
    "save_weights",
]

PathLike = Union[str, "os.PathLike[str]"]

log = logging.getLogger("neurofuse")

#: value of the ``"format"`` field of the metadata document
CHECKPOINT_FORMAT = "neurofuse-checkpoint"
#: newest metadata version this code writes and reads
CHECKPOINT_VERSION = 1
#: value of the ``"format"`` field of a weights-only file (:func:`save_weights`)
WEIGHTS_FORMAT = "neurofuse-weights"

#: limits on what a checkpoint may ask for, checked before anything is built or read: a small
#: file must not make the process allocate gigabytes or recurse without bound
MAX_DOCUMENT_BYTES = 16 << 20
MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_DEPTH = 64
MAX_PARAMETERS = 1 << 31
MAX_MODULES = 100_000

_SAFETENSORS_SUFFIX = ".safetensors"


# ---------------------------------------------------------------------------------------------
# atomic writing
# ---------------------------------------------------------------------------------------------
def _prepare_output(path: PathLike, force: bool) -> Path:
    """Check that ``path`` may be written and create its parent directories."""
    out = Path(path)
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file path instead")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _json_default(obj: Any) -> Any:
    """Make numpy / torch scalars and arrays and paths JSON-serialisable."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def save_json(obj: Any, path: PathLike, *, force: bool = False) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    Numpy and torch scalars / arrays and :class:`pathlib.Path` values are converted.  Non-finite
    floats are written as ``NaN`` / ``Infinity`` (what :mod:`json` reads back).

    Parameters
    ----------
    obj : object
        A JSON-serialisable object.
    path : str or path-like
        Output file; parent directories are created.
    force : bool
        Overwrite ``path`` if it exists.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    OutputExistsError
        If ``path`` exists and ``force`` is false, or is a directory.
    TypeError
        If ``obj`` holds a value that cannot be written as JSON.
    """
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    out = _prepare_output(path, force)
    write_text(out, text)
    return out


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def _architecture_config(model: nn.Module) -> Dict[str, Any]:
    config_fn = getattr(model, "config", None)
    if not callable(config_fn):
        raise ConfigError(
            f"cannot save a {type(model).__name__}: it is not a neurofuse LeveledNet; build it "
            "from neurofuse.models"
        )
    try:
        config = config_fn()
    except NotImplementedError:
        if getattr(model, "arch", None) == "declared":
            raise ConfigError(
                f"cannot save a declared model ({type(model).__name__} from levels_from) as a "
                "self-describing checkpoint: neurofuse cannot rebuild your architecture; save its "
                "weights and declaration with neurofuse.checkpoint.save_weights(model, path), "
                "then reload with load_weights(levels_from(YourModel(...), levels=[...]), path)"
            ) from None
        raise ConfigError(
            f"cannot save a {type(model).__name__}: it does not describe its architecture "
            "(config() is not implemented); build it from neurofuse.models"
        ) from None
    if not isinstance(config, Mapping) or "arch" not in config:
        raise ConfigError(
            f"{type(model).__name__}.config() returned {config!r}, not {{'arch': ..., "
            "'kwargs': {...}}; fix the model's config()"
        )
    return dict(config)


def save_model(model: LeveledNet, path: PathLike, *, force: bool = False,
               metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Save ``model`` as a self-describing ``.safetensors`` checkpoint.

    The state dict is copied to contiguous CPU tensors (tied / shared tensors become independent
    copies, which safetensors requires); the architecture config and ``metadata`` go into the
    file's metadata (see the module docstring).  The file is written atomically.

    Parameters
    ----------
    model : LeveledNet
        The model; its :meth:`~neurofuse.levels.LeveledNet.config` must describe it.
    path : str or path-like
        Output file, ending in ``.safetensors``; parent directories are created.
    force : bool
        Overwrite ``path`` if it exists.
    metadata : mapping, optional
        JSON-serialisable extra information (training settings, accuracy...), returned by
        :func:`read_config` under ``"metadata"``.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    OutputExistsError
        If ``path`` exists and ``force`` is false.
    ConfigError
        If ``path`` does not end in ``.safetensors``, if the model cannot describe its
        architecture, or if ``metadata`` is not JSON-serialisable.
    """
    out = Path(path)
    if out.suffix != _SAFETENSORS_SUFFIX:
        raise ConfigError(
            f"checkpoint path {out} must end in {_SAFETENSORS_SUFFIX} (neurofuse saves "
            "safetensors files only); rename the output"
        )
    document = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": _architecture_config(model),
        "metadata": dict(metadata) if metadata is not None else {},
    }
    return _write_document(model, document, out, force, "checkpoint")


def _write_document(model: nn.Module, document: Mapping[str, Any], out: Path, force: bool,
                    what: str) -> Path:
    """Write ``model``'s state dict with ``document`` (JSON) and the sha256 of both."""
    try:
        header = json.dumps(document, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} metadata is not JSON-serialisable: {exc}") from None
    tensors = {
        name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()
    }
    out = _prepare_output(out, force)
    write_safetensors(out, tensors, metadata={METADATA_KEY: header, DIGEST_KEY: digest(header, tensors)})
    return out


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _unwrap_config(config: Any, source: str) -> Dict[str, Any]:
    """Accept an architecture config or a full metadata document; return the architecture config."""
    if isinstance(config, Mapping) and "arch" not in config and isinstance(config.get("config"),
                                                                             Mapping):
        config = config["config"]
    if not isinstance(config, Mapping) or "arch" not in config:
        raise CheckpointError(
            f"{source} is not an architecture config: expected {{\"arch\": ..., \"kwargs\": "
            "{...}} (as written by LeveledNet.config())"
        )
    return dict(config)


def _read_json_config(path: Path) -> Dict[str, Any]:
    try:
        data = _loads_bounded(path.read_text(encoding="utf-8"), f"architecture config {path}",
                              MAX_CONFIG_BYTES)
    except NeurofuseError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"architecture config {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"architecture config {path} is not valid JSON ({first_line(exc)}); "
                              "fix or re-create it") from None
    return _unwrap_config(data, f"architecture config {path}")


def _json_depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, (dict, list)):
            depth = max(depth, d)
            if depth > MAX_JSON_DEPTH:
                return depth
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, d + 1) for v in items if isinstance(v, (dict, list)))
    return depth


def _loads_bounded(text: str, what: str, limit: int) -> Any:
    """``json.loads(text)`` with caps on the text's size and the value's nesting depth."""
    if len(text) > limit:
        raise CheckpointError(f"{what} is {len(text)} bytes, more than the {limit} bytes a "
                              "checkpoint may hold there; re-save the checkpoint")
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        depth = MAX_JSON_DEPTH + 1
    else:
        depth = _json_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep; it is "
                              "corrupt or hostile: re-save the checkpoint")
    return value


#: the metadata key of the state dicts ``neurofuse fuse --model-factory`` writes (the user's own
#: architecture: no zoo config, the factory is named for messages only; no code is ever imported
#: from a checkpoint)
FACTORY_KEY = "neurofuse-fused"


def _factory_document(path: Path, meta: Mapping[str, str]) -> Dict[str, Any]:
    try:
        doc = _loads_bounded(meta[FACTORY_KEY], f"the metadata of {path}", MAX_DOCUMENT_BYTES)
    except Exception as exc:  # noqa: BLE001 - malformed JSON or too large
        if isinstance(exc, NeurofuseError):
            raise
        raise corrupt_error(path, exc) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_factory"), str):
        raise CheckpointError(f"{path}: its {FACTORY_KEY!r} metadata does not name a model factory; re-create it")
    return doc


def read_factory_metadata(path: PathLike) -> Optional[Dict[str, Any]]:
    """The metadata of a state dict written by ``neurofuse fuse --model-factory`` (``model_factory``,
    ``dataset``, ``method``...), read from the header alone; ``None`` for any other file."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors" or not p.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            meta = fh.metadata()
    except Exception:  # noqa: BLE001 - not readable as safetensors: the loaders say why
        return None
    return _factory_document(p, meta) if meta and FACTORY_KEY in meta else None


def save_factory_state(state: Mapping[str, Tensor], path: PathLike, metadata: Mapping[str, Any], *,
                       force: bool = False) -> Path:
    """Write the state dict of a model of the user's own architecture (``--model-factory``) as
    ``.safetensors`` with ``metadata`` (which names its ``model_factory``) under :data:`FACTORY_KEY`;
    :func:`neurofuse.interop.load_state_dict` reads it back into ``FUNCTION()``."""
    if not isinstance(metadata.get("model_factory"), str):
        raise ConfigError("the metadata of a --model-factory state dict must name its model_factory")
    out = _prepare_output(path, force)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    write_safetensors(out, tensors, metadata={FACTORY_KEY: json.dumps(dict(metadata), default=_json_default)})
    return out


def _parse_document(path: Path, meta: Optional[Mapping[str, str]]) -> Dict[str, Any]:
    """Validate the neurofuse metadata document of a safetensors file."""
    if meta and METADATA_KEY not in meta and FACTORY_KEY in meta:
        factory = _factory_document(path, meta)["model_factory"]
        raise CheckpointError(
            f"{path} is the state dict of a model built by {factory!r} (written by neurofuse fuse "
            f"--model-factory); pass --model-factory {factory} to read it (in Python: "
            "neurofuse.interop.load_state_dict(FUNCTION(), path))")
    if not meta or METADATA_KEY not in meta:
        raise CheckpointError(
            f"{path} has no neurofuse metadata, so it is not a neurofuse checkpoint; save it with "
            "neurofuse.checkpoint.save_model, or load it in Python with "
            "load_model(path, config=...)"
        )
    try:
        document = _loads_bounded(meta[METADATA_KEY], f"the metadata of {path}", MAX_DOCUMENT_BYTES)
    except ValueError as exc:
        if isinstance(exc, NeurofuseError):
            raise
        raise corrupt_error(path, exc) from None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a neurofuse checkpoint (its metadata format is not "
            f"{CHECKPOINT_FORMAT!r}); re-save it with neurofuse.checkpoint.save_model"
        )
    version = document.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid checkpoint version {version!r}; re-save it")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is checkpoint version {version} but this neurofuse reads up to "
            f"{CHECKPOINT_VERSION}; upgrade neurofuse"
        )
    document["config"] = _unwrap_config(document.get("config"), f"the config stored in {path}")
    if not isinstance(document.setdefault("metadata", {}), dict):
        raise CheckpointError(f"{path}: the checkpoint's 'metadata' is not a JSON object; re-save it")
    return document


def read_config(path: PathLike) -> Dict[str, Any]:
    """Read the metadata document of a neurofuse checkpoint without loading its tensors.

    Parameters
    ----------
    path : str or path-like
        A ``.safetensors`` file written by :func:`save_model`.

    Returns
    -------
    dict
        ``{"format": "neurofuse-checkpoint", "version": 1, "config": {...}, "metadata": {...}}``.

    Raises
    ------
    CheckpointError
        If the file is missing, corrupt or truncated, or not a neurofuse checkpoint.
    """
    p = Path(path)
    check_exists(p)
    kind = file_format(p)
    if kind == "torch":
        raise CheckpointError(
            f"{p} is a bare PyTorch state dict with no neurofuse metadata; only .safetensors "
            "checkpoints written by save_model carry their config"
        )
    if kind != "safetensors":
        raise format_error(p, kind)
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            meta = fh.metadata()
    except Exception as exc:  # safetensors raises several types for bad files
        raise corrupt_error(p, exc) from None
    return _parse_document(p, meta)


def _kind_of_safetensors_dtype(name: str) -> str:
    """``"float"``, ``"int"`` or ``"bool"`` for a safetensors dtype name (``F32``, ``I64``...)."""
    if name == "BOOL":
        return "bool"
    return "float" if name.startswith(("F", "BF")) else "int"


def _kind(dtype: torch.dtype) -> str:
    """``"float"``, ``"int"`` or ``"bool"`` for a torch dtype."""
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point or dtype.is_complex else "int"


def _sidecar_config(path: Path) -> Optional[Dict[str, Any]]:
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            return _read_json_config(candidate)
    return None


class ModelTooLarge(Exception):
    """Raised by :func:`build_on_meta` when a build asks for more parameters or modules than allowed."""


def build_on_meta(build: Callable[[], nn.Module], max_parameters: int = MAX_PARAMETERS,
                  max_modules: int = MAX_MODULES) -> nn.Module:
    """``build()`` on the meta device (no memory), stopped as soon as it registers more than
    ``max_parameters`` parameter elements or ``max_modules`` modules (a config of a million layers
    is refused in the millisecond it passes the cap, not after minutes)."""
    counts = {"params": 0, "modules": 0}

    def on_param(module: nn.Module, name: str, param: Any) -> None:
        counts["params"] += int(param.numel()) if param is not None else 0
        if counts["params"] > max_parameters:
            raise ModelTooLarge(f"more than {max_parameters} parameters")

    def on_module(module: nn.Module, name: str, sub: Any) -> None:
        counts["modules"] += 1
        if counts["modules"] > max_modules:
            raise ModelTooLarge(f"more than {max_modules} modules")

    from torch.nn.modules import module as _module

    hooks = [_module.register_module_parameter_registration_hook(on_param),
             _module.register_module_buffer_registration_hook(on_param),
             _module.register_module_module_registration_hook(on_module)]
    try:
        with torch.device("meta"):
            return build()
    finally:
        for h in hooks:
            h.remove()


def _build(config: Mapping[str, Any], path: Path, *, meta: bool = False) -> LeveledNet:
    """Build the model of ``config``; with ``meta=True`` on the meta device (no memory), with
    caps on its parameter and module counts, so that a config can be checked before it costs."""
    from .models import build_model

    try:
        text = json.dumps(dict(config), default=_json_default)
    except (TypeError, ValueError, RecursionError):
        raise CheckpointError(f"the architecture config of {path} is not JSON data") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"the architecture config of {path} is {len(text)} bytes, more than "
                              f"{MAX_CONFIG_BYTES}; it is corrupt or hostile")
    try:
        if meta:
            return build_on_meta(lambda: build_model(config))  # type: ignore[return-value]
        return build_model(config)
    except ModelTooLarge as exc:
        raise CheckpointError(f"the architecture config of {path} asks for a model with {exc}; "
                              "it is corrupt or hostile") from None
    except NeurofuseError as exc:
        raise CheckpointError(f"cannot rebuild the architecture of {path}: {exc}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError,
            RuntimeError, RecursionError) as exc:
        shown = text if len(text) <= 200 else text[:197] + "..."
        raise CheckpointError(
            f"cannot rebuild the architecture of {path} from config {shown}: "
            f"{first_line(exc)}"
        ) from None


def _shape(t: Tensor) -> list[int]:
    return [int(s) for s in t.shape]


def _check_layout(expected: Mapping[str, tuple[list[int], str]],
                  found: Mapping[str, tuple[list[int], str]], path: Path, arch: str) -> None:
    """Names, shapes and dtype kinds of ``found`` (the file) against ``expected`` (the model)."""
    for name, (shape, kind) in expected.items():
        if name not in found:
            raise CheckpointError(
                f"{path} lacks tensor {name!r} that architecture {arch!r} needs; the checkpoint "
                "was saved from another architecture: check the architecture config"
            )
        if found[name][0] != shape:
            raise CheckpointError(
                f"tensor {name!r} in {path} has shape {found[name][0]} but architecture "
                f"{arch!r} expects {shape}; the architecture config does not match the "
                "checkpoint"
            )
        if found[name][1] != kind:
            raise CheckpointError(
                f"tensor {name!r} in {path} holds {found[name][1]} values but architecture "
                f"{arch!r} expects {kind} values; refusing to cast them: re-save the checkpoint"
            )
    for name in found:
        if name not in expected:
            raise CheckpointError(
                f"{path} has tensor {name!r} that architecture {arch!r} does not have; the "
                "architecture config does not match the checkpoint"
            )


def _layout_of_model(model: nn.Module) -> Dict[str, tuple[list[int], str]]:
    return {name: (_shape(t), _kind(t.dtype)) for name, t in model.state_dict().items()}


def _load_state(model: LeveledNet, state: Mapping[str, Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` after checking names, shapes and dtypes."""
    arch = getattr(model, "arch", type(model).__name__)
    _check_layout(_layout_of_model(model),
                  {k: (_shape(t), _kind(t.dtype)) for k, t in state.items()}, path, arch)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise CheckpointError(f"cannot load the weights of {path}: {first_line(exc)}") from None


def _no_architecture(path: Path) -> CheckpointError:
    """The error for a ``.pt`` file without a config, saying what the file really holds."""
    from .interop import read_state_dict

    state = read_state_dict(path)  # a pickled module or a corrupt file raises its own error here
    first = ", ".join(list(state)[:3])
    return CheckpointError(
        f"{path} holds a state dict of {len(state)} tensors ({first}{', ...' if len(state) > 3 else ''}) "
        "but no architecture; for a neurofuse zoo model put its config in "
        f"{path.name}.json next to it (or pass config=); for your own model class load it with "
        "neurofuse.interop.load_state_dict(make_net(), path), or fuse such checkpoints with "
        "`neurofuse fuse --model-factory FILE.py:make_net`"
    )


def _names_differ_only(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """Raise a precise error when ``state`` is ``model``'s but under other tensor names."""
    from .interop import KeyMatchError, match_state_dict

    try:
        match_state_dict(state, model)
    except KeyMatchError:
        return
    arch = getattr(model, "arch", type(model).__name__)
    first = next(iter(state), "")
    raise CheckpointError(
        f"{path} names its tensors differently ({first!r}, ...) from architecture {arch!r} "
        f"({next(iter(model.state_dict()), '')!r}, ...) but every tensor matches by shape and "
        "order: pass key_map='auto' to load_model (or a key_map of names/prefixes)"
    )


def load_model(path: PathLike, *,
               config: Optional[Union[Mapping[str, Any], PathLike]] = None,
               key_map: Any = None) -> LeveledNet:
    """Load a model from a neurofuse ``.safetensors`` checkpoint or a legacy ``.pt`` state dict.

    Parameters
    ----------
    path : str or path-like
        A ``.safetensors`` file written by :func:`save_model`, or a ``.pt`` / ``.pth`` file that
        holds a plain state dict (read with ``torch.load(..., weights_only=True)``; a mapping with
        a ``"state_dict"`` entry is also accepted).
    config : mapping or path-like, optional
        The architecture config ``{"arch": ..., "kwargs": {...}}`` (or a full metadata document
        as returned by :func:`read_config`), or the path of a JSON file that holds one.  It
        overrides the config stored in a ``.safetensors`` checkpoint and is required for a
        ``.pt`` file unless ``<path>.json`` (e.g. ``model.pt.json``) or ``<stem>.json``
        (``model.json``) exists next to it.
    key_map : ``"auto"``, mapping or callable, optional
        Tensor names of a checkpoint saved by other code: ``"auto"`` matches them onto the
        architecture's by shapes and order, a mapping renames exact keys and prefixes
        (``{"level1.": "levels.0."}``); see :func:`neurofuse.interop.match_state_dict`.

    Returns
    -------
    LeveledNet
        The model, on the CPU, in eval mode.

    Raises
    ------
    CheckpointError
        If the file is missing, corrupt or truncated, holds pickled objects other than tensors,
        is not a neurofuse checkpoint (and no config is given), has no architecture config, or if
        its tensor names or shapes do not match the architecture.
    """
    p = Path(path)
    check_exists(p)
    if p.suffix.lower() == ".json":
        raise CheckpointError(
            f"{p} is a JSON file, not a checkpoint; pass the weights file (.safetensors or .pt) "
            "and give this file as its architecture config"
        )
    arch_config: Optional[Dict[str, Any]] = None
    if config is not None:
        if isinstance(config, Mapping):
            arch_config = _unwrap_config(config, "the given config")
        else:
            arch_config = _read_json_config(Path(config))

    kind = file_format(p)   # by content: a .bin or .ckpt that torch.save wrote is PyTorch
    if kind not in ("torch", "safetensors"):
        raise format_error(p, kind)
    header = SafetensorsHeader(p) if kind == "safetensors" else None
    if arch_config is None:
        arch_config = _sidecar_config(p) if header is None else _parse_document(p, header.meta)["config"]
    if arch_config is None:
        raise _no_architecture(p)
    # the config is checked against what the file holds before anything of its size is built or read
    skeleton = _build(arch_config, p, meta=True)
    limit = DATA_FACTOR * data_bytes(skeleton.state_dict()) + DATA_SLACK
    if header is None:
        state = read_torch(p, limit)
        found = {k: (_shape(t), _kind(t.dtype)) for k, t in state.items()}
    else:
        found = {k: (shape, _kind_of_safetensors_dtype(dt)) for k, (shape, dt) in header.tensors.items()}
    if key_map is None:
        try:
            _check_layout(_layout_of_model(skeleton), found, p,
                          getattr(skeleton, "arch", type(skeleton).__name__))
        except CheckpointError:
            if set(skeleton.state_dict()) - set(found):   # other names: maybe only renamed
                _names_differ_only(skeleton, header.read(limit) if header is not None else state, p)
            raise
    del skeleton
    if header is not None:
        state = header.read(limit)
    model = _build(arch_config, p)
    if key_map is not None:
        from .interop import match_state_dict

        state = match_state_dict(state, model, None if key_map == "auto" else key_map, source=str(p))
    _load_state(model, state, p)
    _warn_non_finite(model, p)
    return model.eval()


def _warn_non_finite(model: nn.Module, path: Path) -> None:
    """Log a warning naming the first tensor of ``model`` with NaN or infinite values: such a model
    scores as chance without any other sign."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            log.warning("%s: tensor %r has %d NaN or infinite value(s); the model's outputs are not "
                        "meaningful (a diverged training run or a damaged file)", path, name, bad)
            return


# ---------------------------------------------------------------------------------------------
# weights only (declared models)
# ---------------------------------------------------------------------------------------------
def _declaration(model: nn.Module) -> Dict[str, Any]:
    """What a model says about its levels (names, axes, shapes), for :func:`save_weights`."""
    doc: Dict[str, Any] = {"class": type(model).__name__, "arch": getattr(model, "arch", None)}
    for key, attr in (("levels", "level_names"), ("axes", "axes"), ("input_shape", "input_shape"),
                      ("num_classes", "num_classes"), ("source", "source")):
        value = getattr(model, attr, None)
        if value is not None:
            doc[key] = list(value) if isinstance(value, (list, tuple)) else value
    return doc


def save_weights(model: nn.Module, path: PathLike, *, force: bool = False,
                 metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Save the weights of any model (e.g. a fused declared model) with its level declaration.

    For models that :func:`save_model` cannot describe, such as those declared with
    :func:`neurofuse.levels_from` (and the fused models made from them): the ``.safetensors``
    file holds the state dict and, under the ``"neurofuse"`` metadata key, the document
    ``{"format": "neurofuse-weights", "version": 1, "declaration": {...}, "metadata": {...}}``
    (level names, neuron axes, input shape, number of classes).  To reload, build the model
    again, declare the same levels and call :func:`load_weights`::

        fused = load_weights(levels_from(MyNet(), levels=[...], input_shape=...), path)

    Parameters
    ----------
    model : nn.Module
        The model whose ``state_dict`` is saved.
    path : str or path-like
        Output file, ending in ``.safetensors``; parent directories are created.
    force : bool
        Overwrite ``path`` if it exists.
    metadata : mapping, optional
        JSON-serialisable extra information.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    OutputExistsError
        If ``path`` exists and ``force`` is false.
    ConfigError
        If ``path`` does not end in ``.safetensors`` or ``metadata`` is not JSON-serialisable.
    """
    out = Path(path)
    if out.suffix != _SAFETENSORS_SUFFIX:
        raise ConfigError(f"weights path {out} must end in {_SAFETENSORS_SUFFIX}; rename the output")
    document = {"format": WEIGHTS_FORMAT, "version": 1, "declaration": _declaration(model),
                "metadata": dict(metadata) if metadata is not None else {}}
    return _write_document(model, document, out, force, "weights")


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load weights written by :func:`save_weights` (or :func:`save_model`) into ``model``.

    The tensor names and shapes must match ``model``'s exactly; for a declared model the level
    declaration stored in the file must match too.

    Parameters
    ----------
    model : nn.Module
        The rebuilt model, e.g. ``levels_from(MyNet(), levels=[...], input_shape=...)``.
    path : str or path-like
        A ``.safetensors`` file.

    Returns
    -------
    nn.Module
        ``model``, with the weights loaded, in eval mode.

    Raises
    ------
    CheckpointError
        If the file is missing or corrupt, or its tensors or declaration do not match ``model``.
    """
    p = Path(path)
    check_exists(p)
    kind = file_format(p)
    if kind != "safetensors":
        raise format_error(p, kind) if kind != "torch" else CheckpointError(
            f"{p} is a PyTorch file; load_weights reads .safetensors files written by save_weights "
            "(for a PyTorch state dict use neurofuse.interop.load_state_dict)")
    header = SafetensorsHeader(p)
    state = header.read(DATA_FACTOR * data_bytes(model.state_dict()) + DATA_SLACK)
    meta = header.meta
    try:
        document = json.loads((meta or {}).get(METADATA_KEY, "{}"))
    except ValueError as exc:
        raise corrupt_error(p, exc) from None
    saved = document.get("declaration") if isinstance(document, dict) else None
    if isinstance(saved, dict) and getattr(model, "arch", None) == "declared":
        mine = _declaration(model)
        for key in ("levels", "axes"):
            if key in saved and saved[key] != mine.get(key):
                raise CheckpointError(
                    f"{p} was saved from a model declared with {key} {saved[key]}, but this model "
                    f"has {key} {mine.get(key)}; declare the same levels as when it was saved"
                )
    _load_state(model, state, p)  # type: ignore[arg-type]
    return model.eval()
