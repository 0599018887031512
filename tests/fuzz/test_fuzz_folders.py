"""Fuzzing folder outputs: any layout of inputs, any output folder, with or without ``--force``.

Properties checked: whatever :func:`neurofuse._io.check_outputs` lets through,
:func:`neurofuse._io.write_folder` writes without changing or removing an input or a file that
neurofuse did not write (the output folder holds exactly what was written, the manifest
included); whatever it refuses ends in one ``OutputExistsError`` / ``ConfigError`` line and
changes nothing; ``neurofuse train`` over the same targets exits 0 or 2 with one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from neurofuse._io import MANIFEST, check_outputs, write_folder
from neurofuse.cli import main
from neurofuse.errors import NeurofuseError

#: the tree every example starts from: inputs (files and folders), a foreign folder, a previous
#: neurofuse output, an empty folder, a data folder
_FILES = {"in/a/config.json": b"{}", "in/a/model.safetensors": b"A" * 64, "in/b/config.json": b"{}",
          "data/tokens.safetensors": b"D" * 32, "mine/thesis.tex": b"years of work",
          "notes.txt": b"notes"}
_INPUTS = ["in/a", "in/b", "data/tokens.safetensors"]
_TARGETS = ["new", "in", "in/a", "in/a/sub", "in/b/../a", "data", "data/tokens.safetensors", "mine",
            "prev", "prev-dirty", "empty", "notes.txt", ".", "..", "link-to-a", "link-to-mine",
            "new/deeper/x", "", "prev/../prev"]


def _tree(root: Path) -> None:
    for rel, blob in _FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)
    (root / "empty").mkdir()
    for name in ("prev", "prev-dirty"):
        write_folder(root / name, lambda t: (t / "config.json").write_text("{}"))
    (root / "prev-dirty" / "mine.txt").write_text("added by the user")
    os.symlink(root / "in" / "a", root / "link-to-a")
    os.symlink(root / "mine", root / "link-to-mine")


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@given(st.sampled_from(_TARGETS), st.booleans(), st.booleans())
def test_folder_outputs_never_touch_inputs_or_foreign_files(target, force, cwd_inside):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "w"
        root.mkdir()
        _tree(root)
        old_cwd = os.getcwd()
        os.chdir(root if cwd_inside else d)
        try:
            out = Path(target) if (cwd_inside or target in ("", ".", "..")) else root / target
            before = _snapshot(root)
            try:
                check_outputs([(out, "folder")], force, [root / i for i in _INPUTS], root / "data")
                write_folder(out, lambda t: (t / "config.json").write_text('{"new": 1}'), force=force)
            except NeurofuseError as exc:
                assert "\n" not in str(exc)
                assert _snapshot(root) == before, f"a refused output {target!r} changed files"
                return
            after = _snapshot(root)
            written = out.resolve()
            for rel, digest in before.items():
                p = (root / rel).resolve()
                if written in p.parents:
                    assert rel.startswith(("prev/", "empty/")) or rel.startswith(target + "/"), \
                        f"{rel} was replaced through output {target!r}"
                    assert p.name in ("config.json", MANIFEST), f"{rel} was not neurofuse's own"
                else:
                    assert after.get(rel) == digest, f"{rel} changed through output {target!r}"
            assert sorted(q.name for q in written.iterdir()) == sorted(["config.json", MANIFEST])
            assert not [q for q in written.parent.iterdir() if q.name.endswith((".tmp", ".old"))]
        finally:
            os.chdir(old_cwd)


@given(st.sampled_from(["new", "in", "in/a", "mine", "prev", "prev-dirty", "empty", "notes.txt", "."]),
       st.booleans())
def test_train_into_any_folder_is_clean(target, force):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "w"
        root.mkdir()
        _tree(root)
        before = _snapshot(root)
        old_cwd = os.getcwd()
        os.chdir(root)
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = main(["train", "--out", target, "--models", "1", "--size", "tiny", "--epochs", "1",
                             "--no-progress"] + (["--force"] if force else []))
        finally:
            os.chdir(old_cwd)
        text = err.getvalue()
        assert code in (0, 2) and "Traceback" not in text, text
        after = _snapshot(root)
        if code == 2:
            assert len(text.strip().splitlines()) == 1 and after == before, text
        else:
            assert target in ("new", "prev", "empty"), f"train replaced {target!r}"
            assert {k: v for k, v in after.items() if not k.startswith(target + "/")} == \
                {k: v for k, v in before.items() if not k.startswith(target + "/")}
