"""Wrapping, loading and saving Hugging Face models: :func:`wrap`, :func:`load_pretrained`,
:func:`save_pretrained`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, IncompatibleModelsError, OutputExistsError
from ..models.ensemble import Ensemble
from ._adapters import adapter_for
from ._net import HFLeveledNet

__all__ = ["load_pretrained", "require_transformers", "save_pretrained", "unwrap", "wrap"]

log = logging.getLogger("neurofuse")

PathLike = Union[str, "os.PathLike[str]"]

#: config attribute that records the input shape of one sample in a saved folder
SHAPE_KEY = "neurofuse_input_shape"
#: file that marks a folder holding an ensemble (one sub-folder per member)
ENSEMBLE_FILE = "neurofuse_ensemble.json"


def require_transformers() -> Any:
    """Import ``transformers`` (5.x) or raise a one-line :class:`ConfigError` saying what to install."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face support needs the transformers package: "
                          "pip install 'neurofuse[hf]'") from None
    major = int(str(transformers.__version__).split(".")[0])
    if major < 5:
        raise ConfigError(f"neurofuse.hf needs transformers >= 5, found {transformers.__version__}: "
                          "pip install 'neurofuse[hf]'")
    return transformers


def wrap(model: nn.Module, input_shape: Optional[Sequence[int]] = None, *,
         fallback_input_shape: Optional[Sequence[int]] = None, atol: float = 1e-4,
         seed: int = 0) -> HFLeveledNet:
    """View a ``transformers`` classifier as a :class:`~neurofuse.levels.LeveledNet`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model of a registered family (:func:`neurofuse.hf.list_adapters`), e.g.
        ``ViTForImageClassification(config)`` or ``from_pretrained(local_dir)``.  It is not
        copied: the view shares its parameters (fusion methods work on copies).
    input_shape : sequence of int, optional
        Shape of one input sample: ``(C, H, W)`` for images, ``(T,)`` (sequence length) for
        text.  Default: what the config fixes (ViT: ``num_channels`` and ``image_size``), or the
        ``neurofuse_input_shape`` that :func:`save_pretrained` records.
    fallback_input_shape : sequence of int, optional
        The shape to use when neither ``input_shape`` nor the config gives one (e.g. the shape
        of the data at hand, for a ResNet, which takes any image size).
    atol : float
        Tolerance of the check that the levels reproduce ``model(x).logits``.
    seed : int
        Seed of the random check input.

    Returns
    -------
    HFLeveledNet
        The leveled view; ``.hf_model`` is ``model``.

    Raises
    ------
    IncompatibleModelsError
        If no adapter knows the model, or its levels do not reproduce the model's logits.
    ConfigError
        If the input shape is missing or does not fit the model.
    """
    require_transformers()
    adapter = adapter_for(model)
    config = model.config
    shape = input_shape if input_shape is not None else getattr(config, SHAPE_KEY, None)
    if shape is None:
        shape = adapter.default_input_shape(config)
    if shape is None:
        shape = fallback_input_shape
    if shape is None:
        what = "(T,), the sequence length" if adapter.input_kind == "tokens" else "(C, H, W)"
        raise ConfigError(f"{type(model).__name__} does not fix its input size: pass "
                          f"input_shape={what}")
    shape_t: Tuple[int, ...] = tuple(int(s) for s in shape)
    pairs = adapter.levels(model)
    for lv, _ in pairs:
        if lv.transformer_spec is None:
            lv.not_alignable = lv.not_alignable or adapter.not_alignable
    net = HFLeveledNet(model, [lv for lv, _ in pairs], [ax for _, ax in pairs], shape_t,
                       int(config.num_labels), adapter.model_type)
    net.adapter = adapter
    _check_levels(net, adapter, atol, seed)
    return net


def _check_levels(net: HFLeveledNet, adapter: Any, atol: float, seed: int) -> None:
    model = net.hf_model
    ref_p = next(model.parameters())
    gen = torch.Generator().manual_seed(int(seed))
    x = adapter.example_input(model.config, net.input_shape, gen).to(ref_p.device)
    if x.is_floating_point():
        x = x.to(ref_p.dtype)
    was = model.training
    net.eval()
    try:
        with torch.no_grad():
            try:
                ref = model(x).logits
            except Exception as exc:  # noqa: BLE001 - a wrong input shape, reported as such
                raise ConfigError(f"{type(model).__name__} fails on inputs of shape "
                                  f"{list(x.shape)}: {str(exc).splitlines()[0]}; check input_shape") from None
            got = net(x)
            h = x
            for lv in net.levels:   # a level's transformer stages must recompute it
                out = lv(h)
                spec = lv.transformer_spec
                if spec is not None and not _recomputes(spec, lv, h, out, atol):
                    log.warning("the %r adapter's transformer stages of %s do not recompute it; "
                                "the level is fused as an opaque level", adapter.model_type, lv.level_name)
                    lv.transformer_spec = None
                    lv.not_alignable = lv.not_alignable or adapter.not_alignable
                h = out
    finally:
        net.train(was)
    diff = float((got - ref).abs().max())
    if got.shape != ref.shape or diff > atol + atol * float(ref.abs().max()):
        raise IncompatibleModelsError(
            f"the {adapter.model_type!r} adapter's levels differ from {type(model).__name__}'s "
            f"logits by {diff:.3g}; this transformers version computes the model differently "
            "from the adapter"
        )


def _recomputes(spec: Any, level: nn.Module, x: torch.Tensor, out: torch.Tensor, atol: float) -> bool:
    """Whether ``spec``'s stages recompute ``level``'s output ``out`` on ``x`` (a family laid out
    differently, e.g. with a distillation token, fails here)."""
    try:
        got = spec.forward(level, x)
    except Exception:  # noqa: BLE001 - stages that do not fit this model
        return False
    return got.shape == out.shape and float((got - out).abs().max()) <= atol + atol * float(out.abs().max())


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model behind an :class:`HFLeveledNet` (its parameters are the view's)."""
    if isinstance(model, HFLeveledNet):
        return model.hf_model
    raise IncompatibleModelsError(f"{type(model).__name__} is not a Hugging Face model view")


#: most bytes of a ``config.json`` / ``neurofuse_ensemble.json`` read (they are small documents)
MAX_JSON_BYTES = 1 << 20
#: most parameters a folder's config may declare (as for neurofuse's own checkpoints)
MAX_PARAMETERS = 1 << 31
#: most modules a folder's config may declare (BERT-large and ViT-huge have about 600)
MAX_MODULES = 20_000
#: most members an ensemble folder may list
MAX_MEMBERS = 256
#: config keys that make transformers import Python code from the folder
_CODE_KEYS = ("auto_map", "custom_pipelines")


def _local_dir(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a folder; pass a folder written by save_pretrained")
    if not (p / "config.json").is_file() and not (p / ENSEMBLE_FILE).is_file():
        raise CheckpointError(f"{p} has no config.json; pass a folder written by save_pretrained")
    return p


def _read_json(path: Path) -> Any:
    """A small JSON document of a model folder, or a one-line :class:`CheckpointError`."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is {size} bytes, more than the {MAX_JSON_BYTES} such a "
                                  "file may have; it is corrupt or hostile: re-save the folder")
        return json.loads(path.read_text(encoding="utf-8"))
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]}); "
                              "re-save the folder with save_pretrained") from None


def _check_config(p: Path) -> Dict[str, Any]:
    """``config.json`` read by neurofuse first: a JSON object that names no code to import."""
    doc = _read_json(p / "config.json")
    if not isinstance(doc, dict):
        raise CheckpointError(f"{p / 'config.json'} holds a {type(doc).__name__}, not a config "
                              "object; re-save the folder with save_pretrained")
    for key in _CODE_KEYS:
        if key in doc and doc[key] not in (None, {}, []):
            raise CheckpointError(
                f"{p / 'config.json'} has {key!r} ({str(doc[key])[:80]}): loading it "
                "would import Python code from the folder, which neurofuse never does; use a folder "
                "of a model class that transformers itself provides")
    return doc


def _ensemble_members(p: Path) -> Tuple[List[Path], Any]:
    """The member folders of an ensemble folder (each a plain sub-folder of ``p``) and its class
    weights, from a validated ``neurofuse_ensemble.json``."""
    f = p / ENSEMBLE_FILE
    doc = _read_json(f)
    members = doc.get("members") if isinstance(doc, dict) else None
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise CheckpointError(f"{f} does not list its members ('members': a non-empty list of "
                              "sub-folder names); re-save the ensemble with save_pretrained")
    if len(members) > MAX_MEMBERS:
        raise CheckpointError(f"{f} lists {len(members)} members, more than {MAX_MEMBERS}; it is "
                              "corrupt or hostile")
    root = p.resolve()
    out = []
    for name in members:
        q = p / name
        if Path(name).name != name or name in ("", ".", "..") or q.resolve().parent != root:
            raise CheckpointError(f"{f} names member {name!r}, which is not a sub-folder of {p}; an "
                                  "ensemble's members are its own sub-folders: re-save it")
        if (q / ENSEMBLE_FILE).exists():
            raise CheckpointError(f"member {q} of {p} is an ensemble itself; nested ensembles are "
                                  "not read")
        out.append(q)
    return out, doc.get("class_weights")


def _weight_files(p: Path) -> List[Path]:
    """The safetensors files of a folder (one file, or the shards of its index)."""
    single = p / "model.safetensors"
    index = p / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        doc = _read_json(index)
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{index} has no 'weight_map' of file names; re-save the folder")
        files = []
        for name in sorted(set(wmap.values())):
            q = p / name
            if Path(name).name != name or q.resolve().parent != p.resolve() or not q.is_file():
                raise CheckpointError(f"{index} names shard {name!r}, which is not a file of {p}; "
                                      "re-save the folder")
            files.append(q)
        return files
    others = sorted(q.name for q in p.iterdir() if q.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5",
                                                                 ".msgpack"))
    raise CheckpointError(
        f"{p} has no model.safetensors{f' (it has {others[0]})' if others else ''}; neurofuse reads "
        "Hugging Face weights from safetensors only (pickled .bin files can run code): re-save the "
        "model with save_pretrained, which writes safetensors")


def _check_weights(p: Path, cls: Any, config: Any) -> None:
    """Build ``cls(config)`` on the meta device (no memory) and compare its tensors with the
    folder's safetensors headers before any weight is read: a size cap, and every tensor the
    file has for the model of the model's shape and kind (no silent cast of integer data)."""
    from .._tensorfile import SafetensorsHeader

    found: Dict[str, Tuple[List[int], str]] = {}
    for f in _weight_files(p):
        found.update(SafetensorsHeader(f).tensors)
    from ..checkpoint import ModelTooLarge, build_on_meta

    try:
        from transformers.initialization import no_init_weights   # no random init of meta tensors
    except ImportError:  # pragma: no cover - another transformers layout
        from contextlib import nullcontext as no_init_weights

    def build() -> nn.Module:
        with no_init_weights():
            return cls(config)

    try:
        skeleton = build_on_meta(build, MAX_PARAMETERS, MAX_MODULES)
    except ModelTooLarge as exc:
        raise CheckpointError(f"{p / 'config.json'} declares a model with {exc}; it is corrupt or "
                              "hostile") from None
    except Exception as exc:  # noqa: BLE001 - a config the class cannot build
        text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{p / 'config.json'} does not describe a buildable "
                              f"{cls.__name__}: {text}") from None
    for name, t in skeleton.state_dict().items():
        if name not in found:
            continue   # missing tensors: from_pretrained's loading report (tied weights aside)
        shape, dtype = found[name]
        if shape != [int(s) for s in t.shape]:
            raise CheckpointError(f"tensor {name!r} in {p} has shape {shape} but its config.json "
                                  f"declares {list(t.shape)}; the weights do not match the config")
        stored_float = dtype.startswith(("F", "BF"))
        if stored_float != t.dtype.is_floating_point:
            raise CheckpointError(
                f"tensor {name!r} in {p} holds {dtype} values but {cls.__name__} needs "
                f"{str(t.dtype).replace('torch.', '')}; refusing to cast them: re-save the folder")


def load_pretrained(path: PathLike, input_shape: Optional[Sequence[int]] = None, *,
                    fallback_input_shape: Optional[Sequence[int]] = None) -> nn.Module:
    """Load a local ``save_pretrained`` folder (nothing is downloaded) and :func:`wrap` it.

    The class is the config's ``architectures[0]`` (e.g. ``ViTForImageClassification``), a class
    of ``transformers`` itself: a config with an ``auto_map`` (code in the folder) is refused and
    nothing is imported from the folder (``trust_remote_code=False``).  Only safetensors weights
    are read, after their headers are checked against the model the config declares (built on
    the meta device): a tensor of another shape or of integer data, a missing tensor or a config
    of more than :data:`MAX_PARAMETERS` parameters is an error.  A folder written by
    :func:`save_pretrained` for an ensemble loads as an
    :class:`~neurofuse.models.ensemble.Ensemble` of wrapped members (its own sub-folders).
    ``input_shape`` and ``fallback_input_shape`` are passed to :func:`wrap`.

    Raises
    ------
    CheckpointError
        If the folder is missing, has no ``config.json`` or cannot be loaded.
    """
    transformers = require_transformers()
    p = _local_dir(path)
    if (p / ENSEMBLE_FILE).is_file():
        folders, class_weights = _ensemble_members(p)
        members = [load_pretrained(q, input_shape, fallback_input_shape=fallback_input_shape)
                   for q in folders]
        try:
            return Ensemble(members, class_weights)
        except (ConfigError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{p / ENSEMBLE_FILE}: bad class_weights ({str(exc).splitlines()[0]}); "
                                  "re-save the ensemble") from None
    doc = _check_config(p)
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True,
                                                         trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {p / 'config.json'}: {str(exc).splitlines()[0]}") from None
    archs = doc.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise CheckpointError(f"{p / 'config.json'} names no known model class (architectures: "
                              f"{archs or 'none'}); save the folder with save_pretrained")
    _check_weights(p, cls, config)
    try:
        model, info = cls.from_pretrained(str(p), local_files_only=True, trust_remote_code=False,
                                          output_loading_info=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load {p} as {cls.__name__}: {str(exc).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    if missing or mismatched:
        what = (f"lacks tensor(s) {missing[:3]}" if missing else
                f"has tensors of other shapes {[m[0] if isinstance(m, tuple) else m for m in mismatched][:3]}")
        raise CheckpointError(f"{p} {what} that {cls.__name__} needs (they would be random); the "
                              "weights are incomplete: re-save or re-download the folder")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        log.warning("%s has %d tensor(s) %s that %s does not use; they are ignored", p,
                    len(unexpected), unexpected[:3], cls.__name__)
    return wrap(model.eval(), input_shape, fallback_input_shape=fallback_input_shape)


def save_pretrained(model: nn.Module, path: PathLike, *, force: bool = False,
                    metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Save a (fused) Hugging Face model view with ``save_pretrained`` into the folder ``path``.

    The folder loads back with ``AutoModel...from_pretrained(path)`` or
    :func:`load_pretrained`; ``config.json`` also records ``neurofuse_input_shape``.  An
    :class:`~neurofuse.models.ensemble.Ensemble` of views is saved as one sub-folder per member
    (``member_0``, ...) and ``neurofuse_ensemble.json``.  The folder is written next to its
    destination and swapped into place (:func:`neurofuse._io.write_folder`), so a failed save
    leaves no half-written folder and the previous output stays until the new one is complete.
    ``metadata`` (JSON-serialisable: how the model was fused) is written to ``neurofuse.json``.

    Raises
    ------
    OutputExistsError
        If ``path`` exists and ``force`` is false, or it is a folder that neurofuse did not
        write (or that holds files it did not write): ``--force`` never removes those.
    IncompatibleModelsError
        If ``model`` is not a view of a Hugging Face model (or an ensemble of them).
    """
    from .._io import write_folder, write_json

    require_transformers()
    out = Path(path)
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"{out} exists; pass force=True (--force) to overwrite")
    if isinstance(model, Ensemble):
        members = list(model.members)
        if not all(isinstance(m, HFLeveledNet) for m in members):
            raise IncompatibleModelsError("this ensemble has members that are not Hugging Face models")
    elif not isinstance(model, HFLeveledNet):
        raise IncompatibleModelsError(f"{type(model).__name__} is not a Hugging Face model view; "
                                      "save it with neurofuse.save_model")

    def write(tmp: Path) -> None:
        if isinstance(model, Ensemble):
            names: List[str] = []
            for i, m in enumerate(model.members):
                names.append(f"member_{i}")
                _save_one(m, tmp / names[-1])  # type: ignore[arg-type]
            cw = model.class_weights
            write_json(tmp / ENSEMBLE_FILE, {"members": names,
                                             "class_weights": None if cw is None else cw.tolist()},
                       indent=1)
        else:
            _save_one(model, tmp)
        if metadata is not None:
            write_json(tmp / "neurofuse.json", metadata, indent=1, default=str)

    write_folder(out, write, force=force)
    log.info("saved %s", out)
    return out


def _save_one(net: HFLeveledNet, folder: Path) -> None:
    hf = net.hf_model
    setattr(hf.config, SHAPE_KEY, list(net.input_shape))
    hf.save_pretrained(str(folder))
