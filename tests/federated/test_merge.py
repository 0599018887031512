"""No data on the server for RegMean and Fisher merging: every model's statistics summed over the
clients give the merge a server holding the union of their data would compute."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="neurofuse[federated] (flwr) is not installed")

from flwr.app import Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

import neurofuse  # noqa: E402
from neurofuse import FusionSet  # noqa: E402
from neurofuse.errors import ConfigError  # noqa: E402
from neurofuse.methods import get_method  # noqa: E402
from neurofuse.federated import (ClientModel, ClientSetup, FederatedConfig, LocalGrid, MethodAggregation,  # noqa: E402
                                 RoundContext, StatisticsAggregation, aggregation_from_spec, answer_query,
                                 merge_by_statistics, merge_methods)
from neurofuse.models import MLP  # noqa: E402
from neurofuse.training import TrainConfig, train_model  # noqa: E402


@pytest.fixture(scope="module")
def shared_init_mlps(digits):
    """Three MLPs trained from one initial model on three class-skewed parts of digits, and the
    parts (150 samples each) the clients hold."""
    from neurofuse.federated import dirichlet_alpha_split

    parts = dirichlet_alpha_split(digits.y_train.numpy(), 3, 0.5, seed=1)
    torch.manual_seed(5)
    init = MLP(digits.input_shape, 10, [24, 16])
    models = []
    for i, part in enumerate(parts):
        m = init.clone()
        train_model(m, digits.x_train[part], digits.y_train[part], config=TrainConfig(epochs=4, lr=3e-3, seed=i))
        models.append(m.eval())
    shards = [(digits.x_train[p[:150]], digits.y_train[p[:150]]) for p in parts]
    return models, shards


def _grid(shards):
    app = ClientApp()

    @app.query("model_stats")
    def answer(msg: Message, context) -> Message:
        x, y = shards[int(context.node_config["partition-id"])]
        return Message(answer_query(msg, FusionSet(x, y, 64)), reply_to=msg)

    return LocalGrid(app, len(shards))


def _max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


CASES = [("regmean", {}), ("regmean", {"bias": "fit", "alpha": 0.9}), ("fisher", {}),
         ("fisher", {"fisher": "empirical"}), ("regmean-aligned", {"align": "weights"}),
         ("fisher-aligned", {"align": "weights"})]


def _aggregate(method, options, scope, models, shards):
    grid = _grid(shards)
    nodes = list(grid.get_node_ids())
    agg = aggregation_from_spec({"method": method, "server_data": False, "options": options, "scope": scope})
    assert isinstance(agg, StatisticsAggregation) and not agg.needs_server_data
    replies = [ClientModel(f"client {i}", n, m, 150.0) for i, (n, m) in enumerate(zip(nodes, models))]
    return agg.aggregate(replies, RoundContext(1, None, grid=grid))


@pytest.mark.parametrize("method,options", CASES)
def test_with_every_clients_statistics_the_merge_equals_the_central_merge_on_the_union(shared_init_mlps, method,
                                                                                        options):
    models, shards = shared_init_mlps
    merged, cost = _aggregate(method, options, "all", models, shards)
    union = (torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards]))
    central = neurofuse.fuse(models, union, method=method, progress=False, batch_size=64, **options)
    assert _max_diff(merged, central) < 1e-5
    assert cost["rounds"] == 1 and cost["bytes_sent"] > 0 and cost["bytes_received"] > 0


@pytest.mark.parametrize("method,options", CASES)
def test_with_their_own_clients_statistics_each_model_is_weighed_on_the_data_it_was_trained_on(
        shared_init_mlps, method, options):
    """scope='own' (RegMean's and Fisher merging's own definition, FedFisher's federated form):
    model i's statistics come from client i's data alone, and the server sent it model i only."""
    models, shards = shared_init_mlps
    merged, cost = _aggregate(method, options, "own", models, shards)
    fusion = get_method(method)(progress=False, batch_size=64, **options)
    run = fusion.Run(fusion, models, None)
    nets = fusion.merge_inputs(run)
    stats = [fusion.model_statistics(net, FusionSet(x, y, 64)) for net, (x, y) in zip(nets, shards)]
    assert _max_diff(merged, fusion.merge(run, nets, stats)) < 1e-6
    _, every = _aggregate(method, options, "all", models, shards)
    assert cost["bytes_sent"] < every["bytes_sent"] / 2  # one model to each client, not all of them


def test_a_model_whose_client_fails_is_left_out_of_an_own_data_merge(shared_init_mlps, caplog):
    models, shards = shared_init_mlps
    grid = _grid(shards)
    nodes = list(grid.get_node_ids())
    grid.failing.add(nodes[2])
    merged, _ = merge_by_statistics(grid, nodes, models, "regmean")
    two, _ = merge_by_statistics(_grid(shards[:2]), nodes[:2], models[:2], "regmean")
    assert _max_diff(merged, two) < 1e-6
    assert "models [2] left out of the merge" in caplog.text


def test_merges_that_need_server_samples_are_refused_before_any_round():
    assert set(merge_methods()) == {"regmean", "regmean-aligned", "fisher", "fisher-aligned"}
    with pytest.raises(ConfigError, match="align='weights'"):
        StatisticsAggregation("regmean-aligned")  # activation matching reads the server's data
    with pytest.raises(ConfigError, match="needs the samples themselves"):
        StatisticsAggregation("zipit")
    with pytest.raises(ConfigError, match="scope must be 'all'"):
        aggregation_from_spec({"method": "kf-linear", "server_data": False, "scope": "own"})
    with pytest.raises(ConfigError, match="give it with 'server_data': false"):
        aggregation_from_spec({"method": "regmean", "scope": "all"})


def test_clients_start_from_one_model_or_each_from_its_own():
    from neurofuse.federated._run import _strategy

    setup = ClientSetup(dataset="digits", num_clients=3, arch="mlp", size="tiny")
    fedavg = MethodAggregation("vanilla")
    shared = _strategy(FederatedConfig(clients=setup, method="vanilla"), fedavg, ())
    different = _strategy(FederatedConfig(clients=setup, method="vanilla", init="different"), fedavg, ())
    assert shared.initial_model is not None and different.initial_model is None
    with pytest.raises(ConfigError, match=r"init \(--init\) 'own'; choose one of"):
        FederatedConfig(clients=setup, method="vanilla", init="own")
