"""save_pretrained writes a folder that from_pretrained loads back to the same function."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

import neurofuse  # noqa: E402
import neurofuse.hf as nh  # noqa: E402
from neurofuse.errors import CheckpointError, IncompatibleModelsError, OutputExistsError  # noqa: E402
from neurofuse.models.ensemble import Ensemble  # noqa: E402

from .test_adapters import FAMILIES, inputs, tiny  # noqa: E402


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_model_round_trips_through_from_pretrained(family, tmp_path):
    nets = [tiny(family, 0), tiny(family, 1)]
    x = inputs(family, 24)
    y = torch.arange(24) % FAMILIES[family][1]
    fused = neurofuse.fuse(nets, (x, y), method="kf-gradient", progress=False,
                           levels={"epochs": 2}, head={"epochs": 2})
    assert isinstance(fused, nh.HFLeveledNet)
    out = nh.save_pretrained(fused, tmp_path / "fused")
    cls = getattr(transformers, type(fused.hf_model).__name__)
    back = cls.from_pretrained(str(out)).eval()          # plain transformers, no neurofuse
    with torch.no_grad():
        want = fused(x)
        assert torch.allclose(back(x).logits, want, atol=1e-6)
        again = nh.load_pretrained(out)                   # the input shape was recorded
        assert tuple(again.input_shape) == FAMILIES[family][0]
        assert torch.allclose(again(x), want, atol=1e-6)
    # the fused model is not one of the inputs: the base models are unchanged
    assert not torch.allclose(nets[0](x), want)


def test_ensemble_saves_one_folder_per_member(tmp_path):
    nets = [tiny("bert", 0), tiny("bert", 1)]
    ens = neurofuse.fuse(nets, None, method="ensemble", progress=False)
    out = nh.save_pretrained(ens, tmp_path / "ens")
    assert json.loads((out / "neurofuse_ensemble.json").read_text())["members"] == ["member_0", "member_1"]
    back = nh.load_pretrained(out)
    x = inputs("bert")
    assert isinstance(back, Ensemble)
    with torch.no_grad():
        assert torch.allclose(back(x), ens(x), atol=1e-6)


def test_save_refuses_an_existing_folder_and_non_hf_models(tmp_path):
    net = tiny("vit")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="exists"):
        nh.save_pretrained(net, tmp_path / "taken")
    nh.save_pretrained(net, tmp_path / "taken", force=True)
    assert (tmp_path / "taken" / "config.json").is_file()
    from neurofuse.models import MLP

    with pytest.raises(IncompatibleModelsError, match="not a Hugging Face model view"):
        nh.save_pretrained(MLP((1, 8, 8), 10, [8]), tmp_path / "mlp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]   # no temporary folder left


def test_load_of_a_missing_or_foreign_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        nh.load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        nh.load_pretrained(tmp_path / "empty")
