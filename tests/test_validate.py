"""Tests of neurofuse._validate: the one set of option predicates, used by every typed config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from neurofuse._validate import MAX_SEED, check_seed, is_int, is_number
from neurofuse.distill import DistillConfig
from neurofuse.errors import ConfigError
from neurofuse.experiment import SplitConfig
from neurofuse.finetune import FinetuneConfig
from neurofuse.training import TrainConfig


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


@pytest.mark.parametrize("value", [0, 7, MAX_SEED, np.int64(3)])
def test_seeds_in_range_are_returned_as_python_ints(value):
    assert check_seed(value) == int(value) and type(check_seed(value)) is int


@pytest.mark.parametrize("value", [-1, MAX_SEED + 1, 2**64, 1.5, True, "3", None])
def test_seeds_out_of_range_or_not_integers_are_a_one_line_config_error(value):
    with pytest.raises(ConfigError, match=r"my seed must be an integer in \[0, 4294967295\]") as info:
        check_seed(value, "my seed")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("make", [lambda s: TrainConfig(seed=s), lambda s: FinetuneConfig(seed=s),
                                  lambda s: DistillConfig(seed=s), lambda s: SplitConfig(seed=s)],
                         ids=["TrainConfig", "FinetuneConfig", "DistillConfig", "SplitConfig"])
@pytest.mark.parametrize("seed", [-1, 2**64])
def test_every_config_refuses_a_seed_its_generators_cannot_take(make, seed):
    with pytest.raises(ConfigError, match="seed"):
        make(seed)
