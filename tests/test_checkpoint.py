"""Tests of neurofuse.checkpoint: round trips, overwrite protection, and refusal of bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neurofuse.checkpoint import load_model, read_config, save_json, save_model
from neurofuse.errors import CheckpointError, ConfigError, OutputExistsError
from neurofuse.models import MLP, VGG

#: set when an object refused by ``weights_only=True`` is nevertheless unpickled
UNPICKLED: list = []


def _mark_unpickled() -> "Evil":
    UNPICKLED.append(True)
    return Evil()


class Evil:
    """A pickled object whose unpickling would run code (records that it ran)."""

    def __reduce__(self):  # noqa: D105
        return (_mark_unpickled, ())


def _mlp(seed: int = 0, hidden=(16, 12)) -> MLP:
    torch.manual_seed(seed)
    return MLP(input_shape=(1, 8, 8), num_classes=10, hidden=hidden)


def _vgg(seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    return VGG(input_shape=(1, 8, 8), num_classes=10, width_multiplier=0.125)


def _assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, f"error message is not one line: {message!r}"
    return message


@pytest.mark.parametrize("make", [_mlp, _vgg], ids=["mlp", "vgg"])
def test_round_trip_gives_identical_outputs_and_config(tmp_path: Path, make) -> None:
    model = make(seed=3).eval()
    path = save_model(model, tmp_path / "m.safetensors", metadata={"val_accuracy": 0.5})
    loaded = load_model(path)
    x = torch.randn(5, 1, 8, 8)
    assert type(loaded) is type(model)
    assert not loaded.training, "load_model must return the model in eval mode"
    assert loaded.config() == model.config()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    doc = read_config(path)
    assert doc["format"] == "neurofuse-checkpoint" and doc["version"] == 1
    assert doc["config"] == model.config()
    assert doc["metadata"] == {"val_accuracy": 0.5}


def test_save_creates_parent_dirs_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "m.safetensors"
    save_model(_mlp(), target)
    assert target.is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.safetensors"]


def test_save_rejects_non_safetensors_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        save_model(_mlp(), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_overwrite_needs_force_and_keeps_original_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(_mlp(seed=0), path)
    original = path.read_bytes()
    with pytest.raises(OutputExistsError) as exc:
        save_model(_mlp(seed=1), path)
    assert "--force" in _assert_one_line(exc)
    assert path.read_bytes() == original, "a refused save must not change the file"
    save_model(_mlp(seed=1), path, force=True)
    assert path.read_bytes() != original
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), _mlp(seed=1).eval()(x))


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    good = save_model(_mlp(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_model(bad)
    message = _assert_one_line(exc)
    assert str(bad) in message and "corrupt or truncated" in message


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as exc:
        load_model(bad)
    _assert_one_line(exc)
    with pytest.raises(CheckpointError):
        read_config(bad)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as exc:
        load_model(tmp_path / "nope.safetensors")
    assert "does not exist" in _assert_one_line(exc)


def test_safetensors_without_neurofuse_metadata_is_refused_unless_config_given(
        tmp_path: Path) -> None:
    model = _mlp()
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    assert "not a neurofuse checkpoint" in _assert_one_line(exc)
    loaded = load_model(path, config=model.config())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_foreign_metadata_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"neurofuse": json.dumps({"format": "x"})})
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    _assert_one_line(exc)


def test_pt_state_dict_loads_with_config_or_sidecar(tmp_path: Path) -> None:
    model = _mlp(seed=5).eval()
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path)
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    assert "legacy.pt.json" in _assert_one_line(exc)
    with torch.no_grad():
        assert torch.equal(load_model(path, config=model.config())(x), model(x))
        config_file = tmp_path / "arch.json"
        config_file.write_text(json.dumps(model.config()))
        assert torch.equal(load_model(path, config=config_file)(x), model(x))
        (tmp_path / "legacy.pt.json").write_text(json.dumps(model.config()))
        assert torch.equal(load_model(path)(x), model(x))
    (tmp_path / "legacy.pt.json").unlink()
    (tmp_path / "legacy.json").write_text(json.dumps(model.config()))
    assert load_model(path).config() == model.config()


def test_pt_with_pickled_object_is_refused_without_running_it(tmp_path: Path) -> None:
    model = _mlp()
    path = tmp_path / "evil.pt"
    torch.save({"levels.0.1.weight": Evil()}, path)
    UNPICKLED.clear()
    with pytest.raises(CheckpointError) as exc:
        load_model(path, config=model.config())
    assert "weights_only" in _assert_one_line(exc)
    assert not UNPICKLED, "the pickled object was executed"


def test_truncated_pt_is_refused(tmp_path: Path) -> None:
    model = _mlp()
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError) as exc:
        load_model(bad, config=model.config())
    assert "corrupt or truncated" in _assert_one_line(exc)


def test_shape_mismatch_names_the_key(tmp_path: Path) -> None:
    small = _mlp(hidden=(16, 12))
    path = tmp_path / "small.pt"
    torch.save(small.state_dict(), path)
    big_config = _mlp(hidden=(32, 12)).config()
    with pytest.raises(CheckpointError) as exc:
        load_model(path, config=big_config)
    message = _assert_one_line(exc)
    assert "'levels.0.1.weight'" in message and "[16, 64]" in message and "[32, 64]" in message


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    model = _mlp()
    state = model.state_dict()
    missing = dict(state)
    del missing["levels.2.1.bias"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError) as exc:
        load_model(tmp_path / "missing.pt", config=model.config())
    assert "'levels.2.1.bias'" in _assert_one_line(exc)
    extra = dict(state)
    extra["levels.9.weight"] = torch.zeros(1)
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError) as exc:
        load_model(tmp_path / "extra.pt", config=model.config())
    assert "'levels.9.weight'" in _assert_one_line(exc)


def test_unknown_architecture_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(_mlp().state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_model(path, config={"arch": "no-such-arch", "kwargs": {}})
    assert "no-such-arch" in _assert_one_line(exc)


def test_save_json_is_protected_and_atomic(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "out" / "results.json"
    save_json({"acc": np.float32(0.5), "n": np.int64(3), "t": torch.tensor([1, 2])}, path)
    assert json.loads(path.read_text()) == {"acc": 0.5, "n": 3, "t": [1, 2]}
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        save_json({"acc": 1.0}, path)
    assert path.read_bytes() == before
    save_json({"acc": 1.0}, path, force=True)
    assert json.loads(path.read_text()) == {"acc": 1.0}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_read_config_and_load_refuse_wrong_file_kinds(tmp_path: Path) -> None:
    model = _mlp()
    pt = tmp_path / "m.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(CheckpointError) as exc:
        read_config(pt)
    _assert_one_line(exc)
    config_file = tmp_path / "m.json"
    config_file.write_text(json.dumps(model.config()))
    with pytest.raises(CheckpointError) as exc:
        load_model(config_file)
    assert "not a checkpoint" in _assert_one_line(exc)
