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

A rank that fails alone (its data missing, a disk full) must not leave the others guessing or
waiting: on its way out (:func:`shutdown`, called from a ``finally``) it leaves a one-line notice
``rank R: <its error>`` in the process group's store and closes its connections; a peer whose
collective then fails reads the notice and raises :class:`PeerFailed` with it, instead of gloo's
"Connection closed by peer". The store lives in torchrun's agent, or in rank 0 when ranks are
launched by hand: a failing rank 0 then waits (at most :data:`NOTICE_WAIT_S`) until every peer has
read its notice before it exits. NCCL does not notice a peer's exit inside a collective; there
the collective timeout (``--dist-timeout``) still bounds the wait.
"""

import os
import sys
import time
from datetime import timedelta
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Replicas", "SINGLE", "DistributedError", "PeerFailed", "DEFAULT_TIMEOUT_S",
           "from_environment", "launched", "shutdown"]

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300  # a collective that waits longer than this fails instead of hanging
NOTICE_KEY, SEEN_KEY = "dhp/failure", "dhp/failure-seen"  # in the process group's store
NOTICE_WAIT_S = 60  # how long a failed store-hosting rank waits for its peers to read why
# (a peer reads the notice at its next collective, after its own data loading, say)


class DistributedError(Exception):
    r"""The process group cannot start, or a rank stopped answering; one line."""


class PeerFailed(DistributedError, RuntimeError):
    r"""Another rank failed and said why (``rank R: <its error>``). A RuntimeError too, as the
    failed collective's own error was, so callers that catch those keep working."""


class Replicas:
    r"""This process's place among the replicas of a run (``rank`` of ``world_size``)."""

    def __init__(self, rank: int = 0, world_size: int = 1, backend: Optional[str] = None,
                 store=None) -> None:
        self.rank, self.world_size, self.backend = rank, world_size, backend
        # The process group's key-value store (kept referenced: in rank 0 it is the server,
        # which must outlive the process group to pass on a failure notice).
        self.store = store
        self.notice_seen = False  # another rank's failure notice read (and acknowledged)
        self.peer_lost = False  # a collective failed with no notice: a peer died without one

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
            self._collective(torch.distributed.all_reduce, tensor)
        return tensor

    def all_reduce_flat(self, tensors: list) -> None:
        r"""Sum each tensor of ``tensors`` over the ranks in place, with one collective."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._collective(torch.distributed.all_reduce, flat)
        torch._foreach_copy_(tensors, [part.view_as(t) for part, t in
                                       zip(flat.split([t.numel() for t in tensors]), tensors)])

    def _collective(self, call, *args) -> None:
        r"""``call(*args)``; when it fails because a peer failed and left a notice, PeerFailed
        saying which rank and why, instead of the transport's error."""
        try:
            call(*args)
        except RuntimeError:
            notice = self._read_notice()
            if notice is None:
                self.peer_lost = True  # this rank did not fail: nothing of its own to announce
                raise
            raise PeerFailed(notice) from None

    def _read_notice(self, wait_s: float = 2.0) -> Optional[str]:
        r"""Another rank's failure notice, acknowledged; None if there is none (a rank killed by
        a signal leaves none) or the store is gone with its host."""
        if self.store is None:
            return None
        try:
            self.store.wait([NOTICE_KEY], timedelta(seconds=wait_s))
            notice = self.store.get(NOTICE_KEY).decode(errors="replace")
            if not self.notice_seen:
                self.store.add(SEEN_KEY, 1)
                self.notice_seen = True
            return notice
        except (RuntimeError, ValueError):  # no notice in time, or the store's host is gone
            return None

    def announce_failure(self, error: BaseException) -> bool:
        r"""Leave ``rank R: <error's first line>`` in the store for the peers, unless another
        rank's notice is already there (then acknowledge that one). Returns whether this rank's
        notice is the one the peers will read."""
        if self.store is None or self.notice_seen or self.peer_lost:
            return False
        lines = str(error).strip().splitlines() or [type(error).__name__]
        mine = f"rank {self.rank}: {lines[0][:300]}"
        try:
            held = self.store.compare_set(NOTICE_KEY, "", mine).decode(errors="replace")
        except (RuntimeError, ValueError):
            return False
        if held != mine:  # a peer failed first: its notice stands
            self._read_notice(wait_s=0)
            return False
        return True

    def wait_for_notice_readers(self, limit_s: float = NOTICE_WAIT_S) -> None:
        r"""Until every peer has read this rank's notice (at most ``limit_s``): the store dies
        with this process when it hosts it."""
        deadline = time.monotonic() + limit_s
        try:
            while (self.store.add(SEEN_KEY, 0) < self.world_size - 1
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        except (RuntimeError, ValueError):
            pass

    def shard(self, rows: Tensor) -> Tensor:
        r"""This rank's contiguous share of ``rows`` (sizes differ by at most one; may be empty)."""
        if self.world_size == 1:
            return rows
        return rows.tensor_split(self.world_size)[self.rank]

    def barrier(self) -> None:
        if self.distributed:
            self._collective(torch.distributed.barrier)

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
    return Replicas(rank, world_size, backend, _default_store()), device


def _default_store():
    r"""The store the launcher's rendezvous gave the default process group (None if this torch
    does not expose it: failures are then reported as the transport's errors)."""
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _hosts_store(replicas: Replicas) -> bool:
    # Rank 0 serves the store unless torchrun's agent does (TORCHELASTIC_USE_AGENT_STORE).
    return replicas.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def shutdown(replicas: Replicas, failure: Optional[BaseException] = None) -> None:
    r"""Leave the process group. ``failure``: why this rank stops early; by default the
    exception in flight, as callers leave from a ``finally`` block. A failing rank announces it
    (see the module's docstring) before closing its connections, which wakes peers blocked in a
    collective at once."""
    if failure is None:
        failure = sys.exc_info()[1]
    announced = (replicas.distributed and failure is not None
                 and not isinstance(failure, PeerFailed) and replicas.announce_failure(failure))
    if replicas.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if announced and _hosts_store(replicas):
        replicas.wait_for_notice_readers()
