"""Neuron importance: shapes, positivity, and that attribution follows the labels."""

import pytest
import torch

from neurofuse import FusionSet
from neurofuse.errors import ConfigError, DataError
from neurofuse.importance import importance_methods, neuron_importance


def test_registry_lists_the_three_scores():
    assert {"uniform", "conductance", "deeplift"} <= set(importance_methods())


@pytest.mark.parametrize("method", ["uniform", "conductance", "deeplift"])
@pytest.mark.parametrize("arch", ["trained_mlp", "trained_vgg"])
def test_scores_have_one_positive_entry_per_neuron(method, arch, request, digits_fusion):
    model = request.getfixturevalue(arch)
    fs = FusionSet(digits_fusion[0][:60], digits_fusion[1][:60], batch_size=25)
    for level in range(model.num_levels - 1):
        s = neuron_importance(model, level, fs, method)
        assert s.shape == (model.level_widths()[level],)
        assert (s > 0).all()


def test_a_dead_neuron_gets_the_lowest_conductance(trained_mlp, digits_fusion):
    m = trained_mlp.clone()
    with torch.no_grad():
        m.levels[1][1].weight[:, 3] = 0.0  # neuron 3 of level 0 no longer reaches the output
    fs = FusionSet(*digits_fusion)
    s = neuron_importance(m, 0, fs, "conductance")
    assert int(s.argmin()) == 3


def test_attribution_needs_labels_and_known_names(trained_mlp, digits_fusion):
    with pytest.raises(DataError, match="needs labels"):
        neuron_importance(trained_mlp, 0, FusionSet(digits_fusion[0]), "deeplift")
    with pytest.raises(ConfigError, match="unknown importance"):
        neuron_importance(trained_mlp, 0, FusionSet(*digits_fusion), "shapley")
