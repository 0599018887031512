"""Datasets by name: data-directory resolution, missing files, digits and the real MNIST files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neurofuse.data import Dataset, list_datasets, load_dataset, resolve_data_dir, verify_mnist
from neurofuse.errors import ConfigError, DataError

REAL_DATA = Path("/work/shared/data")
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
def test_list_datasets_names_every_supported_dataset() -> None:
    assert set(list_datasets()) == {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100"}


def test_unknown_dataset_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("imagenet")
    message = str(info.value)
    assert "imagenet" in message and all(name in message for name in list_datasets())
    assert "\n" not in message


# ------------------------------------------------------------------------------------------------
# resolve_data_dir
# ------------------------------------------------------------------------------------------------
def test_resolve_data_dir_prefers_explicit_argument_over_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    monkeypatch.setenv("NEUROFUSE_DATA", str(env))
    assert resolve_data_dir(explicit) == explicit.absolute()
    assert resolve_data_dir(str(explicit)) == explicit.absolute()


def test_resolve_data_dir_uses_env_when_no_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tmp_path / "env"
    monkeypatch.setenv("NEUROFUSE_DATA", str(env))
    assert resolve_data_dir() == env.absolute()
    assert resolve_data_dir(None) == env.absolute()


def test_resolve_data_dir_falls_back_to_shared_data_next_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.delenv("NEUROFUSE_DATA", raising=False)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_data_dir() == (tmp_path / "shared" / "data").resolve()


def test_load_dataset_reads_from_env_dir_when_no_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEUROFUSE_DATA", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_dataset("mnist")
    assert str(tmp_path / "mnist") in str(info.value)


# ------------------------------------------------------------------------------------------------
# Missing files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected_file, searched",
    [
        ("mnist", "train-images-idx3-ubyte", ["mnist", ""]),
        ("fashion-mnist", "t10k-labels-idx1-ubyte", ["fashion-mnist", "fashion_mnist"]),
        ("cifar10", "data_batch_3", ["cifar-10-batches-py", "cifar10/cifar-10-batches-py"]),
        ("cifar100", "test", ["cifar-100-python", "cifar100/cifar-100-python"]),
    ],
)
def test_missing_files_error_is_one_line_naming_files_and_every_searched_dir(
    tmp_path: Path, name: str, expected_file: str, searched: list
) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(name, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert expected_file in message
    for sub in searched:
        assert f"{tmp_path / sub if sub else tmp_path}" in message
    assert "--data-dir" in message and "NEUROFUSE_DATA" in message


def test_missing_single_file_is_reported_even_when_the_others_exist(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (folder / name).write_bytes(b"")
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


# ------------------------------------------------------------------------------------------------
# digits (scikit-learn, no files)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_has_stratified_80_20_split_of_8x8_images(digits: Dataset) -> None:
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert tuple(digits.x_train.shape) == (1437, 1, 8, 8)
    assert tuple(digits.x_test.shape) == (360, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_test.dtype == torch.int64
    assert set(digits.y_test.tolist()) == set(range(10))
    test_counts = np.bincount(digits.y_test.numpy(), minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37  # stratified: ~36 per class


def test_digits_is_standardised_with_train_statistics(digits: Dataset) -> None:
    assert abs(float(digits.x_train.mean())) < 1e-4
    assert abs(float(digits.x_train.std()) - 1.0) < 1e-3


def test_digits_test_split_is_deterministic(digits: Dataset) -> None:
    again = load_dataset("digits")
    assert torch.equal(digits.x_test, again.x_test)
    assert torch.equal(digits.y_test, again.y_test)
    assert torch.equal(digits.y_train, again.y_train)


# ------------------------------------------------------------------------------------------------
# Real MNIST (development copy)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_data() -> Path:
    if not (REAL_DATA / "mnist").is_dir():
        pytest.skip(f"real MNIST not available at {REAL_DATA / 'mnist'}")
    return REAL_DATA


def test_real_mnist_files_match_the_original_md5(real_data: Path) -> None:
    result = verify_mnist(real_data)
    assert len(result) == 4 and all(result.values()), result


def test_real_mnist_has_the_known_sizes_class_counts_and_statistics(real_data: Path) -> None:
    ds = load_dataset("mnist", real_data)
    assert tuple(ds.x_train.shape) == (60000, 1, 28, 28)
    assert tuple(ds.x_test.shape) == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train.numpy(), minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.y_test.numpy(), minlength=10).tolist() == MNIST_TEST_COUNTS
    # normalised with the train statistics 0.1307 / 0.3081: mean ~0, std ~1 on the train set
    assert abs(float(ds.x_train.mean())) < 1e-3
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-3
