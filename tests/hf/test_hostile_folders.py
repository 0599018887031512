"""Hostile and careless Hugging Face inputs: nothing lost, no code run, no silent result.

Properties checked: ``fuse --hf --out`` never removes an input folder, the data file or the
working directory, and ``--force`` replaces only a folder neurofuse wrote; a crash while the
folder is written keeps the previous output; a folder whose config names code (``auto_map``) is
refused without a prompt and its code never runs; missing or integer weights, a malformed
``neurofuse_ensemble.json``, members outside the ensemble's folder and an empty ``--hf-data``
file are one-line errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import neurofuse  # noqa: E402
import neurofuse.hf as nh  # noqa: E402
from neurofuse.cli import main  # noqa: E402
from neurofuse.errors import CheckpointError, OutputExistsError  # noqa: E402

from .test_adapters import tiny  # noqa: E402


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfhostile")
    ds = nh.token_task(n_train=60, n_test=30, seed=0)
    save_file({"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test,
               "y_test": ds.y_test}, str(root / "tokens.safetensors"))
    for i in range(2):
        tiny("bert", i).hf_model.save_pretrained(str(root / "in" / f"bert{i}"))
    return root


def _fuse(work: Path, out, *extra: str) -> list:
    return ["fuse", "--hf", str(work / "in" / "bert0"), str(work / "in" / "bert1"), "--method", "vanilla",
            "--hf-data", str(work / "tokens.safetensors"), "--fusion-samples", "20", "--out", str(out),
            "--no-progress", *extra]


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("neurofuse: error:") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("target", ["parent", "input", "data", "cwd", "inside"])
def test_an_output_folder_never_is_holds_or_lies_inside_an_input(work, capsys, monkeypatch, target):
    before = _digest(work)
    out = {"parent": work / "in", "input": work / "in" / "bert0", "data": work / "tokens.safetensors",
           "cwd": Path("."), "inside": work / "in" / "bert1" / "sub"}[target]
    monkeypatch.chdir(work)
    err = _one_line_error(capsys, main(_fuse(work, out, "--force")))
    assert "choose" in err or "give" in err
    assert _digest(work) == before          # nothing deleted, nothing replaced


def test_force_replaces_only_a_folder_neurofuse_wrote(work, tmp_path, capsys):
    out = tmp_path / "fused"
    assert main(_fuse(work, out)) == 0
    capsys.readouterr()
    assert main(_fuse(work, out, "--force")) == 0                 # its own output: replaced
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")                        # the user's file in it
    err = _one_line_error(capsys, main(_fuse(work, out, "--force")))
    assert "notes.txt" in err and (out / "notes.txt").read_text() == "mine"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    err = _one_line_error(capsys, main(_fuse(work, foreign, "--force")))
    assert "not written by neurofuse" in err and (foreign / "thesis.tex").exists()


def test_a_crash_while_writing_keeps_the_previous_output(work, tmp_path, monkeypatch):
    net = tiny("bert", 0)
    out = nh.save_pretrained(net, tmp_path / "fused")
    before = _digest(out)
    from neurofuse.hf import _io

    def crash(view, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{")
        raise KeyboardInterrupt   # killed half-way
    monkeypatch.setattr(_io, "_save_one", crash)
    with pytest.raises(KeyboardInterrupt):
        nh.save_pretrained(tiny("bert", 1), out, force=True)
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]   # no temporary folder left


def test_a_crash_while_the_old_output_is_removed_leaves_a_whole_output(work, tmp_path, monkeypatch):
    out = nh.save_pretrained(tiny("bert", 0), tmp_path / "fused")
    old = _digest(out)
    new_dir = nh.save_pretrained(tiny("bert", 1), tmp_path / "reference")
    new = {k: v for k, v in _digest(new_dir).items()}
    shutil.rmtree(new_dir)
    real = shutil.rmtree

    def killed(path, *args, **kwargs):   # the process dies after removing one file
        files = [p for p in Path(path).rglob("*") if p.is_file()]
        if files:
            files[0].unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        nh.save_pretrained(tiny("bert", 1), out, force=True)
    monkeypatch.setattr(shutil, "rmtree", real)
    got = _digest(out)
    assert got == old or {k: v for k, v in got.items() if k != ".neurofuse-output.json"} == \
        {k: v for k, v in new.items() if k != ".neurofuse-output.json"}


def test_a_folder_whose_config_names_code_is_refused_without_running_it(work, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(work / "in" / "bert0", evil)
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(model_type="evilnet", auto_map={"AutoConfig": "evil.EvilConfig"})
    (evil / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "PWNED"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import BertConfig as EvilConfig\n")
    code = f"import neurofuse.hf as nh; nh.load_pretrained({str(evil)!r}, (12,))"
    proc = subprocess.run([sys.executable, "-c", code], input="y\ny\n", capture_output=True, text=True,
                          timeout=300)
    assert not marker.exists(), "the folder's Python file ran"
    assert "auto_map" in proc.stderr and "never" in proc.stderr and "[y/N]" not in proc.stdout
    with pytest.raises(CheckpointError, match="auto_map"):
        nh.load_pretrained(evil, (12,))


def _tamper(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    edit(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


def test_missing_or_integer_weights_are_errors(work, tmp_path):
    src = work / "in" / "bert0"
    head = "classifier.weight"
    no_head = _tamper(src, tmp_path / "nohead", lambda t: t.pop(head))
    with pytest.raises(CheckpointError, match=r"lacks tensor.*classifier\.weight"):
        nh.load_pretrained(no_head, (12,))
    ints = _tamper(src, tmp_path / "ints", lambda t: t.update({head: t[head].round().long()}))
    with pytest.raises(CheckpointError, match="I64 values.*refusing to cast"):
        nh.load_pretrained(ints, (12,))


def test_a_config_of_a_huge_model_is_refused_before_anything_is_allocated(work, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(work / "in" / "bert0", big)
    cfg = json.loads((big / "config.json").read_text())
    cfg.update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=48)
    (big / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="more than"):
        nh.load_pretrained(big, (12,))


def test_a_folder_of_pickled_weights_only_is_refused(work, tmp_path):
    pkl = tmp_path / "pkl"
    shutil.copytree(work / "in" / "bert0", pkl)
    (pkl / "model.safetensors").rename(pkl / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no model.safetensors.*pytorch_model.bin.*safetensors only"):
        nh.load_pretrained(pkl, (12,))


@pytest.mark.parametrize("doc,message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "does not list its members"),
    ('{"class_weights": null}', "does not list its members"),
    ('{"members": ["../../in/bert0"]}', "not a sub-folder"),
    ('{"members": ["/etc"]}', "not a sub-folder"),
    ('{"members": ["m"], "class_weights": [[1, 2], [3]]}', "class_weights"),
])
def test_a_malformed_ensemble_file_is_a_one_line_error(work, tmp_path, capsys, doc, message):
    ens = tmp_path / "ens"
    ens.mkdir()
    shutil.copytree(work / "in" / "bert0", ens / "m")
    (ens / "neurofuse_ensemble.json").write_text(doc)
    with pytest.raises(CheckpointError, match=message):
        nh.load_pretrained(ens, (12,))
    rc = main(["fuse", "--hf", str(ens), str(work / "in" / "bert1"), "--method", "vanilla", "--hf-data",
               str(work / "tokens.safetensors"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert "is an ensemble folder" in _one_line_error(capsys, rc)   # fuse takes its members


@pytest.mark.parametrize("content,message", [
    (b"", "cannot read --hf-data"),
    ({"x_train": torch.zeros(0, 12, dtype=torch.long), "y_train": torch.zeros(0, dtype=torch.long)},
     "no training sample"),
    ({"x_train": torch.zeros(4, 12, dtype=torch.long), "y_train": torch.zeros(4)}, "integer labels"),
    ({"x_train": torch.zeros(4, 12, dtype=torch.long), "y_train": torch.zeros(3, dtype=torch.long)},
     "one sample per label"),
    ({"x_train": torch.zeros(2, 12, dtype=torch.long), "y_train": torch.tensor([0, -1])}, "label -1"),
    ({"x_train": torch.full((4, 12), 1000), "y_train": torch.zeros(4, dtype=torch.long)},
     "token id 1000, outside the models' vocabulary [0, 25)"),
    ({"x_train": torch.full((4, 12), -3), "y_train": torch.zeros(4, dtype=torch.long)}, "token id -3"),
    ({"x_train": torch.zeros(4, 12), "y_train": torch.zeros(4, dtype=torch.long)}, "takes integer token ids"),
])
def test_a_bad_data_file_is_a_one_line_error(work, tmp_path, capsys, content, message):
    f = tmp_path / "d.safetensors"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        save_file(content, str(f))
    rc = main(["fuse", "--hf", str(work / "in" / "bert0"), str(work / "in" / "bert1"), "--hf-data", str(f),
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert message in _one_line_error(capsys, rc)
    assert not (tmp_path / "o").exists()


def test_an_ensemble_round_trips_and_is_replaced_whole(work, tmp_path):
    ens = neurofuse.fuse([tiny("bert", 0), tiny("bert", 1)], None, method="ensemble", progress=False)
    out = nh.save_pretrained(ens, tmp_path / "ens")
    assert isinstance(nh.load_pretrained(out), neurofuse.models.ensemble.Ensemble)
    nh.save_pretrained(tiny("bert", 0), out, force=True)     # an ensemble folder replaced by one model
    assert not (out / "member_0").exists() and (out / "config.json").is_file()
    with pytest.raises(OutputExistsError, match="exists"):
        nh.save_pretrained(tiny("bert", 0), out)
