"""CCA Merge: gives back a model fused with itself or a permuted copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.errors import IncompatibleModelsError
from neurofuse.methods import CCAMerge, get_method
from neurofuse.models import MLP, ResNet

from .permuted import permute_spaces, randomise_batchnorm


def test_registered():
    assert get_method("cca-merge") is CCAMerge and CCAMerge.needs_data


def test_fusing_a_model_with_itself_gives_it_back(trained_mlp, digits_fusion):
    fused = neurofuse.fuse([trained_mlp, trained_mlp], digits_fusion, method="cca-merge", progress=False)
    for p, q in zip(fused.parameters(), trained_mlp.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet"])
def test_a_permuted_copy_gives_back_the_same_function(arch, digits, digits_fusion, trained_mlp, trained_vgg):
    """Post-activation features include ReLUs dead on the fusion set; the pre-activation
    tie-break keeps them apart, so the function is recovered on test inputs too."""
    model = {"mlp": lambda: trained_mlp, "vgg": lambda: trained_vgg,
             "resnet": lambda: randomise_batchnorm(ResNet(digits.input_shape, 10, depth=20, width_multiplier=0.25), 0),
             }[arch]()
    twin, _ = permute_spaces(model, seed=1)
    fused = neurofuse.fuse([model, twin], digits_fusion, method="cca-merge", progress=False)
    x = digits.x_test[:128]
    with torch.no_grad():
        assert float((fused(x) - model(x)).abs().max()) < 1e-3
    assert fused.state_dict().keys() == model.state_dict().keys()  # BatchNorms written back


def test_three_models_correspondences_and_equal_widths(trained_mlp, digits, digits_fusion):
    twins = [permute_spaces(trained_mlp, seed=s)[0] for s in (1, 2)]
    result = CCAMerge(progress=False).run([trained_mlp, *twins], digits_fusion)
    fused = result.model
    with torch.no_grad():
        assert float((fused(digits.x_test[:64]) - trained_mlp(digits.x_test[:64])).abs().max()) < 1e-3
    mats = [c.normalized() for c in result.correspondences]
    assert [g.shape for g in mats] == [(32, 96), (24, 72)]
    assert all(np.allclose(g.sum(1), 1.0) for g in mats)
    with pytest.raises(IncompatibleModelsError, match="equal widths"):
        neurofuse.fuse([trained_mlp, MLP(digits.input_shape, 10, [16, 24])], digits_fusion, method="cca-merge",
                       progress=False)
