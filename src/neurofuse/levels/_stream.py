r"""The level stream: every model's level inputs over the fusion set, one level at a time.

Level-wise fusion needs, at level :math:`\ell`, the input of level :math:`\ell` of every base
model (and of the fused model) on every fusion batch.  Recomputing it from the network input costs
:math:`\ell` level evaluations per batch, :math:`O(L^2)` for the whole fusion; carrying it
forward costs one evaluation of each level per batch, one forward pass per model in all.

:class:`LevelStream` carries ``n`` such *streams* (one per network) batch by batch.  Level
inputs are kept in memory while the stream's stored bytes stay under a budget; above it they are
spilled to files in a private temporary folder (read back one batch at a time) or,
with ``spill="recompute"``, not stored at all and recomputed from the fusion set through the
levels applied so far.  The folder is removed when the stream is closed (it is a context manager)
or garbage-collected.

>>> with LevelStream(data, 2, "cpu") as st:            # doctest: +SKIP
...     for b in st:                                     # one fusion batch
...         out = model.levels[0](b.inputs[1])
...         b.keep(1, out)                               # stream 1 moves on with `out`
...     st.advance({0: fused.levels[0], 1: model.levels[0]})
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .._fusion_set import FusionSet
from .._phases import phase
from ..errors import ConfigError

__all__ = ["DEFAULT_MEMORY_BUDGET", "LevelStream", "StreamBatch"]

log = logging.getLogger("neurofuse")

#: bytes of level inputs a stream keeps in memory before it spills (all streams together)
DEFAULT_MEMORY_BUDGET = 16 * 2**20

Fn = Callable[[Tensor], Tensor]


class _Store:
    """The per-batch tensors of one stream at one level."""

    def get(self, i: int, device: torch.device) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def put(self, i: int, t: Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    nbytes_in_memory = 0
    #: bytes a store being filled will hold (its estimate when it was created)
    reserved = 0

    def complete(self, n: int) -> bool:
        """Whether all ``n`` batches were put."""
        return False

    def close(self) -> None:
        pass


class _DropStore(_Store):
    """Above the budget with ``spill="recompute"``: values are dropped, recomputed when read."""

    def put(self, i: int, t: Tensor) -> None:
        pass

    def complete(self, n: int) -> bool:
        return True


class _DataStore(_Store):
    """Level 0: the fusion set itself (no copy)."""

    def __init__(self, data: FusionSet) -> None:
        self.data = data

    def get(self, i: int, device: torch.device) -> Tensor:
        bs = self.data.batch_size
        return self.data.x[i * bs:(i + 1) * bs].to(device)


class _MemoryStore(_Store):
    def __init__(self) -> None:
        self.items: Dict[int, Tensor] = {}

    def get(self, i: int, device: torch.device) -> Tensor:
        return self.items[i].to(device)

    def put(self, i: int, t: Tensor) -> None:
        self.items[i] = t
        self.nbytes_in_memory += t.numel() * t.element_size()

    def complete(self, n: int) -> bool:
        return len(self.items) == n


class _DiskStore(_Store):
    """Raw bytes of every batch in one file, read back into a fresh tensor per batch (no
    memory map stays open, so resident memory does not grow with the spilled level)."""

    def __init__(self, folder: str) -> None:
        fd, self.path = tempfile.mkstemp(suffix=".level", dir=folder)
        self.file = os.fdopen(fd, "wb")
        self.index: Dict[int, Tuple[int, Tuple[int, ...], torch.dtype]] = {}
        self.offset = 0

    @phase("spill")
    def put(self, i: int, t: Tensor) -> None:
        # flatten before the byte view: a tensor with size-1 dims can be contiguous with a last
        # stride other than 1 (a [B, C, 1, 1] conv output in channels_last), which view refuses
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(raw))  # no copy of the batch
        self.index[i] = (self.offset, tuple(t.shape), t.dtype)
        self.offset += raw.size

    def complete(self, n: int) -> bool:
        return len(self.index) == n

    @phase("spill")
    def get(self, i: int, device: torch.device) -> Tensor:
        if not self.file.closed:
            self.file.flush()
        off, shape, dtype = self.index[i]
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        if n == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        out = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:  # read straight into the batch's own buffer
            f.seek(off)
            f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        return out.to(device)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


class _RecomputeStore(_Store):
    """Nothing stored: the fusion batch is run again through the levels applied so far."""

    def __init__(self, data: FusionSet, chain: Sequence[Fn]) -> None:
        self.base = _DataStore(data)
        self.chain = list(chain)

    def get(self, i: int, device: torch.device) -> Tensor:
        h = self.base.get(i, device)
        with torch.no_grad():
            for fn in self.chain:
                h = fn(h)
        return h


@dataclass
class StreamBatch:
    """One fusion batch as seen by the streams: every stream's current input and the labels.

    Attributes
    ----------
    index : int
        Batch number.
    inputs : list of Tensor
        Current level input of every stream on this batch.
    y : Tensor or None
        Labels of the batch.
    """

    index: int
    inputs: List[Tensor]
    y: Optional[Tensor]
    _stream: "LevelStream" = field(repr=False)

    def keep(self, stream: int, value: Tensor) -> None:
        """Offer ``value`` as stream ``stream``'s next-level input for this batch (it must equal
        what :meth:`LevelStream.advance` would compute), so that it is not computed twice."""
        self._stream._keep(stream, self.index, value)


class LevelStream:
    """Carries the level inputs of ``n`` networks over the fusion set, one level at a time.

    Parameters
    ----------
    data : FusionSet
        The fusion set (its batches are the stream's batches).
    n : int
        Number of streams (networks).  All start at the fusion inputs.
    device : str or torch.device
        Where the batches are handed out.
    memory_budget : int
        Bytes of level inputs kept in memory, all streams together; beyond it a stream's next
        level is spilled (``0`` spills everything, ``None`` never spills).
    spill : {"disk", "recompute"}
        Where a level that does not fit goes: temporary files (removed on :meth:`close`) or
        nowhere (recomputed from the fusion set through every level applied so far).
    """

    def __init__(self, data: FusionSet, n: int, device: torch.device | str = "cpu", *,
                 memory_budget: Optional[int] = DEFAULT_MEMORY_BUDGET,
                 spill: Literal["disk", "recompute"] = "disk") -> None:
        if n < 1:
            raise ConfigError(f"a level stream needs at least one stream, got {n}")
        if spill not in ("disk", "recompute"):
            raise ConfigError(f"spill must be 'disk' or 'recompute', got {spill!r}")
        if memory_budget is not None and memory_budget < 0:
            raise ConfigError(f"memory_budget must be >= 0 bytes, got {memory_budget}")
        self.data = data
        self.device = torch.device(device)
        self.budget = memory_budget
        self.spill = spill
        self.num_batches = (len(data) + data.batch_size - 1) // data.batch_size
        self._stores: List[_Store] = [_DataStore(data) for _ in range(n)]
        self._chains: List[List[Fn]] = [[] for _ in range(n)]
        self._next: Dict[int, _Store] = {}
        self._folder: Optional[tempfile.TemporaryDirectory] = None
        self._finalizer: Optional[weakref.finalize] = None
        #: how many stream levels went over the memory budget (diagnostics)
        self.spilled = 0

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> "LevelStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop every stored level and remove the temporary folder."""
        for s in list(self._stores) + list(self._next.values()):
            s.close()
        self._stores = []
        self._next = {}
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
            self._folder = None

    def __len__(self) -> int:
        return len(self._stores)

    # -- reading ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StreamBatch]:
        return self.batches()

    def batches(self, streams: Optional[Sequence[int]] = None) -> Iterator[StreamBatch]:
        """Every fusion batch with the current inputs of ``streams`` (default: all; the others
        are left out of ``inputs``, which then lists only the requested ones in order)."""
        which = range(len(self._stores)) if streams is None else list(streams)
        bs = self.data.batch_size
        for i in range(self.num_batches):
            y = None if self.data.y is None else self.data.y[i * bs:(i + 1) * bs].to(self.device)
            yield StreamBatch(i, [self._stores[s].get(i, self.device) for s in which], y, self)

    # -- moving on --------------------------------------------------------------------------
    def _bytes_in_memory(self) -> int:
        """Bytes held or reserved in memory: a level being filled counts at its full size."""
        return sum(max(s.nbytes_in_memory, s.reserved) for s in list(self._stores) + list(self._next.values()))

    def _new_store(self, nbytes: int) -> _Store:
        if self.budget is None or self._bytes_in_memory() + nbytes <= self.budget:
            store = _MemoryStore()
            store.reserved = nbytes
            return store
        self.spilled += 1
        if self.spill == "recompute":
            return _DropStore()
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="neurofuse-stream-")
            self._finalizer = weakref.finalize(self, self._folder.cleanup)
        return _DiskStore(self._folder.name)

    def _keep(self, stream: int, index: int, value: Tensor) -> None:
        store = self._next.get(stream)
        if store is None:
            nbytes = value.numel() * value.element_size() * self.num_batches
            store = self._next[stream] = self._new_store(nbytes)
        store.put(index, value.detach())

    def advance(self, fns: Mapping[int, Optional[Fn]],
                transforms: Optional[Mapping[int, Fn]] = None) -> None:
        """Move each stream in ``fns`` to its next level: its input becomes ``fn(input)``.

        Values offered with :meth:`StreamBatch.keep` for every batch are used as they are; the
        others are computed now, one batch at a time, without gradients.  ``fn`` may be
        ``None`` for a stream whose values were all kept, unless ``spill="recompute"`` (which
        needs every level's function to recompute it).  ``transforms[s]``, if given, is applied
        to stream ``s``'s *kept* values (which must all be there): a cheap map from what was kept
        to ``fn(input)``, e.g. a change of neuron basis; values that are computed or recomputed
        come from ``fn`` itself.
        """
        transforms = dict(transforms or {})
        for s, fn in fns.items():
            if not 0 <= s < len(self._stores):
                raise IndexError(f"stream {s} out of range (there are {len(self._stores)})")
            if fn is None and self.spill == "recompute":
                raise ValueError(f"stream {s}: spill='recompute' needs the level's function")
        todo = [s for s in fns if not (s in self._next and self._next[s].complete(self.num_batches))]
        for s in todo:
            transforms.pop(s, None)
            if fns[s] is None:
                raise ValueError(f"stream {s}: no function given and not every batch was kept")
            self._next.pop(s, None)
        if todo:
            with torch.no_grad():
                for b in self.batches(todo):
                    for s, h in zip(todo, b.inputs):
                        self._keep(s, b.index, fns[s](h))  # type: ignore[misc]
        for s, fn in fns.items():
            if fn is not None:
                self._chains[s].append(fn)
            new = self._next[s]
            if s in transforms and not isinstance(new, _DropStore):
                with torch.no_grad():
                    first = transforms[s](new.get(0, self.device))
                    # the mapped level is held next to the kept one while it is made: it is kept
                    # in memory only if both fit the budget, and spilled otherwise
                    mapped = self._new_store(first.numel() * first.element_size() * self.num_batches)
                    mapped.put(0, first)
                    for i in range(1, self.num_batches):
                        mapped.put(i, transforms[s](new.get(i, self.device)))
                new.close()
                new = mapped
            del self._next[s]
            if isinstance(new, _DropStore):
                new = _RecomputeStore(self.data, self._chains[s])
            self._stores[s].close()
            self._stores[s] = new
