"""The fusion set: the few labelled training samples that fusion looks at."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

__all__ = ["FusionSet", "as_fusion_set"]

log = logging.getLogger("neurofuse")


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


def _labels(y: Any, n: int) -> Tensor:
    """Integer class labels ``[n]`` from ``y``: class indices, or one-hot rows (converted)."""
    try:
        y = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"fusion labels are not a tensor of class indices ({exc})") from None
    if y.dim() == 2 and y.shape[0] == n and y.shape[1] > 1 and y.numel() > 0:
        hot = (y == 0) | (y == 1)
        if bool(hot.all()) and bool((y.sum(1) == 1).all()):
            log.info("fusion labels are one-hot [%d, %d]: converting them to class indices",
                     y.shape[0], y.shape[1])
            return y.argmax(1).long()
        raise DataError(
            f"fusion labels have shape {list(y.shape)}: pass class indices [N] (or one-hot rows, "
            "which are converted), not soft labels or scores"
        )
    if y.dim() != 1:
        raise DataError(f"fusion labels have shape {list(y.shape)}; pass class indices of shape [N]")
    if y.dtype == torch.bool or y.is_complex():
        raise DataError(f"fusion labels are {y.dtype}; pass integer class indices")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not torch.equal(y, y.round()):
            raise DataError("fusion labels must be integer class indices, got non-integer values")
        if y.numel() and float(y.abs().max()) > 2**62:
            raise DataError("fusion labels are far out of any class range; pass class indices")
    return y.long()


def _from_loader(data: Any) -> Tuple[Tensor, Optional[Tensor]]:
    xs, ys = [], []
    for b in data:
        if isinstance(b, Mapping):
            raise DataError(
                f"the DataLoader yields dict batches (keys {sorted(map(str, b))[:4]}); make it yield "
                "(x, y) pairs, e.g. from a TensorDataset(x, y)"
            )
        if isinstance(b, (tuple, list)):
            if not b or not isinstance(b[0], Tensor) or (len(b) > 1 and not isinstance(b[1], Tensor)):
                raise DataError(
                    f"the DataLoader yields {type(b).__name__} batches of "
                    f"{[type(v).__name__ for v in b][:3]}; make it yield (x, y) tensor pairs"
                )
            xs.append(b[0])
            if len(b) > 1:
                ys.append(b[1])
        elif isinstance(b, Tensor):
            xs.append(b)
        else:
            raise DataError(f"the DataLoader yields {type(b).__name__} batches; make it yield (x, y) "
                            "tensor pairs")
    if not xs:
        raise DataError("empty fusion set: the DataLoader yielded no batches")
    if ys and len(ys) != len(xs):
        raise DataError("the DataLoader yields labels with some batches only; yield (x, y) always")
    try:
        return torch.cat(xs), (torch.cat(ys) if ys else None)
    except RuntimeError as exc:
        raise DataError(f"the DataLoader's batches do not stack into one fusion set "
                        f"({str(exc).splitlines()[0]}); make every batch the same shape") from None


def as_fusion_set(data: Any, batch_size: int = 256) -> FusionSet:
    """Turn ``data`` into a :class:`FusionSet`.

    Accepts a :class:`FusionSet`, an input tensor, an ``(x, y)`` pair, a
    ``torch.utils.data.TensorDataset`` or a ``DataLoader`` yielding ``(x, y)`` batches.  Labels
    may be class indices or one-hot rows (converted to indices); float16, bfloat16 and float64
    inputs are converted to float32 (the models' dtype; fusion converts again for models of
    another dtype).

    Raises
    ------
    DataError
        If the data is of another kind (e.g. a DataLoader of dicts), empty, not finite, or its
        labels are not class indices.
    """
    if isinstance(data, FusionSet):
        fs = data
    elif isinstance(data, Tensor):
        fs = FusionSet(data, None, batch_size)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (Tensor, np.ndarray)):
        try:
            x = torch.as_tensor(data[0])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"fusion inputs are not a numeric array ({exc})") from None
        fs = FusionSet(x, None if data[1] is None else _labels(data[1], x.shape[0] if x.dim() else 0),
                       batch_size)
    elif isinstance(data, torch.utils.data.TensorDataset):
        t = data.tensors
        fs = FusionSet(t[0], _labels(t[1], t[0].shape[0]) if len(t) > 1 else None, batch_size)
    elif isinstance(data, torch.utils.data.DataLoader):
        x, y = _from_loader(data)
        fs = FusionSet(x, None if y is None else _labels(y, x.shape[0]), batch_size)
    elif data is None:
        raise DataError("this method needs fusion data: pass data=(x, y) with a few training samples")
    else:
        raise DataError(
            f"cannot use a {type(data).__name__} as fusion data; pass a tensor, an (x, y) pair, "
            "a TensorDataset or a DataLoader"
        )
    if not isinstance(fs.x, Tensor):
        raise DataError(f"fusion inputs must be a tensor, got a {type(fs.x).__name__}")
    if fs.x.dim() < 2 or fs.x.shape[0] == 0:
        raise DataError("empty fusion set: pass at least one sample (e.g. --fusion-samples 400)")
    if fs.x.is_complex():
        raise DataError("fusion inputs are complex numbers; pass real-valued inputs")
    if not torch.is_floating_point(fs.x) or fs.x.dtype != torch.float32:
        log.debug("fusion inputs are %s: converting them to float32", fs.x.dtype)
        fs.x = fs.x.float()
    if not _all_finite(fs.x):
        raise DataError("fusion inputs contain NaN or infinite values; clean the data first")
    if fs.y is not None and fs.y.shape[0] != fs.x.shape[0]:
        raise DataError(f"fusion set has {fs.x.shape[0]} inputs but {fs.y.shape[0]} labels")
    if isinstance(fs.batch_size, bool) or not isinstance(fs.batch_size, int) or fs.batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {fs.batch_size!r}")
    return fs
