"""Output-level weights: importance per class, normalised over models, times class shares."""

from __future__ import annotations

import numpy as np
import pytest

from neurofuse.errors import ConfigError
from neurofuse.grouping import output_weights


def test_equal_importance_is_the_mean():
    w = output_weights(3, 4, scores=np.full((3, 4), 7.5))
    np.testing.assert_allclose(w, np.full((3, 4), 1 / 3))


def test_columns_sum_to_one_and_follow_the_scores():
    rng = np.random.default_rng(0)
    s = rng.uniform(0.1, 2, (4, 5))
    w = output_weights(4, 5, scores=s)
    np.testing.assert_allclose(w.sum(0), 1.0)
    np.testing.assert_allclose(w, s / s.sum(0))


def test_zero_importance_on_a_class_contributes_nothing_to_it():
    s = np.ones((2, 3))
    s[1, 2] = 0.0
    w = output_weights(2, 3, scores=s)
    assert w[1, 2] == 0.0 and w[0, 2] == 1.0
    np.testing.assert_allclose(w[:, :2], 0.5)


def test_importance_combines_with_class_shares_as_a_product():
    cw = np.array([[0.9, 0.5], [0.1, 0.5]])
    s = np.array([[1.0, 3.0], [1.0, 1.0]])
    w = output_weights(2, 2, class_weights=cw, scores=s)
    np.testing.assert_allclose(w[:, 0], [0.9, 0.1])
    np.testing.assert_allclose(w[:, 1], [0.75, 0.25])


def test_a_class_no_model_weighs_falls_back_to_the_mean():
    cw = np.array([[0.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(output_weights(2, 2, class_weights=cw)[:, 0], [0.5, 0.5])


@pytest.mark.parametrize("bad", [np.ones((2, 2)), -np.ones((3, 2)), np.full((3, 2), np.nan)])
def test_refuses_bad_shapes_and_values(bad):
    with pytest.raises(ConfigError):
        output_weights(3, 2, class_weights=bad)
