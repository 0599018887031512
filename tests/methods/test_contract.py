"""The contract every registered fusion method keeps (issue "one result, no state on the method").

- one instance used twice gives what two fresh instances give, bit for bit (no state survives a call);
- ``fuse(..., return_result=True).model`` is what ``fuse(...)`` returns;
- a method that builds one network records a correspondence for every hidden level, and REPAIR
  works on it; an output ensemble records none and is refused by REPAIR;
- ``check_level`` agrees with what ``fuse`` refuses, and the refusal comes before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.errors import ConfigError, IncompatibleModelsError
from neurofuse.methods import get_method, list_methods
from neurofuse.models import MLP, make_model
from neurofuse.training import TrainConfig, train_model

#: settings that keep every method fast on two small MLPs
FAST = {"kd-head": {"epochs": 2}, "feddf": {"epochs": 2}, "kf-linear": {"n_init": 2},
        "kf-gradient": {"levels": {"epochs": 2}, "head": {"epochs": 2}, "kmeans_n_init": 1}}


def _fast(method: str) -> dict:
    return dict(FAST.get(method, {}))


@pytest.fixture(scope="module")
def mlps(digits):
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = MLP(digits.input_shape, 10, [20, 16])
        train_model(m, digits.x_train[:600], digits.y_train[:600], config=TrainConfig(epochs=3, lr=3e-3, seed=seed))
        out.append(m.eval())
    return out


@pytest.fixture(scope="module")
def fs(digits_fusion):
    return digits_fusion[0][:120], digits_fusion[1][:120]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", list_methods())
def test_one_instance_used_twice_equals_fresh_instances(method, mlps, fs):
    cls = get_method(method)
    imp = "conductance" if cls.uses_importance else "uniform"

    def fresh() -> torch.nn.Module:
        return cls(importance=imp, progress=False, **_fast(method)).fuse(mlps, fs)

    reused = cls(importance=imp, progress=False, **_fast(method))
    assert _same(reused.fuse(mlps, fs), fresh())
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in mlps]
    try:
        # the same model objects with other weights: state kept by the method would be stale
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for m in mlps:
                for p in m.parameters():
                    p.add_(0.1 * p.std() * torch.randn(p.shape, generator=gen))
        assert _same(reused.fuse(mlps, fs), fresh())
    finally:
        for m, state in zip(mlps, saved):
            m.load_state_dict(state)


@pytest.mark.parametrize("method", list_methods())
def test_the_result_holds_what_fuse_returns_and_one_correspondence_per_hidden_level(method, mlps, fs):
    cls = get_method(method)
    model = neurofuse.fuse(mlps, fs, method=method, progress=False, **_fast(method))
    result = neurofuse.fuse(mlps, fs, method=method, progress=False, return_result=True, **_fast(method))
    assert isinstance(result, neurofuse.FusionResult) and result.method == method
    assert _same(model, result.model)
    if cls.output_is_ensemble:
        assert result.correspondences == ()
        return
    fused_w = result.model.level_widths()
    assert len(result.correspondences) == len(fused_w) - 1
    for lvl, c in enumerate(result.correspondences):
        assert isinstance(c, neurofuse.Correspondence)
        assert c.n_fused == fused_w[lvl] and list(c.widths) == [m.level_widths()[lvl] for m in mlps]
        assert c.covered().all(), f"level {lvl}: a fused neuron stands for no base neuron"


@pytest.mark.parametrize("method", list_methods())
def test_repair_works_whenever_the_output_is_not_an_ensemble(method, mlps, fs, digits):
    cls = get_method(method)
    if cls.output_is_ensemble:
        with pytest.raises(ConfigError, match="ensemble"):
            neurofuse.fuse(mlps, fs, method=method, repair=True, progress=False, **_fast(method))
        return
    result = neurofuse.fuse(mlps, fs, method=method, repair=True, progress=False, return_result=True,
                            **_fast(method))
    assert [s.name for s in result.steps] == ["repair"]
    logits = result.model(digits.x_test[:50])
    assert torch.isfinite(logits).all()


def test_kf_gradient_with_repair_rescales_its_clusters(mlps, fs):
    """The combination crashed ('groups must list 2 levels..., got 0'): kf-gradient recorded no
    grouping.  Its correspondences are its K-means clusters."""
    opts = _fast("kf-gradient")
    result = neurofuse.fuse(mlps, fs, method="kf-gradient", repair=True, progress=False, return_result=True, **opts)
    plain = neurofuse.fuse(mlps, fs, method="kf-gradient", progress=False, **opts)
    assert not _same(result.model, plain)  # REPAIR changed the fused neurons' statistics
    assert all(c.is_hard for c in result.correspondences)


def _tiny_resnet(seed: int, digits):
    torch.manual_seed(seed)
    return make_model("resnet", "tiny", digits.input_shape, 10).eval()


@pytest.mark.parametrize("method", [n for n in list_methods() if get_method(n).fuses_levels])
def test_check_level_agrees_with_what_fuse_refuses(method, digits, fs, monkeypatch):
    """On a ResNet (residual levels): a method refuses exactly when check_level names a level,
    and refuses before it computes any importance score."""
    cls = get_method(method)
    nets = [_tiny_resnet(0, digits), _tiny_resnet(1, digits)]
    reasons = [cls.check_level(nets[0], i) for i in range(nets[0].num_levels)]
    calls = []
    import neurofuse.methods._base as base

    real = base.importance_sums
    monkeypatch.setattr(base, "importance_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = _fast(method)
    if any(reasons):
        first = next(i for i, r in enumerate(reasons) if r)
        with pytest.raises(IncompatibleModelsError, match=f"cannot fuse level {first} "):
            neurofuse.fuse(nets, fs, method=method, importance="conductance", progress=False, **kw)
        assert not calls  # refused before any importance score
    else:
        fused = neurofuse.fuse(nets, fs, method=method, progress=False, **kw)
        assert torch.isfinite(fused(fs[0][:8])).all()


def test_the_closed_form_refuses_a_layernorm_it_does_not_fit_and_alignment_accepts_it(digits):
    def mlp(*middle):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), *middle,
                                   torch.nn.Linear(16, 10)).eval()

    # residual blocks are fitted one layer at a time, a LayerNorm over a Linear's outputs with it,
    # one read by a Linear folded into it; one between two activations is not fitted
    post = neurofuse.levels_from(mlp(torch.nn.LayerNorm(16), torch.nn.ReLU()), input_shape=(1, 8, 8))
    pre = neurofuse.levels_from(mlp(torch.nn.ReLU(), torch.nn.LayerNorm(16)), input_shape=(1, 8, 8))
    between = neurofuse.levels_from(mlp(torch.nn.ReLU(), torch.nn.LayerNorm(16), torch.nn.GELU()),
                                    input_shape=(1, 8, 8))
    for net, closed_form in ((_tiny_resnet(0, digits), True), (post, True), (pre, True), (between, False)):
        linear = [get_method("kf-linear").check_level(net, i) for i in range(net.num_levels)]
        aligned = [get_method("otfusion").check_level(net, i) for i in range(net.num_levels)]
        assert not any(aligned)
        assert (not any(linear)) == closed_form
        assert all(get_method(n).check_level(net, 0) is None for n in list_methods() if not get_method(n).fuses_levels)
    assert "LayerNorm" in linear[1]


def test_capabilities_are_class_attributes_asked_of_every_method():
    for name in list_methods():
        cls = get_method(name)
        assert isinstance(cls.output_is_ensemble, bool) and isinstance(cls.supports_statistics, bool)
        assert cls.display_label() and isinstance(cls.order, int)
    assert [n for n in list_methods() if get_method(n).output_is_ensemble] == ["ensemble"]
    assert {n for n in list_methods() if get_method(n).supports_statistics} == {"hf-linear", "kf-linear"}
    assert {n for n in list_methods() if get_method(n).supports_model_statistics} == {
        "regmean", "regmean-aligned", "fisher", "fisher-aligned"}


@pytest.mark.parametrize("bad,needle", [({"n_init": 0}, "option 'n_init' must be an integer >= 1, got 0"),
                                        ({"n_init": 2.5}, "option 'n_init' must be an integer"),
                                        ({"output_weights": "median"}, "one of 'importance', 'mean'"),
                                        ({"ridge": -1.0}, "option 'ridge' must be 'auto' or a number >= 0, got -1.0"),
                                        ({"ridge": "gcv"}, "option 'ridge' must be 'auto' or a number >= 0, got 'gcv'"),
                                        ({"refine": "yes"}, "option 'refine' must be true or false")])
def test_options_are_checked_against_their_declared_constraints(bad, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        get_method("kf-linear")(**bad)


def test_method_options_show_the_declared_constraints():
    from neurofuse.methods import method_options

    info = {o.name: o for o in method_options("otfusion")}
    assert info["solver"].allowed == "one of 'exact', 'sinkhorn'"
    assert info["reg"].allowed == "a number > 0"
    assert {o.name: o for o in method_options("kf-linear")}["ridge"].allowed == "'auto' or a number >= 0"
    assert np.all([o.allowed for o in method_options("kf-linear") if not o.common])
