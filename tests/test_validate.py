"""Tests of neurofuse._validate: the one set of option predicates, used by every typed config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from neurofuse._validate import is_int, is_number


@pytest.mark.parametrize("value", [0, -3, 10**30, np.int64(4), np.uint8(1)])
def test_integers_are_ints(value):
    assert is_int(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, "1", None, np.float32(2)])
def test_bools_floats_and_strings_are_not_ints(value):
    assert not is_int(value)


@pytest.mark.parametrize("value", [0, 1.5, -2.0, np.float32(0.1), np.int16(3), 1e308])
def test_finite_reals_are_numbers(value):
    assert is_number(value)


@pytest.mark.parametrize("value", [True, np.bool_(False), math.nan, math.inf, -math.inf,
                                   np.float64("nan"), "0.1", None, [1.0]])
def test_bools_non_finite_values_and_strings_are_not_numbers(value):
    assert not is_number(value)


def test_there_is_one_copy_of_the_predicates():
    src = Path(is_int.__code__.co_filename).parent
    copies = [str(p.relative_to(src)) for p in src.rglob("*.py") if p.name != "_validate.py"
              and any(f"def {name}(" in p.read_text(encoding="utf-8")
                      for name in ("_is_int", "_is_num", "_is_number", "is_int", "is_number"))]
    assert not copies, f"define option predicates only in neurofuse/_validate.py: {copies}"


@pytest.mark.parametrize("make", ["train", "finetune", "level", "kd-head"])
def test_every_config_rejects_a_bool_and_a_nan(make):
    from neurofuse.approximation._gradient import LevelConfig
    from neurofuse.errors import ConfigError
    from neurofuse.finetune import FinetuneConfig
    from neurofuse.methods._kd import KDHeadOptions
    from neurofuse.training import TrainConfig

    cls = {"train": TrainConfig, "finetune": FinetuneConfig, "level": LevelConfig,
           "kd-head": KDHeadOptions}[make]
    with pytest.raises(ConfigError, match="epochs"):
        cls(epochs=True)
    with pytest.raises(ConfigError, match="lr"):
        cls(lr=math.nan)
    with pytest.raises(ConfigError, match="weight_decay"):
        cls(weight_decay=math.inf)
