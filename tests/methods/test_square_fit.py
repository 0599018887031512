"""No cliff where the fusion set has as many samples as a level has inputs (issue 23).

Two MNIST MLPs 784-128-128-128-10 (bias-free, IID halves of 20,000 training images, 3 epochs):
with 128 fusion samples the least-squares fit of every hidden level after the first is square,
and the pseudo-inverse interpolates (measured: kf-linear 53-60 %, hf-linear 66-82 % where 256
samples give 90 %).  The default ``ridge="auto"`` must stay with the fusion at twice the samples.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.data import balanced_subset, load_dataset, partition, resolve_data_dir
from neurofuse.models import MLP
from neurofuse.training import TrainConfig, evaluate, train_model

WIDTH = 128


@pytest.fixture(scope="module")
def square_case():
    roots = [resolve_data_dir(), Path("/work/shared/data")]     # the development copy, as in tests/data
    root = next((r for r in roots if (r / "mnist").is_dir()), None)
    if root is None:
        pytest.skip(f"real MNIST not available under {roots}")
    ds = load_dataset("mnist", root)
    y = ds.y_train.numpy()
    train = balanced_subset(y, np.arange(len(y)), 20000, seed=1)
    models = []
    for i, part in enumerate(partition(y[train], 2, "iid", seed=0)):
        torch.manual_seed(i)
        m = MLP(ds.input_shape, 10, [WIDTH] * 3, bias=False)
        train_model(m, ds.x_train[train[part]], ds.y_train[train[part]],
                    config=TrainConfig(epochs=3, lr=5e-4, warmup_epochs=1, seed=i))
        models.append(m.eval())
    pool = np.setdiff1d(np.arange(len(y)), train)

    def fusion(n):
        idx = balanced_subset(y, pool, n, seed=0)
        return ds.x_train[idx], ds.y_train[idx]

    def accuracy(model):
        return 100.0 * float(evaluate(model, ds.x_test[:2000], ds.y_test[:2000])["accuracy"])

    return models, fusion, accuracy


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear"])
def test_fusion_with_as_many_samples_as_inputs_is_as_good_as_with_twice_as_many(square_case, method):
    models, fusion, accuracy = square_case
    square, double = fusion(WIDTH), fusion(2 * WIDTH)
    reference = accuracy(neurofuse.fuse(models, double, method=method, progress=False))
    unregularised = accuracy(neurofuse.fuse(models, square, method=method, progress=False, ridge=0.0))
    # the case is hard: the pseudo-inverse (the fit before ridge="auto") falls off the cliff
    assert unregularised < reference - 5.0, (unregularised, reference)
    default = accuracy(neurofuse.fuse(models, square, method=method, progress=False))
    assert default > reference - 1.0, (default, reference)


def test_the_ridge_option_is_auto_by_default_and_names_a_bad_value():
    from neurofuse.errors import ConfigError
    from neurofuse.methods import get_method

    for name in ("kf-linear", "hf-linear"):
        cls = get_method(name)
        assert cls(progress=False).options.ridge == "auto"
        for ok in ("auto", 0, 0.0, 1e-3):
            assert cls(progress=False, ridge=ok).options.ridge == ok
        for bad in ("gcv", -1.0, True, float("nan"), float("inf")):
            with pytest.raises(ConfigError, match="ridge"):
                cls(progress=False, ridge=bad)
