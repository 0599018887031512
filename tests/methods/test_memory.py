"""memory_budget: the working set is estimated before any work, fitted by smaller batches and
spilled level activations, and a fusion that cannot fit is refused with the estimate."""

from __future__ import annotations

import pytest
import torch

import neurofuse
from neurofuse.errors import ConfigError, MemoryBudgetError
from neurofuse.methods import _memory, get_method
from neurofuse.methods._memory import estimate_memory, plan_memory
from neurofuse.models import MLP, VGG


def _models(kind: str, n: int = 2):
    out = []
    for s in range(n):
        torch.manual_seed(s)
        out.append((VGG((1, 8, 8), 10, width_multiplier=0.25) if kind == "vgg" else MLP((1, 8, 8), 10, [32, 24])).eval())
    return out


def _rows_seen(models):
    """Largest batch any level of ``models`` (or a copy made by the method) runs on."""
    seen = [0]

    def hook(module, args):
        seen[0] = max(seen[0], int(args[0].shape[0]))

    handles = [lvl.register_forward_pre_hook(hook) for m in models for lvl in m.levels]
    return seen, handles


@pytest.mark.parametrize("method", ["kf-linear", "otfusion", "vanilla"])
def test_a_fusion_over_the_budget_is_refused_before_any_pass_over_the_fusion_set(method, digits_fusion):
    models = _models("vgg")
    seen, handles = _rows_seen(models)
    with pytest.raises(MemoryBudgetError, match=r"needs at least an estimated [\d.]+ (MiB|GiB) \(.*\).*memory_budget=4096"):
        neurofuse.fuse(models, digits_fusion, method=method, memory_budget=4096, progress=False)
    for h in handles:
        h.remove()
    assert seen[0] <= 1          # the level shapes come from one zero sample, the data was never run


def test_auto_refuses_what_the_machine_cannot_hold_and_none_checks_nothing(digits_fusion, monkeypatch):
    models = _models("mlp")
    monkeypatch.setattr(_memory, "available_memory", lambda device: 1000)
    with pytest.raises(MemoryBudgetError, match="cpu has 0 MiB available.*memory_budget=None"):
        neurofuse.fuse(models, digits_fusion, method="kf-linear", progress=False)
    neurofuse.fuse(models, digits_fusion, method="kf-linear", memory_budget=None, progress=False)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "lots"])
def test_a_bad_budget_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="memory_budget"):
        get_method("kf-linear")(memory_budget=bad)


def test_a_tight_budget_lowers_the_batch_spills_and_gives_the_same_fusion(digits_fusion):
    models = _models("vgg")
    method = get_method("kf-linear")(progress=False)
    from neurofuse._fusion_set import as_fusion_set

    fs = as_fusion_set(digits_fusion, 256)
    roomy = plan_memory(method, models, fs, None)
    fixed, _ = estimate_memory(method, models, len(fs), 1, 0)
    budget = fixed + (roomy.estimate - fixed) // 8
    tight = plan_memory(method, models, fs, budget)
    assert tight.batch_size < 256 and tight.stream_bytes is not None
    assert tight.estimate <= budget < roomy.estimate
    ref = neurofuse.fuse(models, digits_fusion, method="kf-linear", memory_budget=None, progress=False)
    seen, handles = _rows_seen(models)
    got = neurofuse.fuse(models, digits_fusion, method="kf-linear", memory_budget=budget, progress=False)
    for h in handles:
        h.remove()
    assert 1 < seen[0] <= tight.batch_size
    x = digits_fusion[0][:64]
    with torch.no_grad():
        assert torch.allclose(got(x), ref(x), atol=1e-3, rtol=1e-3)


def test_the_closed_form_estimate_grows_with_the_models_and_covers_the_gram_matrix():
    small, big = _models("vgg", 2), _models("vgg", 4)
    method = get_method("kf-linear")()
    e2, p2 = estimate_memory(method, small, 400, 256, None)
    e4, p4 = estimate_memory(method, big, 400, 256, None)
    assert e4 > e2 and p4["algebra"] > p2["algebra"]
    d = max(lv.design for lv in _memory.level_shapes(small))
    assert p2["algebra"] >= d * d * 8        # at least the largest level's float64 Gram matrix


def _vits(n: int = 2):
    from neurofuse.models import ViT

    out = []
    for s in range(n):
        torch.manual_seed(s)
        out.append(ViT((1, 8, 8), 10, patch=4, hidden=32, depth=2, heads=2, mlp_hidden=64).eval())
    return out


@pytest.mark.parametrize("kind", ["mlp", "vgg", "vit"])
def test_every_registered_method_gets_an_estimate_that_a_tiny_budget_refuses(kind):
    """No method is unknown to the estimate (the generic one covers those without their own),
    on dense, conv and transformer levels; a budget below it refuses, before any work."""
    from neurofuse._fusion_set import FusionSet
    from neurofuse.methods import list_methods

    models = _vits() if kind == "vit" else _models(kind)
    fs = FusionSet(torch.zeros(100, 1, 8, 8), None)
    for name in list_methods():
        method = get_method(name)(progress=False)
        data = fs if method.needs_data else None
        plan = plan_memory(method, models, data, None)
        assert plan.estimate >= _memory.RUNTIME and all(v >= 0 for v in plan.parts.values()), name
        with pytest.raises(MemoryBudgetError, match=name):
            plan_memory(method, models, data, 4096)


def test_transformer_levels_count_their_inner_layers_in_the_closed_form_estimate():
    shapes = _memory.level_shapes(_vits())
    block = [lv for lv in shapes if lv.inner_out][0]
    # the widest input: the MLP's output projection (64 + bias); the most outputs: the packed
    # query/key/value projection (3 x 32)
    assert block.design == 64 + 1 and block.inner_out == 3 * 32
    _, parts = estimate_memory(get_method("kf-linear")(), _vits(), 400, 256, None)
    assert parts["algebra"] >= block.design ** 2 * 8


def test_merges_from_per_model_statistics_count_every_models_statistics():
    models = _models("vgg")
    grams = sum(d * d for d, _ in _memory._layers(models[0])) * 8
    _, rm = estimate_memory(get_method("regmean")(), models, 400, 256, None)
    _, al = estimate_memory(get_method("regmean-aligned")(), models, 400, 256, None)
    assert rm["algebra"] >= 2 * grams and al["models"] > rm["models"]
    _, fi = estimate_memory(get_method("fisher")(), models, 400, 256, None)
    size = sum(p.numel() * 4 for p in models[0].parameters())
    assert fi["algebra"] >= 2 * size


def test_a_conv1d_layer_counts_as_the_linear_layer_it_computes():
    """GPT-2's ``Conv1D`` (weight ``[in, out]``) holds a Gram matrix of its inputs in RegMean, as a
    ``Linear`` of the same shape does: both count in the estimate."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv, lin = Conv1D(10, 16), torch.nn.Linear(16, 10)
    assert _memory._layers(torch.nn.Sequential(conv)) == _memory._layers(torch.nn.Sequential(lin)) == ((17, 10),)
