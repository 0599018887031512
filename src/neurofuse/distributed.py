"""Fusion on ``torch.distributed``: each rank streams a shard of the fusion set.

Every statistic a level-wise method reads from the data is a sum over samples
(:mod:`neurofuse.stats`), so with ``distributed=True`` each rank accumulates the statistics of its
own shard, :meth:`~neurofuse.stats.AdditiveStats.all_reduce` sums them over the ranks, and every
rank solves the level identically: all ranks end with the same fused model, equal (up to the
order of floating-point sums) to fusing in one process on the union of the shards.

Under ``torchrun --nproc-per-node K``::

    import neurofuse
    from neurofuse import distributed

    distributed.init()                      # gloo on CPU, nccl on GPU, from torchrun's env
    fused = neurofuse.fuse(models, (x, y), method="kf-linear", distributed=True)
    if distributed.is_main():
        neurofuse.checkpoint.save_model(fused, "fused.safetensors")
    distributed.shutdown()

or on the command line ``torchrun --nproc-per-node 2 -m neurofuse fuse ... --distributed``.
Every rank passes the *whole* fusion set; :func:`shard_fusion_set` keeps its contiguous part.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

from ._fusion_set import FusionSet
from .errors import ConfigError, DataError

__all__ = ["init", "is_main", "rank", "shard_fusion_set", "shutdown", "world_size"]

log = logging.getLogger("neurofuse")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes in the default group (1 outside a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes files and prints)."""
    return rank() == 0


def init(backend: Optional[str] = None, device: str = "cpu") -> None:
    """Initialise the default process group from torchrun's environment variables.

    ``backend`` defaults to ``"nccl"`` for a CUDA ``device`` and ``"gloo"`` otherwise.  Does
    nothing if a group is already initialised.

    Raises
    ------
    ConfigError
        If the environment has no ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` (not started by
        ``torchrun``) or ``torch.distributed`` is unavailable.
    """
    if _active():
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run without --distributed")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"--distributed needs the environment torchrun sets (missing {', '.join(missing)}); "
            "start with: torchrun --nproc-per-node K -m neurofuse fuse ... --distributed"
        )
    backend = backend or ("nccl" if torch.device(device).type == "cuda" else "gloo")
    dist.init_process_group(backend=backend)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    log.info("distributed: rank %d of %d (%s)", rank(), world_size(), backend)


def shutdown() -> None:
    """Destroy the default process group if one is active."""
    if _active():
        dist.destroy_process_group()


def shard_fusion_set(data: FusionSet, rank_: Optional[int] = None,
                     world: Optional[int] = None) -> FusionSet:
    """The contiguous part of ``data`` that rank ``rank_`` of ``world`` streams.

    Shard sizes differ by at most one sample; the shards of all ranks, in rank order, are the
    whole fusion set.

    Raises
    ------
    ConfigError
        If no process group is active (and no ``rank_``/``world`` given).
    DataError
        If the fusion set has fewer samples than there are ranks.
    """
    if rank_ is None or world is None:
        if not _active():
            raise ConfigError(
                "distributed=True but torch.distributed is not initialised; call "
                "neurofuse.distributed.init() (under torchrun) first"
            )
        rank_, world = rank(), world_size()
    n = len(data)
    if n < world:
        raise DataError(f"the fusion set has {n} samples for {world} ranks; every rank needs one")
    lo, hi = (n * rank_) // world, (n * (rank_ + 1)) // world
    y = None if data.y is None else data.y[lo:hi]
    return FusionSet(data.x[lo:hi], y, data.batch_size)
