"""``neurofuse.fuse`` against bad inputs: each ends in a one-line NeurofuseError or is converted
(float64/float16 inputs, one-hot labels), never in a raw exception or a silent degenerate result."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import neurofuse
from neurofuse.errors import ConfigError, DataError, IncompatibleModelsError, NeurofuseError
from neurofuse.models import MLP


def _models(n: int = 2):
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(MLP((1, 8, 8), 10, [16, 12]).eval())
    return out


def _data(n: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def _one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("bad", [[1, 2], ["a.safetensors"], [None, None]])
def test_models_that_are_not_modules_are_a_clear_error(bad):
    with pytest.raises(IncompatibleModelsError, match="not a torch nn.Module") as info:
        neurofuse.fuse(bad, _data(), progress=False)
    _one_line(info)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_float64_and_half_inputs_are_converted_to_the_models_dtype(dtype):
    x, y = _data()
    ref = neurofuse.fuse(_models(), (x, y), method="hf-linear", progress=False)
    got = neurofuse.fuse(_models(), (x.to(dtype), y), method="hf-linear", progress=False)
    probe = torch.randn(5, 1, 8, 8)
    tol = 1e-4 if dtype == torch.float64 else 0.5
    assert torch.allclose(got(probe), ref(probe), atol=tol)


def test_models_of_different_dtypes_are_refused():
    a, b = _models()
    with pytest.raises(IncompatibleModelsError, match="float64") as info:
        neurofuse.fuse([a, b.double()], _data(), progress=False)
    _one_line(info)


def test_one_hot_labels_with_conductance_equal_class_indices():
    x, y = _data()
    one_hot = torch.nn.functional.one_hot(y, 10)
    kw = dict(method="hf-linear", importance="conductance", progress=False)
    ref = neurofuse.fuse(_models(), (x, y), **kw)
    got = neurofuse.fuse(_models(), (x, one_hot), **kw)
    probe = torch.randn(5, 1, 8, 8)
    assert torch.allclose(got(probe), ref(probe))


def test_soft_labels_are_refused_clearly():
    x, y = _data()
    soft = torch.softmax(torch.randn(len(y), 10), 1)
    with pytest.raises(DataError, match="soft labels") as info:
        neurofuse.fuse(_models(), (x, soft), importance="conductance", progress=False)
    _one_line(info)


class _DictSet(Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def test_a_dataloader_of_dicts_is_a_clear_error():
    with pytest.raises(DataError, match="dict batches") as info:
        neurofuse.fuse(_models(), DataLoader(_DictSet(), batch_size=16), progress=False)
    _one_line(info)


@pytest.mark.parametrize("seed", [2**64, 2**32, -1, 1.5, True])
def test_out_of_range_seeds_are_a_config_error(seed):
    with pytest.raises(ConfigError, match="seed") as info:
        neurofuse.fuse(_models(), _data(), seed=seed, progress=False)
    _one_line(info)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_a_fusion_set_smaller_than_the_class_count_is_refused_naming_the_method(n):
    with pytest.raises(DataError, match="'kf-linear'.*at least 10 samples") as info:
        neurofuse.fuse(_models(), _data(n), method="kf-linear", progress=False)
    _one_line(info)


def test_ensemble_needs_no_fusion_set_so_none_is_required():
    fused = neurofuse.fuse(_models(), None, method="ensemble", progress=False)
    assert fused(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("value", [1e38, -3e31])
@pytest.mark.parametrize("method", ["kf-linear", "vanilla", "ensemble", "kd-head"])
def test_a_finite_absurd_weight_is_refused_like_nan(method, value):
    a, b = _models()
    with torch.no_grad():
        b.levels[1][1].weight[0, 0] = value
    with pytest.raises(IncompatibleModelsError, match="magnitude") as info:
        neurofuse.fuse([a, b], _data(), method=method, progress=False)
    _one_line(info)


def test_every_bad_input_is_a_neurofuse_error_not_a_raw_exception():
    x, y = _data()
    cases = [
        dict(data=(x, y.float() + 0.5)),
        dict(data=(x, y[:-1])),
        dict(data=(x[:, :, :4], y)),
        dict(data=(x.to(torch.complex64), y)),
        dict(data=(x, torch.full_like(y, 99))),
        dict(data=DataLoader(list(zip(x, y)), batch_size=7)),  # works: (x, y) batches
        dict(data="not data"),
        dict(data=(x, y), width=[0, 3]),
    ]
    for kw in cases:
        try:
            neurofuse.fuse(_models(), progress=False, **kw)
        except NeurofuseError as exc:
            assert "\n" not in str(exc)
