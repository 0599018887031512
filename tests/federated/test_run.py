"""The round loop (mocked grid, local grid), the ClientApp, the CLI, and one real Flower simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest.mock import Mock

import numpy as np
import pytest

pytest.importorskip("flwr", reason="neurofuse[federated] (flwr) is not installed")

from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from neurofuse.cli import main  # noqa: E402
from neurofuse.errors import ConfigError  # noqa: E402
from neurofuse.federated import (ClientSetup, FederatedConfig, FusionStrategy, client_parts,  # noqa: E402
                                 dirichlet_alpha_split, run_federated)

from .conftest import mock_reply  # noqa: E402


def test_dirichlet_alpha_split_covers_every_index_once_and_is_skewed_for_small_alpha():
    y = np.repeat(np.arange(10), 100)
    parts = dirichlet_alpha_split(y, 5, 0.1, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    assert min(len(p) for p in parts) >= 10
    classes = [len(np.unique(y[p])) for p in parts]
    iid = dirichlet_alpha_split(y, 5, 100.0, seed=0)
    assert np.mean(classes) < np.mean([len(np.unique(y[p])) for p in iid]) == 10
    assert [p.tolist() for p in parts] == [p.tolist() for p in dirichlet_alpha_split(y, 5, 0.1, seed=0)]
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_alpha_split(y, 5, 0.0, seed=0)


def test_round_loop_against_a_mocked_grid_sends_the_fused_architecture(client_mlps, digits_fusion):
    """Flower's pattern: Strategy.start on a Mock(spec=Grid) whose replies are mocked."""
    models, _, _ = client_mlps
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [11, 12, 13]
    sent = []

    def send_and_receive(messages, timeout=None):
        messages = list(messages)
        sent.append(messages)
        return [mock_reply(models[m.metadata.dst_node_id - 11], 100, node=m.metadata.dst_node_id)
                for m in messages]

    grid.send_and_receive.side_effect = send_and_receive
    s = FusionStrategy("kf-linear", server_data=digits_fusion[0], min_train_nodes=3, min_available_nodes=3,
                       options={"width": 20})
    result = s.start(grid, num_rounds=2)
    assert len(s.history) == 2 and len(result.arrays) > 0
    train_rounds = [ms for ms in sent if ms and ms[0].metadata.message_type == "train"]
    assert "model" not in train_rounds[0][0].content["config"]  # round 1: clients start on their own
    cfg = json.loads(train_rounds[1][0].content["config"]["model"])  # round 2: the fused architecture
    assert cfg["kwargs"]["hidden"] == [20, 20]


def test_local_grid_runs_one_shot_and_multi_round(tmp_path):
    setup = ClientSetup(dataset="digits", num_clients=3, alpha=0.5, epochs=4, arch="mlp", size="tiny")
    res = run_federated(FederatedConfig(clients=setup, method="kf-linear", rounds=2, server_samples=200,
                                        fedavg_run=True))
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    # class shares by default (FederatedConfig(class_shares=True)): the clients sent label counts
    assert set(res["runs"]) == {"kf-linear + class shares", "fedavg-run"}
    assert {"fedavg", "ensemble", "fedavg-run"} <= set(res["rounds"][0])
    for h in res["runs"]["kf-linear + class shares"]:
        assert h["clients-used"] == 3 and h["bytes-received"] > 0 and h["bytes-sent"] > 0
        assert 0.0 <= h["server-accuracy"] <= 1.0 and "accuracy-ensemble" in h
    # round 2 started from the fused model: every client sent the same architecture back
    assert res["rounds"][1]["gap_closed"] is not None
    assert len(client_parts(setup)) == 3


def test_cli_federate_writes_results_and_a_plot(tmp_path, capsys):
    out = tmp_path / "fed"
    rc = main(["federate", "--clients", "3", "--alpha", "0.5", "--method", "kf-linear", "--rounds", "1",
               "--no-server-data", "--backend", "local", "--epochs", "3", "--size", "tiny", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    key = "kf-linear (client statistics) + class shares"          # class shares by default
    assert doc["config"]["no_server_data"] is True and key in doc["runs"]
    assert doc["runs"][key][0]["protocol-rounds"] == 3
    assert (out / "accuracy.png").stat().st_size > 0
    assert key in capsys.readouterr().out
    assert main(["federate", "--out", str(out), "--backend", "local"]) == 2  # exists: no overwrite
    assert main(["federate", "--method", "otfusion", "--no-server-data", "--backend", "local",
                 "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_real_flower_simulation_with_four_clients_on_digits(tmp_path):
    """Flower's Ray simulation end to end, in a fresh process; nothing is left running after it."""
    code = (
        "from neurofuse.federated import *\n"
        "s = ClientSetup(dataset='digits', num_clients=4, alpha=0.5, epochs=3, size='tiny')\n"
        "r = run_federated(FederatedConfig(clients=s, method='kf-linear', rounds=1, server_samples=200,\n"
        "                  class_shares=False,\n"
        "                  compare=({'method': 'kf-linear', 'server_data': False},), backend='simulation'))\n"
        "h = r['runs']['kf-linear'][0]\n"
        "assert h['clients-used'] == 4 and 'accuracy-kf-linear (client statistics)' in h, h\n"
        "import os, ray, time; assert not ray.is_initialized()\n"
        "def kids():\n"
        "    out = []\n"
        "    for d in os.listdir('/proc'):\n"
        "        try:\n"
        "            st = open(f'/proc/{d}/stat').read().rsplit(')', 1)[1].split()\n"
        "        except (OSError, IndexError):\n"
        "            continue\n"
        "        if d.isdigit() and int(st[1]) == os.getpid() and st[0] != 'Z':\n"
        "            out.append(d)\n"
        "    return out\n"
        "for _ in range(90):  # Ray's workers take a while to exit on a loaded 2-core machine\n"
        "    left = kids()\n"
        "    if not left: break\n"
        "    time.sleep(1)\n"
        "assert not left, 'processes left running after 90 s: ' + str(\n"
        "    [open(f'/proc/{d}/cmdline').read().replace(chr(0), ' ')[:80] for d in left if os.path.exists(f'/proc/{d}')])\n"
        "print('OK', h['server-accuracy'])\n")
    import neurofuse

    src = os.path.dirname(os.path.dirname(os.path.abspath(neurofuse.__file__)))  # this checkout's code
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0",
           "PYTHONPATH": os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
