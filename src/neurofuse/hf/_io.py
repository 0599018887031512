"""Wrapping, loading and saving Hugging Face models: :func:`wrap`, :func:`load_pretrained`,
:func:`save_pretrained`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
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
        lv.not_alignable = lv.not_alignable or adapter.not_alignable
    net = HFLeveledNet(model, [lv for lv, _ in pairs], [ax for _, ax in pairs], shape_t,
                       int(config.num_labels), adapter.model_type)
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
    finally:
        net.train(was)
    diff = float((got - ref).abs().max())
    if got.shape != ref.shape or diff > atol + atol * float(ref.abs().max()):
        raise IncompatibleModelsError(
            f"the {adapter.model_type!r} adapter's levels differ from {type(model).__name__}'s "
            f"logits by {diff:.3g}; this transformers version computes the model differently "
            "from the adapter"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model behind an :class:`HFLeveledNet` (its parameters are the view's)."""
    if isinstance(model, HFLeveledNet):
        return model.hf_model
    raise IncompatibleModelsError(f"{type(model).__name__} is not a Hugging Face model view")


def _local_dir(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a folder; pass a folder written by save_pretrained")
    if not (p / "config.json").is_file() and not (p / ENSEMBLE_FILE).is_file():
        raise CheckpointError(f"{p} has no config.json; pass a folder written by save_pretrained")
    return p


def load_pretrained(path: PathLike, input_shape: Optional[Sequence[int]] = None, *,
                    fallback_input_shape: Optional[Sequence[int]] = None) -> nn.Module:
    """Load a local ``save_pretrained`` folder (nothing is downloaded) and :func:`wrap` it.

    The class is the config's ``architectures[0]`` (e.g. ``ViTForImageClassification``).  A
    folder written by :func:`save_pretrained` for an ensemble loads as an
    :class:`~neurofuse.models.ensemble.Ensemble` of wrapped members.  ``input_shape`` and
    ``fallback_input_shape`` are passed to :func:`wrap`.

    Raises
    ------
    CheckpointError
        If the folder is missing, has no ``config.json`` or cannot be loaded.
    """
    transformers = require_transformers()
    p = _local_dir(path)
    if (p / ENSEMBLE_FILE).is_file():
        doc = json.loads((p / ENSEMBLE_FILE).read_text())
        members = [load_pretrained(p / name, input_shape, fallback_input_shape=fallback_input_shape)
                   for name in doc["members"]]
        return Ensemble(members, doc.get("class_weights"))
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {p / 'config.json'}: {str(exc).splitlines()[0]}") from None
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise CheckpointError(f"{p / 'config.json'} names no known model class (architectures: "
                              f"{archs or 'none'}); save the folder with save_pretrained")
    try:
        model = cls.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load {p} as {cls.__name__}: {str(exc).splitlines()[0]}") from None
    return wrap(model.eval(), input_shape, fallback_input_shape=fallback_input_shape)


def save_pretrained(model: nn.Module, path: PathLike, *, force: bool = False,
                    metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Save a (fused) Hugging Face model view with ``save_pretrained`` into the folder ``path``.

    The folder loads back with ``AutoModel...from_pretrained(path)`` or
    :func:`load_pretrained`; ``config.json`` also records ``neurofuse_input_shape``.  An
    :class:`~neurofuse.models.ensemble.Ensemble` of views is saved as one sub-folder per member
    (``member_0``, ...) and ``neurofuse_ensemble.json``.  The folder is written next to its
    destination and renamed into place, so a failed save leaves no half-written folder.
    ``metadata`` (JSON-serialisable: how the model was fused) is written to ``neurofuse.json``.

    Raises
    ------
    OutputExistsError
        If ``path`` exists and ``force`` is false.
    IncompatibleModelsError
        If ``model`` is not a view of a Hugging Face model (or an ensemble of them).
    """
    require_transformers()
    out = Path(path)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass force=True (--force) to overwrite")
    if isinstance(model, Ensemble):
        members = list(model.members)
        if not all(isinstance(m, HFLeveledNet) for m in members):
            raise IncompatibleModelsError("this ensemble has members that are not Hugging Face models")
    elif not isinstance(model, HFLeveledNet):
        raise IncompatibleModelsError(f"{type(model).__name__} is not a Hugging Face model view; "
                                      "save it with neurofuse.save_model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)   # mkdtemp makes it private; the saved folder is an ordinary one
    try:
        if isinstance(model, Ensemble):
            names: List[str] = []
            for i, m in enumerate(model.members):
                names.append(f"member_{i}")
                _save_one(m, tmp / names[-1])  # type: ignore[arg-type]
            cw = model.class_weights
            (tmp / ENSEMBLE_FILE).write_text(json.dumps(
                {"members": names, "class_weights": None if cw is None else cw.tolist()}, indent=1))
        else:
            _save_one(model, tmp)
        if metadata is not None:
            (tmp / "neurofuse.json").write_text(json.dumps(metadata, indent=1, default=str))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved %s", out)
    return out


def _save_one(net: HFLeveledNet, folder: Path) -> None:
    hf = net.hf_model
    setattr(hf.config, SHAPE_KEY, list(net.input_shape))
    hf.save_pretrained(str(folder))
