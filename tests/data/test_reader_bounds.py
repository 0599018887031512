"""The readers allocate no more than a file's header declares: gzip bombs and lying length fields
end in a DataError without the memory they ask for."""

from __future__ import annotations

import gzip
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from neurofuse.data import read_cifar_batch, read_idx
from neurofuse.errors import DataError


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak / 2**20


def _raises(fn, match: str):
    def run():
        with pytest.raises(DataError, match=match):
            fn()
    return run


def test_a_gzip_bomb_behind_a_small_idx_header_is_not_decompressed(tmp_path: Path) -> None:
    # a label file that declares 1000 labels but decompresses to 64 MB
    blob = gzip.compress(struct.pack(">II", 2049, 1000) + bytes(64 << 20), compresslevel=9)
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(blob)
    assert len(blob) < 200_000
    peak = _peak_mb(_raises(lambda: read_idx(path), "corrupt"))
    assert peak < 8, f"read_idx held {peak:.0f} MB for a header of 1000 bytes"


def test_an_idx_header_declaring_terabytes_is_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 2051, 2**32 - 1, 2**16, 2**16)))
    peak = _peak_mb(_raises(lambda: read_idx(path), "declares"))
    assert peak < 8


def test_a_large_valid_gzip_idx_file_still_reads(tmp_path: Path) -> None:
    arr = (np.arange(3 * 300 * 300) % 251).astype(np.uint8).reshape(3, 300, 300)
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 2051, 3, 300, 300) + arr.tobytes()))
    np.testing.assert_array_equal(read_idx(path), arr)


def test_a_cifar_pickle_with_a_lying_length_field_is_refused_without_the_memory(tmp_path: Path):
    # BINBYTES8 with a 4 GB length, then nothing: a truncated (or hostile) pickle
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 4 << 30) + b"xx")
    peak = _peak_mb(_raises(lambda: read_cifar_batch(path), "not a readable CIFAR batch"))
    assert peak < 8, f"read_cifar_batch held {peak:.0f} MB for a 13-byte file"


def test_a_valid_cifar_batch_still_reads(tmp_path: Path) -> None:
    data = (np.arange(4 * 3072) % 256).astype(np.uint8).reshape(4, 3072)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1, 2, 3]}, protocol=2))
    x, y = read_cifar_batch(path)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 3]


def test_a_small_gzip_idx_that_claims_and_holds_hundreds_of_mb_is_refused_unread(tmp_path: Path) -> None:
    # a consistent file: the header declares 128 MiB and the gzip (130 KB) holds them, all zeros
    n = 128 << 20
    blob = gzip.compress(struct.pack(">IIII", 2051, n // (64 * 64), 64, 64) + bytes(n), compresslevel=9)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(blob)
    assert len(blob) < 200_000
    peak = _peak_mb(_raises(lambda: read_idx(path), "more than 64 times the compressed file's size"))
    assert peak < 8, f"read_idx held {peak:.0f} MB for a {len(blob)}-byte file"


def test_a_valid_idx_file_is_read_into_one_buffer(tmp_path: Path) -> None:
    # the reader holds the array once (no bytes copy, no final copy): peak about the data's size
    arr = (np.random.default_rng(0).integers(0, 256, (40, 512, 512))).astype(np.uint8)   # 10 MiB
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 2051, 40, 512, 512) + arr.tobytes(), 1))
    out = {}
    peak = _peak_mb(lambda: out.setdefault("x", read_idx(path)))
    np.testing.assert_array_equal(out["x"], arr)
    assert peak < 1.5 * arr.nbytes / 2**20, f"read_idx held {peak:.0f} MB for {arr.nbytes >> 20} MiB of data"
