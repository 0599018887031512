"""Phase timer: where a fusion spends its time, for benchmarks; free when nobody records.

The engine's expensive steps are marked with :func:`phase` (a decorator) or :func:`span` (a
``with`` block), by name: ``"statistics"`` (sufficient statistics from level outputs),
``"eigh"`` (eigendecompositions), ``"solve"`` (the rest of the closed form and the gradient
fits), ``"grouping"`` (K-means, Hungarian matching, optimal transport), ``"importance"``,
``"repair"``, ``"spill"`` (level activations written to or read from disk).  Nothing is measured
unless a :class:`PhaseTimer` is active: a marked call then costs one global lookup.

>>> with PhaseTimer() as timer:                        # doctest: +SKIP
...     neurofuse.fuse(models, data)
>>> timer.seconds                                      # doctest: +SKIP
{'statistics': 1.9, 'eigh': 3.2, 'grouping': 0.4, 'solve': 0.7, 'other': 0.3}

Times are *exclusive*: a phase inside another (an eigendecomposition inside a solve) counts for
the inner one only, so the phases add up to the timed block's wall time (the rest is
``"other"``).  On a GPU, ``PhaseTimer(sync=True)`` synchronises the device at every boundary so
that asynchronous kernels are charged to the phase that launched them.
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, Optional, TypeVar

__all__ = ["PhaseTimer", "phase", "span"]

F = TypeVar("F", bound=Callable[..., Any])

#: the timer that records, if any
_active: Optional["PhaseTimer"] = None
_NULL: ContextManager[None] = nullcontext()


class PhaseTimer:
    """Records wall and CPU seconds per phase while active (a context manager).

    Attributes
    ----------
    seconds : dict
        Exclusive wall seconds per phase; ``"other"`` is the time inside the block and outside
        every phase.
    cpu : dict
        Exclusive process CPU seconds per phase, likewise.
    calls : dict
        Number of entries into each phase.
    """

    def __init__(self, sync: bool = False) -> None:
        self.seconds: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self._stack: List[str] = []
        self._sync = sync
        self._prev: Optional[PhaseTimer] = None
        self._mark = (0.0, 0.0)

    def _now(self) -> "tuple[float, float]":
        if self._sync:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def _charge(self) -> None:
        wall, cpu = self._now()
        name = self._stack[-1] if self._stack else "other"
        self.seconds[name] = self.seconds.get(name, 0.0) + wall - self._mark[0]
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu - self._mark[1]
        self._mark = (wall, cpu)

    def push(self, name: str) -> None:
        """Enter phase ``name`` (the enclosing phase stops counting)."""
        self._charge()
        self._stack.append(name)
        self.calls[name] = self.calls.get(name, 0) + 1

    def pop(self) -> None:
        """Leave the innermost phase."""
        self._charge()
        self._stack.pop()

    def __enter__(self) -> "PhaseTimer":
        global _active
        self._prev, _active = _active, self
        self._mark = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        while self._stack:
            self.pop()
        self._charge()
        _active = self._prev


class _Span:
    __slots__ = ("timer", "name")

    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.timer.push(self.name)

    def __exit__(self, *exc: object) -> None:
        self.timer.pop()


def span(name: str) -> ContextManager[None]:
    """``with span("grouping"): ...`` times the block as phase ``name`` (a shared no-op context
    when no timer is active)."""
    timer = _active
    return _NULL if timer is None else _Span(timer, name)


def phase(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function is timed as phase ``name`` while a timer is active."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            timer = _active
            if timer is None:
                return fn(*args, **kwargs)
            timer.push(name)
            try:
                return fn(*args, **kwargs)
            finally:
                timer.pop()

        return wrapper  # type: ignore[return-value]

    return deco
