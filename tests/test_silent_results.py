"""Settings that used to give a result silently different from what was asked are refused.

Properties checked: a width multiplier that leaves a level with less than one neuron (it used
to become one neuron per level) is an error naming the smallest multiplier, in the API and the
CLI (which reads ``1e-7`` as a float); ``--distill-extra`` without ``--distill`` (ignored before)
is an error.
"""

from __future__ import annotations

import json

import pytest
import torch

import neurofuse
from neurofuse.cli import main
from neurofuse.errors import ConfigError
from neurofuse.models import MLP


def _models():
    out = []
    for i in range(2):
        torch.manual_seed(i)
        out.append(MLP((1, 8, 8), 10, [32, 16]).eval())
    return out


@pytest.mark.parametrize("width", [1e-7, 0.01])
def test_a_width_multiplier_below_one_neuron_is_refused(width):
    x = torch.randn(40, 1, 8, 8)
    with pytest.raises(ConfigError, match=rf"width multiplier {width:g} gives level .* at least 0.0312"):
        neurofuse.fuse(_models(), (x, torch.arange(40) % 10), width=width, progress=False)
    fused = neurofuse.fuse(_models(), (x, torch.arange(40) % 10), width=0.5, progress=False)
    assert fused.level_widths() == [16, 8, 10]


def test_cli_reads_a_width_in_scientific_notation_and_refuses_distill_extra_alone(tmp_path, capsys):
    from neurofuse.checkpoint import save_model

    paths = [str(save_model(m, tmp_path / f"m{i}.safetensors", metadata={"dataset": "digits"}))
             for i, m in enumerate(_models())]
    out = str(tmp_path / "f.safetensors")
    assert main(["fuse", *paths, "--width", "1e-7", "--out", out, "--no-progress"]) == 2
    assert "width multiplier 1e-07 gives level 0" in capsys.readouterr().err
    assert main(["fuse", *paths, "--distill-extra", "100", "--out", out, "--no-progress"]) == 2
    assert "--distill-extra 100 needs --distill" in capsys.readouterr().err
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("weights", [[[1.0, float("nan")], [1.0, 1.0]], [[-1.0, 1.0], [1.0, 1.0]],
                                     [[float("inf"), 1.0], [1.0, 1.0]]])
def test_an_ensemble_refuses_nan_infinite_or_negative_class_weights(tmp_path, weights):
    from neurofuse.checkpoint import load_model, save_model
    from neurofuse.errors import CheckpointError
    from neurofuse.models.ensemble import Ensemble

    members = [MLP((1, 8, 8), 2, [4]) for _ in range(2)]
    with pytest.raises(ConfigError, match="finite and non-negative"):
        Ensemble(members, weights)
    ok = save_model(Ensemble(members, [[1.0, 0.5], [0.0, 0.5]]), tmp_path / "e.safetensors")
    # the same refusal for a checkpoint whose stored config carries such weights
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ok), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    doc = json.loads(meta["neurofuse"])
    doc["config"]["kwargs"]["class_weights"] = weights
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"neurofuse": json.dumps(doc)})
    with pytest.raises(CheckpointError, match="finite and non-negative"):
        load_model(tmp_path / "bad.safetensors")
