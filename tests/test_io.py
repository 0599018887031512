"""Tests of neurofuse._io: every output is written atomically, durably and with a normal mode."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from neurofuse import _io
from neurofuse.checkpoint import load_model, save_json, save_model
from neurofuse.models import MLP

SRC = Path(_io.__file__).parent


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(input_shape=(4,), num_classes=3, hidden=(5,))


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_a_new_checkpoint_gets_the_umask_mode_of_a_normal_file_not_0600(tmp_path, umask, mask):
    umask(mask)
    p = save_model(_mlp(), tmp_path / "m.safetensors")
    j = save_json({"a": 1}, tmp_path / "m.json")
    expected = 0o666 & ~mask
    assert stat.S_IMODE(p.stat().st_mode) == expected
    assert stat.S_IMODE(j.stat().st_mode) == expected


def test_overwriting_keeps_the_mode_of_the_replaced_file(tmp_path, umask):
    umask(0o022)
    p = _io.write_text(tmp_path / "a.txt", "one")
    os.chmod(p, 0o640)
    _io.write_text(p, "two")
    assert p.read_text() == "two" and stat.S_IMODE(p.stat().st_mode) == 0o640


@pytest.mark.parametrize("writer", ["bytes", "text", "json", "safetensors", "checkpoint", "figure"])
def test_every_writer_fsyncs_the_file_and_then_its_directory(tmp_path, monkeypatch, writer):
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if writer == "bytes":
        _io.write_bytes(tmp_path / "out.bin", b"\x00\x01")
    elif writer == "text":
        _io.write_text(tmp_path / "out.txt", "x")
    elif writer == "json":
        save_json({"a": 1}, tmp_path / "out.json")
    elif writer == "safetensors":
        _io.write_safetensors(tmp_path / "out.safetensors", {"w": torch.ones(2)})
    elif writer == "checkpoint":
        save_model(_mlp(), tmp_path / "out.safetensors")
    else:
        from neurofuse.plots import accuracy_bars

        accuracy_bars([0.5, 0.6], {"vanilla": 0.4}, tmp_path / "out.png")
    assert synced == ["file", "dir"], synced
    assert len(list(tmp_path.iterdir())) == 1, "a temporary file was left behind"


def test_new_parent_directories_are_made_durable_too(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "dir")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = _io.write_text(tmp_path / "a" / "b" / "c.txt", "x")
    assert target.read_text() == "x"
    if os.path.exists("/proc/self/fd"):
        root = tmp_path.resolve()
        assert synced == [str(root), str(root / "a"), str(root / "a" / "b")], synced


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = _io.write_text(tmp_path / "keep.json", "old")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _io.atomic_write(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


def test_json_that_cannot_be_serialised_does_not_touch_the_file(tmp_path):
    target = _io.write_text(tmp_path / "a.json", "old")
    with pytest.raises(TypeError):
        _io.write_json(target, {"x": object()})
    assert target.read_text() == "old"


def test_a_checkpoint_round_trips_through_the_atomic_writer(tmp_path):
    m = _mlp()
    back = load_model(save_model(m, tmp_path / "m.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))


def _record_temporary_names(monkeypatch) -> list:
    names: list = []
    real = _io.atomic_write

    def spy(path, write):
        return real(path, lambda tmp: (names.append(tmp.name), write(tmp))[1])

    monkeypatch.setattr(_io, "atomic_write", spy)
    return names


def test_figure_writers_use_a_unique_temporary_name_each_time(tmp_path, monkeypatch):
    from neurofuse.bench._figures import _pyplot, _save
    from neurofuse.plots import save_figure

    names = _record_temporary_names(monkeypatch)
    plt = _pyplot()
    for write in (save_figure, _save, save_figure, _save):
        fig = plt.figure()
        write(fig, tmp_path / "fig.png")
    assert len(names) == 4 and len(set(names)) == 4, names
    assert all(n.startswith(".fig.png.") and n.endswith(".tmp") for n in names)
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]


def test_figure_stamp_files_are_written_atomically(tmp_path, monkeypatch):
    from neurofuse.bench import _figures

    names = _record_temporary_names(monkeypatch)
    monkeypatch.setattr(_figures, "clustering_figure",
                        lambda cfg, ds, path, device="cpu": _io.write_bytes(path, b"png"))
    cfg = SimpleNamespace(figures=("clustering",), figure_options={}, dataset="digits",
                          train_subsample=None, fusion_samples=10, ratio=0.2, train={}, splits=(2,))
    assert _figures.make_figures(cfg, tmp_path) == ["clustering.png"]
    assert any(n.startswith(".clustering.key.") for n in names), names
    assert (tmp_path / ".clustering.key").is_file()


# names of calls that write or rename a file; only neurofuse/_io.py may make them
_RAW_WRITES = re.compile(r"os\.replace\(|os\.rename\(|\.rename\(|\.replace\(tmp|\.write_text\(|"
                         r"\.write_bytes\(|savefig\(|save_file\(|NamedTemporaryFile\(|json\.dump\(")


def test_no_module_but_io_writes_output_files_itself():
    offenders = []
    for p in sorted(SRC.rglob("*.py")):
        if p.name == "_io.py":
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if _RAW_WRITES.search(code):
                offenders.append(f"{p.relative_to(SRC)}:{i}: {line.strip()}")
    assert not offenders, "write through neurofuse._io instead:\n" + "\n".join(offenders)


def test_safetensors_files_are_byte_identical_whatever_the_metadata_hash_order(tmp_path):
    """safetensors writes its metadata map in hash order (random per process); the writer sorts
    it, so equal tensors and metadata always give equal bytes (and equal content hashes)."""
    import json
    import subprocess
    import sys

    code = ("import sys, torch; from neurofuse._io import write_safetensors; "
            "write_safetensors(sys.argv[1], {'w': torch.arange(4.0)}, "
            "metadata={k: k * 3 for k in 'zyxwvutsrq'})")
    outs = []
    for i in range(4):
        p = tmp_path / f"m{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(p)], check=True)
        outs.append(p.read_bytes())
    assert all(o == outs[0] for o in outs)
    n = int.from_bytes(outs[0][:8], "little")
    meta = json.loads(outs[0][8:8 + n])["__metadata__"]
    assert list(meta) == sorted(meta)
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "m0.safetensors"))["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
