"""No data on the server: the level-wise statistics protocol equals central fusion on the union."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="neurofuse[federated] (flwr) is not installed")

from flwr.app import Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

import neurofuse  # noqa: E402
from neurofuse import FusionSet  # noqa: E402
from neurofuse.errors import ConfigError  # noqa: E402
from neurofuse.federated import (FusionStrategy, LocalGrid, StatisticsAggregation, answer_query,  # noqa: E402
                                 fuse_by_levels)
from neurofuse.federated._local import FIRST_CLIENT_NODE_ID  # noqa: E402

from .conftest import mock_reply  # noqa: E402


def _stats_app(shards):
    """A ClientApp that answers the protocol's queries from its own shard (partition id)."""
    app = ClientApp()

    def answer(msg: Message, context) -> Message:
        x, y = shards[int(context.node_config["partition-id"])]
        return Message(answer_query(msg, FusionSet(x, y, 64)), reply_to=msg)

    app.query("level_stats")(answer)
    app.query("importance_sums")(answer)
    return app


def _shards(digits, parts, n=150):
    return [(digits.x_train[p[:n]], digits.y_train[p[:n]]) for p in parts]


def _max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


@pytest.mark.parametrize("importance,options", [("uniform", {}), ("conductance", {"width": 30})])
def test_no_server_data_equals_central_fusion_on_the_union(client_mlps, digits, importance, options):
    models, parts, _ = client_mlps
    shards = _shards(digits, parts)
    grid = LocalGrid(_stats_app(shards), len(shards))
    fused, cost = fuse_by_levels(grid, list(grid.get_node_ids()), models, "kf-linear", importance,
                                 seed=0, options=options)
    x = torch.cat([s[0] for s in shards])
    y = torch.cat([s[1] for s in shards])
    width = options.get("width")
    central = neurofuse.fuse(models, (x, y), method="kf-linear", importance=importance, width=width,
                             progress=False, batch_size=64)
    assert _max_diff(fused, central) < 1e-5
    levels = models[0].num_levels
    assert cost["rounds"] == levels + (importance != "uniform")
    assert cost["bytes_received"] > 0 and cost["bytes_sent"] > cost["bytes_received"]


def test_a_client_that_fails_a_level_round_is_left_out(client_mlps, digits, caplog):
    models, parts, _ = client_mlps
    shards = _shards(digits, parts)
    grid = LocalGrid(_stats_app(shards), 3)
    grid.failing.add(FIRST_CLIENT_NODE_ID + 2)
    fused, _ = fuse_by_levels(grid, list(grid.get_node_ids()), models, "kf-linear")
    central = neurofuse.fuse(models, torch.cat([shards[0][0], shards[1][0]]), method="kf-linear",
                             progress=False, batch_size=64)
    assert _max_diff(fused, central) < 1e-5
    assert "client node 1003" in caplog.text


def test_strategy_without_server_data_runs_the_protocol_in_aggregate_train(client_mlps, digits):
    models, parts, _ = client_mlps
    shards = _shards(digits, parts)
    grid = LocalGrid(_stats_app(shards), 3)
    s = FusionStrategy(StatisticsAggregation("kf-linear"), eval_data=(digits.x_test, digits.y_test),
                       compare=("ensemble",), min_train_nodes=3)
    s.grid = grid
    replies = [mock_reply(m, 150, node=FIRST_CLIENT_NODE_ID + i) for i, m in enumerate(models)]
    arrays, metrics = s.aggregate_train(1, replies)
    central = neurofuse.fuse(models, torch.cat([sh[0] for sh in shards]), method="kf-linear", progress=False,
                             batch_size=64)
    assert _max_diff(s.fused_model, central) < 1e-5
    assert metrics["protocol-rounds"] == models[0].num_levels
    assert metrics["bytes-sent"] > 0 and "accuracy-ensemble" in metrics
    assert metrics["bytes-received"] > sum(r.content["arrays"].count_bytes() for r in replies)


def test_methods_that_need_samples_are_refused_without_server_data(client_mlps):
    with pytest.raises(ConfigError, match="needs the samples themselves"):
        fuse_by_levels(None, [1], client_mlps[0], "otfusion")


def test_models_with_levels_fitted_in_steps_are_refused_before_any_round(digits):
    """A residual block is fitted one layer at a time, in several passes over the data, which
    one round of statistics per level cannot carry: refused before anything is sent."""
    from neurofuse.models import make_model

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(make_model("resnet", "tiny", digits.input_shape, 10).eval())
    with pytest.raises(ConfigError, match="level 1 of these models is fitted one layer at a time"):
        fuse_by_levels(None, [], models, method="kf-linear")
