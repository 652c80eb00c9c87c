"""The process group: joining it, barriers that a stop request can end, gathering, leader decisions."""

from __future__ import annotations

import contextlib
import time
import uuid
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from extract.errors import JobError, StopRequested, UserError, peers_lost
from extract.runtime import group_store, stopping
from extract.runtime.identity import RankIdentity

T = TypeVar("T")
GROUP_TIMEOUT = timedelta(hours=1)  # model fetches and the last batches may keep peers waiting
BARRIER_POLL_SECONDS = (0.01, 0.5)  # first and longest pause between looks at the store


@contextlib.contextmanager
def process_group(identity: RankIdentity, device: torch.device) -> Iterator[None]:
    """Join torchrun's group when there is one to join; tear down only a group made here. A GPU `device`
    must be the current one (`current_device`)."""
    created = identity.world_size > 1 and not dist.is_initialized()
    if created:
        try:
            if device.type == "cuda":
                dist.init_process_group("nccl", timeout=GROUP_TIMEOUT, device_id=device)
            else:
                dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
        except ValueError as err:  # the rendezvous settings (MASTER_ADDR, MASTER_PORT) are missing or wrong
            raise UserError(f"environment: cannot join the process group ({err}); start with torchrun") from None
    try:
        if in_group():
            _name_this_job()
        yield
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _name_this_job() -> None:
    """Rank 0 draws a name for this job's keys in the group's store and every rank adopts it."""
    name = [uuid.uuid4().hex]
    with _peers_reachable():
        dist.broadcast_object_list(name, src=0)
    group_store.name_job(name[0])


def in_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _peers_reachable() -> Iterator[None]:
    """A collective or store call: when a peer has died it fails; say so in one line, not a traceback."""
    try:
        yield
    except RuntimeError:  # gloo/NCCL and the store raise RuntimeError subclasses (DistBackendError, ...)
        raise peers_lost() from None


def barrier() -> None:
    """Wait until every rank is here. The wait goes through the group's key-value store rather than a
    collective, so it returns to Python between looks: a stop request (this rank's signal or a peer's)
    ends it at once instead of leaving the rank stuck for a peer that has gone. Every rank passes, or every
    rank stops: a rank stops only after taking back its arrival while some peer has yet to arrive."""
    store = group_store.store()
    if store is None:
        return
    key, world_size = group_store.next_barrier_key(), dist.get_world_size()
    pause, longest = BARRIER_POLL_SECONDS
    deadline = time.monotonic() + GROUP_TIMEOUT.total_seconds()
    with _peers_reachable():
        arrived = store.add(key, 1)
        while arrived < world_size:
            signal_name = stopping.requested()
            if signal_name is not None:
                if store.add(key, -1) < world_size - 1:
                    stopping.stop(signal_name)
                store.add(key, 1)  # every rank had arrived, and some may have gone on: go with them
                return
            if time.monotonic() > deadline:
                raise JobError(f"other ranks did not arrive within {GROUP_TIMEOUT}; "
                               f"rerun the same command to resume")
            time.sleep(pause)
            pause = min(2 * pause, longest)
            arrived = store.add(key, 0)


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (on every rank), once every rank has arrived."""
    if not in_group():
        return [value]
    barrier()
    values: list[Any] = [None] * dist.get_world_size()
    with _peers_reachable():
        dist.all_gather_object(values, value)
    return values


def leader_decides(identity: RankIdentity, action: Callable[[], T]) -> T:
    """Run `action` on rank 0 only; its result, or the UserError/JobError it raised, reaches every rank."""
    outcome: list[Any] = [None]
    if identity.is_leader:
        try:
            outcome[0] = (None, action())
        except (UserError, JobError) as err:
            outcome[0] = (type(err), str(err))
        except StopRequested as err:
            outcome[0] = (StopRequested, err.signal_name)
    if in_group():
        barrier()
        with _peers_reachable():
            dist.broadcast_object_list(outcome, src=0)
    error, value = outcome[0]
    if error is not None:
        raise error(value)
    return value


@contextlib.contextmanager
def local_leader_first(identity: RankIdentity) -> Iterator[None]:
    """Local rank 0 of each node goes first (e.g. to fetch weights); the others wait for it."""
    if identity.local_rank != 0:
        barrier()
    try:
        yield
    finally:
        if identity.local_rank == 0:
            barrier()
