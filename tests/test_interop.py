"""Checkpoints people already have: pickled modules loaded safely, foreign tensor names matched
by shapes and order (or a key map), and load_model's errors saying what a file really holds."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from neurofuse.checkpoint import load_model
from neurofuse.errors import CheckpointError, ConfigError
from neurofuse.interop import (
    KeyMatchError,
    load_factory,
    load_pickled_module,
    load_state_dict,
    match_state_dict,
    read_state_dict,
)
from neurofuse.models import make_model

RAN = []


class ThirdPartyMLP(nn.Module):
    """A third-party MLP identical to the zoo's tiny MLP, under other tensor names."""

    def __init__(self):
        super().__init__()
        self.level1 = nn.Sequential(nn.Flatten(), nn.Linear(64, 32))
        self.level2 = nn.Sequential(nn.ReLU(), nn.Linear(32, 32))
        self.level3 = nn.Sequential(nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.level3(self.level2(self.level1(x)))


def _side_effect(tag):
    RAN.append(tag)
    return tag


class Evil:
    def __reduce__(self):
        return (_side_effect, ("evil",))


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def _zoo():
    torch.manual_seed(0)
    return make_model("mlp", "tiny", (1, 8, 8), 10).eval()


def test_keys_are_matched_by_shapes_and_order():
    """The issue's case: level1.1.weight -> levels.0.1.weight, same architecture."""
    src = ThirdPartyMLP()
    out = match_state_dict(src.state_dict(), _zoo())
    assert list(out) == list(_zoo().state_dict())
    assert torch.equal(out["levels.0.1.weight"], src.state_dict()["level1.1.weight"])


def test_key_map_renames_prefixes_and_exact_keys():
    src = ThirdPartyMLP().state_dict()
    out = match_state_dict(src, _zoo(), {"level1.": "levels.0.", "level2.": "levels.1.",
                                         "level3.1.weight": "levels.2.1.weight",
                                         "level3.1.bias": "levels.2.1.bias"})
    assert torch.equal(out["levels.2.1.bias"], src["level3.1.bias"])
    with pytest.raises(KeyMatchError) as exc:
        match_state_dict(src, _zoo(), {"level1.": "levels.0."})
    assert "missing" in _one_line(exc)


def test_unmatchable_keys_show_both_lists_side_by_side():
    src = ThirdPartyMLP().state_dict()
    src["level3.1.weight"] = torch.zeros(10, 31)
    with pytest.raises(KeyMatchError) as exc:
        match_state_dict(src, _zoo(), source="ckpt.pt")
    msg = _one_line(exc)
    assert "'level3.1.weight' [10, 31]" in msg and "'levels.2.1.weight' [10, 32]" in msg
    rows = exc.value.table.splitlines()
    assert "ckpt.pt" in rows[0] and "MLP" in rows[0]
    bad = [r for r in rows if r.startswith("!")]
    assert len(bad) == 1 and "level3.1.weight [10, 31]" in bad[0] and "levels.2.1.weight [10, 32]" in bad[0]
    assert exc.value.table in getattr(exc.value, "__notes__", [exc.value.table])


def test_missing_batchnorm_counters_are_taken_from_the_model():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    src = {k.replace("0.", "conv.").replace("1.", "bn."): v for k, v in model.state_dict().items()
           if "num_batches" not in k}
    out = match_state_dict(src, model)
    model.load_state_dict(out)


def test_load_state_dict_reads_pt_with_weights_only_and_training_wrappers(tmp_path: Path):
    src = ThirdPartyMLP().eval()
    torch.save({"model": src.state_dict(), "epoch": 3, "lr": 0.1}, tmp_path / "train.pt")
    zoo = load_state_dict(make_model("mlp", "tiny", (1, 8, 8), 10), tmp_path / "train.pt")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(zoo(x), src(x))


def test_pickled_module_loads_only_with_its_classes(tmp_path: Path):
    torch.manual_seed(0)
    model = ThirdPartyMLP().eval()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError) as exc:
        load_pickled_module(tmp_path / "whole.pt")
    assert "ThirdPartyMLP" in _one_line(exc) and "classes=" in str(exc.value)
    loaded = load_pickled_module(tmp_path / "whole.pt", classes=[ThirdPartyMLP])
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_pickled_module_of_a_renamed_class_loads_through_a_remap(tmp_path: Path):
    old = types.ModuleType("oldpkg")

    class Net(ThirdPartyMLP):
        pass

    Net.__module__, Net.__qualname__ = "oldpkg", "Net"
    old.Net = Net
    sys.modules["oldpkg"] = old
    try:
        torch.save(Net().eval(), tmp_path / "old.pt")
    finally:
        del sys.modules["oldpkg"]
    loaded = load_pickled_module(tmp_path / "old.pt", remap={"oldpkg.Net": ThirdPartyMLP})
    assert type(loaded) is ThirdPartyMLP


def test_pickled_code_never_runs(tmp_path: Path):
    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pt")
    RAN.clear()
    with pytest.raises(CheckpointError) as exc:
        load_pickled_module(tmp_path / "evil.pt", classes=[ThirdPartyMLP])
    assert "_side_effect" in _one_line(exc)
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "evil.pt")
    assert not RAN


def test_load_model_says_what_a_pt_without_config_holds(tmp_path: Path):
    torch.save(ThirdPartyMLP().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError) as exc:
        load_model(tmp_path / "sd.pt")
    msg = _one_line(exc)
    assert "holds a state dict of 6 tensors" in msg and "bare" not in msg
    assert "--model-factory" in msg and "sd.pt.json" in msg
    torch.save(ThirdPartyMLP(), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError) as exc:
        load_model(tmp_path / "whole.pt")
    msg = _one_line(exc)
    assert "pickled" in msg and "load_pickled_module" in msg and "state dict of" not in msg


def test_load_model_with_foreign_names_says_they_match_and_key_map_loads(tmp_path: Path):
    src = ThirdPartyMLP().eval()
    torch.save(src.state_dict(), tmp_path / "foreign.pt")
    config = _zoo().config()
    with pytest.raises(CheckpointError) as exc:
        load_model(tmp_path / "foreign.pt", config=config)
    msg = _one_line(exc)
    assert "matches by shape and order" in msg and "key_map='auto'" in msg
    assert "another architecture" not in msg
    model = load_model(tmp_path / "foreign.pt", config=config, key_map="auto")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_load_factory_imports_file_and_function(tmp_path: Path):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n\ndef make_net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))\n")
    fn = load_factory(f"{tmp_path / 'my_models.py'}:make_net")
    assert isinstance(fn(), nn.Sequential)
    with pytest.raises(ConfigError, match="no function 'nope'.*make_net"):
        load_factory(f"{tmp_path / 'my_models.py'}:nope")
    with pytest.raises(ConfigError, match="FILE.py:function"):
        load_factory("my_models.make_net")
