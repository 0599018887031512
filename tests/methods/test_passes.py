"""Each level-wise method runs each base model once over the fusion set (the limit), importance
aside, and Conductance for every level costs at most (steps + 2) passes per model."""

import pytest
import torch

import neurofuse
from neurofuse.models import MLP, VGG, ResNet


def _count_passes(models, n):
    counts = [0] * len(models)
    handles = []
    for i, m in enumerate(models):
        def hook(mod, inp, _o, i=i, own=m.levels[0]):
            if mod is own:  # a fused model cloned from this one carries a copy of the hook
                counts[i] += inp[0].shape[0]
        handles.append(m.levels[0].register_forward_hook(hook))
    return counts, handles


def _pairs(digits):
    torch.manual_seed(0)
    return {
        "mlp": [MLP(digits.input_shape, 10, [16, 12, 8]) for _ in range(2)],
        "vgg": [VGG(digits.input_shape, 10, width_multiplier=0.125) for _ in range(2)],
        "resnet": [ResNet.preset("tiny", digits.input_shape, 10) for _ in range(2)],
    }


@pytest.mark.parametrize("arch,method", [
    ("mlp", "kf-linear"), ("mlp", "hf-linear"), ("mlp", "otfusion"), ("mlp", "git-rebasin"),
    ("mlp", "kf-gradient"), ("vgg", "kf-linear"), ("vgg", "otfusion"), ("vgg", "git-rebasin"),
    ("resnet", "git-rebasin"), ("resnet", "kf-gradient"), ("vgg", "hf-linear"),
])
def test_every_base_model_runs_once_over_the_fusion_set(arch, method, digits, digits_fusion):
    models = _pairs(digits)[arch]
    x, y = digits_fusion[0][:120], digits_fusion[1][:120]
    counts, handles = _count_passes(models, len(x))
    opts = {"levels": {"epochs": 1}, "head": {"epochs": 1}} if method == "kf-gradient" else {}
    try:
        neurofuse.fuse(models, (x, y), method=method, progress=False, batch_size=50, **opts)
    finally:
        for h in handles:
            h.remove()
    passes = [c / len(x) for c in counts]
    assert max(passes) <= 1.2, passes


def test_conductance_for_every_level_costs_at_most_steps_plus_two_passes(digits, digits_fusion):
    models = _pairs(digits)["vgg"]
    x, y = digits_fusion[0][:60], digits_fusion[1][:60]
    counts, handles = _count_passes(models, len(x))
    try:
        neurofuse.fuse(models, (x, y), method="kf-linear", importance="conductance", progress=False)
    finally:
        for h in handles:
            h.remove()
    steps = 10
    assert max(c / len(x) for c in counts) <= (steps + 2) + 1  # attribution + the fusion pass
