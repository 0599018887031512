"""Packaging metadata follows the current standards (PEP 639 licence expression)."""

from __future__ import annotations

from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_license_is_an_spdx_expression_not_the_deprecated_table():
    tomllib = pytest.importorskip("tomllib")
    doc = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    assert doc["project"]["license"] == "MIT"
    # PEP 639 licence expressions need setuptools >= 77 to build
    req = [r for r in doc["build-system"]["requires"] if r.startswith("setuptools")]
    assert req and req[0].replace(" ", "") in ("setuptools>=77", "setuptools>=77.0")
