"""Hypothesis profiles of the fuzz suite.

``ci`` (the default, and what CI runs): few, derandomised examples, the whole suite in well under
30 s.  ``dev``: more examples, random each run.  ``long``: a thorough local run, minutes.  Choose
with ``HYPOTHESIS_PROFILE=dev`` or ``HYPOTHESIS_PROFILE=long``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])

settings.register_profile("ci", max_examples=20, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=150, print_blob=True, **_COMMON)
settings.register_profile("long", max_examples=2000, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")

