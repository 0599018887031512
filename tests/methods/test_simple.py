"""The simple registry entries: base models, vanilla averaging, ensembles."""

import pytest
import torch

import neurofuse
from neurofuse.errors import ConfigError, IncompatibleModelsError
from neurofuse.models import MLP


def test_base_returns_a_copy_of_the_chosen_model():
    ms = [MLP((1, 8, 8), 10, [8]) for _ in range(3)]
    out = neurofuse.fuse(ms, method="base", index=2)
    assert out is not ms[2]
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), ms[2].state_dict().values()))
    with pytest.raises(ConfigError, match="out of range"):
        neurofuse.fuse(ms, method="base", index=3)


def test_vanilla_is_the_elementwise_mean():
    ms = [MLP((1, 8, 8), 10, [8]) for _ in range(3)]
    out = neurofuse.fuse(ms, method="vanilla")
    w = torch.stack([m.levels[0][1].weight for m in ms]).mean(0)
    assert torch.allclose(out.levels[0][1].weight, w, atol=1e-7)


def test_vanilla_refuses_different_widths_naming_the_tensor():
    with pytest.raises(IncompatibleModelsError, match="levels.0.1.weight"):
        neurofuse.fuse([MLP((1, 8, 8), 10, [8]), MLP((1, 8, 8), 10, [9])], method="vanilla")


def test_class_weighted_ensemble_follows_the_model_that_saw_the_class():
    a, b = MLP((1, 8, 8), 3, [4]), MLP((1, 8, 8), 3, [4])
    with torch.no_grad():
        for m, c in ((a, 0), (b, 1)):
            for p in m.parameters():
                p.zero_()
            m.levels[1][1].bias[c] = 5.0   # a predicts class 0, b predicts class 1
    x = torch.zeros(2, 1, 8, 8)
    weights = [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]  # model a saw only class 0, b only class 1
    ens = neurofuse.fuse([a, b], method="ensemble", class_weights=weights)
    p = ens(x).exp()
    assert torch.allclose(p.sum(-1), torch.ones(2))
    plain = neurofuse.fuse([a, b], method="ensemble")(x).exp()
    assert p[0, 2] < plain[0, 2]  # class 2 loses the mass neither model claims


def test_fusion_leaves_the_callers_models_in_their_mode():
    ms = [MLP((1, 8, 8), 10, [8]) for _ in range(2)]
    ms[0].train()
    ms[1].eval()
    x = (torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,)))
    neurofuse.fuse(ms, x, method="kf-linear", progress=False)
    assert ms[0].training and not ms[1].training


def test_neurofuse_methods_is_callable_and_a_package():
    import neurofuse.methods._levelwise as lw

    assert "kf-linear" in neurofuse.methods()
    assert neurofuse.methods.get_method("kf-linear") is lw.KMeansLinearFusion
