"""The command line for your own models: `fuse --model-factory` and `neurofuse levels`."""

import re
from pathlib import Path

import pytest
import torch

from neurofuse.cli import main
from neurofuse.data import load_dataset
from neurofuse.interop import load_factory, load_state_dict
from neurofuse.training import TrainConfig, evaluate, train_model

MODELS = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """A small CNN written without neurofuse in mind (BatchNorm, functional ReLUs, Dropout)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(self.drop(torch.flatten(x, 1)))


def make_net():
    return Net()
'''


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    """my_models.py:make_net and two of its state dicts trained on halves of digits."""
    d = tmp_path_factory.mktemp("factory")
    (d / "my_models.py").write_text(MODELS)
    spec = f"{d / 'my_models.py'}:make_net"
    ds = load_dataset("digits")
    paths = []
    n = len(ds.y_train)
    for seed, part in enumerate([slice(0, n // 2), slice(n // 2, n)]):
        torch.manual_seed(seed)
        model = load_factory(spec)()
        train_model(model, ds.x_train[part], ds.y_train[part],
                    config=TrainConfig(epochs=3, lr=3e-3, seed=seed))
        torch.save(model.state_dict(), d / f"ckpt{seed}.pt")
        paths.append(str(d / f"ckpt{seed}.pt"))
    return d, spec, paths


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method", ["kf-linear", "kf-gradient", "otfusion"])
def test_fuse_model_factory_writes_a_state_dict_of_the_users_model(factory, capsys, method):
    d, spec, paths = factory
    out = d / f"fused-{method}.safetensors"
    code, text, err = _run(capsys, "fuse", "--model-factory", spec, *paths, "--out", str(out),
                           "--dataset", "digits", "--method", method, "--no-progress",
                           "--fusion-samples", "200")
    assert code == 0, err
    assert "3 automatic levels" in text
    printed = float(re.search(r"test accuracy ([\d.]+)%", text).group(1))
    fused = load_state_dict(load_factory(spec)(), out)     # the user's own class loads it back
    ds = load_dataset("digits")
    assert abs(100 * evaluate(fused, ds.x_test, ds.y_test)["accuracy"] - printed) < 0.01
    assert printed > 50
    for p in paths:
        assert Path(p).exists()
    code, _, err = _run(capsys, "fuse", "--model-factory", spec, *paths, "--out", str(out),
                        "--dataset", "digits", "--method", method, "--no-progress")
    assert code == 2 and "exists" in err                   # never overwritten without --force


def test_eval_and_finetune_read_what_fuse_model_factory_writes(factory, capsys):
    """The fused state dict names its factory: eval and finetune read it given the same
    --model-factory, and say which one to pass without it (no code is imported from a file)."""
    d, spec, paths = factory
    fused = d / "fused-read.safetensors"
    assert _run(capsys, "fuse", "--model-factory", spec, *paths, "--out", str(fused), "--dataset", "digits",
                "--method", "kf-linear", "--no-progress", "--fusion-samples", "200")[0] == 0
    code, text, err = _run(capsys, "eval", str(fused), "--model-factory", spec)
    assert code == 0, err
    assert "digits test set" in text   # the dataset comes from the fused file's metadata
    code, _, err = _run(capsys, "eval", str(fused))
    assert code == 2 and f"pass --model-factory {spec}" in err and "Traceback" not in err
    tuned = d / "tuned.safetensors"
    code, text, err = _run(capsys, "finetune", str(fused), "--model-factory", spec, "--out", str(tuned),
                           "--epochs", "1", "--no-progress")
    assert code == 0, err
    assert "test accuracy" in text
    code, text, err = _run(capsys, "eval", str(tuned), "--model-factory", spec)
    assert code == 0, err


def test_levels_prints_levels_widths_and_methods(factory, capsys):
    _, spec, _ = factory
    code, text, err = _run(capsys, "levels", spec, "--input-shape", "1,8,8")
    assert code == 0, err
    assert "3 levels (found with torch.fx)" in text
    assert re.search(r"0\s+chain\s+conv\s+8\s+conv1 -> bn1", text)
    assert re.search(r"2\s+chain\s+dense\s+10\s+.*fc", text)
    assert "fused by: otfusion, git-rebasin, hf-linear, kf-linear, kf-gradient" in text
    # which tensors each neuron map moves, along which axis, under the model's own names
    assert ("out-map: conv1.weight rows, bn1.{weight, bias, running_mean, running_var}, "
            "conv2.weight columns (per 3x3 tap)") in text
    assert "out-map: conv2.weight rows, conv2.bias, fc.weight columns (per position, 16 positions)" in text


def test_factory_errors_are_one_line(factory, capsys, tmp_path):
    d, spec, paths = factory
    out = str(tmp_path / "f.safetensors")
    code, _, err = _run(capsys, "fuse", "--model-factory", spec, *paths, "--out", out, "--no-progress")
    assert code == 2 and "pass --dataset" in err
    code, _, err = _run(capsys, "fuse", "--model-factory", spec, *paths, "--out", out,
                        "--dataset", "digits", "--method", "ensemble", "--no-progress")
    assert code == 2 and "does not give one model of your architecture" in err
    code, _, err = _run(capsys, "fuse", "--auto-levels", *paths, "--out", out, "--dataset", "digits")
    assert code == 2 and "--auto-levels needs --model-factory" in err
    code, _, err = _run(capsys, "levels", spec)
    assert code == 2 and "--input-shape" in err


def test_unmatched_checkpoint_prints_both_key_lists(factory, capsys, tmp_path):
    _, spec, paths = factory
    state = torch.load(paths[0], weights_only=True)
    state["fc.weight"] = torch.zeros(10, 3)
    torch.save(state, tmp_path / "bad.pt")
    code, _, err = _run(capsys, "fuse", "--model-factory", spec, paths[0], str(tmp_path / "bad.pt"),
                        "--out", str(tmp_path / "f.safetensors"), "--dataset", "digits")
    assert code == 2
    lines = err.splitlines()
    assert lines[-1].startswith("neurofuse: error: the tensors of")
    assert any(ln.startswith("!") and "fc.weight [10, 3]" in ln and "fc.weight [10, 256]" in ln for ln in lines)
