"""``neurofuse fuse --hf DIR1 DIR2 ... --out DIR`` and ``neurofuse methods --hf``."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

import neurofuse.hf as nh  # noqa: E402
from neurofuse.cli import main  # noqa: E402

from .test_adapters import tiny  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfcli")
    ds = nh.token_task(n_train=120, n_test=60, seed=0)
    save_file({"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test,
               "y_test": ds.y_test}, str(root / "tokens.safetensors"))
    for i in range(2):
        tiny("bert", i).hf_model.save_pretrained(str(root / f"bert{i}"))       # plain transformers
        nh.save_pretrained(tiny("resnet", i), root / f"resnet{i}")             # records (1, 16, 16)
    return root


def test_fuse_hf_writes_a_from_pretrained_folder(folders, tmp_path, capsys):
    out = tmp_path / "fused"
    rc = main(["fuse", "--hf", str(folders / "bert0"), str(folders / "bert1"), "--method", "kf-gradient",
               "--hf-data", str(folders / "tokens.safetensors"), "--fusion-samples", "60",
               "--option", 'levels={"epochs": 2}', "--option", 'head={"epochs": 2}',
               "--out", str(out), "--no-progress"])
    assert rc == 0
    line = capsys.readouterr().out
    assert "kf-gradient/uniform of 2 Hugging Face bert models, test accuracy" in line
    meta = json.loads((out / "neurofuse.json").read_text())
    assert meta["method"] == "kf-gradient" and meta["fusion_samples"] == 60
    model = BertForSequenceClassification.from_pretrained(str(out))
    assert model.config.neurofuse_input_shape == [12]
    # the inputs are untouched
    assert not (folders / "bert0" / "neurofuse.json").exists()


def test_fuse_hf_resizes_images_to_the_models_size(folders, tmp_path, capsys, caplog):
    out = tmp_path / "resnet"
    rc = main(["fuse", "--hf", str(folders / "resnet0"), str(folders / "resnet1"), "--method", "vanilla",
               "--dataset", "digits", "--fusion-samples", "50", "--out", str(out), "--no-progress"])
    assert rc == 0 and "vanilla of 2 Hugging Face resnet models" in capsys.readouterr().out
    assert "resizing digits images from [8, 8] to the models' [16, 16]" in caplog.text
    assert nh.load_pretrained(out).input_shape == (1, 16, 16)


def test_fuse_hf_aligns_resnets_with_repair(folders, tmp_path, capsys):
    """The Hugging Face ResNet is cut as the zoo's residual blocks: otfusion and REPAIR apply from
    the command line, and the folder records that REPAIR ran."""
    out = tmp_path / "aligned"
    rc = main(["fuse", "--hf", str(folders / "resnet0"), str(folders / "resnet1"), "--method", "otfusion",
               "--repair", "--dataset", "digits", "--fusion-samples", "50", "--out", str(out), "--no-progress"])
    assert rc == 0 and "otfusion/uniform of 2 Hugging Face resnet models + REPAIR" in capsys.readouterr().out
    assert json.loads((out / "neurofuse.json").read_text())["repair"] is True


@pytest.mark.parametrize("extra,message", [
    (["--method", "kf-linear", "--width", "16"], "--width does not apply to --hf"),
    (["--method", "kf-gradient", "--width", "16"], "--width does not apply to --hf"),
])
def test_fuse_hf_errors_are_one_line(folders, tmp_path, capsys, extra, message):
    rc = main(["fuse", "--hf", str(folders / "bert0"), str(folders / "bert1"), "--hf-data",
               str(folders / "tokens.safetensors"), "--fusion-samples", "60", "--out",
               str(tmp_path / "x"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["otfusion", "kf-linear"])
def test_fuse_hf_aligns_and_fits_bert_in_closed_form(folders, tmp_path, capsys, method):
    out = tmp_path / method
    rc = main(["fuse", "--hf", str(folders / "bert0"), str(folders / "bert1"), "--hf-data",
               str(folders / "tokens.safetensors"), "--fusion-samples", "60", "--method", method,
               "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert nh.load_pretrained(out).family == "bert"


def test_fuse_hf_needs_data_and_a_new_output(folders, tmp_path, capsys):
    args = ["fuse", "--hf", str(folders / "bert0"), str(folders / "bert1"), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "y")]) == 2
    assert "--hf needs fusion data" in capsys.readouterr().err
    assert main([*args, "--out", str(folders / "bert0"), "--hf-data", str(folders / "tokens.safetensors")]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(3, 12)}, str(bad))
    assert main([*args, "--out", str(tmp_path / "z"), "--hf-data", str(bad)]) == 2
    assert "needs x_train and y_train" in capsys.readouterr().err


def test_methods_hf_says_which_method_fuses_which_family(capsys):
    assert main(["methods", "--hf"]) == 0
    out = capsys.readouterr().out
    for family in ("vit:", "resnet:", "bert:"):
        assert family in out
    assert re.search(r"kf-gradient +yes:", out) and re.search(r"zipit +no:", out)
    assert main(["methods"]) == 0
    assert "neurofuse methods --hf" in capsys.readouterr().out


@pytest.mark.parametrize("wrapped", [False, True])
def test_levels_shows_a_transformers_model_through_its_adapter(tmp_path, capsys, wrapped):
    """``neurofuse levels`` takes a function that returns a Hugging Face model (wrapped through
    its family's adapter) or an already leveled one (shown as it is)."""
    f = tmp_path / "build.py"
    f.write_text("from neurofuse.hf import tiny_model\n\n"
                 "def build():\n"
                 f"    net = tiny_model('gpt2', (12,), 6, vocab_size=30, seed=0)\n"
                 f"    return net{'' if wrapped else '.hf_model'}\n")
    assert main(["levels", f"{f}:build", *([] if wrapped else ["--input-shape", "12"])]) == 0
    out = capsys.readouterr().out
    assert ("its own levels" if wrapped else "the Hugging Face 'gpt2' adapter") in out
    assert "input [12]" in out
    assert "4 levels" in out and "transformer.wte + wpe" in out and "kf-linear" in out


def test_levels_of_a_leveled_net_read_its_own_input_shape(tmp_path, capsys):
    """A model with its own levels knows its input: no shape needed, a contradicting one refused."""
    f = tmp_path / "build.py"
    f.write_text("from neurofuse.hf import tiny_model\n\n"
                 "def build():\n"
                 "    return tiny_model('gpt2', (12,), 6, vocab_size=30, seed=0)\n")
    assert main(["levels", f"{f}:build", "--input-shape", "3,8,8"]) == 2
    err = capsys.readouterr().err
    assert "input shape [12], not [3, 8, 8]" in err and len(err.strip().splitlines()) == 1


def test_fusing_an_unwrapped_transformers_model_says_to_wrap_it():
    from neurofuse import fuse
    from neurofuse.errors import IncompatibleModelsError

    net = tiny("bert")
    x = torch.randint(0, 25, (8, 12))
    with pytest.raises(IncompatibleModelsError, match=r"BertForSequenceClassification.*neurofuse\.hf\.wrap"):
        fuse([net.hf_model, net.hf_model], (x, torch.zeros(8, dtype=torch.long)), method="kf-linear", progress=False)
