"""neurofuse.fuse: bad arguments are NeurofuseErrors with one-line messages naming the bad value."""

import pytest
import torch

import neurofuse
from neurofuse.errors import ConfigError, DataError, IncompatibleModelsError
from neurofuse.models import MLP


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return [MLP((1, 8, 8), 10, [16, 16]) for _ in range(2)]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"width": "abc"}, ConfigError, "width must be"),
    ({"width": float("nan")}, ConfigError, "nan"),
    ({"seed": -1}, ConfigError, "seed"),
    ({"seed": "x"}, ConfigError, "seed"),
    ({"n_init": "abc"}, ConfigError, "'n_init'"),
    ({"n_init": True}, ConfigError, "'n_init'"),
    ({"rtol": -1.0}, ConfigError, "rtol"),
    ({"method": "kf-gradient", "overrides": {9: {"epochs": 1}}}, ConfigError, "level"),
    ({"depth": "deep"}, ConfigError, "depth"),
])
def test_bad_settings_are_config_errors(pair, data, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern) as e:
        neurofuse.fuse(pair, data, progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_labels_out_of_range_are_a_data_error(pair, data):
    x, y = data
    with pytest.raises(DataError, match=r"range over \[20, 29\]"):
        neurofuse.fuse(pair, (x, y + 20), importance="conductance", progress=False)


def test_a_single_model_instead_of_a_list_is_refused(pair, data):
    with pytest.raises(IncompatibleModelsError, match="list of models"):
        neurofuse.fuse(pair[0], data)


def test_numpy_arrays_are_accepted_as_fusion_data(pair, data):
    x, y = data
    fused = neurofuse.fuse(pair, (x.numpy(), y.numpy()), progress=False)
    assert fused.level_widths() == [16, 16, 10]
