"""A BatchNorm-folded model written back into its original architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neurofuse.errors import IncompatibleModelsError
from neurofuse.levels import fold_batchnorm, unfold_state
from neurofuse.models import MLP, ResNet, build_model


def _randomised(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return model.eval()


def test_unfolding_a_folded_resnet_gives_the_same_function_in_the_original_architecture():
    torch.manual_seed(0)
    model = _randomised(ResNet((1, 8, 8), 10, depth=20, width_multiplier=0.25))
    folded = fold_batchnorm(model)
    with torch.no_grad():  # change the folded weights: the unfolded copy must follow them
        for p in folded.parameters():
            p.add_(0.01 * torch.randn_like(p))
    back = build_model(model.config())
    back.load_state_dict(unfold_state(folded, back))
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(back.eval()(x), folded(x), atol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in back.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_a_model_without_batchnorm_is_copied_and_a_different_architecture_is_refused():
    torch.manual_seed(0)
    mlp = MLP((1, 8, 8), 10, [6])
    state = unfold_state(mlp, MLP((1, 8, 8), 10, [6]))
    assert all(torch.equal(state[k], v) for k, v in mlp.state_dict().items())
    with pytest.raises(IncompatibleModelsError, match="cannot unfold"):
        unfold_state(fold_batchnorm(ResNet((1, 8, 8), 10, depth=20, width_multiplier=0.25)), mlp)
