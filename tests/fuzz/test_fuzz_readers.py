"""Fuzzing the idx and CIFAR readers: truncations, bit flips, header fields, gzip and pickle
damage.  Every case reads or raises a DataError, and the file is unchanged."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from neurofuse.data import read_cifar_batch, read_idx
from neurofuse.data._readers import md5_of_content
from neurofuse.errors import DataError

_IMAGES = struct.pack(">IIII", 2051, 3, 4, 5) + bytes(range(60))
_LABELS = struct.pack(">II", 2049, 6) + bytes([0, 1, 2, 3, 4, 5])
_CIFAR = [pickle.dumps({b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072),
                        b"labels": [3, 7]}, protocol=p) for p in (2, 4, 5)]


def _mutate(draw, blob: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "same"]))
    b = bytearray(blob)
    if kind == "flip" and b:
        for pos, bit in draw(st.lists(st.tuples(st.integers(0, len(b) - 1), st.integers(0, 7)),
                                      min_size=1, max_size=4)):
            b[pos] ^= 1 << bit
    elif kind == "truncate":
        b = b[:draw(st.integers(0, len(b)))]
    elif kind == "splice":
        pos = draw(st.integers(0, len(b)))
        b[pos:pos + draw(st.integers(0, 8))] = draw(st.binary(max_size=12))
    return bytes(b)


def _read(blob: bytes, name: str, reader) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(blob)
        try:
            reader(path)
        except DataError as exc:
            assert "\n" not in str(exc), str(exc)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(blob).hexdigest()


@st.composite
def _idx_files(draw):
    base = draw(st.sampled_from([_IMAGES, _LABELS]))
    if draw(st.sampled_from([False, False, True])):  # hostile header fields
        magic = draw(st.sampled_from([2051, 2049, 2050, 0]))
        dims = draw(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=3))
        base = struct.pack(f">I{len(dims)}I", magic, *dims) + draw(st.binary(max_size=64))
    blob = _mutate(draw, base)
    gz = draw(st.booleans())
    if gz:
        blob = _mutate(draw, gzip.compress(blob))
    return blob, draw(st.sampled_from(["x-idx3-ubyte", "x-idx3-ubyte.gz"]))


@given(_idx_files())
def test_idx_reader(case):
    blob, name = case
    _read(blob, name, read_idx)
    _read(blob, name, md5_of_content)


@st.composite
def _cifar_files(draw):
    if draw(st.sampled_from([False, False, True])):
        leaf = st.one_of(st.integers(), st.binary(max_size=8), st.text(max_size=4), st.none())
        obj = draw(st.recursive(leaf, lambda c: st.lists(c, max_size=3)
                                | st.dictionaries(st.binary(max_size=6), c, max_size=3),
                                max_leaves=10))
        if draw(st.booleans()):
            obj = {b"data": obj, b"labels": draw(st.lists(st.integers(), max_size=3))}
        return pickle.dumps(obj, protocol=draw(st.integers(2, 5)))
    return _mutate(draw, draw(st.sampled_from(_CIFAR)))


@given(_cifar_files())
def test_cifar_reader(blob):
    _read(blob, "data_batch_1", read_cifar_batch)
