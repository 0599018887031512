"""Git Re-Basin weight matching: no data, permutations recovered, the same function back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.errors import IncompatibleModelsError
from neurofuse.methods import WeightMatching, get_method
from neurofuse.models import MLP, VGG, ResNet
from neurofuse.testing import permute_hidden

from .permuted import permute_spaces, randomise_batchnorm


def test_registered_and_needs_no_data():
    assert "weight-matching" in neurofuse.methods() and get_method("weight-matching") is WeightMatching
    assert WeightMatching.needs_data is False


def test_fusing_a_model_with_itself_gives_it_back(trained_mlp, digits):
    fused = neurofuse.fuse([trained_mlp, trained_mlp], None, method="weight-matching", progress=False)
    for p, q in zip(fused.parameters(), trained_mlp.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet"])
def test_a_permuted_copy_gives_back_the_same_function(arch, digits):
    torch.manual_seed(0)
    model = {"mlp": lambda: MLP(digits.input_shape, 10, [24, 16]),
             "vgg": lambda: VGG(digits.input_shape, 10, width_multiplier=0.0625),
             "resnet": lambda: randomise_batchnorm(ResNet(digits.input_shape, 10, depth=20, width_multiplier=0.25), 0),
             }[arch]().eval()
    twin, _ = permute_spaces(model, seed=1)
    x = digits.x_test[:64]
    with torch.no_grad():
        assert (twin(x) - model(x)).abs().max() < 1e-4  # the copy is the same function
        fused = neurofuse.fuse([model, twin], None, method="weight-matching", progress=False)
        assert (fused(x) - model(x)).abs().max() < 1e-4


def test_finds_the_permutation_of_a_permuted_copy_with_noise(digits):
    """Model B = A permuted plus noise: the correspondences pair every neuron of A with its copy."""
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, [32, 24]).eval()
    twin = permute_hidden(model, seed=2)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.02 * torch.randn_like(p))
    result = WeightMatching(progress=False).run([model, twin], None)
    first = model.levels[0][1].weight.detach()
    second = twin.levels[0][1].weight.detach()
    for lvl, n in enumerate([32, 24]):
        assert result.correspondences[lvl].is_hard
        g = result.correspondences[lvl].normalized()
        assert g.shape == (n, 2 * n) and np.allclose(g.sum(1), 1.0)
        assert np.allclose(g[:, :n], 0.5 * np.eye(n))
        found = g[:, n:].argmax(1)
        if lvl == 0:
            assert torch.allclose(second[found], first, atol=0.1)


def test_equal_widths_only_and_fuses_more_than_two_models(digits):
    torch.manual_seed(0)
    a = MLP(digits.input_shape, 10, [16]).eval()
    with pytest.raises(IncompatibleModelsError, match="equal widths"):
        neurofuse.fuse([a, MLP(digits.input_shape, 10, [20])], None, method="weight-matching", progress=False)
    three = neurofuse.fuse([a, permute_hidden(a, seed=1), permute_hidden(a, seed=2)], None,
                           method="weight-matching", progress=False)
    x = digits.x_test[:32]
    with torch.no_grad():
        assert (three(x) - a(x)).abs().max() < 1e-4


def test_repair_uses_the_recorded_correspondences(digits_fusion):
    torch.manual_seed(0)
    a, b = (MLP((1, 8, 8), 10, [24]).eval() for _ in range(2))
    fused = neurofuse.fuse([a, b], digits_fusion, method="weight-matching", repair=True, progress=False)
    assert torch.isfinite(fused(digits_fusion[0])).all()
