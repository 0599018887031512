"""fold_batchnorm: function preserved (1e-5), original untouched, and the linear methods fold BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neurofuse
from neurofuse.errors import IncompatibleModelsError
from neurofuse.levels import fold_batchnorm, has_batchnorm, levels_from, split_affine
from neurofuse.models import ResNet


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)), (4, 3, 5, 5)),
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6)), (4, 3, 7, 7)),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5)), (4, 3, 2, 2)),
    (lambda: nn.Sequential(nn.ReLU(), nn.Linear(12, 5, bias=False), nn.BatchNorm1d(5)), (4, 12)),
])
def test_folding_preserves_the_function(make, shape):
    torch.manual_seed(0)
    net = _randomize_bn(make())
    x = torch.randn(*shape)
    folded = fold_batchnorm(net)
    assert not has_batchnorm(folded) and has_batchnorm(net), "the original must be untouched"
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
    pre, affine = split_affine(folded)
    assert affine.bias is not None


def test_folding_a_resnet_preserves_its_function_and_leaves_only_the_unfoldable():
    torch.manual_seed(0)
    net = _randomize_bn(ResNet((1, 8, 8), 10, 20, width_multiplier=0.5))
    folded = fold_batchnorm(net)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
    assert isinstance(folded, ResNet) and not has_batchnorm(folded)
    split_affine(folded.levels[0])          # the stem is now affine
    with pytest.raises(IncompatibleModelsError, match="kf-gradient"):
        split_affine(folded.levels[1])      # a residual block never is


def test_bn_without_running_stats_cannot_be_folded():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(IncompatibleModelsError, match="running statistics"):
        fold_batchnorm(net)


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.block1(x))
        x = nn.functional.max_pool2d(torch.relu(self.block2(x)), 2)
        return self.fc(x.flatten(1))


def _declared(seed: int):
    torch.manual_seed(seed)
    model = _randomize_bn(_ConvBN(), seed)
    return levels_from(model, ["block1", [torch.relu, "block2"],
                                      [torch.relu, nn.MaxPool2d(2), nn.Flatten(), "fc"]],
                       input_shape=(1, 8, 8))


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_linear_methods_fold_batchnorm_first(method, digits_fusion):
    """A permuted copy is not needed: fusing a BN model with itself must give its function back,
    which fails if BN is not folded (split_affine refuses [Conv2d, BatchNorm2d])."""
    net = _declared(0)
    fused = neurofuse.fuse([net, net], digits_fusion, method=method, progress=False)
    assert not has_batchnorm(fused) and has_batchnorm(net)
    x = digits_fusion[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), atol=1e-3, rtol=1e-3)
