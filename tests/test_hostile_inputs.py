"""Further hostile inputs on the new surfaces (``levels``, ``--model-factory``, ``.pt`` state dicts).

Properties checked: a factory function that raises is a one-line error (it was a raw
traceback); an input shape of billions of elements is refused before the random check input is
allocated; integer, complex, sparse or quantized tensors are not cast or half-copied into a
float model (int64 was cast silently, sparse and quantized were raw tracebacks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurofuse.cli import main
from neurofuse.errors import CheckpointError, ConfigError
from neurofuse.interop import load_state_dict
from neurofuse.levels import auto_levels, levels_from

FACTORY = """
import torch.nn.functional as F
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)
    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))
def make():
    return Net()
def boom():
    raise RuntimeError("no GPU here")
"""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _one_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("neurofuse: error:") and len(err.strip().splitlines()) == 1, err
    return err


def test_a_factory_that_raises_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "f.py").write_text(FACTORY)
    err = _one_line(capsys, main(["levels", f"{tmp_path / 'f.py'}:boom", "--input-shape", "1,8,8"]))
    assert "boom() raises RuntimeError: no GPU here" in err


def test_an_input_shape_of_billions_of_elements_is_refused_before_allocating(tmp_path, capsys):
    (tmp_path / "f.py").write_text(FACTORY)
    err = _one_line(capsys, main(["levels", f"{tmp_path / 'f.py'}:make", "--input-shape", "1,60000,60000"]))
    assert "3600000000 elements per sample" in err
    with pytest.raises(ConfigError, match="elements per sample"):
        auto_levels(Net(), (3, 4096, 4096))
    m = Net()
    with pytest.raises(ConfigError, match="elements per sample"):
        levels_from(m, levels=[[nn.Flatten(), m.fc1], [nn.ReLU(), m.fc2]], input_shape=(1, 1 << 25))


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize("convert,message", [
    (lambda t: t.round().long(), "holds int64 values but Net has float32 there; refusing to cast"),
    (lambda t: t.to(torch.complex64), "holds complex64 values"),
    (lambda t: t.to_sparse(), "is sparse_coo"),
    (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), "is quantized"),
])
def test_tensors_of_another_kind_are_not_cast_into_the_model(tmp_path, capsys, convert, message):
    state = Net().state_dict()
    state["fc1.weight"] = convert(state["fc1.weight"])
    torch.save(state, tmp_path / "ckpt.pt")
    target = Net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(target, tmp_path / "ckpt.pt")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())   # nothing half-loaded
    (tmp_path / "f.py").write_text(FACTORY)
    rc = main(["levels", f"{tmp_path / 'f.py'}:make", "--input-shape", "1,8,8", "--checkpoint",
               str(tmp_path / "ckpt.pt")])
    assert message.split(";")[0].split(" but")[0] in _one_line(capsys, rc)

