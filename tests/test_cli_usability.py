"""The command line tells its defaults and options: help texts, ``methods NAME``, ``-v`` anywhere."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest
import torch

from neurofuse.cli import build_parser, main
from neurofuse.methods import get_method, list_methods, method_options


def _parsers():
    """``(command words, parser)`` of every subcommand."""
    out = []

    def walk(parser, words):
        out.append((words, parser))
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, words + [name])

    walk(build_parser(), [])
    return out


def _actions():
    for words, parser in _parsers():
        for a in parser._actions:
            if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                yield " ".join(words), a


def test_every_option_with_a_default_shows_it_in_its_help():
    missing = [f"{cmd} {a.option_strings[-1]} (default {a.default!r})" for cmd, a in _actions()
               if a.default not in (None, False, 0, argparse.SUPPRESS) and "default" not in (a.help or "")]
    assert not missing, "help texts without their default: " + ", ".join(missing)


@pytest.mark.parametrize("cmd, option, default", [
    ("fuse", "--method", "kf-linear"), ("fuse", "--importance", "uniform"), ("fuse", "--width", "widths"),
    ("train", "--lr", "0.001"), ("train", "--ratio", "0.2"), ("train", "--epochs", "per dataset"),
    ("finetune", "--epochs", "30"), ("demo", "--lr", "0.001"),
])
def test_the_issue_s_options_state_their_defaults(cmd, option, default):
    helps = {(c, a.option_strings[-1]): a.help for c, a in _actions()}
    text = helps[(cmd, option)] % {"default": dict((a.option_strings[-1], a.default) for c, a in _actions()
                                                   if c == cmd)[option]}
    assert "default" in text and default in text, text


def test_finetune_and_align_describe_their_own_seed():
    helps = {(c, a.option_strings[-1]): a.help for c, a in _actions()}
    fuse = helps[("fuse", "--seed")]
    for cmd in ("finetune", "align"):
        assert helps[(cmd, "--seed")] != fuse and "of fusion" not in helps[(cmd, "--seed")]
    assert "validation" in helps[("finetune", "--seed")]


@pytest.mark.parametrize("argv, level", [
    (["methods"], 0), (["-v", "methods"], 1), (["methods", "-v"], 1), (["methods", "-vv"], 2),
    (["fuse", "a.safetensors", "--out", "f.safetensors", "-v"], 1),
    (["-v", "eval", "a.safetensors"], 1), (["bench", "list", "-v"], 1),
    (["bench", "run", "table1", "--scale", "smoke", "--verbose"], 1),
])
def test_verbose_works_before_and_after_the_subcommand(argv, level):
    assert build_parser().parse_args(argv).verbose == level


def test_every_subcommand_accepts_verbose():
    for words, parser in _parsers():
        assert any("--verbose" in a.option_strings for a in parser._actions), words


@pytest.mark.parametrize("cmd", ["eval", "align"])
def test_eval_and_align_take_device_and_no_progress(cmd):
    args = build_parser().parse_args([cmd, "a.safetensors", "b.safetensors", "--device", "cpu",
                                      "--no-progress"])
    assert args.device == "cpu" and args.no_progress is True


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    from neurofuse.checkpoint import save_model
    from neurofuse.models import MLP

    d = tmp_path_factory.mktemp("ckpt")
    paths = []
    for i, hidden in enumerate(([12], [12, 12])):
        torch.manual_seed(i)
        paths.append(str(save_model(MLP((1, 8, 8), 10, hidden), d / f"m{i}.safetensors",
                                    metadata={"dataset": "digits"})))
    return paths


def test_eval_and_align_run_on_the_given_device(two_checkpoints, tmp_path, capsys):
    assert main(["eval", *two_checkpoints, "--device", "cpu", "--no-progress",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert set(json.loads((tmp_path / "e.json").read_text())) == set(two_checkpoints)
    assert main(["align", *two_checkpoints, "--device", "cpu", "--no-progress",
                 "--fusion-samples", "50"]) == 0
    capsys.readouterr()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cmd", ["eval", "align"])
def test_an_unavailable_device_is_a_one_line_error(two_checkpoints, capsys, cmd):
    assert main([cmd, *two_checkpoints, "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurofuse: error:") and "cuda" in err and "\n" not in err


@pytest.mark.parametrize("name", list_methods())
def test_methods_name_lists_every_option_with_its_type_and_default(name, capsys):
    assert main(["methods", name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name}: {get_method(name).summary}")
    fields = dataclasses.fields(get_method(name).Options)
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else None
        assert f"  {f.name} (" in out and re.search(rf"default {re.escape(json.dumps(default))}[;)]", out), (f.name, out)
    assert "  batch_size (int, default " in out


def test_method_options_reads_types_defaults_and_descriptions():
    rows = {o.name: o for o in method_options("kd-head")}
    assert (rows["epochs"].type, rows["epochs"].default) == ("int", "150")
    assert rows["lr"].description == "Adam learning rate."
    assert rows["batch_size"].default == "32" and rows["batch_size"].common  # kd-head's own default
    ot = {o.name: o for o in method_options("otfusion")}
    assert (ot["solver"].type, ot["solver"].default) == ("str", '"exact"')
    lin = {o.name: o for o in method_options("kf-linear")}
    assert lin["rtol"].type == "float or null" and lin["rtol"].default == "null"
    assert "e.g. pixels" in lin["prior"].description  # "e.g." does not end the sentence
    assert lin["n_init"].description.startswith("K-means restarts")


@pytest.mark.parametrize("name", list_methods())
def test_method_option_descriptions_are_plain_text_without_latex(name):
    for o in method_options(name):
        assert "\\" not in o.description and ":math:" not in o.description, (o.name, o.description)


def test_option_formulas_read_as_plain_text():
    ridge = {o.name: o for o in method_options("hf-linear")}["ridge"].description
    assert '"auto" (default)' in ridge and "the mean diagonal of Xᵀ X" in ridge


def test_methods_with_an_unknown_name_is_a_one_line_error(capsys):
    assert main(["methods", "kf-linaer"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurofuse: error:") and "kf-linaer" in err and "\n" not in err
