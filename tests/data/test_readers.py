"""File readers (idx, CIFAR pickles, md5) and datasets loaded from small files written here."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

from neurofuse.data import (
    load_dataset,
    md5_of_content,
    read_cifar_batch,
    read_idx,
    verify_mnist,
)
from neurofuse.errors import DataError

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# ------------------------------------------------------------------------------------------------
# Writers for the original formats
# ------------------------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    magic = {3: 2051, 1: 2049}[arr.ndim]
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist_like(folder: Path, n_train: int, n_test: int, seed: int, gz: bool) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(folder / name, arr, gz)
    return arrays


def write_cifar_batch(
    path: Path, data: np.ndarray, labels: Sequence[int], label_key: bytes
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump({b"data": data, label_key: list(labels), b"batch_label": b"x"}, fh, protocol=2)


def cifar_rows(n: int, channel_values: Sequence[int]) -> np.ndarray:
    """n rows of 3072 bytes; channel c is the constant channel_values[c]."""
    planes = [np.full((n, 1024), v, dtype=np.uint8) for v in channel_values]
    return np.concatenate(planes, axis=1)


# ------------------------------------------------------------------------------------------------
# idx
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_round_trips_images_and_labels(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    got_images = read_idx(write_idx(tmp_path / "img", images, gz))
    got_labels = read_idx(write_idx(tmp_path / "lab", labels, gz))
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 5, 3)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_rejects_truncated_file(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))[:-10]
    path = tmp_path / ("img.gz" if gz else "img")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_extra_payload(tmp_path: Path) -> None:
    path = tmp_path / "lab"
    path.write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="corrupt"):
        read_idx(path)


def test_read_idx_rejects_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(struct.pack(">IIII", 2050, 1, 2, 2) + bytes(4))
    with pytest.raises(DataError, match="magic 2050") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_cut_gzip_stream(tmp_path: Path) -> None:
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path = tmp_path / "lab.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx(path)


def test_md5_of_content_is_the_same_for_gz_and_raw(tmp_path: Path) -> None:
    arr = np.arange(100, dtype=np.uint8)
    raw = write_idx(tmp_path / "a", arr, gz=False)
    gz = write_idx(tmp_path / "b", arr, gz=True)
    assert md5_of_content(raw) == md5_of_content(gz)
    assert md5_of_content(raw) != md5_of_content(write_idx(tmp_path / "c", arr[::-1], gz=False))


def test_verify_mnist_flags_files_that_are_not_the_originals(tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "mnist", 3, 2, seed=0, gz=True)
    result = verify_mnist(tmp_path)
    assert set(result) == set(IDX_NAMES)
    assert not any(result.values())


# ------------------------------------------------------------------------------------------------
# CIFAR pickles
# ------------------------------------------------------------------------------------------------
def test_read_cifar_batch_returns_channel_major_images_and_labels(tmp_path: Path) -> None:
    data = cifar_rows(3, (10, 20, 30))
    data[1, 1024 + 32 * 5 + 7] = 255  # green plane, row 5, column 7 of image 1
    path = tmp_path / "data_batch_1"
    write_cifar_batch(path, data, [4, 0, 9], b"labels")
    images, labels = read_cifar_batch(path)
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [4, 0, 9])
    assert images[1, 1, 5, 7] == 255 and images[1, 1, 5, 6] == 20
    assert images[0, 2, 0, 0] == 30


def test_read_cifar_batch_accepts_str_keys_and_prefers_fine_labels(tmp_path: Path) -> None:
    path = tmp_path / "train"
    with path.open("wb") as fh:
        pickle.dump(
            {"data": cifar_rows(2, (1, 2, 3)), "fine_labels": [57, 3], "coarse_labels": [1, 2]},
            fh,
            protocol=2,
        )
    _, labels = read_cifar_batch(path)
    np.testing.assert_array_equal(labels, [57, 3])


def test_read_cifar_batch_accepts_the_numpy_core_path_of_the_original_files(tmp_path: Path) -> None:
    # The original batches were pickled by NumPy 1.x, naming numpy.core.multiarray._reconstruct.
    blob = pickle.dumps({b"data": cifar_rows(2, (5, 6, 7)), b"labels": [3, 1]}, protocol=2)
    old = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert old != blob and b"numpy._core" not in old
    path = tmp_path / "data_batch_1"
    path.write_bytes(old)
    images, labels = read_cifar_batch(path)
    assert images[1, 2, 31, 31] == 7 and labels.tolist() == [3, 1]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-dict"])
def test_read_cifar_batch_refuses_malicious_pickle_without_running_it(
    tmp_path: Path, nested: bool, capfd: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned.txt"
    payload = {b"data": _Evil(marker), b"labels": [0]} if nested else _Evil(marker)
    path = tmp_path / "data_batch_1"
    with path.open("wb") as fh:
        pickle.dump(payload, fh, protocol=2)
    with pytest.raises(DataError, match=r"refusing to unpickle .*system .*not a CIFAR batch"):
        read_cifar_batch(path)
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out


def test_read_cifar_batch_refuses_builtins_eval(tmp_path: Path) -> None:
    # GLOBAL builtins.eval, then call it: a classic payload written by hand (protocol 0).
    path = tmp_path / "test_batch"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(DataError, match="refusing to unpickle builtins.eval"):
        read_cifar_batch(path)


def test_read_cifar_batch_rejects_truncated_pickle(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    write_cifar_batch(path, cifar_rows(2, (1, 2, 3)), [0, 1], b"labels")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="not a readable CIFAR batch") as info:
        read_cifar_batch(path)
    assert "\n" not in str(info.value)


def test_read_cifar_batch_rejects_label_count_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    write_cifar_batch(path, cifar_rows(2, (1, 2, 3)), [0, 1, 2], b"labels")
    with pytest.raises(DataError, match="2 images"):
        read_cifar_batch(path)


# ------------------------------------------------------------------------------------------------
# Datasets from small files
# ------------------------------------------------------------------------------------------------
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _expected_channels(values: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> list:
    return [(v / 255.0 - m) / s for v, m, s in zip(values, mean, std)]


@pytest.mark.parametrize("layout", ["cifar-10-batches-py", "cifar10/cifar-10-batches-py"])
def test_load_cifar10_concatenates_batches_in_order_and_normalises(
    tmp_path: Path, layout: str
) -> None:
    folder = tmp_path / layout
    values = (200, 100, 50)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", cifar_rows(2, values), [i, i + 1], b"labels")
    write_cifar_batch(folder / "test_batch", cifar_rows(3, values), [9, 8, 7], b"labels")

    ds = load_dataset("cifar10", tmp_path)

    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert tuple(ds.x_train.shape) == (10, 3, 32, 32) and tuple(ds.x_test.shape) == (3, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert ds.y_test.tolist() == [9, 8, 7]
    for c, expected in enumerate(_expected_channels(values, CIFAR10_MEAN, CIFAR10_STD)):
        torch.testing.assert_close(ds.x_train[:, c], torch.full((10, 32, 32), expected))
        torch.testing.assert_close(ds.x_test[:, c], torch.full((3, 32, 32), expected))


def test_load_cifar100_uses_fine_labels_and_its_own_statistics(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    values = (30, 130, 230)
    write_cifar_batch(folder / "train", cifar_rows(4, values), [0, 99, 42, 7], b"fine_labels")
    write_cifar_batch(folder / "test", cifar_rows(2, values), [5, 98], b"fine_labels")

    ds = load_dataset("cifar100", tmp_path)

    assert ds.num_classes == 100 and tuple(ds.x_train.shape) == (4, 3, 32, 32)
    assert ds.y_train.tolist() == [0, 99, 42, 7] and ds.y_test.tolist() == [5, 98]
    for c, expected in enumerate(_expected_channels(values, CIFAR100_MEAN, CIFAR100_STD)):
        torch.testing.assert_close(ds.x_test[:, c], torch.full((2, 32, 32), expected))


def test_load_cifar10_refuses_labels_outside_the_classes(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", cifar_rows(1, (0, 0, 0)), [0], b"labels")
    write_cifar_batch(folder / "test_batch", cifar_rows(1, (0, 0, 0)), [10], b"labels")
    with pytest.raises(DataError, match="labels outside 0..9"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("folder", ["fashion-mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_fashion_mnist_reads_idx_files_and_normalises(
    tmp_path: Path, folder: str, gz: bool
) -> None:
    arrays = write_mnist_like(tmp_path / folder, n_train=6, n_test=4, seed=1, gz=gz)

    ds = load_dataset("fashion-mnist", tmp_path)

    assert ds.name == "fashion-mnist" and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert tuple(ds.x_train.shape) == (6, 1, 28, 28) and tuple(ds.x_test.shape) == (4, 1, 28, 28)
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    expected = (arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_load_mnist_accepts_files_directly_in_the_data_dir(tmp_path: Path) -> None:
    arrays = write_mnist_like(tmp_path, n_train=3, n_test=2, seed=2, gz=False)
    ds = load_dataset("mnist", tmp_path)
    expected = (arrays["train-images-idx3-ubyte"].astype(np.float32) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_load_mnist_refuses_image_and_label_count_mismatch(tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "mnist", n_train=3, n_test=2, seed=3, gz=False)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8), gz=False)
    with pytest.raises(DataError, match="2 images but .* 5 labels"):
        load_dataset("mnist", tmp_path)
