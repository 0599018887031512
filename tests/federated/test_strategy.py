"""FusionStrategy.aggregate_train on mocked replies (Flower's own pattern), and its checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="neurofuse[federated] (flwr) is not installed")

from flwr.app import ArrayRecord  # noqa: E402

import neurofuse  # noqa: E402
from neurofuse.errors import ConfigError, DataError  # noqa: E402
from neurofuse.federated import (ClassShareWeighting, FusionStrategy, MethodAggregation,  # noqa: E402
                                 StatisticsAggregation, TooFewClientsError, labels_needed)
from neurofuse.models import MLP  # noqa: E402

from .conftest import mock_reply  # noqa: E402


def _same_arch(client_mlps, digits):
    """Three same-width models (for FedAvg): re-use the first architecture with others' seeds."""
    out = []
    for i in range(3):
        torch.manual_seed(i)
        out.append(MLP(digits.input_shape, 10, [32, 24]).eval())
    return out


def test_vanilla_is_fedavg_sample_weighted_mean(client_mlps, digits):
    models = _same_arch(client_mlps, digits)
    counts = [100, 300, 600]
    replies = [mock_reply(m, n, node=i + 1) for i, (m, n) in enumerate(zip(models, counts))]
    arrays, metrics = FusionStrategy("vanilla", min_train_nodes=3).aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    w = np.asarray(counts, dtype=np.float64) / sum(counts)
    for k, v in got.items():
        want = sum(wi * m.state_dict()[k].double() for wi, m in zip(w, models))
        assert torch.allclose(v.double(), want, atol=1e-6), k
    assert metrics["clients-used"] == 3 and metrics["num-examples"] == 1000


def test_kf_linear_fuses_different_widths_like_neurofuse_fuse(client_mlps, digits, digits_fusion):
    models, _, _ = client_mlps
    replies = [mock_reply(m, 100, node=i + 1) for i, m in enumerate(models)]
    s = FusionStrategy("kf-linear", server_data=digits_fusion[0], eval_data=(digits.x_test, digits.y_test),
                       min_train_nodes=3)
    arrays, metrics = s.aggregate_train(1, replies)
    want = neurofuse.fuse(models, digits_fusion[0], method="kf-linear", progress=False)
    got = arrays.to_torch_state_dict()
    assert list(got) == list(want.state_dict())
    for k, v in want.state_dict().items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    assert s.fused_model.hidden == [32, 24]  # the first client's architecture
    for key in ("fusion-seconds", "server-accuracy", "bytes-received", "bytes-sent", "clients-used"):
        assert key in metrics
    assert metrics["bytes-received"] >= sum(r.content["arrays"].count_bytes() for r in replies)
    assert 0.3 < metrics["server-accuracy"] <= 1.0


def test_replies_are_ordered_by_node_so_the_first_client_sets_the_architecture(client_mlps, digits_fusion):
    models, _, _ = client_mlps
    replies = [mock_reply(m, 100, node=n) for m, n in zip(models, (3, 1, 2))]
    s = FusionStrategy("kf-linear", server_data=digits_fusion[0], min_train_nodes=3)
    s.aggregate_train(1, replies)
    assert s.fused_model.hidden == models[1].hidden


def test_server_chosen_architecture(client_mlps, digits_fusion):
    models, _, _ = client_mlps
    arch = MLP((1, 8, 8), 10, [20, 12]).config()
    s = FusionStrategy("kf-linear", server_data=digits_fusion[0], architecture=arch, min_train_nodes=3)
    s.aggregate_train(1, [mock_reply(m, 100, node=i) for i, m in enumerate(models)])
    assert s.fused_model.hidden == [20, 12]


def test_failed_nan_and_incompatible_replies_are_dropped_with_their_names(client_mlps, digits, digits_fusion,
                                                                           caplog):
    models, _, _ = client_mlps
    bad = models[1].state_dict()
    bad = {k: v.clone() for k, v in bad.items()}
    bad["levels.0.1.weight"][0, 0] = float("nan")
    deep = MLP(digits.input_shape, 10, [16, 16, 16]).eval()  # 4 levels, the others have 3
    replies = [mock_reply(models[0], 100, node=1), mock_reply(models[2], 100, node=2),
               mock_reply(models[1], 100, node=3, arrays=ArrayRecord(bad)),
               mock_reply(error="client crashed", node=4), mock_reply(deep, 100, node=5),
               mock_reply(models[2], 100, node=6, arrays=ArrayRecord({"x": torch.zeros(3)}))]
    s = FusionStrategy("kf-linear", server_data=digits_fusion[0], min_train_nodes=2)
    with caplog.at_level(logging.WARNING, logger="neurofuse"):
        arrays, metrics = s.aggregate_train(1, replies)
    assert metrics["clients-used"] == 2 and metrics["clients-dropped"] == 4
    text = caplog.text
    assert "client node 3" in text and "NaN" in text
    assert "client node 4" in text and "client crashed" in text
    assert "client node 5" in text and "incompatible" in text
    assert "client node 6" in text and "do not fit" in text
    assert arrays is not None


def test_too_few_usable_replies_is_a_clear_error(client_mlps, digits_fusion):
    models, _, _ = client_mlps
    s = FusionStrategy("kf-linear", server_data=digits_fusion[0], min_train_nodes=3)
    with pytest.raises(TooFewClientsError, match=r"2 usable client replies of 3.*minimum 3.*client node 9"):
        s.aggregate_train(2, [mock_reply(models[0], node=1), mock_reply(models[1], node=2),
                              mock_reply(error="timeout", node=9)])


def test_fedavg_drops_a_client_of_other_widths_by_name(client_mlps, digits, caplog):
    models = _same_arch(client_mlps, digits)
    odd = client_mlps[0][1]  # [40, 24]
    replies = [mock_reply(m, 10, node=i + 1) for i, m in enumerate(models)] + [mock_reply(odd, 10, node=7)]
    with caplog.at_level(logging.WARNING, logger="neurofuse"):
        _, metrics = FusionStrategy("vanilla", min_train_nodes=3).aggregate_train(1, replies)
    assert metrics["clients-used"] == 3 and "client node 7" in caplog.text


def test_label_requirements_are_checked_when_the_strategy_is_made(digits_fusion):
    x, y = digits_fusion
    assert labels_needed("kf-linear", "uniform") is None
    assert "true label" in labels_needed("kf-linear", "conductance")
    with pytest.raises(DataError, match="no labels.*importance='uniform'.*StatisticsAggregation"):
        FusionStrategy("kf-linear", importance="conductance", server_data=x)
    FusionStrategy("kf-linear", importance="conductance", server_data=(x, y))
    FusionStrategy("feddf", server_data=x)  # distillation needs inputs only
    with pytest.raises(DataError, match="server fusion set"):
        FusionStrategy("kf-linear")
    with pytest.raises(ConfigError, match="needs the samples themselves"):
        FusionStrategy(StatisticsAggregation("otfusion"))
    with pytest.raises(ConfigError, match="class_weights"):
        ClassShareWeighting(MethodAggregation("vanilla"))
    FusionStrategy(ClassShareWeighting(StatisticsAggregation("kf-linear")))  # no server data needed
    with pytest.raises(ConfigError, match="unknown fusion method"):
        FusionStrategy("no-such-method")
    FusionStrategy("vanilla")  # FedAvg needs no data


def test_class_share_weights_come_from_the_reported_label_counts(client_mlps, digits, digits_fusion):
    models, _, counts = client_mlps
    replies = [mock_reply(m, 100, node=i + 1, label_counts=c) for i, (m, c) in enumerate(zip(models, counts))]
    s = FusionStrategy(ClassShareWeighting(MethodAggregation("ensemble")), eval_data=(digits.x_test, digits.y_test),
                       min_train_nodes=3)
    s.aggregate_train(1, replies)
    c = np.asarray(counts, dtype=np.float64)
    assert np.allclose(s.fused_model.class_weights.numpy(), c / c.sum(0), atol=1e-6)
    s = FusionStrategy(ClassShareWeighting(MethodAggregation("kf-linear")), server_data=digits_fusion[0],
                       min_train_nodes=3)
    s.aggregate_train(1, replies)
    no_counts = [mock_reply(m, 100, node=i + 1) for i, m in enumerate(models)]
    with pytest.raises(DataError, match="label counts"):
        s.aggregate_train(2, no_counts)


def test_comparison_methods_are_scored_on_the_same_replies(client_mlps, digits, digits_fusion):
    models, _, _ = client_mlps
    s = FusionStrategy("kf-linear", server_data=digits_fusion[0], eval_data=(digits.x_test, digits.y_test),
                       compare=("ensemble", "vanilla"), min_train_nodes=3)
    _, metrics = s.aggregate_train(1, [mock_reply(m, 100, node=i + 1) for i, m in enumerate(models)])
    assert "accuracy-ensemble" in metrics
    assert "accuracy-vanilla" not in metrics  # FedAvg cannot average different widths: skipped, logged
