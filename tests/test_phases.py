"""The phase timer: exclusive times that add up, nothing recorded when off, phases of a fusion."""

from __future__ import annotations

import time

import torch

import neurofuse
from neurofuse import _phases
from neurofuse._phases import PhaseTimer, phase, span
from neurofuse.models import MLP


@phase("outer")
def _outer() -> None:
    time.sleep(0.02)
    _inner()


@phase("inner")
def _inner() -> None:
    time.sleep(0.03)


def test_phase_times_are_exclusive_and_add_up_to_the_block():
    t0 = time.perf_counter()
    with PhaseTimer() as timer:
        _outer()
        with span("block"):
            time.sleep(0.01)
    wall = time.perf_counter() - t0
    assert timer.calls == {"outer": 1, "inner": 1, "block": 1}
    assert 0.015 <= timer.seconds["outer"] < 0.03 + 0.02     # its own sleep, not the inner one
    assert timer.seconds["inner"] >= 0.025
    assert abs(sum(timer.seconds.values()) - wall) < 0.01


def test_nothing_is_recorded_without_a_timer_and_exceptions_unwind():
    assert _phases._active is None
    _outer()                              # no timer: plain call
    assert span("x") is span("y")         # the shared no-op context
    with PhaseTimer() as timer:

        @phase("boom")
        def boom() -> None:
            raise ValueError

        try:
            boom()
        except ValueError:
            pass
        _inner()
    assert timer.calls == {"boom": 1, "inner": 1} and not timer._stack
    assert _phases._active is None


def test_a_fusion_reports_its_phases(digits_fusion):
    models = []
    for s in range(2):
        torch.manual_seed(s)
        models.append(MLP((1, 8, 8), 10, [16]).eval())
    with PhaseTimer() as timer:
        neurofuse.fuse(models, digits_fusion, method="kf-linear", progress=False)
    assert {"statistics", "solve", "grouping"} <= set(timer.calls)
    with PhaseTimer() as timer:
        neurofuse.fuse(models, digits_fusion, method="otfusion", progress=False)
    assert {"statistics", "grouping"} <= set(timer.calls)
