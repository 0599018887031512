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
from .._validate import check_choice, check_int, check_number, check_seed
from ..errors import ConfigError

__all__ = ["MAX_CLIENTS", "MIN_CLIENT_SAMPLES", "ClientSetup", "client_data", "dirichlet_alpha_split",
           "client_parts"]

#: the client splits
PARTITIONS = ("dirichlet", "sharded", "iid")
#: fewest training samples a client may get (the Dirichlet split's ``min_size``)
MIN_CLIENT_SAMPLES = 10
#: most clients of one run (each is a Flower node; more do not fit one machine's simulation)
MAX_CLIENTS = 10_000
#: limits of the local training settings (larger values are typing mistakes, not experiments)
MAX_EPOCHS = 10_000
MAX_LR = 10.0
#: largest Dirichlet concentration (beyond it the split is IID to machine precision)
MAX_ALPHA = 1e6

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
        from ..data import list_datasets
        from ..models import zoo_architectures

        check_choice(self.dataset, "dataset", list_datasets())
        check_int(self.num_clients, "num_clients (--clients)", 1, MAX_CLIENTS)
        check_choice(self.partition, "partition (--partition)", PARTITIONS)
        check_number(self.alpha, "alpha (--alpha)", 0.0, MAX_ALPHA, lo_open=True)
        check_choice(self.arch, "arch (--arch)", zoo_architectures())
        check_choice(self.size, "size (--size)", ("tiny", "small", "paper"))
        check_int(self.epochs, "epochs (--epochs)", 1, MAX_EPOCHS)
        check_number(self.lr, "lr (--lr)", 0.0, MAX_LR, lo_open=True)
        check_int(self.batch_size, "batch_size", 1)
        check_number(self.val_fraction, "val_fraction", 0.0, 1.0, hi_open=True)
        check_seed(self.seed)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ConfigError(f"data_dir must be a path string, got {self.data_dir!r}")

    def check_fits(self) -> None:
        """Refuse, before any client starts, a split the dataset cannot give: every client needs
        :data:`MIN_CLIENT_SAMPLES` training samples."""
        n = len(_dataset(self.dataset, self.data_dir).y_train)
        most = max(1, n // MIN_CLIENT_SAMPLES)
        if self.num_clients > most:
            raise ConfigError(f"{self.num_clients} clients on the {n} training samples of {self.dataset} "
                              f"leave fewer than {MIN_CLIENT_SAMPLES} samples per client; use at most "
                              f"{most} clients (--clients)")


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
