"""Model registry: architecture names to classes, and rebuilding from a config."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence, Type, TypeVar

from .._registry import Registry
from ..errors import CheckpointError, ConfigError
from ..levels import LeveledNet

_MODELS: Registry[Type[LeveledNet]] = Registry("architecture")
M = TypeVar("M", bound=Type[LeveledNet])


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`LeveledNet` subclass under ``name``."""

    def deco(cls: M) -> M:
        cls.arch = name
        _MODELS.register(name)(cls)
        return cls

    return deco


def get_model(name: str, **kwargs: Any) -> LeveledNet:
    """Build a fresh model of architecture ``name`` with constructor arguments ``kwargs``."""
    cls = _MODELS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for architecture {name!r}: {exc}") from None


def make_model(arch: str, size: str, input_shape: Sequence[int], num_classes: int) -> LeveledNet:
    """A zoo model by family and named size (see :meth:`LeveledNet.preset`)."""
    cls = _MODELS.get(arch)
    preset = getattr(cls, "preset", None)
    if preset is None:
        raise ConfigError(f"architecture {arch!r} has no named sizes")
    return preset(size, input_shape, num_classes)


def zoo_architectures() -> List[str]:
    """Registered architectures that have named sizes (what ``--arch`` accepts)."""
    return [n for n in _MODELS.names() if isinstance(_MODELS.get(n), type)
            and issubclass(_MODELS.get(n), LeveledNet)]


def list_models() -> List[str]:
    """Names of the registered architectures."""
    return _MODELS.names()


def build_model(config: Mapping[str, Any]) -> LeveledNet:
    """Rebuild a model from :meth:`LeveledNet.config` output ``{"arch": ..., "kwargs": {...}}``."""
    if not isinstance(config, Mapping) or "arch" not in config:
        raise CheckpointError("architecture config has no 'arch' field; is this a neurofuse checkpoint?")
    kwargs: Dict[str, Any] = dict(config.get("kwargs", {}))
    return get_model(str(config["arch"]), **kwargs)
