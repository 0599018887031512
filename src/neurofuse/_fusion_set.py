"""The fusion set: the few labelled training samples that fusion looks at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

__all__ = ["FusionSet", "as_fusion_set"]


@dataclass
class FusionSet:
    """Inputs ``x`` (and labels ``y``, needed by attribution-based importance) streamed in batches.

    Parameters
    ----------
    x : Tensor
        Inputs, ``[N, *input_shape]``.
    y : Tensor, optional
        Integer class labels ``[N]``.
    batch_size : int
        Rows per batch when statistics are streamed.
    """

    x: Tensor
    y: Optional[Tensor] = None
    batch_size: int = 256

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, device: torch.device | str = "cpu") -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
        for i in range(0, len(self), self.batch_size):
            xb = self.x[i:i + self.batch_size].to(device)
            yb = None if self.y is None else self.y[i:i + self.batch_size].to(device)
            yield xb, yb

    def check_labels(self, num_classes: Optional[int]) -> None:
        """Labels must be class indices in ``[0, num_classes)``."""
        if self.y is None or num_classes is None or self.y.numel() == 0:
            return
        lo, hi = int(self.y.min()), int(self.y.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"fusion labels range over [{lo}, {hi}] but the models have {num_classes} classes; "
                "pass class indices in [0, num_classes)"
            )

    def check_input_shape(self, input_shape: Sequence[int]) -> None:
        got = tuple(self.x.shape[1:])
        if got != tuple(input_shape):
            raise DataError(
                f"fusion inputs have shape {list(got)} per sample but the models take "
                f"{list(input_shape)}; pass data of the models' input shape"
            )


def _all_finite(x: Tensor, rows: int = 4096) -> bool:
    """``torch.isfinite(x).all()`` in slices of ``rows``: no temporaries the size of the data."""
    return all(bool(torch.isfinite(x[i:i + rows]).all()) for i in range(0, x.shape[0], rows))


def as_fusion_set(data: Any, batch_size: int = 256) -> FusionSet:
    """Turn ``data`` into a :class:`FusionSet`.

    Accepts a :class:`FusionSet`, an input tensor, an ``(x, y)`` pair, a
    ``torch.utils.data.TensorDataset`` or a ``DataLoader`` yielding ``(x, y)`` batches.
    """
    if isinstance(data, FusionSet):
        fs = data
    elif isinstance(data, Tensor):
        fs = FusionSet(data, None, batch_size)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (Tensor, np.ndarray)):
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise DataError("fusion labels must be integer class indices, got non-integer values")
        fs = FusionSet(x, y.long(), batch_size)
    elif isinstance(data, torch.utils.data.TensorDataset):
        t = data.tensors
        fs = FusionSet(t[0], t[1].long() if len(t) > 1 else None, batch_size)
    elif isinstance(data, torch.utils.data.DataLoader):
        xs, ys = [], []
        for b in data:
            if isinstance(b, (tuple, list)):
                xs.append(b[0])
                if len(b) > 1:
                    ys.append(b[1])
            else:
                xs.append(b)
        if not xs:
            raise DataError("empty fusion set: the DataLoader yielded no batches")
        fs = FusionSet(torch.cat(xs), torch.cat(ys).long() if ys else None, batch_size)
    elif data is None:
        raise DataError("this method needs fusion data: pass data=(x, y) with a few training samples")
    else:
        raise DataError(
            f"cannot use a {type(data).__name__} as fusion data; pass a tensor, an (x, y) pair, "
            "a TensorDataset or a DataLoader"
        )
    if fs.x.dim() < 2 or fs.x.shape[0] == 0:
        raise DataError("empty fusion set: pass at least one sample (e.g. --fusion-samples 400)")
    if not torch.is_floating_point(fs.x):
        fs.x = fs.x.float()
    if not _all_finite(fs.x):
        raise DataError("fusion inputs contain NaN or infinite values; clean the data first")
    if fs.y is not None and fs.y.shape[0] != fs.x.shape[0]:
        raise DataError(f"fusion set has {fs.x.shape[0]} inputs but {fs.y.shape[0]} labels")
    if fs.batch_size < 1:
        raise DataError(f"batch_size must be positive, got {fs.batch_size}")
    return fs
