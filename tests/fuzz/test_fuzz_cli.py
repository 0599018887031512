"""Fuzzing the command line's argument space: any mix of good and bad inputs, outputs, seeds,
devices and options ends with exit 0, or exit 2 and one ``neurofuse: error:`` line — never a
traceback — and no input file changes."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

from neurofuse.checkpoint import save_model
from neurofuse.cli import main
from neurofuse.models import MLP

_TEMPLATE = Path(tempfile.mkdtemp(prefix="neurofuse-fuzz-cli-"))
atexit.register(shutil.rmtree, _TEMPLATE, True)
for _i in range(2):
    torch.manual_seed(_i)
    save_model(MLP((1, 8, 8), 10, [8, 6]), _TEMPLATE / f"m{_i}.safetensors",
               metadata={"dataset": "digits", "model_index": _i})
(_TEMPLATE / "split.json").write_text(json.dumps({"class_shares": [[0.5] * 10] * 2}))
(_TEMPLATE / "corrupt.safetensors").write_bytes((_TEMPLATE / "m0.safetensors").read_bytes()[:200])
(_TEMPLATE / "notes.txt").write_text("not a checkpoint")
(_TEMPLATE / "old.json").write_text("{}")
(_TEMPLATE / "dir").mkdir()

_INPUTS = ["m0.safetensors", "m1.safetensors", "corrupt.safetensors", "notes.txt", "missing.safetensors",
           "dir", "alias.safetensors", "split.json"]
_OUTS = ["new.safetensors", "m0.safetensors", "alias.safetensors", "dir", "notes.txt", "new.pt",
         "sub/new.safetensors", "notes.txt/x.safetensors", "split.json", "old.json", "new.json",
         "new.png", ""]


@st.composite
def _argv(draw):
    cmd = draw(st.sampled_from(["eval", "fuse", "align", "finetune", "methods"]))
    pick = lambda xs: draw(st.sampled_from(xs))  # noqa: E731
    ins = [pick(_INPUTS) for _ in range(draw(st.integers(1, 3)))]
    argv = [cmd]
    if cmd == "finetune":
        argv += [ins[0], "--out", pick(_OUTS), "--epochs", "1"]
    elif cmd in ("fuse", "align", "eval"):
        argv += ins
    if cmd == "fuse":
        argv += ["--out", pick(_OUTS), "--method", pick(["vanilla", "hf-linear", "ensemble", "nope"]),
                 "--fusion-samples", pick(["60", "60", "5", "0", "x"])]
        if draw(st.booleans()):
            argv += ["--option", pick(["n_init=2", "device=cpu", "seed=1", "bogus=3", "=x", "noeq"])]
        if draw(st.booleans()):
            argv += ["--width", pick(["8", "0.5", "a", "1,2", "0"])]
        if draw(st.booleans()):
            argv += ["--head-weights"]
    if cmd in ("eval", "align") and draw(st.booleans()):
        argv += ["--json", pick(_OUTS)]
    if cmd == "align":
        argv += ["--fusion-samples", "60"]
        if draw(st.booleans()):
            argv += ["--plot", pick(_OUTS)]
    if cmd in ("fuse", "align", "finetune") and draw(st.booleans()):
        argv += ["--seed", pick(["0", "7", str(2**32), str(2**64), "-1", "abc"])]
    if cmd in ("fuse", "finetune") and draw(st.booleans()):
        argv += ["--device", pick(["cpu", "foo", "meta", "cuda:7", ""])]
    if cmd != "methods" and draw(st.booleans()):
        argv += ["--force"]
    if cmd in ("fuse", "finetune"):
        argv += ["--no-progress"]
    read = [] if cmd == "methods" else ins[:1] if cmd == "finetune" else ins
    if "--head-weights" in argv:
        read = read + ["split.json"]
    if "alias.safetensors" in read:
        read = read + ["m0.safetensors"]
    return argv, read


def _sha(p: Path):
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


@given(_argv())
def test_cli_argument_space(case):
    argv, read = case
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "w"
        shutil.copytree(_TEMPLATE, root)
        os.symlink(root / "m0.safetensors", root / "alias.safetensors")
        names = set(_INPUTS) | set(_OUTS)
        args = [str(root / a) if a in names and a else a for a in argv]
        before = {root / a: _sha(root / a) for a in read}
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exc:  # argparse's own errors
                code = exc.code
        text = err.getvalue()
        assert "Traceback" not in text, text
        assert code in (0, 2), (code, text)
        if code == 2:
            errors = [ln for ln in text.splitlines() if ln.startswith("neurofuse: error: ")]
            assert len(errors) == 1 and text.rstrip().splitlines()[-1] == errors[0], text
        for p, h in before.items():
            assert _sha(p) == h, f"input {p.name} changed: {argv}"
