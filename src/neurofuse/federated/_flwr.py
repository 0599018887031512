"""The one place that imports Flower: offline defaults first, a clear error when it is missing."""

from __future__ import annotations

import os

from ..errors import ConfigError

__all__ = ["FLOWER_ENV", "require_flwr"]

#: environment Flower reads at import time: no telemetry, no update check, no dependency
#: installation at run time (this machine, and CI, are offline); a user's own setting wins
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def require_flwr() -> str:
    """Import Flower (``flwr``) with :data:`FLOWER_ENV` set and return its version.

    Raises
    ------
    ConfigError
        If ``flwr`` is not installed: ``pip install "neurofuse[federated]"``.
    """
    for k, v in FLOWER_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import flwr
    except ImportError as exc:
        raise ConfigError(
            f"neurofuse.federated needs Flower (flwr 1.42) and Ray ({exc}); install them with: "
            'pip install "neurofuse[federated]"'
        ) from None
    return str(flwr.__version__)
