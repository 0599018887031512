"""Folder outputs of the command line: written whole, never mixed, never over an input.

Properties checked: ``train --force`` killed while it writes leaves the previous run whole (not a
mix of two runs); an output folder is never the working folder or one holding the user's
files; ``--force`` replaces a folder neurofuse wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from neurofuse.cli import main


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _train(out: Path, seed: int, *extra: str) -> list:
    return ["train", "--out", str(out), "--models", "2", "--size", "tiny", "--epochs", "1",
            "--seed", str(seed), "--no-progress", *extra]


def test_train_force_killed_while_writing_leaves_the_previous_run_whole(tmp_path, monkeypatch, capsys):
    out = tmp_path / "base"
    assert main(_train(out, 0)) == 0
    first = _files(out)
    import neurofuse.checkpoint as ckpt

    real, calls = ckpt.save_model, []

    def killed_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt   # the process is killed between two models
        return real(*args, **kwargs)
    monkeypatch.setattr(ckpt, "save_model", killed_after_one)
    assert main(_train(out, 1, "--force")) == 130
    assert _files(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]   # no temporary folder left
    monkeypatch.setattr(ckpt, "save_model", real)
    assert main(_train(out, 1, "--force")) == 0
    second = _files(out)
    assert second.keys() == first.keys() and second["model_0.safetensors"] != first["model_0.safetensors"]
    capsys.readouterr()


def test_train_never_replaces_the_working_folder_or_the_users_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert main(_train(Path("."), 0, "--force")) == 2
    assert "working directory" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path.parent)
    assert main(_train(tmp_path, 0, "--force")) == 2
    assert "not written by neurofuse" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "model_0.safetensors").exists()


def test_bench_run_checks_its_output_folder_first(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["bench", "run", "table1", "--scale", "smoke", "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "afile").read_text() == "x"
