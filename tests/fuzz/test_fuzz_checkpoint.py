"""Fuzzing the checkpoint reader: truncations, bit flips, header lengths, hostile headers, nested
JSON, shapes and dtypes.  Every case loads or raises a NeurofuseError, and the file is unchanged."""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from neurofuse.checkpoint import load_model, read_config, save_model
from neurofuse.errors import NeurofuseError
from neurofuse.models import MLP

torch.manual_seed(0)
_MODEL = MLP((1, 8, 8), 10, [6, 5])
with tempfile.TemporaryDirectory() as _d:
    _VALID = save_model(_MODEL, Path(_d) / "m.safetensors",
                        metadata={"dataset": "digits", "seed": 0}).read_bytes()
_HEADER_END = 8 + struct.unpack("<Q", _VALID[:8])[0]

_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1,
           "BOOL": 1}

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                       st.floats(allow_nan=False), st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda c: st.lists(c, max_size=4)
                     | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=20)


def _check(blob: bytes, suffix: str = ".safetensors") -> None:
    """Load ``blob`` from a file: a model or a NeurofuseError, and the file is unchanged."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        path.write_bytes(blob)
        before = hashlib.sha256(blob).hexdigest()
        for fn in (read_config, load_model):
            try:
                out = fn(path)
            except NeurofuseError as exc:
                assert "\n" not in str(exc), str(exc)
            else:
                assert isinstance(out, (dict, nn.Module))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before


@given(st.integers(0, len(_VALID) - 1))
def test_truncated_checkpoints(n):
    _check(_VALID[:n])


@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 7)), min_size=1,
                max_size=6))
def test_bit_flipped_checkpoints(flips):
    blob = bytearray(_VALID)
    for pos, bit in flips:
        blob[pos] ^= 1 << bit
    _check(bytes(blob))


@given(st.lists(st.tuples(st.integers(_HEADER_END, len(_VALID) - 1), st.integers(0, 7)),
                min_size=1, max_size=3))
def test_bit_flips_in_tensor_data_are_always_caught(flips):
    blob = bytearray(_VALID)
    for pos, bit in flips:
        blob[pos] ^= 1 << bit
    if bytes(blob) == _VALID:
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(bytes(blob))
        try:
            load_model(path)
        except NeurofuseError as exc:
            assert "checksum" in str(exc)
        else:
            raise AssertionError("a flipped bit in the tensor data was not detected")


@given(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 2 * len(_VALID))))
def test_header_lengths(length):
    _check(struct.pack("<Q", length) + _VALID[8:])


@given(st.binary(max_size=300))
def test_random_bytes(blob):
    _check(blob)
    _check(blob, ".pt")


def _safetensors(tensors, metadata) -> bytes:
    """A safetensors file from ``{name: (dtype, shape, data)}``, offsets computed or given."""
    header, data, offset = {}, b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def _hostile(draw):
    """A well-formed safetensors file whose config, tensor names, shapes or dtypes lie."""
    def rarely(usual, *others):
        return draw(st.sampled_from([usual] * 4 * len(others) + list(others)))

    def sometimes(k):  # true about once in k + 1 draws (and false when shrunk)
        return draw(st.sampled_from([False] * k + [True]))

    hidden = draw(st.just([6, 5]) | st.lists(st.integers(0, 2**20), max_size=3)) \
        if sometimes(3) else [6, 5]
    kwargs = {"input_shape": rarely([1, 8, 8], [1, 8], [0, 8, 8], [-1, 8, 8]),
              "num_classes": rarely(10, 0, -3, 2**40, "10"),
              "hidden": hidden, "bias": rarely(True, False, "yes")}
    if sometimes(5):
        kwargs[draw(st.text(max_size=5))] = draw(_json)
    arch = rarely("mlp", "vgg", "resnet", "vit", "ensemble", "nope")
    if arch == "ensemble":
        kwargs = {"members": [{"arch": "mlp", "kwargs": kwargs}] * draw(st.integers(0, 3)),
                  "class_weights": draw(st.none() | _json)}
    doc = {"format": "neurofuse-checkpoint", "version": rarely(1, 2, 0, "1"),
           "config": {"arch": arch, "kwargs": kwargs},
           "metadata": draw(st.dictionaries(st.text(max_size=6), _json, max_size=3))
           if not sometimes(5) else draw(_json)}
    text = json.dumps(doc)
    depth = rarely(0, 50, 5000)
    if depth:
        text = text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    tensors = {}
    for name, t in _MODEL.state_dict().items():
        if sometimes(29):
            continue  # a missing tensor
        dtype = rarely("F32", *_DTYPES)
        shape = list(t.shape) if not sometimes(9) else draw(st.lists(st.integers(0, 7),
                                                                              max_size=3))
        n = 1
        for s in shape:
            n *= s
        raw = draw(st.binary(min_size=n * _DTYPES[dtype], max_size=n * _DTYPES[dtype]))
        tensors[name] = (dtype, shape, raw)
    if sometimes(9):
        tensors["extra"] = ("F32", [1], b"\0\0\0\0")
    meta = {"neurofuse": text}
    if sometimes(2):
        meta["neurofuse.sha256"] = draw(st.sampled_from(["0" * 64, "", "zz"]))
    return _safetensors(tensors, rarely(meta, None, {}))


@given(_hostile())
def test_hostile_headers_configs_shapes_and_dtypes(blob):
    _check(blob)
