"""RegMean, plain and aligned: least squares on every model's own inputs; aligned copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import neurofuse
from neurofuse.errors import ConfigError, IncompatibleModelsError
from neurofuse.methods import AlignedRegMean, RegMean, get_method
from neurofuse.models import MLP

from .permuted import permute_spaces


def _linear(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("bias", ["fit", "average"])
def test_two_linear_models_give_the_least_squares_solution(bias, digits_fusion):
    a, b = _linear(0), _linear(1)
    x = digits_fusion[0].reshape(len(digits_fusion[0]), -1).double().numpy()
    fused = neurofuse.fuse([a, b], digits_fusion, method="regmean", bias=bias, progress=False)
    ws = [m[1].weight.detach().double().numpy() for m in (a, b)]
    bs = [m[1].bias.detach().double().numpy() for m in (a, b)]
    if bias == "fit":
        design = np.concatenate([x, np.ones((len(x), 1))], 1)
        targets = np.concatenate([x @ w.T + c for w, c in zip(ws, bs)])
        sol = np.linalg.lstsq(np.concatenate([design, design]), targets, rcond=None)[0].T
        want_w, want_b = sol[:, :-1], sol[:, -1]
    else:
        targets = np.concatenate([x @ w.T for w in ws])
        want_w = np.linalg.lstsq(np.concatenate([x, x]), targets, rcond=None)[0].T
        want_b = (bs[0] + bs[1]) / 2
    # some pixels are constant on the fusion set, so the weights are determined only up to the
    # null space of the design matrix: compare the fitted outputs (and the averaged biases)
    got_w, got_b = fused[1].weight.detach().double().numpy(), fused[1].bias.detach().double().numpy()
    assert np.allclose(x @ got_w.T + got_b, x @ want_w.T + want_b, atol=1e-4)
    if bias == "average":
        assert np.allclose(got_b, want_b, atol=1e-6)


@pytest.mark.parametrize("bias", ["fit", "average"])
def test_a_conv1d_layer_is_merged_as_the_linear_layer_it_computes(bias, digits_fusion):
    """GPT-2's ``Conv1D`` stores its weight ``[in, out]``: RegMean merges it like the ``Linear``
    with the transposed weight (on each model's own inputs: not the mean of the weights), and
    writes the result back in the ``Conv1D``'s layout."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    def pair(seed):
        torch.manual_seed(seed)
        lin = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
        conv = Conv1D(10, 16)
        with torch.no_grad():
            conv.weight.copy_(lin[3].weight.T)
            conv.bias.copy_(lin[3].bias)
        return lin, nn.Sequential(lin[0], lin[1], lin[2], conv).eval()

    (la, ca), (lb, cb) = pair(0), pair(1)
    lin = neurofuse.fuse([la, lb], digits_fusion, method="regmean", bias=bias, progress=False)
    conv = neurofuse.fuse([ca, cb], digits_fusion, method="regmean", bias=bias, progress=False)
    assert conv[3].weight.shape == (16, 10)
    assert torch.allclose(conv[3].weight.T, lin[3].weight, atol=1e-5)
    assert torch.allclose(conv[3].bias, lin[3].bias, atol=1e-5)
    assert not torch.allclose(conv[3].weight, (ca[3].weight + cb[3].weight) / 2, atol=1e-3)


def test_each_hidden_layer_is_fitted_on_each_models_own_inputs(digits_fusion):
    """Level 1 of two MLPs: the regression runs on relu(h_k) of model k, not on a shared input."""
    torch.manual_seed(0)
    a, b = (MLP((1, 8, 8), 10, [12]).eval() for _ in range(2))
    fused = neurofuse.fuse([a, b], digits_fusion, method="regmean", bias="fit", progress=False)
    with torch.no_grad():
        hs = [torch.relu(m.forward_until(digits_fusion[0], 0)).double().numpy() for m in (a, b)]
    design = [np.concatenate([h, np.ones((len(h), 1))], 1) for h in hs]
    targets = [d @ np.concatenate([m.levels[1][1].weight.detach().double().numpy(),
                                   m.levels[1][1].bias.detach().double().numpy()[:, None]], 1).T
               for d, m in zip(design, (a, b))]
    sol = np.linalg.lstsq(np.concatenate(design), np.concatenate(targets), rcond=None)[0].T
    assert np.allclose(fused.levels[1][1].weight.detach().numpy(), sol[:, :-1], atol=1e-4)
    assert np.allclose(fused.levels[1][1].bias.detach().numpy(), sol[:, -1], atol=1e-4)


def test_fusing_a_model_with_itself_gives_it_back(trained_mlp, trained_vgg, digits_fusion):
    for model in (trained_mlp, trained_vgg):
        fused = neurofuse.fuse([model, model], digits_fusion, method="regmean", progress=False)
        for p, q in zip(fused.parameters(), model.parameters()):
            assert torch.allclose(p, q, atol=1e-5)


@pytest.mark.parametrize("align", ["activations", "weights"])
def test_aligned_regmean_gives_back_the_function_of_a_permuted_copy(align, trained_mlp, trained_vgg, digits,
                                                                      digits_fusion):
    for model in (trained_mlp, trained_vgg):
        twin, _ = permute_spaces(model, seed=3)
        fused = neurofuse.fuse([model, twin], digits_fusion, method="regmean-aligned", align=align,
                               progress=False)
        with torch.no_grad():
            assert float((fused(digits.x_test[:64]) - model(digits.x_test[:64])).abs().max()) < 1e-4


def test_which_is_which_and_what_is_refused(trained_mlp, digits_fusion):
    assert get_method("regmean") is RegMean and not RegMean.fuses_levels
    with pytest.raises(ConfigError, match="unknown option"):
        RegMean(align="weights")  # merges the models as they are: use regmean-aligned to align
    assert get_method("regmean-aligned") is AlignedRegMean and AlignedRegMean.Options().align == "activations"
    with pytest.raises(ConfigError, match="option 'align' must be one of 'activations', 'weights'"):
        AlignedRegMean(align="none")
    result = RegMean(progress=False).run([trained_mlp, permute_spaces(trained_mlp, seed=1)[0]], digits_fusion)
    # unaligned: fused neuron j is neuron j of both models
    assert [c.normalized().shape for c in result.correspondences] == [(32, 64), (24, 48)]
    assert np.allclose(result.correspondences[0].normalized()[:, 32:], 0.5 * np.eye(32))
    with pytest.raises(IncompatibleModelsError, match="identical architectures"):
        neurofuse.fuse([trained_mlp, MLP((1, 8, 8), 10, [16, 24])], digits_fusion, method="regmean", progress=False)
