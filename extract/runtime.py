"""The rank runtime: who this process is, its device, its process group and its log lines."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist

from extract import group_store, stopping
from extract.errors import JobError, StopRequested, UserError, peers_lost

T = TypeVar("T")
GROUP_TIMEOUT = timedelta(hours=1)  # model fetches and the last batches may keep peers waiting
BARRIER_POLL_SECONDS = (0.01, 0.5)  # first and longest pause between looks at the store


@dataclass(frozen=True)
class RankIdentity:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        return f"rank {self.rank}/{self.world_size}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "RankIdentity":
        """Read torchrun's variables once; none set means one process on its own."""
        names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
        if dist.is_available() and dist.is_initialized():
            # A caller's own group (started by srun or mpirun, say) may not set LOCAL_RANK; then the GPU
            # the caller made current is this rank's.
            current_gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0
            return cls(dist.get_rank(), _env_int(environ, "LOCAL_RANK", current_gpu), dist.get_world_size())
        present = [n for n in names if n in environ]
        if not present:
            return cls(0, 0, 1)
        if len(present) != len(names):
            missing = ", ".join(n for n in names if n not in environ)
            raise UserError(f"environment: {missing} not set while {', '.join(present)} is; start with torchrun")
        identity = cls(*(_env_int(environ, n, None) for n in names))
        if not (0 <= identity.rank < identity.world_size and identity.local_rank >= 0):
            raise UserError(f"environment: RANK={identity.rank}, LOCAL_RANK={identity.local_rank}, "
                            f"WORLD_SIZE={identity.world_size} are inconsistent")
        return identity


def _env_int(environ: Mapping[str, str], name: str, default: int | None) -> int:
    value = environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"environment: {name}={value!r} is not a whole number") from None


def choose_device(requested: str, identity: RankIdentity) -> torch.device:
    """`auto`: this rank's GPU (cuda:LOCAL_RANK) when CUDA is there, else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to this process")
    if identity.local_rank >= torch.cuda.device_count():
        raise UserError(f"--device cuda: LOCAL_RANK {identity.local_rank} but only "
                        f"{torch.cuda.device_count()} GPU(s) visible; use fewer processes per node")
    return torch.device("cuda", identity.local_rank)


def current_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes a GPU the current device (pinned memory and NCCL use it) and gives the caller's back after."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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


def rank_logger(identity: RankIdentity) -> logging.Logger:
    """A logger whose every line carries this rank's place in the job."""
    logger = logging.getLogger("esm_features")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [{identity.tag}] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
