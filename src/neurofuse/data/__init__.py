"""Datasets, file readers and data partitions.

* :func:`load_dataset` / :func:`list_datasets` / :func:`resolve_data_dir`: datasets by name
  (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``) from their original file
  formats, normalised, as a :class:`Dataset`.
* :func:`read_idx`, :func:`read_cifar_batch` (a restricted, code-free unpickler),
  :func:`md5_of_content`, :func:`verify_mnist`: the readers.
* :func:`partition` (``iid`` / ``dirichlet`` / ``sharded``), :func:`train_val_split`,
  :func:`balanced_subset`, :func:`class_shares`, :func:`partition_summary`: splitting data among
  models and drawing class-balanced fusion sets, each with an explicit seed.
"""

from ._partition import (
    balanced_subset,
    class_shares,
    dirichlet_alpha_split,
    dirichlet_split,
    iid_split,
    partition,
    partition_summary,
    sharded_split,
    train_val_split,
)
from ._readers import md5_of_content, read_cifar_batch, read_idx, verify_mnist
from ._sources import Dataset, list_datasets, load_dataset, resolve_data_dir

__all__ = [
    "Dataset",
    "load_dataset",
    "list_datasets",
    "resolve_data_dir",
    "read_idx",
    "read_cifar_batch",
    "md5_of_content",
    "verify_mnist",
    "iid_split",
    "dirichlet_split",
    "dirichlet_alpha_split",
    "sharded_split",
    "partition",
    "train_val_split",
    "balanced_subset",
    "class_shares",
    "partition_summary",
]
