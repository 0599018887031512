"""Client data for federated runs: the FL-standard Dirichlet(alpha) split and per-client caches.

The federated literature's non-IID split (Hsu et al. 2019; FedMA, FedDF, DENSE) draws, for each
class, the clients' shares from a symmetric ``Dirichlet(alpha)``: ``alpha = 0.1`` leaves most
clients with one or two classes, ``alpha = 0.5`` is milder.  neurofuse's own ``"dirichlet"``
partition (the paper's appendix D, min/max concentration ``ratio``) is another family, so the
federated runs use this one for ``--alpha``; ``"sharded"`` and ``"iid"`` are neurofuse's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..data import Dataset, dirichlet_alpha_split, load_dataset, partition, train_val_split
from ..errors import ConfigError

__all__ = ["ClientSetup", "client_data", "dirichlet_alpha_split", "client_parts"]

log = logging.getLogger("neurofuse")


@dataclasses.dataclass(frozen=True)
class ClientSetup:
    """How the simulated clients get their data and train.

    Attributes
    ----------
    dataset : str
        ``"digits"``, ``"mnist"``, ... (:func:`neurofuse.data.load_dataset`).
    num_clients : int
        Number of clients (partitions).
    partition : str
        ``"dirichlet"`` (FL's Dirichlet(alpha), :func:`dirichlet_alpha_split`), ``"sharded"``
        or ``"iid"``.
    alpha : float
        Dirichlet concentration.
    arch, size : str
        Zoo architecture and named size of the clients' models (round 1).
    epochs : int
        Local epochs per round.
    lr, batch_size : float, int
        Adam learning rate and mini-batch size.
    val_fraction : float
        Share of each client's data held out for its checkpoint choice.
    seed : int
        Seed of the split and of the clients' training.
    data_dir : str, optional
        Where the dataset files are.
    share_label_counts : bool
        Whether clients report their label counts (for class-share weights).
    """

    dataset: str = "digits"
    num_clients: int = 5
    partition: str = "dirichlet"
    alpha: float = 0.5
    arch: str = "mlp"
    size: str = "small"
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    val_fraction: float = 0.1
    seed: int = 0
    data_dir: Optional[str] = None
    share_label_counts: bool = True

    def __post_init__(self) -> None:
        if self.partition not in ("dirichlet", "sharded", "iid"):
            raise ConfigError(f"partition must be 'dirichlet', 'sharded' or 'iid', got {self.partition!r}")
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {self.num_clients}")


@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: Optional[str]) -> Dataset:
    return load_dataset(name, data_dir)


def client_parts(setup: ClientSetup) -> List[np.ndarray]:
    """Training-set indices of every client."""
    y = _dataset(setup.dataset, setup.data_dir).y_train.numpy()
    if setup.partition == "dirichlet":
        return dirichlet_alpha_split(y, setup.num_clients, setup.alpha, setup.seed)
    return partition(y, setup.num_clients, setup.partition, seed=setup.seed)


@functools.lru_cache(maxsize=64)
def _parts_cached(setup: ClientSetup) -> Tuple[np.ndarray, ...]:
    return tuple(client_parts(setup))


def client_data(setup: ClientSetup, partition_id: int
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s ``(x_train, y_train, x_val, y_val)`` (cached per process)."""
    parts = _parts_cached(setup)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(f"partition id {partition_id} out of range for {len(parts)} clients")
    ds = _dataset(setup.dataset, setup.data_dir)
    tr, val = train_val_split(parts[partition_id], setup.val_fraction, seed=setup.seed * 1000 + partition_id)
    return ds.x_train[tr], ds.y_train[tr], ds.x_train[val], ds.y_train[val]
