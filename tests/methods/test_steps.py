"""The closed form inside a level (methods/_steps.py) and what the level-wise methods refuse.

Properties checked:

* a residual block, a depthwise level and a concatenation are fitted one layer at a time, in the
  order and with the kinds ``closed_form_steps`` gives (reported per level);
* the grouping of a concatenation keeps every part's neurons in that part (block diagonal), for
  models from different initialisations;
* N models of different weights (and a compressed fused width for the zoo ResNet) fuse to a
  finite model whose correspondences cover every fused neuron;
* a grouped convolution that is not depthwise is refused by every method but kf-gradient, and
  ``check_level`` agrees: the refusal names the level and comes before any importance score;
* the one-pass statistics protocol (federated servers) refuses a level it cannot carry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import neurofuse
from neurofuse._fusion_set import as_fusion_set
from neurofuse.errors import IncompatibleModelsError
from neurofuse.levels import fold_batchnorm
from neurofuse.methods import get_method, list_methods
from neurofuse.models import make_model

from ..levels.user_models import BranchNet, MobileNetV2


def _net(model: nn.Module, shape=(3, 16, 16)):
    return neurofuse.levels_from(model.eval(), input_shape=shape)


def _data(n: int = 96, shape=(3, 16, 16), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_blocks_and_depthwise_levels_are_fitted_in_steps_and_reported():
    torch.manual_seed(0)
    nets = [_net(MobileNetV2()) for _ in range(2)]
    result = neurofuse.fuse(nets, _data(), method="kf-linear", progress=False, return_result=True)
    steps = {r["level"]: [(s["kind"], s["space"]) for s in r.get("steps", [])] for r in result.report}
    assert steps[1] == [("depthwise", "in"), ("residual", "in")]
    assert steps[3] == [("depthwise", "in")]
    assert steps[5] == [("new", "h0"), ("depthwise", "h0"), ("residual", "in")]
    assert steps[0] == []                                     # a single layer: one pass
    assert len(result.correspondences) == nets[0].num_levels - 1
    assert all(c.covered().all() for c in result.correspondences)
    # a tied level keeps the grouping of the level it is tied to
    assert np.array_equal(result.correspondences[1].labels, result.correspondences[0].labels)


def test_a_concatenation_is_grouped_part_by_part():
    torch.manual_seed(1)
    nets = [_net(BranchNet()) for _ in range(3)]
    result = neurofuse.fuse(nets, _data(), method="kf-linear", progress=False, return_result=True)
    corr = result.correspondences[1]
    labels = np.split(corr.labels, np.cumsum(corr.widths)[:-1])
    for lab in labels:                                        # parts of 6 and 10 channels
        assert (lab[:6] < 6).all() and (lab[6:] >= 6).all()
    assert [(s["kind"], s["space"]) for s in result.report[1]["steps"]] == [("new", "out0"), ("new", "out1")]


@pytest.mark.parametrize("method", ["kf-linear", "otfusion"])
def test_n_models_of_different_weights_fuse(method):
    torch.manual_seed(2)
    nets = [_net(MobileNetV2()) for _ in range(3)]
    x, y = _data()
    fused = neurofuse.fuse(nets, (x, y), method=method, progress=False)
    out = fused(x[:8])
    assert out.shape == (8, 10) and torch.isfinite(out).all()


def test_the_zoo_resnet_is_compressed_by_the_closed_form(digits):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(make_model("resnet", "tiny", digits.input_shape, 10).eval())
    x, y = digits.x_train[:128], digits.y_train[:128]
    result = neurofuse.fuse(models, (x, y), method="kf-linear", width=0.5, progress=False, return_result=True)
    widths = result.model.level_widths()
    assert widths[:-1] == [max(1, round(w * 0.5)) for w in models[0].level_widths()[:-1]]
    assert torch.isfinite(result.model(x[:8])).all()
    assert all(c.covered().all() for c in result.correspondences)


class GroupedNet(nn.Module):
    """A ResNeXt-style grouped convolution (two groups of four channels)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.stem(x))))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("method", [n for n in list_methods() if get_method(n).fuses_levels])
def test_a_grouped_convolution_is_refused_by_name_before_any_importance(method, monkeypatch):
    cls = get_method(method)
    torch.manual_seed(0)
    nets = [_net(GroupedNet()) for _ in range(2)]
    reasons = [cls.check_level(nets[0], i) for i in range(nets[0].num_levels)]
    calls = []
    import neurofuse.methods._base as base

    real = base.importance_sums
    monkeypatch.setattr(base, "importance_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = _data()
    kw = {"levels": {"epochs": 1}, "head": {"epochs": 1}} if method == "kf-gradient" else {}
    if method == "kf-gradient":
        assert not any(reasons)
        assert torch.isfinite(neurofuse.fuse(nets, (x, y), method=method, progress=False, **kw)(x[:4])).all()
        return
    assert reasons[0] is None and "grouped convolution (groups=2" in reasons[1]
    with pytest.raises(IncompatibleModelsError, match=r"cannot fuse level 1 \(relu -> grouped\).*grouped convolution"):
        neurofuse.fuse(nets, (x, y), method=method, progress=False, **kw,
                       importance="conductance" if cls.uses_importance else "uniform")
    assert not calls


def test_the_one_pass_statistics_refuse_a_level_fitted_in_steps():
    torch.manual_seed(0)
    nets = [fold_batchnorm(_net(MobileNetV2())) for _ in range(2)]
    fusion = get_method("kf-linear")(progress=False)
    assert fusion.one_pass(nets[0].levels[0]) and not fusion.one_pass(nets[0].levels[1])
    _, fused, _ = fusion.setup(fusion.Run(fusion, nets, None))
    x, _ = _data(16)
    with fusion.stream(as_fusion_set(x, 16), 3) as stream:
        stream.advance({0: fused.levels[0], 1: nets[0].levels[0], 2: nets[1].levels[0]})
        with pytest.raises(IncompatibleModelsError, match="level 1 is fitted one layer at a time"):
            fusion.level_statistics(1, nets, fused, stream)
