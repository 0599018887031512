"""Checkpoints that lie: a sha256 of the data catches bit rot, the config is checked against the
file's header before anything is built, and hostile sizes, dtypes and nesting are refused."""

from __future__ import annotations

import json
import logging
import resource
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from neurofuse.checkpoint import DIGEST_KEY, METADATA_KEY, load_model, read_config, save_model
from neurofuse.errors import CheckpointError
from neurofuse.models import MLP


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP((1, 8, 8), 10, [16, 12])


def _header_len(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


def _write(path: Path, tensors, config, metadata=None) -> Path:
    doc = {"format": "neurofuse-checkpoint", "version": 1, "config": config,
           "metadata": metadata or {}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={METADATA_KEY: json.dumps(doc)})
    return path


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_save_stores_a_sha256_and_the_round_trip_verifies_it(tmp_path):
    path = save_model(_mlp(), tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as fh:
        digest = fh.metadata()[DIGEST_KEY]
    assert len(digest) == 64 and int(digest, 16) >= 0
    m = load_model(path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(m(x), _mlp().eval()(x))


def test_a_flipped_exponent_bit_in_the_tensor_data_is_caught_naming_the_file(tmp_path):
    path = save_model(_mlp(), tmp_path / "m.safetensors")
    blob = bytearray(path.read_bytes())
    start = _header_len(blob)
    blob[start + 3] ^= 0x40  # the high exponent bit of the first float32 (little endian)
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum mismatch") as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_an_edited_metadata_value_is_caught(tmp_path):
    path = save_model(_mlp(), tmp_path / "m.safetensors", metadata={"seed": 1})
    blob = path.read_bytes()
    assert blob.count(b'\\"seed\\": 1') == 1
    path.write_bytes(blob.replace(b'\\"seed\\": 1', b'\\"seed\\": 7'))
    assert read_config(path)["metadata"]["seed"] == 7  # the header alone still parses
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_model(path)


def test_a_checkpoint_without_a_digest_loads_with_a_debug_line(tmp_path, caplog):
    m = _mlp()
    path = _write(tmp_path / "old.safetensors", m.state_dict(), m.config())
    with caplog.at_level(logging.DEBUG, logger="neurofuse"):
        loaded = load_model(path)
    assert any("no sha256" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), m.eval()(x))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_integer_or_bool_tensors_where_floats_belong_are_refused_not_cast(tmp_path, dtype):
    m = _mlp()
    state = dict(m.state_dict())
    state["levels.0.1.weight"] = torch.ones_like(state["levels.0.1.weight"]).to(dtype)
    path = _write(tmp_path / "int.safetensors", state, m.config())
    with pytest.raises(CheckpointError, match="refusing to cast"):
        load_model(path)


def test_a_config_far_larger_than_the_file_is_refused_before_it_is_built(tmp_path):
    m = _mlp()
    config = {"arch": "mlp", "kwargs": {"input_shape": [1, 8, 8], "num_classes": 10,
                                        "hidden": [2 ** 40], "bias": True}}
    path = _write(tmp_path / "bomb.safetensors", m.state_dict(), config)
    with pytest.raises(CheckpointError, match="parameters"):
        load_model(path)


def test_a_config_that_does_not_match_the_header_allocates_nothing(tmp_path):
    m = _mlp()
    config = {"arch": "mlp", "kwargs": {"input_shape": [1, 8, 8], "num_classes": 10,
                                        "hidden": [16000, 16000], "bias": True}}  # 1 GB of floats
    path = _write(tmp_path / "big.safetensors", m.state_dict(), config)
    before = _maxrss_mb()
    with pytest.raises(CheckpointError, match="shape"):
        load_model(path)
    assert _maxrss_mb() - before < 300


def test_an_ensemble_config_with_thousands_of_members_is_refused(tmp_path):
    member = MLP((1, 8, 8), 10, [4]).config()
    config = {"arch": "ensemble", "kwargs": {"members": [member] * 2000, "class_weights": None}}
    path = _write(tmp_path / "ens.safetensors", {"x": torch.zeros(1)}, config)
    with pytest.raises(CheckpointError, match="lists 2000 members"):
        load_model(path)


def test_deeply_nested_metadata_is_refused_by_read_config_and_load(tmp_path):
    m = _mlp()
    path = _write(tmp_path / "deep.safetensors", m.state_dict(), m.config())
    doc = json.dumps({"format": "neurofuse-checkpoint", "version": 1, "config": m.config()})
    text = doc[:-1] + ', "metadata": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"
    save_file(dict(m.state_dict()), str(path), metadata={METADATA_KEY: text})
    for fn in (read_config, load_model):
        with pytest.raises(CheckpointError, match="nested"):
            fn(path)


def test_oversized_metadata_is_refused(tmp_path):
    m = _mlp()
    path = _write(tmp_path / "fat.safetensors", m.state_dict(), m.config(),
                  metadata={"blob": "x" * (17 << 20)})
    with pytest.raises(CheckpointError, match="bytes"):
        read_config(path)


def test_an_extra_or_missing_tensor_in_the_header_is_refused(tmp_path):
    m = _mlp()
    state = dict(m.state_dict())
    extra = _write(tmp_path / "extra.safetensors", {**state, "spy": torch.zeros(2)}, m.config())
    with pytest.raises(CheckpointError, match="'spy'"):
        load_model(extra)
    state.pop("levels.0.1.bias")
    missing = _write(tmp_path / "missing.safetensors", state, m.config())
    with pytest.raises(CheckpointError, match="lacks tensor"):
        load_model(missing)
