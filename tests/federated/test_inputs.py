"""Bad ``federate`` inputs end before Flower starts, in one line naming the value and the limit;
outputs are never overwritten without ``--force``.

Properties checked: every option of a run is validated when the config is built (not inside the
clients); a client count the data cannot serve is refused up front with the limit; a federated
benchmark config that is not JSON, not an object, has a key of the wrong type or lacks one is a
``ConfigError`` naming the key; ``federate`` and ``federate --bench`` keep existing
``accuracy.png``, ``results.json`` and ``report.md`` unless ``--force``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="neurofuse[federated] (flwr) is not installed")

from neurofuse.cli import main  # noqa: E402
from neurofuse.errors import ConfigError  # noqa: E402
from neurofuse.federated import ClientSetup, FederatedConfig  # noqa: E402
from neurofuse.federated._bench import FL_CONFIGS, load_fl_config  # noqa: E402


def _one_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("neurofuse: error:") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("field,value,message", [
    ("alpha", -1.0, "alpha (--alpha) must be a finite number in (0"),
    ("alpha", float("nan"), "alpha (--alpha)"),
    ("lr", 0.0, "lr (--lr) must be a finite number in (0, 10]"),
    ("lr", float("inf"), "lr (--lr)"),
    ("partition", "shards", "unknown partition (--partition) 'shards'"),
    ("epochs", 0, "epochs (--epochs) must be an integer in [1"),
    ("num_clients", 100_000, "num_clients (--clients) must be an integer in [1, 10000], got 100000"),
    ("arch", "gpt", "unknown arch (--arch) 'gpt'"),
    ("val_fraction", 1.0, "val_fraction must be a finite number in [0, 1)"),
    ("dataset", "imagenet", "unknown dataset 'imagenet'"),
])
def test_client_settings_are_checked_when_the_config_is_built(field, value, message):
    with pytest.raises(ConfigError) as exc:
        ClientSetup(**{field: value})
    assert message in str(exc.value)


@pytest.mark.parametrize("field,value,message", [
    ("method", "fedprox", "unknown fusion method 'fedprox'"),
    ("importance", "shap", "unknown importance (--importance) 'shap'"),
    ("rounds", 0, "rounds (--rounds) must be an integer in [1"),
    ("server_samples", -1, "server_samples (--server-samples) must be an integer >= 0"),
    ("compare", ("vanilla", "nope"), "unknown fusion method 'nope'"),
    ("compare", "vanilla", "compare must be a list"),
])
def test_server_settings_are_checked_when_the_config_is_built(field, value, message):
    with pytest.raises(ConfigError) as exc:
        FederatedConfig(**{field: value})
    assert message in str(exc.value)


_CLI_CASES = [
    (["--alpha", "-1"], "alpha (--alpha)"),
    (["--lr", "nan"], "lr (--lr)"),
    (["--clients", "100000"], "in [1, 10000], got 100000"),
    (["--clients", "1000"], "use at most 143 clients"),
    (["--server-samples", "100000"], "use at most 1437"),
]


def test_cli_refuses_what_cannot_work_before_flower_starts(tmp_path):
    """In one fresh process with a time limit: a check left to the clients would start Flower (and
    with 100000 clients not end for many minutes)."""
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from neurofuse.cli import main
        out = []
        for argv in {[a for a, _ in _CLI_CASES]!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(["federate", "--backend", "local", "--size", "tiny", "--epochs", "1",
                           "--out", {str(tmp_path / "o")!r}, *argv])
            out.append([rc, err.getvalue()])
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (argv, message), (rc, err) in zip(_CLI_CASES, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o").exists()


def _bench_doc() -> dict:
    return {"name": "tinyfl", "title": "t", "common": {
        "clients": 2, "arch": "mlp", "size": "tiny", "server_samples": 40, "lr": 0.001, "seed": 0,
        "one_shot": {"method": "vanilla", "compare": ["ensemble"]}},
        "scales": {"smoke": {"dataset": "digits", "alphas": [0.5], "epochs": 1}}}


def _edit(doc: dict, path: str, value):
    keys = path.split(".")
    d = doc
    for k in keys[:-1]:
        d = d[k]
    if value is KeyError:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value
    return doc


@pytest.mark.parametrize("edit,message", [
    ("not json", "not valid JSON"),
    ([1, 2], "expected a JSON object, got list"),
    (("common.clients", "abc"), "clients: clients must be an integer"),
    (("common", KeyError), "clients: missing"),
    (("common", [1]), "common: expected a JSON object"),
    (("scales.smoke.alphas", []), "alphas: expected a non-empty list"),
    (("scales.smoke.alphas", [0.5, -2]), "alphas[1]"),
    (("common.one_shot", "kf-linear"), "one_shot: expected a JSON object"),
    (("common.one_shot.method", "nope"), "one_shot.method: unknown fusion method 'nope'"),
    (("common.one_shot.compare", ["ensemble", {"method": "vanilla", "server_data": False}]),
     "one_shot.compare[1]: method 'vanilla' needs the samples themselves"),
    (("common.one_shot.compare", [{"method": "kf-linear", "shares": True}]),
     "one_shot.compare[0]: unknown aggregation key(s) ['shares']"),
    (("common.momentum", 0.9), "unknown key(s) ['momentum']"),
    (("scales", {}), "has no scale 'smoke'"),
    (("common.multi_round", {"method": "vanilla", "rounds": "5", "local_epochs": 1}), "multi_round.rounds"),
])
def test_a_bad_federated_benchmark_config_names_the_key(tmp_path, capsys, edit, message):
    f = tmp_path / "cfg.json"
    if isinstance(edit, str):
        f.write_text(edit)
    elif isinstance(edit, list):
        f.write_text(json.dumps(edit))
    else:
        f.write_text(json.dumps(_edit(_bench_doc(), *edit)))
    with pytest.raises(ConfigError) as exc:
        load_fl_config(str(f), "smoke")
    assert message in str(exc.value) and "\n" not in str(exc.value)
    rc = main(["federate", "--bench", str(f), "--scale", "smoke", "--out", str(tmp_path / "o")])
    assert message in _one_line(capsys, rc)
    assert not (tmp_path / "o").exists()


def test_the_shipped_federated_config_is_valid():
    for scale in ("smoke", "full"):
        cfg = load_fl_config("fl", scale)
        assert cfg["clients"] == 5 and cfg["one_shot"]["method"] == "kf-linear"
    assert (FL_CONFIGS / "fl.json").is_file()


def test_class_shares_are_on_by_default_where_the_method_takes_class_weights():
    """``FederatedConfig`` and ``neurofuse federate`` weigh the output level by the clients' class
    shares unless told not to (issue 23); a method without ``class_weights`` (FedAvg) runs as is,
    and the ``fl`` benchmark keeps its method plain (the class-share rows are in its compare)."""
    from neurofuse.cli import build_parser
    from neurofuse.federated import ClassShareWeighting
    from neurofuse.federated._bench import _cells

    assert isinstance(FederatedConfig().aggregation(), ClassShareWeighting)
    assert FederatedConfig(class_shares=False).aggregation().label == "kf-linear"
    assert FederatedConfig(method="vanilla").aggregation().label == "vanilla"
    parser = build_parser()
    assert parser.parse_args(["federate"]).class_shares is True
    assert parser.parse_args(["federate", "--no-class-shares"]).class_shares is False
    cells = _cells(load_fl_config("fl", "smoke"), "local", None, None, ("one_shot", "multi_round"))
    assert cells and all(fc.aggregation().label == "kf-linear" for _, fc in cells)


def test_federate_keeps_an_existing_plot_without_force(tmp_path, capsys):
    out = tmp_path / "fed"
    out.mkdir()
    (out / "accuracy.png").write_bytes(b"my plot")
    rc = main(["federate", "--clients", "2", "--size", "tiny", "--epochs", "1", "--backend", "local",
               "--out", str(out)])
    assert "accuracy.png exists; pass --force" in _one_line(capsys, rc)
    assert (out / "accuracy.png").read_bytes() == b"my plot" and not (out / "results.json").exists()


@pytest.mark.parametrize("name", ["results.json", "report.md", "one_shot-shared-alpha0.5.json"])
def test_federate_bench_keeps_existing_outputs_without_force(tmp_path, capsys, name):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(_bench_doc()))
    out = tmp_path / "bench"
    out.mkdir()
    (out / name).write_text("previous results")
    argv = ["federate", "--bench", str(cfg), "--scale", "smoke", "--backend", "local", "--out", str(out)]
    assert f"{name} exists; pass --force" in _one_line(capsys, main(argv))
    assert (out / name).read_text() == "previous results"
    assert [p.name for p in out.iterdir()] == [name]
    if name == "report.md":   # with --force the run replaces them
        assert main([*argv, "--force"]) == 0
        assert (out / "report.md").read_text().startswith("# t (smoke)")
        assert json.loads((out / "results.json").read_text())["cells"]
        assert Path(out / "one_shot-shared-alpha0.5.json").is_file()


def test_a_method_that_cannot_fuse_the_architecture_fails_before_any_client_trains(tmp_path, monkeypatch, capsys):
    import neurofuse.federated._run as run

    def no_clients(*args, **kwargs):
        raise AssertionError("a client app was built: the run started")
    monkeypatch.setattr(run, "make_client_app", no_clients)
    # kf-linear fits a residual block layer by layer where the data is, not from one round of statistics
    rc = main(["federate", "--arch", "resnet", "--size", "tiny", "--method", "kf-linear", "--no-server-data",
               "--clients", "2", "--epochs", "1", "--backend", "local", "--out", str(tmp_path / "o")])
    assert "level 1 of these models is fitted one layer at a time" in _one_line(capsys, rc)
    assert not (tmp_path / "o").exists()
