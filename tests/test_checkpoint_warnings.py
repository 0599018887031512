"""What loading a checkpoint says besides its result.

Properties checked: a neurofuse checkpoint written before the sha256 digest is loaded with one
warning (once per file) that its data is unverified; a checkpoint with a NaN weight is loaded
with a warning naming the tensor, and ``neurofuse eval`` shows it; ``eval`` of a bad PyTorch
file reports the file's problem, not a missing ``--dataset``.
"""

from __future__ import annotations

import json
import logging

import torch
from safetensors.torch import save_file

from neurofuse.checkpoint import METADATA_KEY, load_model, read_config, save_model
from neurofuse.cli import main
from neurofuse.models import MLP


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP((1, 8, 8), 10, [8])


def test_a_checkpoint_without_a_digest_is_loaded_with_one_warning(tmp_path, caplog):
    model = _mlp()
    path = save_model(model, tmp_path / "new.safetensors", metadata={"dataset": "digits"})
    old = tmp_path / "old.safetensors"   # as neurofuse wrote them before the digest
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old),
              metadata={METADATA_KEY: json.dumps(read_config(path))})
    with caplog.at_level(logging.WARNING, logger="neurofuse"):
        load_model(path)
        assert "unverified" not in caplog.text
        load_model(old)
        load_model(old)
    assert caplog.text.count("unverified") == 1 and "old.safetensors" in caplog.text


def test_a_nan_weight_is_named_by_load_model_and_eval(tmp_path, caplog, capsys):
    model = _mlp()
    with torch.no_grad():
        model.levels[0][1].weight[0, 0] = float("nan")
    path = save_model(model, tmp_path / "nan.safetensors", metadata={"dataset": "digits"})
    with caplog.at_level(logging.WARNING, logger="neurofuse"):
        load_model(path)
    assert "levels.0.1.weight" in caplog.text and "NaN" in caplog.text
    caplog.clear()
    assert main(["eval", str(path)]) == 0
    assert "NaN" in caplog.text + capsys.readouterr().err


def test_eval_of_a_bad_pt_reports_the_file_not_the_dataset(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save(_mlp().state_dict(), bad)
    bad.write_bytes(bad.read_bytes()[:300])
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "corrupt or truncated" in err and "--dataset" not in err
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(b"\x00" * 64)
    assert main(["eval", str(noise), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "safetensors and torch.save zip files, recognised by content" in err
