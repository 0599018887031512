"""Saving fused declared (non-zoo) models: weights plus declaration, and accurate advice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurofuse
from neurofuse.checkpoint import load_weights, read_config, save_model, save_weights
from neurofuse.errors import CheckpointError, ConfigError


class Net(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _declare(model: nn.Module):
    return neurofuse.levels_from(model, levels=["fc1", [F.relu, "fc2"]], input_shape=(4,))


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    models = [_declare(Net()), _declare(Net())]
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    return neurofuse.fuse(models, (x, y), method="kf-linear", progress=False), x


def test_saving_a_fused_declared_model_says_how_to_save_and_rebuild_it(fused, tmp_path):
    with pytest.raises(ConfigError) as exc:
        save_model(fused[0], tmp_path / "f.safetensors")
    msg = str(exc.value)
    assert "save_weights" in msg and "load_weights" in msg and "levels_from" in msg
    assert "neurofuse.models" not in msg, "the zoo cannot rebuild a declared model"
    assert not (tmp_path / "f.safetensors").exists()


def test_weights_and_declaration_round_trip_into_a_new_declaration(fused, tmp_path):
    model, x = fused
    p = save_weights(model, tmp_path / "f.safetensors", metadata={"method": "kf-linear"})
    back = load_weights(_declare(Net()), p)
    assert torch.equal(back(x), model(x)) and not back.training
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as fh:
        import json

        doc = json.loads(fh.metadata()["neurofuse"])
    assert doc["format"] == "neurofuse-weights" and doc["metadata"] == {"method": "kf-linear"}
    assert doc["declaration"]["levels"] == model.level_names and doc["declaration"]["axes"] == model.axes


def test_load_weights_refuses_another_declaration_or_other_shapes(fused, tmp_path):
    p = save_weights(fused[0], tmp_path / "f.safetensors")
    other = neurofuse.levels_from(Net(), levels=["fc1", [lambda t: F.relu(t), "fc2"]], input_shape=(4,))
    with pytest.raises(CheckpointError, match="declare the same levels"):
        load_weights(other, p)
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(_declare(Net(hidden=5)), p)


def test_save_weights_keeps_the_usual_output_rules(fused, tmp_path):
    p = save_weights(fused[0], tmp_path / "f.safetensors")
    with pytest.raises(neurofuse.errors.OutputExistsError):
        save_weights(fused[0], p)
    with pytest.raises(ConfigError, match="must end in .safetensors"):
        save_weights(fused[0], tmp_path / "f.pt")


def test_a_zoo_checkpoint_is_still_self_describing(tmp_path):
    from neurofuse.models import MLP

    p = save_model(MLP((4,), 3, [5]), tmp_path / "m.safetensors")
    assert read_config(p)["config"]["arch"] == "mlp"
