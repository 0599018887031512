"""HF/KF Linear: permutation recovery, widths, and one-line errors on bad input."""

import pytest
import torch

import neurofuse
from neurofuse.errors import ConfigError, DataError, IncompatibleModelsError
from neurofuse.models import MLP
from neurofuse.testing import permute_hidden


def _max_diff(a, b, x):
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


@pytest.mark.parametrize("method", ["hf-linear", "kf-linear"])
@pytest.mark.parametrize("arch", ["trained_mlp", "trained_vgg"])
def test_fusing_a_model_with_its_permuted_copy_gives_back_the_same_function(
        method, arch, request, digits, digits_fusion):
    model = request.getfixturevalue(arch)
    twin = permute_hidden(model, seed=1)
    assert _max_diff(model, twin, digits.x_test) < 1e-4  # the permutation itself is exact
    fused = neurofuse.fuse([model, twin], digits_fusion, method=method, progress=False)
    assert _max_diff(fused, model, digits_fusion[0]) < 1e-4
    assert _max_diff(fused, model, digits.x_test) < 1e-4


def test_kf_linear_fuses_models_of_different_widths_into_a_chosen_width(digits, digits_fusion):
    torch.manual_seed(0)
    models = [MLP(digits.input_shape, 10, [w]) for w in (8, 12, 16)]
    fused = neurofuse.fuse(models, digits_fusion, method="kf-linear", width=[10], progress=False)
    assert fused.level_widths() == [10, 10]
    fused = neurofuse.fuse(models, digits_fusion, method="kf-linear", width=0.5, progress=False)
    assert fused.level_widths() == [4, 10]


def test_importance_scores_are_accepted_by_the_linear_methods(trained_mlp, digits_fusion):
    twin = permute_hidden(trained_mlp, seed=2)
    for imp in ("conductance", "deeplift"):
        fused = neurofuse.fuse([trained_mlp, twin], digits_fusion, method="kf-linear", importance=imp,
                               progress=False)
        assert _max_diff(fused, trained_mlp, digits_fusion[0]) < 1e-4


# ---- bad input: one-line errors -------------------------------------------------------------

def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)


def test_models_with_different_level_counts_are_refused(digits, digits_fusion):
    a, b = MLP(digits.input_shape, 10, [8]), MLP(digits.input_shape, 10, [8, 8])
    with pytest.raises(IncompatibleModelsError, match="levels") as e:
        neurofuse.fuse([a, b], digits_fusion, progress=False)
    _one_line(e)


def test_models_with_different_input_shapes_are_refused(digits_fusion):
    a, b = MLP((1, 8, 8), 10, [8]), MLP((1, 4, 16), 10, [8])
    with pytest.raises(IncompatibleModelsError, match="inputs of shape"):
        neurofuse.fuse([a, b], digits_fusion, progress=False)


def test_hungarian_with_three_models_or_unequal_widths_is_refused(digits, digits_fusion):
    ms = [MLP(digits.input_shape, 10, [8]) for _ in range(3)]
    with pytest.raises(IncompatibleModelsError, match="at most 2") as e:
        neurofuse.fuse(ms, digits_fusion, method="hf-linear", progress=False)
    _one_line(e)
    with pytest.raises(IncompatibleModelsError, match="equal widths"):
        neurofuse.fuse([ms[0], MLP(digits.input_shape, 10, [9])], digits_fusion, method="hf-linear",
                       progress=False)


def test_a_fused_width_larger_than_the_neurons_available_is_refused(digits, digits_fusion):
    ms = [MLP(digits.input_shape, 10, [8]) for _ in range(2)]
    with pytest.raises(IncompatibleModelsError, match="larger than the 16 neurons") as e:
        neurofuse.fuse(ms, digits_fusion, method="kf-linear", width=[17], progress=False)
    _one_line(e)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused(digits, digits_fusion, bad):
    ms = [MLP(digits.input_shape, 10, [8]) for _ in range(2)]
    with torch.no_grad():
        ms[1].levels[0][1].weight[0, 0] = bad
    for method in ("kf-linear", "vanilla"):
        with pytest.raises(IncompatibleModelsError, match="NaN or infinite") as e:
            neurofuse.fuse(ms, digits_fusion, method=method, progress=False)
        _one_line(e)


def test_an_empty_fusion_set_is_refused(digits):
    ms = [MLP(digits.input_shape, 10, [8]) for _ in range(2)]
    empty = (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty fusion set") as e:
        neurofuse.fuse(ms, empty, progress=False)
    _one_line(e)


def test_inputs_of_the_wrong_shape_are_refused(digits):
    ms = [MLP(digits.input_shape, 10, [8]) for _ in range(2)]
    with pytest.raises(DataError, match=r"shape \[1, 28, 28\] per sample") as e:
        neurofuse.fuse(ms, (torch.zeros(5, 1, 28, 28), torch.zeros(5, dtype=torch.long)),
                       progress=False)
    _one_line(e)


def test_unknown_method_option_and_width_zero_are_config_errors(digits, digits_fusion):
    ms = [MLP(digits.input_shape, 10, [8]) for _ in range(2)]
    with pytest.raises(ConfigError, match="unknown fusion method 'nope'"):
        neurofuse.fuse(ms, digits_fusion, method="nope")
    with pytest.raises(ConfigError, match="unknown option"):
        neurofuse.fuse(ms, digits_fusion, method="kf-linear", n_clusters=3)
    with pytest.raises(ConfigError, match="at least 1"):
        neurofuse.fuse(ms, digits_fusion, method="kf-linear", width=[0], progress=False)
    with pytest.raises(ConfigError, match="does not use importance"):
        neurofuse.fuse(ms, digits_fusion, method="vanilla", importance="conductance")


def test_vanilla_of_a_model_with_itself_is_itself(trained_mlp, digits):
    fused = neurofuse.fuse([trained_mlp, trained_mlp], method="vanilla", progress=False)
    assert _max_diff(fused, trained_mlp, digits.x_test) < 1e-6


def test_ensemble_returns_log_probabilities_of_the_mean_softmax(trained_mlp, digits):
    twin = permute_hidden(trained_mlp, seed=3)
    ens = neurofuse.fuse([trained_mlp, twin], method="ensemble", progress=False)
    with torch.no_grad():
        out = ens(digits.x_test)
        ref = torch.log_softmax(trained_mlp(digits.x_test), -1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_models_whose_spatial_sizes_differ_are_refused():
    from neurofuse.models import VGG

    a = VGG((1, 8, 8), 10, layout=[4, "M", 4])
    b = VGG((1, 8, 8), 10, layout=[4, 4, "M"])
    with pytest.raises(IncompatibleModelsError, match="spatial sizes differ") as e:
        neurofuse.fuse([a, b], (torch.zeros(10, 1, 8, 8), torch.zeros(10, dtype=torch.long)),
                       progress=False)
    _one_line(e)


def test_any_parameter_free_module_may_precede_the_affine_layer():
    from neurofuse.levels import split_affine

    level = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Unflatten(1, (2, 4)), torch.nn.Flatten(1),
                                torch.nn.Linear(8, 3))
    pre, affine = split_affine(level)
    assert isinstance(affine, torch.nn.Linear)
    with pytest.raises(IncompatibleModelsError, match="kf-gradient"):
        split_affine(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)))


@pytest.mark.parametrize("options", [{}, {"prior": False}, {"ridge": 0.1}])
def test_the_first_level_skips_the_solve_only_where_it_is_exact(trained_mlp, digits_fusion, options):
    """Level 0 reads the shared model input: with the prior its least-squares weights are the
    base weights, whatever the ridge (shrinking toward the prior leaves them there), so no X^T A
    is accumulated there; the result is the same function as the general solve (checked against
    the method with the shortcut disabled)."""
    from neurofuse.methods import get_method
    from neurofuse.methods._levelwise import KMeansLinearFusion

    twin = permute_hidden(trained_mlp, seed=3)
    method = get_method("kf-linear")(seed=0, progress=False, **options)
    nets = [trained_mlp, twin]
    shared = [method.shares_inputs(lvl, nets, trained_mlp) for lvl in range(trained_mlp.num_levels)]
    assert shared == [options.get("prior", True), *([False] * (trained_mlp.num_levels - 1))]
    fused = neurofuse.fuse(nets, digits_fusion, method="kf-linear", progress=False, **options)
    general = KMeansLinearFusion(seed=0, progress=False, **options)
    general.shares_inputs = lambda *a: False          # type: ignore[method-assign]
    ref = general.fuse(nets, digits_fusion)
    assert _max_diff(fused, ref, digits_fusion[0]) < 1e-3
