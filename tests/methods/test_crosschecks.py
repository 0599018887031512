"""Cross-checks between fusion methods that must hold exactly or by theory.

* ``otfusion`` (exact OT, uniform importance) and ``git-rebasin`` on pre-activations with the
  Euclidean distance give the same fused model on two equal-width models (the equivalence noted
  under table 1 of Luenam et al. 2025): for equal widths and uniform marginals the optimal plan is
  a permutation and both minimise the same assignment cost.
* Every aligning method recovers a model from a hidden-neuron-permuted copy of itself.
* ``otfusion`` of three MLPs of different widths beats ``vanilla`` averaging of three equal-width
  MLPs trained the same way (vanilla cannot fuse different widths).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import neurofuse
from neurofuse.methods import get_method
from neurofuse.data import balanced_subset
from neurofuse.models import MLP, VGG
from neurofuse.training import TrainConfig, evaluate, predict_logits, train_model

TOL = 1e-4


def permuted_copy(model, seed: int = 0):
    """A copy of an MLP/VGG whose hidden neurons are permuted at every level (same function)."""
    g = torch.Generator().manual_seed(seed)
    out = model.clone()
    affines = [[m for m in level.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
               for level in out.levels]
    with torch.no_grad():
        for a, nxt in zip(affines[:-1], affines[1:]):
            perm = torch.randperm(a.weight.shape[0], generator=g)
            assert not torch.equal(perm, torch.arange(len(perm)))
            a.weight.copy_(a.weight[perm])
            if a.bias is not None:
                a.bias.copy_(a.bias[perm])
            w = nxt.weight
            if isinstance(nxt, nn.Linear) and w.shape[1] != len(perm):  # after Flatten of [C, H, W]
                w3 = w.reshape(w.shape[0], len(perm), -1)
                nxt.weight.copy_(w3[:, perm].reshape(w.shape))
            else:
                nxt.weight.copy_(w[:, perm])
    return out.eval()


def _train(model, data, seed: int, epochs: int):
    torch.manual_seed(seed)
    train_model(model, data.x_train, data.y_train,
                config=TrainConfig(epochs=epochs, lr=3e-3, batch_size=64, seed=seed))
    return model.eval()




@pytest.fixture(scope="module")
def fusion_set(digits):
    idx = balanced_subset(digits.y_train.numpy(), np.arange(len(digits.y_train)), 400, seed=0)
    return digits.x_train[idx], digits.y_train[idx]


@pytest.fixture(scope="module")
def mlp_pair(digits):
    """Two MLPs with two hidden layers, trained from different seeds."""
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(_train(MLP(digits.input_shape, 10, [32, 24]), digits, seed, 6))
    return models


@pytest.fixture(scope="module")
def small_vgg(digits):
    """A small VGG whose classifier reads a 2x2 feature map (a conv-to-linear transition with
    four positions per channel)."""
    torch.manual_seed(3)
    return _train(VGG(digits.input_shape, 10, layout=[8, "M", 16, "M", 16]), digits, 3, 2)


def _max_diff(a, b, xs):
    return max(float((predict_logits(a, x) - predict_logits(b, x)).abs().max()) for x in xs)


# -- otfusion == git-rebasin on pre-activations ----------------------------------------------
@pytest.mark.parametrize("ground_metric,metric", [("euclidean", "distance"),
                                                  ("sqeuclidean", "sqdistance")])
@pytest.mark.parametrize("arch", ["mlp", "vgg"])
def test_otfusion_equals_git_rebasin_on_pre_activations(arch, ground_metric, metric, mlp_pair,
                                                        small_vgg, fusion_set, digits):
    if arch == "mlp":
        a, b = mlp_pair
    else:  # a second VGG: the first one with other weights, as independent as a retrain
        a, b = small_vgg, small_vgg.clone()
        torch.manual_seed(11)
        with torch.no_grad():
            for p in b.parameters():
                p.add_(0.3 * p.std() * torch.randn_like(p))
            b.load_state_dict(permuted_copy(b, seed=5).state_dict())
    ot = neurofuse.fuse([a, b], fusion_set, method="otfusion", solver="exact",
                        ground_metric=ground_metric, progress=False)
    gr = get_method("git-rebasin")(activations="pre", metric=metric, progress=False)
    res = gr.run([a, b], fusion_set)
    rb = res.model
    # the matching is not trivial (otherwise both would just be vanilla averaging)
    assert any(p is not None and not np.array_equal(p, np.arange(len(p))) for p in res.extras["permutations"])
    for (k1, v1), (k2, v2) in zip(ot.state_dict().items(), rb.state_dict().items()):
        assert k1 == k2
        assert torch.allclose(v1, v2, atol=1e-5), k1
    assert _max_diff(ot, rb, [fusion_set[0], digits.x_test]) < TOL


# -- recovering a model from its permuted copy ------------------------------------------------
@pytest.mark.parametrize("method,options", [
    ("otfusion", {}),
    ("otfusion", {"solver": "sinkhorn", "reg": 1e-3}),
    ("git-rebasin", {}),
    ("git-rebasin", {"metric": "correlation"}),
    ("hf-linear", {}),
    ("kf-linear", {"n_init": 3}),
])
@pytest.mark.parametrize("arch", ["mlp", "vgg"])
def test_recovers_permuted_copy(arch, method, options, mlp_pair, small_vgg, fusion_set, digits):
    model = mlp_pair[0] if arch == "mlp" else small_vgg
    twin = permuted_copy(model, seed=7)
    assert _max_diff(model, twin, [digits.x_test]) < 1e-5  # the permutation keeps the function
    fused = neurofuse.fuse([model, twin], fusion_set, method=method, progress=False, **options)
    assert _max_diff(fused, model, [fusion_set[0], digits.x_test]) < TOL


def test_vanilla_of_a_model_with_itself_is_itself(mlp_pair, small_vgg, digits):
    for model in (mlp_pair[0], small_vgg):
        fused = neurofuse.fuse([model, model.clone()], method="vanilla", progress=False)
        for (k, v), (_, w) in zip(fused.state_dict().items(), model.state_dict().items()):
            assert torch.allclose(v, w, atol=1e-7), k
        assert _max_diff(fused, model, [digits.x_test]) < TOL


def test_vanilla_does_not_recover_a_permuted_copy(mlp_pair, digits):
    """Control: without alignment the permuted copy is *not* recovered, so the tests above can fail."""
    model = mlp_pair[0]
    fused = neurofuse.fuse([model, permuted_copy(model, seed=7)], method="vanilla", progress=False)
    assert _max_diff(fused, model, [digits.x_test]) > 0.1


# -- N models of different widths --------------------------------------------------------------
@pytest.fixture(scope="module")
def three_widths(digits):
    return [_train(MLP(digits.input_shape, 10, [w]), digits, 20 + i, 6)
            for i, w in enumerate((32, 48, 64))]


@pytest.fixture(scope="module")
def three_equal(digits):
    return [_train(MLP(digits.input_shape, 10, [32]), digits, 20 + i, 6) for i in range(3)]


def test_otfusion_three_models_of_different_widths_beats_vanilla(three_widths, three_equal,
                                                                 fusion_set, digits):
    """Baseline: ``vanilla`` averaging of three width-32 MLPs trained exactly like the width
    32/48/64 ones (same seeds, epochs and data); vanilla cannot fuse different widths."""
    fused = neurofuse.fuse(three_widths, fusion_set, method="otfusion", progress=False)
    assert isinstance(fused, MLP) and fused.hidden == [32]  # the anchor's architecture and widths
    assert fused.level_widths() == three_widths[0].level_widths()
    with pytest.raises(neurofuse.IncompatibleModelsError):
        neurofuse.fuse(three_widths, method="vanilla", progress=False)
    vanilla = neurofuse.fuse(three_equal, method="vanilla", progress=False)
    acc_ot = evaluate(fused, digits.x_test, digits.y_test)["accuracy"]
    acc_va = evaluate(vanilla, digits.x_test, digits.y_test)["accuracy"]
    assert acc_ot > acc_va + 0.05, (acc_ot, acc_va)
    assert acc_ot > 0.8
