r"""Data-parallel training over ``torch.distributed``: the replicas of one run and their collectives.

Launched by ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``), every process holds the whole model and the whole benchmark and trains on its
slice of each *global* batch: ``--batch-size`` keeps its one-process meaning, so N processes see
exactly the batches of the one-process run with the same seed. What DistributedDataParallel does
for gradients (one all-reduce, averaged over the global batch), the lean step does itself, because
a DHP head needs more than gradients to agree:

- the Hebbian update is the global batch's: the per-class sums and counts of the trunk's output are
  all-reduced before Algorithm 1's update, so every rank applies the identical update (as
  ``torch.nn.SyncBatchNorm`` does for its batch statistics). DDP's buffer broadcast would instead
  overwrite every rank's trace with rank 0's, a trace that has only ever seen rank 0's slices;
- the gradient through the class means uses the global counts and the all-reduced ``dL/dW_eff``;
- Fisher / MAS importances are sums over sample shards, all-reduced and divided by the total count;
  SI's path integral needs nothing: every rank holds the same gradients and weights;
- evaluation counts correct predictions on shards and all-reduces the counts.

One process (no launcher) is the same code with :data:`SINGLE`, whose collectives do nothing.
"""

import os
from datetime import timedelta
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Replicas", "SINGLE", "DistributedError", "DEFAULT_TIMEOUT_S", "from_environment",
           "launched", "shutdown"]

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300  # a collective that waits longer than this fails instead of hanging


class DistributedError(Exception):
    r"""The process group cannot start, or a rank stopped answering; one line."""


class Replicas:
    r"""This process's place among the replicas of a run (``rank`` of ``world_size``)."""

    def __init__(self, rank: int = 0, world_size: int = 1, backend: Optional[str] = None) -> None:
        self.rank, self.world_size, self.backend = rank, world_size, backend

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        r"""Rank 0 writes the run's files; every rank computes the same results."""
        return self.rank == 0

    def all_reduce(self, tensor: Tensor) -> Tensor:
        r"""Sum ``tensor`` over the ranks, in place (every rank gets the total); returns it."""
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def all_reduce_flat(self, tensors: list) -> None:
        r"""Sum each tensor of ``tensors`` over the ranks in place, with one collective."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        torch._foreach_copy_(tensors, [part.view_as(t) for part, t in
                                       zip(flat.split([t.numel() for t in tensors]), tensors)])

    def shard(self, rows: Tensor) -> Tensor:
        r"""This rank's contiguous share of ``rows`` (sizes differ by at most one; may be empty)."""
        if self.world_size == 1:
            return rows
        return rows.tensor_split(self.world_size)[self.rank]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}


SINGLE = Replicas()  # one process: every collective is a no-op


def launched() -> bool:
    r"""True when a launcher such as ``torchrun`` started this process as one of a group."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def from_environment(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Replicas, str]:
    r"""Join the process group the launcher describes; returns ``(replicas, device)``.

    gloo on CPU, NCCL on CUDA (each process on ``cuda:LOCAL_RANK``). Without a launcher:
    ``(SINGLE, device)``. ``timeout_s`` bounds every collective, so a rank that stops answering
    makes the others fail with an error instead of waiting forever.
    """
    if not launched():
        return SINGLE, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank} wants cuda:{local_rank} but this host has "
                                   f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    try:
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size,
                                             timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"rank {rank} of {world_size} could not join the {backend} process "
                               f"group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
                               f" ({str(err).splitlines()[0][:200]})") from None
    return Replicas(rank, world_size, backend), device


def shutdown(replicas: Replicas) -> None:
    if replicas.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
