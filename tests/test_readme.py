"""The README's commands and examples are complete: they run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list:
    """``(language, text)`` of every fenced code block of the README."""
    blocks, lang, lines = [], None, []
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(lines) + "\n"))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def _shell_lines() -> list:
    """README shell commands, with ``\\``-continued lines joined and ``$ `` prompts dropped."""
    out = []
    for lang, b in _blocks():
        if lang == "python":
            continue
        for line in b.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            line = line[2:] if line.startswith("$ ") else line
            if line.startswith("neurofuse "):
                out.append(line)
    return out


def _python_blocks() -> list:
    return [b for lang, b in _blocks() if lang == "python"]


def test_every_readme_command_parses_and_every_fuse_line_has_its_required_out():
    from neurofuse.cli import build_parser

    fuse_lines = [line for line in _shell_lines() if line.startswith("neurofuse fuse ")]
    assert len(fuse_lines) >= 3
    for line in fuse_lines:
        assert "--out" in shlex.split(line), f"README: {line!r} lacks the required --out"
    parser = build_parser()
    for line in _shell_lines():
        args = [a if a != "..." else "m.safetensors" for a in shlex.split(line)[1:]]
        if "[" in line or "|" in line or args[:1] == ["demo"] and "--out" in line and "DIR" in line:
            continue  # a synopsis, not a command
        try:
            parser.parse_args(args)
        except SystemExit as exc:  # argparse's error exit
            pytest.fail(f"README command does not parse: {line!r} (exit {exc.code})")


@pytest.mark.slow
def test_the_different_depth_example_runs_as_written(capsys):
    block = next(b for b in _python_blocks() if 'depth="align"' in b)
    assert "import" in block and "train_model" in block
    exec(compile(block, f"{README}:different-depth example", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    accuracy = float(re.search(r"fused: ([0-9.]+)% test accuracy", out).group(1))
    assert accuracy > 50, out
