"""levels_from: declaring the levels of a model written without neurofuse, validating the
declaration precisely, and fusing declared models end to end."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurofuse
from neurofuse.data import partition
from neurofuse.errors import ConfigError
from neurofuse.levels import DeclaredNet, LeveledNet, levels_from
from neurofuse.training import TrainConfig, evaluate, train_model

DOC = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"


class UserCNN(nn.Module):
    """A CNN written independently of neurofuse: functional ReLU and pooling in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.ModuleDict({"a": nn.Conv2d(1, 8, 3, padding=1),
                                       "b": nn.Conv2d(8, 12, 3, padding=1)})
        self.classifier = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.features["a"](x))
        x = F.max_pool2d(F.relu(self.features["b"](x)), 2)
        return self.classifier(x.flatten(1))


GOOD = ["features.a", [F.relu, "features.b"],
        [F.relu, lambda x: F.max_pool2d(x, 2), nn.Flatten(), "classifier"]]


def test_a_correct_declaration_reproduces_the_model_and_shares_its_modules():
    torch.manual_seed(0)
    model = UserCNN()
    net = levels_from(model, GOOD, axes=["conv", "conv", "dense"], input_shape=(1, 8, 8))
    assert isinstance(net, DeclaredNet) and isinstance(net, LeveledNet)
    assert net.num_levels == 3 and net.axes == ["conv", "conv", "dense"] and net.num_classes == 10
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-6, rtol=1e-6)
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in net.parameters()} == model_params, "levels must share the user's modules"
    assert net.level_widths() == [8, 12, 10]
    # axes and the class count are inferred when not given
    assert levels_from(model, GOOD, input_shape=(1, 8, 8)).axes == ["conv", "conv", "dense"]


@pytest.mark.parametrize("levels, axes, pieces", [
    # the functional ReLU before features.b is missing: reported at level 1, with the difference
    (["features.a", ["features.b"], [F.relu, nn.MaxPool2d(2), nn.Flatten(), "classifier"]],
     None, ["level 1", "differs from what model(x) computes", "relu"]),
    # the last level forgets the ReLU: only the final comparison can see it
    (["features.a", [F.relu, "features.b"], [nn.MaxPool2d(2), nn.Flatten(), "classifier"]],
     None, ["do not reproduce model(x)", "differ by up to"]),
    # wrong axis: expected vs got dimensions and shape
    (GOOD, ["conv", "dense", "dense"],
     ["level 1", "declared 'dense'", "[B, C] (2-D)", "[2, 12, 8, 8] (4-D)"]),
    # pooling forgotten: the classifier fails on the shape it gets
    (["features.a", [F.relu, "features.b"], [F.relu, nn.Flatten(), "classifier"]],
     None, ["level 2", "fails on the output of the previous level", "[2, 12, 8, 8]"]),
    # a name that does not exist: the message lists what does
    (["features.a", [F.relu, "features.c"], "classifier"], None,
     ["level 1", "no sub-module 'features.c'", "features, classifier"]),
    (GOOD, ["conv", "conv"], ["3 levels", "2 axes"]),
    (GOOD, ["conv", "conv", "pixels"], ["level 2", "unknown axis"]),
])
def test_a_wrong_declaration_is_reported_precisely(levels, axes, pieces):
    torch.manual_seed(0)
    with pytest.raises(ConfigError) as err:
        levels_from(UserCNN(), levels, axes=axes, input_shape=(1, 8, 8))
    msg = str(err.value)
    assert "\n" not in msg
    for piece in pieces:
        assert piece in msg, (piece, msg)


def test_wrong_input_shape_and_class_count():
    with pytest.raises(ConfigError, match="input_shape"):
        levels_from(UserCNN(), GOOD, input_shape=(3, 8, 8))
    with pytest.raises(ConfigError, match="num_classes is 5"):
        levels_from(UserCNN(), GOOD, input_shape=(1, 8, 8), num_classes=5)
    with pytest.raises(ConfigError, match="input_shape"):
        levels_from(UserCNN(), GOOD)


def test_parameters_outside_every_level_are_warned_about():
    model = UserCNN()
    model.unused = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="unused.weight"):
        levels_from(model, GOOD, input_shape=(1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        levels_from(UserCNN(), GOOD, input_shape=(1, 8, 8))


@pytest.fixture(scope="module")
def declared_pair(digits):
    parts = partition(digits.y_train.numpy(), 2, "dirichlet", seed=2)
    out = []
    for i, p in enumerate(parts):
        torch.manual_seed(i)
        model = UserCNN()
        train_model(model, digits.x_train[p], digits.y_train[p],
                    config=TrainConfig(epochs=12, lr=3e-3, warmup_epochs=1, seed=i))
        out.append(levels_from(model.eval(), GOOD, input_shape=(1, 8, 8)))
    return out


@pytest.mark.parametrize("method", ["kf-gradient", "kf-linear"])
def test_declared_models_fuse_end_to_end(method, declared_pair, digits, digits_fusion):
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in declared_pair]
    fused = neurofuse.fuse(declared_pair, digits_fusion, method=method, progress=False)
    assert isinstance(fused, DeclaredNet)
    acc = evaluate(fused, digits.x_test, digits.y_test)["accuracy"]
    vanilla = evaluate(neurofuse.fuse(declared_pair, method="vanilla", progress=False),
                       digits.x_test, digits.y_test)["accuracy"]
    assert acc > 0.7 and acc > vanilla, (acc, vanilla)
    for m, sd in zip(declared_pair, before):   # the users' models are not modified
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_declared_models_keep_their_widths(declared_pair, digits_fusion):
    with pytest.raises(ConfigError, match="declared models keep their widths"):
        declared_pair[0].with_widths([4, 4])
    with pytest.raises(ConfigError, match="declared models keep their widths"):
        neurofuse.fuse(declared_pair, digits_fusion, method="kf-gradient", width=6, progress=False)


def test_the_documentation_example_runs(capsys):
    """The runnable example of docs/architectures.md (the block that defines SmallCNN)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    example = next(b for b in blocks if "class SmallCNN" in b)
    exec(compile(example, str(DOC), "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    accs = [float(v) for v in re.findall(r"kf-\w+: ([0-9.]+)", out)]
    assert len(accs) == 2 and min(accs) > 0.7, out
