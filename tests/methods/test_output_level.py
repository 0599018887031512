"""Output-level weighting (``output_weights``, ``class_weights``) of every method that averages
the output level: hf-linear, kf-linear, kf-gradient, otfusion, git-rebasin, kd-head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.errors import ConfigError
from neurofuse.grouping import output_weights
from neurofuse.methods import get_method
from neurofuse.training import predict_logits

AVERAGING = ["hf-linear", "kf-linear", "otfusion", "git-rebasin"]


@pytest.fixture(scope="module")
def pair(dirichlet_mlps):
    models, _ = dirichlet_mlps
    return models[:2]


def _fast(method):
    if method == "kf-gradient":
        return {"levels": {"epochs": 2}, "head": {"epochs": 2}}
    return {"n_init": 1} if method == "kf-linear" else {}


@pytest.mark.parametrize("method", AVERAGING + ["kf-gradient"])
def test_importance_weights_with_uniform_scores_are_the_mean(method, pair, digits_fusion):
    kw = _fast(method)
    a = neurofuse.fuse(pair, digits_fusion, method=method, progress=False, output_weights="importance", **kw)
    b = neurofuse.fuse(pair, digits_fusion, method=method, progress=False, output_weights="mean", **kw)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


@pytest.mark.parametrize("method", AVERAGING)
def test_importance_weights_follow_the_output_scores(method, pair, digits_fusion):
    fusion = get_method(method)(importance="conductance", progress=False, **_fast(method))
    fs = neurofuse._fusion_set.as_fusion_set(digits_fusion)
    run = fusion.Run(fusion, pair, fs)
    got = fusion.output_level_weights(run, pair)
    scores = torch.stack([run.importance_scores(m)[-1] for m in pair]).numpy()
    np.testing.assert_allclose(got, scores / scores.sum(0))
    a = neurofuse.fuse(pair, digits_fusion, method=method, importance="conductance", progress=False,
                       output_weights="importance", **_fast(method))
    b = neurofuse.fuse(pair, digits_fusion, method=method, importance="conductance", progress=False,
                       output_weights="mean", **_fast(method))
    assert not torch.equal(list(a.state_dict().values())[-1], list(b.state_dict().values())[-1])


@pytest.mark.parametrize("method", ["otfusion", "git-rebasin"])
def test_a_model_with_zero_class_weight_contributes_nothing_to_that_class(method, pair, digits_fusion):
    cw = np.ones((2, 10))
    cw[1, 3] = 0.0
    fused = neurofuse.fuse(pair, digits_fusion, method=method, progress=False, class_weights=cw)
    w, w0 = fused.levels[-1][-1].weight, pair[0].levels[-1][-1].weight
    torch.testing.assert_close(w[3], w0[3])     # class 3 is model 0's row (model 1 weighs 0)
    assert not torch.allclose(w[4], w0[4])      # the other classes are averages


def test_kf_linear_zero_class_weight_fits_the_other_models_logit(pair, digits_fusion):
    cw = np.ones((2, 10))
    cw[1, 3] = 0.0
    x = digits_fusion[0]
    fused = neurofuse.fuse(pair, digits_fusion, method="kf-linear", progress=False, class_weights=cw,
                           n_init=1, width=2.0)       # width = sum of widths: the targets are reachable
    torch.testing.assert_close(predict_logits(fused, x)[:, 3], predict_logits(pair[0], x)[:, 3],
                               atol=1e-3, rtol=1e-3)


def test_kd_head_class_weights_pick_the_teacher(pair, digits_fusion):
    cw = np.zeros((2, 10))
    cw[0] = 1.0   # the teacher is model 0 alone
    a = neurofuse.fuse(pair, digits_fusion, method="kd-head", progress=False, epochs=3, class_weights=cw)
    b = neurofuse.fuse(pair[:1], digits_fusion, method="kd-head", progress=False, epochs=3)
    for va, vb in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(va, vb)


@pytest.mark.parametrize("method", AVERAGING + ["kf-gradient"])
def test_unknown_output_weights_is_refused(method):
    with pytest.raises(ConfigError, match="output_weights"):
        get_method(method)(output_weights="median")


def test_output_weights_function_is_used_for_class_weights(pair, digits_fusion):
    cw = np.random.default_rng(0).uniform(0, 1, (2, 10))
    fusion = get_method("otfusion")(class_weights=cw, progress=False)
    run = fusion.Run(fusion, pair, None)
    np.testing.assert_allclose(fusion.output_level_weights(run, pair), output_weights(2, 10, cw))
