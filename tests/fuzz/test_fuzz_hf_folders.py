"""Fuzzing Hugging Face folders: mutated ``config.json``, weights and ensemble files.

Properties checked: :func:`neurofuse.hf.load_pretrained` returns a model or raises one
``NeurofuseError`` line (never another exception, never a prompt), reads no file outside the
folder, runs no code from it, and changes no file; a model it returns has exactly the weights of
the file (none left at random) and the shapes its config declares.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import neurofuse.hf as nh  # noqa: E402
from neurofuse.errors import NeurofuseError  # noqa: E402

_TEMPLATE = Path(tempfile.mkdtemp(prefix="neurofuse-fuzz-hf-"))
nh.tiny_model("bert", (12,), 6, seed=0, vocab_size=25).hf_model.save_pretrained(str(_TEMPLATE / "bert"))
_CONFIG = json.loads((_TEMPLATE / "bert" / "config.json").read_text())
_WEIGHTS = load_file(str(_TEMPLATE / "bert" / "model.safetensors"))

_value = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**7), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(0, 4), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
_CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "num_labels", "vocab_size", "max_position_embeddings", "architectures", "model_type",
                "auto_map", "id2label", "hidden_act", "neurofuse_input_shape", "torch_dtype",
                "custom_pipelines", "layer_norm_eps"]
_TENSORS = sorted(_WEIGHTS)


@st.composite
def _mutation(draw):
    kind = draw(st.sampled_from(["config", "config", "weights", "bytes", "ensemble", "index"]))
    if kind == "config":
        return kind, {draw(st.sampled_from(_CONFIG_KEYS)): draw(_value) for _ in range(draw(st.integers(1, 3)))}
    if kind == "weights":
        name = draw(st.sampled_from(_TENSORS))
        how = draw(st.sampled_from(["drop", "int", "shape", "half", "extra", "nan"]))
        return kind, (name, how)
    if kind == "bytes":
        return kind, (draw(st.sampled_from(["config.json", "model.safetensors"])),
                      draw(st.integers(0, 4000)), draw(st.integers(0, 255)))
    if kind == "index":
        return kind, draw(st.sampled_from([{"weight_map": {"a": "../bert/model.safetensors"}},
                                           {"weight_map": {"a": "/etc/passwd"}}, {"weight_map": []},
                                           {"weight_map": {"a": "model.safetensors"}}, "x"]))
    return kind, draw(st.one_of(_value, st.fixed_dictionaries(
        {"members": st.one_of(_value, st.lists(st.sampled_from(["m", "..", "../bert", "/tmp", "m/../m", ""]),
                                               max_size=3))},
        optional={"class_weights": _value})))


def _apply(folder: Path, mutation) -> None:
    kind, what = mutation
    if kind == "config":
        cfg = dict(_CONFIG)
        cfg.update(what)
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "weights":
        name, how = what
        t = dict(_WEIGHTS)
        if how == "drop":
            del t[name]
        elif how == "int":
            t[name] = t[name].round().long()
        elif how == "shape":
            t[name] = torch.zeros(*(s + 1 for s in t[name].shape))
        elif how == "half":
            t[name] = t[name].half()
        elif how == "extra":
            t["extra.weight"] = torch.zeros(3)
        else:
            t[name] = torch.full_like(t[name], float("nan"))
        save_file(t, str(folder / "model.safetensors"))
    elif kind == "bytes":
        name, pos, byte = what
        blob = bytearray((folder / name).read_bytes())
        if pos < len(blob):
            blob[pos] = byte
        else:
            blob = blob[: pos % max(1, len(blob))]
        (folder / name).write_bytes(bytes(blob))
    elif kind == "index":
        (folder / "model.safetensors").rename(folder / "weights.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(what))
    else:
        shutil.copytree(folder, folder / "m")
        (folder / "neurofuse_ensemble.json").write_text(json.dumps(what))


def _digests(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@given(_mutation())
def test_a_mutated_folder_loads_exactly_or_is_one_error_line(mutation):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "bert"
        shutil.copytree(_TEMPLATE / "bert", folder)
        _apply(folder, mutation)
        before = _digests(Path(d))
        template = _digests(_TEMPLATE)
        try:
            model = nh.load_pretrained(folder, (12,))
        except NeurofuseError as exc:
            assert "\n" not in str(exc), str(exc)
        else:
            members = list(model.members) if hasattr(model, "members") else [model]
            for m in members:
                state = m.hf_model.state_dict()
                for name, t in state.items():
                    if name in _WEIGHTS and t.shape == _WEIGHTS[name].shape and mutation[0] == "config":
                        assert torch.equal(t, _WEIGHTS[name].to(t.dtype)), f"{name} not from the file"
        assert _digests(Path(d)) == before and _digests(_TEMPLATE) == template
