"""The public one-call API: ``neurofuse.fuse`` and ``neurofuse.methods``."""

from __future__ import annotations

from typing import Any, List, Sequence

from torch import nn

from .methods import WidthSpec, get_method, list_methods

__all__ = ["fuse", "methods"]


def fuse(models: Sequence[nn.Module], data: Any = None, method: str = "kf-linear",
         importance: str = "uniform", width: WidthSpec = None, seed: int = 0,
         progress: bool = True, **options: Any) -> nn.Module:
    """Fuse trained ``models`` into one model.

    Parameters
    ----------
    models : sequence of nn.Module
        The base models (zoo models or models with declared levels); the fused model has the
        first model's architecture (and, by default, its widths).
    data : tensor, (x, y) pair, TensorDataset or DataLoader
        The fusion set: a few (hundred) training samples, never test data.  Labels are needed
        by the attribution-based importance scores.
    method : str
        A name from :func:`methods`, e.g. ``"kf-linear"``, ``"hf-linear"``, ``"vanilla"``.
    importance : str
        ``"uniform"``, ``"conductance"`` or ``"deeplift"`` (methods that use importance only).
    width : None, int, float or list of int
        Fused width per level (see :class:`neurofuse.methods.FusionMethod`).
    seed : int
        Seed of every random choice (K-means seeding, data order).
    progress : bool
        Show progress bars.
    **options
        Method settings (its ``Options`` dataclass), e.g. ``n_init=10`` for ``kf-linear``, or the
        common ``device="cuda"`` and ``batch_size=256``.

    Returns
    -------
    nn.Module
        The fused model, in eval mode.

    Examples
    --------
    >>> fused = neurofuse.fuse([m1, m2, m3], (x_fuse, y_fuse), method="kf-linear",
    ...                        importance="conductance")  # doctest: +SKIP
    """
    cls = get_method(method)
    return cls(importance=importance, width=width, seed=seed, progress=progress, **options).fuse(models, data)


def methods() -> List[str]:
    """Names of every registered fusion method."""
    return list_methods()
