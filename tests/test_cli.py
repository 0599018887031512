"""The command line: demo output, train -> fuse -> eval, and one-line errors that lose nothing."""

import json
from pathlib import Path

import pytest

from neurofuse.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("neurofuse: error: "), err
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert main(["train", "--out", str(out), "--models", "2", "--size", "tiny", "--epochs", "8",
                 "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_demo_writes_results_json_with_the_documented_fields(tmp_path, capsys):
    code, out, _ = _run(capsys, "demo", "--out", str(tmp_path / "d"), "--models", "2", "--epochs", "10",
                        "--methods", "kf-linear,hf-linear,vanilla,ensemble", "--no-progress")
    assert code == 0
    doc = json.loads((tmp_path / "d" / "results.json").read_text())
    assert {"dataset", "partition", "n_models", "seed", "base_models", "methods"} <= set(doc)
    assert doc["dataset"] == "digits" and doc["partition"] == "dirichlet" and doc["n_models"] == 2
    assert len(doc["base_models"]) == 2
    for key in ("kf-linear/uniform", "kf-linear/conductance", "kf-linear/deeplift",
                "hf-linear/uniform", "vanilla", "ensemble"):
        r = doc["methods"][key]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["seconds"] >= 0.0
    assert (tmp_path / "d" / "accuracy.png").stat().st_size > 1000
    assert "kf-linear/uniform" in out and "mean base model" in out


def test_demo_refuses_to_overwrite_results_without_force(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "results.json").write_text("keep me")
    code, _, err = _run(capsys, "demo", "--out", str(d), "--no-progress")
    _assert_one_line_error(code, err, "exists; pass --force")
    assert (d / "results.json").read_text() == "keep me"


def test_train_fuse_eval_round_trip(trained, tmp_path, capsys):
    ckpts = [str(trained / "model_0.safetensors"), str(trained / "model_1.safetensors")]
    fused = tmp_path / "fused.safetensors"
    code, out, _ = _run(capsys, "fuse", *ckpts, "--out", str(fused), "--method", "hf-linear",
                        "--no-progress")
    assert code == 0 and fused.exists() and "test accuracy" in out
    code, out, _ = _run(capsys, "eval", str(fused), *ckpts)
    assert code == 0 and "fused.safetensors" in out
    split = json.loads((trained / "split.json").read_text())
    assert sum(len(p) for p in split["parts"]) == 1437


def test_fuse_names_a_nearly_square_level_fit_in_one_warning_line(trained, tmp_path, capsys, caplog):
    """32 fusion samples for levels with 32 inputs + bias: each such level gets one warning
    line naming it, its size and condition, and the ridge GCV chose for it."""
    caplog.set_level("WARNING", logger="neurofuse")
    ckpts = [str(trained / "model_0.safetensors"), str(trained / "model_1.safetensors")]
    code, out, _ = _run(capsys, "fuse", *ckpts, "--out", str(tmp_path / "f.safetensors"),
                        "--fusion-samples", "32", "--no-progress")
    assert code == 0 and "test accuracy" in out
    lines = [r.getMessage() for r in caplog.records
             if r.levelname == "WARNING" and "least-squares fit" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines), lines
    assert lines[0].startswith("level 1: least-squares fit nearly square (32 rows, "), lines[0]
    assert "condition number" in lines[0] and "chosen by GCV" in lines[0], lines[0]


def test_fuse_refuses_existing_output_and_never_overwrites_an_input(trained, tmp_path, capsys):
    ckpts = [str(trained / "model_0.safetensors"), str(trained / "model_1.safetensors")]
    before = Path(ckpts[0]).read_bytes()
    code, _, err = _run(capsys, "fuse", *ckpts, "--out", ckpts[0], "--force", "--no-progress")
    _assert_one_line_error(code, err, "is one of the inputs")
    assert Path(ckpts[0]).read_bytes() == before
    existing = tmp_path / "x.safetensors"
    existing.write_bytes(b"old")
    code, _, err = _run(capsys, "fuse", *ckpts, "--out", str(existing), "--no-progress")
    _assert_one_line_error(code, err, "exists; pass --force")
    assert existing.read_bytes() == b"old"


def test_corrupt_or_truncated_checkpoint_is_a_one_line_error(trained, tmp_path, capsys):
    good = (trained / "model_0.safetensors").read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good[: len(good) // 2])
    code, _, err = _run(capsys, "eval", str(bad), "--dataset", "digits")
    _assert_one_line_error(code, err, "corrupt or truncated")
    code, _, err = _run(capsys, "fuse", str(bad), str(trained / "model_1.safetensors"),
                        "--out", str(tmp_path / "o.safetensors"), "--dataset", "digits")
    _assert_one_line_error(code, err, "corrupt or truncated")
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_data_files_name_what_is_expected_and_where(tmp_path, capsys):
    code, _, err = _run(capsys, "demo", "--dataset", "mnist", "--data-dir", str(tmp_path),
                        "--out", str(tmp_path / "o"), "--no-progress")
    _assert_one_line_error(code, err, "train-images-idx3-ubyte")
    assert str(tmp_path) in err


def test_models_of_different_depth_are_refused_by_fuse(tmp_path, capsys):
    for i, hidden in enumerate(("8", "8,8")):
        assert main(["train", "--out", str(tmp_path / f"m{i}"), "--models", "1", "--epochs", "1",
                     "--size", "tiny", "--no-progress"]) == 0
    # make the second one deeper by training an MLP of another preset is not possible from the CLI,
    # so build it through the API and save it
    from neurofuse.checkpoint import save_model
    from neurofuse.models import MLP

    deep = tmp_path / "deep.safetensors"
    save_model(MLP((1, 8, 8), 10, [8, 8, 8]), deep, metadata={"dataset": "digits"})
    code, _, err = _run(capsys, "fuse", str(tmp_path / "m0" / "model_0.safetensors"), str(deep),
                        "--out", str(tmp_path / "f.safetensors"), "--no-progress")
    _assert_one_line_error(code, err, "levels")


def test_methods_lists_the_registry_in_aligned_columns(capsys):
    from neurofuse.methods import get_method, list_methods

    code, out, _ = _run(capsys, "methods")
    assert code == 0 and "kf-linear" in out and "hf-linear" in out and "vanilla" in out
    lines = [line for line in out.splitlines() if line.split(" ", 1)[0] in list_methods()]
    assert len(lines) == len(list_methods())
    # the summaries start in one column, after the longest name
    starts = {line.index(get_method(line.split(" ", 1)[0]).summary) for line in lines}
    assert starts == {max(len(n) for n in list_methods()) + 1}


def test_fuse_with_repair_and_finetune_then_finetune_command(trained, tmp_path, capsys):
    ckpts = [str(trained / "model_0.safetensors"), str(trained / "model_1.safetensors")]
    fused = tmp_path / "f.safetensors"
    code, out, _ = _run(capsys, "fuse", *ckpts, "--out", str(fused), "--method", "otfusion",
                        "--option", "solver=sinkhorn", "--repair", "--finetune", "2", "--no-progress")
    assert code == 0 and fused.exists(), out
    code, out, _ = _run(capsys, "finetune", str(fused), "--out", str(tmp_path / "g.safetensors"),
                        "--epochs", "1", "--no-progress")
    assert code == 0 and "->" in out
    code, _, err = _run(capsys, "finetune", str(fused), "--out", str(fused), "--epochs", "1")
    _assert_one_line_error(code, err, "is one of the inputs")


def test_fuse_with_distill_toward_the_class_share_ensemble(trained, tmp_path, capsys):
    ckpts = [str(trained / "model_0.safetensors"), str(trained / "model_1.safetensors")]
    fused = tmp_path / "d.safetensors"
    code, out, _ = _run(capsys, "fuse", *ckpts, "--out", str(fused), "--method", "kf-linear",
                        "--head-weights", "--distill", "3", "--distill-extra", "50",
                        "--distill-lr", "1e-3", "--distill-mixup", "0", "--no-progress")
    assert code == 0 and fused.exists() and "distilled 3 epochs" in out, out
    from neurofuse.checkpoint import read_config

    meta = read_config(fused)["metadata"]
    assert meta["distill"] == 3 and meta["distill_extra"] == 50
    code, _, err = _run(capsys, "fuse", *ckpts, "--out", str(tmp_path / "e.safetensors"),
                        "--distill", "1", "--distill-mixup", "2", "--no-progress")
    _assert_one_line_error(code, err, "mixup must be in [0, 1]")
    assert not (tmp_path / "e.safetensors").exists()


def test_align_prints_the_alignment_and_fuse_accepts_depth_align(tmp_path, capsys):
    import torch

    from neurofuse.checkpoint import save_model
    from neurofuse.models import MLP

    paths = []
    for i, hidden in enumerate(([16, 16], [16, 16, 16, 16])):
        torch.manual_seed(i)
        p = tmp_path / f"m{i}.safetensors"
        save_model(MLP((1, 8, 8), 10, hidden), p, metadata={"dataset": "digits"})
        paths.append(str(p))
    code, out, _ = _run(capsys, "align", *paths, "--plot", str(tmp_path / "a.png"))
    assert code == 0 and "identity levels at" in out and (tmp_path / "a.png").exists()
    code, out, _ = _run(capsys, "fuse", *paths, "--depth", "align", "--out", str(tmp_path / "f.safetensors"),
                        "--no-progress")
    assert code == 0
    from neurofuse.checkpoint import load_model

    assert load_model(tmp_path / "f.safetensors").num_levels == 5


@pytest.mark.parametrize("argv,pattern", [
    (["fuse", "a.safetensors", "--out", "x", "--width", "abc"], "--width"),
    (["train", "--out", "x", "--epochs", "0"], "--epochs"),
    (["fuse", "a.safetensors", "--out", "x", "--seed", "-1"], "--seed"),
    (["demo", "--methods", "nosuch", "--out", "x"], "unknown fusion method 'nosuch'"),
])
def test_bad_arguments_are_one_line_errors(argv, pattern, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits
        code = exc.code
    _, err = capsys.readouterr()
    _assert_one_line_error(code, err, pattern)


def test_option_values_of_the_wrong_type_are_refused(trained, tmp_path, capsys):
    ckpts = [str(trained / "model_0.safetensors"), str(trained / "model_1.safetensors")]
    for opt, pattern in (("n_init=abc", "must be an integer >= 1, got 'abc'"), ("n_init", "KEY=VALUE")):
        code, _, err = _run(capsys, "fuse", *ckpts, "--option", opt, "--out", str(tmp_path / "u.safetensors"))
        _assert_one_line_error(code, err, pattern)


def test_fuse_distributed_under_torchrun_writes_the_single_process_checkpoint(trained, tmp_path):
    """`torchrun --nproc-per-node 2 -m neurofuse fuse ... --distributed`: rank 0 writes a
    checkpoint equal to the one-process fusion."""
    import os
    import socket
    import subprocess
    import sys

    from neurofuse.checkpoint import load_model

    ckpts = [str(trained / "model_0.safetensors"), str(trained / "model_1.safetensors")]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert main(["fuse", *ckpts, "--out", str(one), "--no-progress"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
         "127.0.0.1", "--master-port", str(port), "-m", "neurofuse", "fuse", *ckpts, "--out", str(two),
         "--no-progress", "--distributed"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("test accuracy") == 1  # only rank 0 reports
    a, b = load_model(one), load_model(two)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert (v - w).abs().max() <= 1e-6, k


def test_fuse_distributed_outside_torchrun_is_a_one_line_error(trained, tmp_path, capsys):
    ckpts = [str(trained / "model_0.safetensors"), str(trained / "model_1.safetensors")]
    code, _, err = _run(capsys, "fuse", *ckpts, "--out", str(tmp_path / "f.safetensors"),
                        "--distributed", "--no-progress")
    _assert_one_line_error(code, err, "torchrun")
