"""The command line against bad inputs: no output ever replaces an input, every output is checked
before any work, and every user error (including OS, recursion and memory errors) is one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from neurofuse import cli
from neurofuse.checkpoint import save_model
from neurofuse.cli import main
from neurofuse.models import MLP


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, pattern):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("neurofuse: error: "), err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two untrained digits MLPs saved as checkpoints, with a split.json beside them."""
    d = tmp_path_factory.mktemp("ckpts")
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        m = MLP((1, 8, 8), 10, [16, 12])
        paths.append(save_model(m, d / f"model_{i}.safetensors",
                                metadata={"dataset": "digits", "model_index": i}))
    (d / "split.json").write_text(json.dumps({"class_shares": [[0.5] * 10, [0.5] * 10]}))
    return paths


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts loading models (i.e. does work before a check)."""
    def boom(*_a, **_k):
        raise AssertionError("the command loaded models before checking its arguments")

    monkeypatch.setattr(cli, "_load_all", boom)
    monkeypatch.setattr("neurofuse.checkpoint.load_model", boom)


# -- data loss: no output is ever an input -----------------------------------------------------
def test_eval_json_never_replaces_an_input_checkpoint_even_with_force(ckpts, capsys):
    before = _sha(ckpts[0])
    code, _, err = _run(capsys, "eval", ckpts[0], "--json", ckpts[0], "--force")
    _one_line_error(code, err, "is one of the inputs")
    assert _sha(ckpts[0]) == before


def test_align_plot_never_replaces_an_input_checkpoint_even_with_force(ckpts, capsys):
    before = _sha(ckpts[0])
    code, _, err = _run(capsys, "align", *ckpts, "--plot", ckpts[0], "--force")
    _one_line_error(code, err, "is one of the inputs")
    assert _sha(ckpts[0]) == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_an_output_linked_to_an_input_is_refused(ckpts, tmp_path, capsys, link):
    alias = tmp_path / "alias.safetensors"
    (os.symlink if link == "symlink" else os.link)(ckpts[0], alias)
    before = _sha(ckpts[0])
    for argv in (["fuse", *ckpts, "--out", alias, "--force", "--method", "vanilla"],
                 ["finetune", ckpts[0], "--out", alias, "--force"]):
        code, _, err = _run(capsys, *argv, "--no-progress")
        _one_line_error(code, err, "is one of the inputs")
    assert _sha(ckpts[0]) == before


def test_head_weights_split_json_is_an_input_of_fuse(ckpts, capsys, no_work):
    split = Path(ckpts[0]).parent / "split.json"
    before = _sha(split)
    code, _, err = _run(capsys, "fuse", *ckpts, "--head-weights", "--out", split, "--force")
    _one_line_error(code, err, "is one of the inputs")
    assert _sha(split) == before


def test_an_existing_file_of_the_data_directory_is_never_an_output(ckpts, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    keep = data / "labels.json"
    keep.write_text("{}")
    code, _, err = _run(capsys, "eval", ckpts[0], "--dataset", "digits", "--data-dir", data,
                        "--json", keep, "--force")
    _one_line_error(code, err, "data directory")
    assert keep.read_text() == "{}"


def test_two_outputs_may_not_be_the_same_file(ckpts, tmp_path, capsys, no_work):
    code, _, err = _run(capsys, "align", *ckpts, "--plot", tmp_path / "a.png",
                        "--json", tmp_path / "a.png")
    _one_line_error(code, err, "same file")


# -- late errors: every output is checked before any work ---------------------------------------
@pytest.mark.parametrize("argv, pattern", [
    (["fuse", "{0}", "{1}", "--out", "{tmp}/fused.pt"], "must end in .safetensors"),
    (["fuse", "{0}", "{1}", "--out", "{tmp}"], "is a directory"),
    (["fuse", "{0}", "{1}", "--out", "{file}/x.safetensors"], "is a file, not a directory"),
    (["finetune", "{0}", "--out", "{tmp}/tuned.bin"], "must end in .safetensors"),
    (["eval", "{0}", "--json", "{tmp}/scores.txt"], "must end in .json"),
    (["align", "{0}", "{1}", "--plot", "{tmp}/plot.pdf"], "must end in .png"),
    (["align", "{0}", "{1}", "--json", "{tmp}/old.json"], "exists; pass --force"),
    (["train", "--out", "{file}"], "is a file"),
    (["demo", "--out", "{file}"], "is a file"),
    (["fuse", "{0}", "{1}", "--out", "{tmp}/f.safetensors", "--seed", str(2**64)], "--seed"),
    (["fuse", "{0}", "{1}", "--out", "{tmp}/f.safetensors", "--device", "foo"], "--device"),
    (["fuse", "{0}", "{1}", "--out", "{tmp}/f.safetensors", "--device", "meta"], "--device"),
    (["fuse", "{0}", "{1}", "--out", "{tmp}/f.safetensors", "--option", "device=cpu"],
     "clashes"),
    (["fuse", "{0}", "{1}", "--out", "{tmp}/f.safetensors", "--option", "seed=3"], "use --seed"),
    (["align", "{0}"], "two or more models"),
])
def test_bad_arguments_fail_in_one_line_before_any_work(ckpts, tmp_path, capsys, no_work, argv,
                                                         pattern):
    file = tmp_path / "plain.txt"
    file.write_text("x")
    (tmp_path / "old.json").write_text("x")
    argv = [a.format(*ckpts, tmp=tmp_path, file=file) for a in argv]
    code, _, err = _run(capsys, *argv, *(["--no-progress"] if argv[0] in ("fuse", "finetune", "train",
                                                                          "demo") else []))
    _one_line_error(code, err, pattern)
    assert file.read_text() == "x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_device_cuda_without_cuda_is_a_clear_error(ckpts, tmp_path, capsys, no_work):
    code, _, err = _run(capsys, "fuse", *ckpts, "--out", tmp_path / "f.safetensors", "--device", "cuda")
    _one_line_error(code, err, "not available on this machine")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"class_shares": "x"}',
                                     '{"class_shares": [[0.5], [1, 2]]}', "[" * 100000])
def test_malformed_split_json_for_head_weights_is_one_line(ckpts, tmp_path, capsys, content):
    d = tmp_path / "m"
    d.mkdir()
    copies = []
    for p in ckpts:
        copies.append(d / Path(p).name)
        copies[-1].write_bytes(Path(p).read_bytes())
    (d / "split.json").write_text(content)
    code, _, err = _run(capsys, "fuse", *copies, "--head-weights", "--method", "ensemble",
                        "--out", tmp_path / "f.safetensors", "--no-progress")
    _one_line_error(code, err, "split.json")


# -- OS, recursion and memory errors are one line ------------------------------------------------
def test_an_os_error_while_writing_is_one_line(ckpts, tmp_path, capsys, monkeypatch):
    def read_only(obj, path, **_k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr("neurofuse.checkpoint.save_json", read_only)
    code, _, err = _run(capsys, "eval", ckpts[0], "--json", tmp_path / "s.json")
    _one_line_error(code, err, "Read-only file system")


def test_an_allocator_error_is_one_line(ckpts, capsys, monkeypatch):
    def no_memory(*_a, **_k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 4398046511104 bytes.")

    monkeypatch.setattr("neurofuse.training.evaluate", no_memory)
    code, _, err = _run(capsys, "eval", ckpts[0])
    _one_line_error(code, err, "out of memory")


def test_a_checkpoint_with_deeply_nested_metadata_is_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    m = MLP((1, 8, 8), 10, [4])
    doc = ('{"format": "neurofuse-checkpoint", "version": 1, "config": ' + json.dumps(m.config())
           + ', "metadata": {"dataset": "digits", "x": ' + "[" * 50000 + "]" * 50000 + "}}")
    path = tmp_path / "deep.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path),
              metadata={"neurofuse": doc})
    code, _, err = _run(capsys, "eval", path, "--dataset", "digits")
    _one_line_error(code, err, "nested")


def test_a_non_module_recursion_error_in_a_command_is_one_line(ckpts, capsys, monkeypatch):
    def deep(*_a, **_k):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(cli, "_load_all", deep)
    code, _, err = _run(capsys, "eval", ckpts[0], "--dataset", "digits")
    _one_line_error(code, err, "nested too deeply")


def test_a_truncated_checkpoint_is_reported_as_corrupt_not_as_a_missing_dataset(tmp_path, capsys):
    model = MLP((1, 8, 8), 10, [8])
    good = save_model(model, tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:300])
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurofuse: error:") and "bad.safetensors" in err and "--dataset" not in err


def test_a_closed_pipe_ends_quietly():
    """``neurofuse methods | head -1``: once the reader is gone, no traceback and no error line."""
    import subprocess
    import sys

    code = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "
            "sys.stdout.reconfigure(line_buffering=True); "
            "from neurofuse.cli import main; sys.exit(main(['methods']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr
