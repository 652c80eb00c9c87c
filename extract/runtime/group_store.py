"""The process group's key-value store (torchrun's rendezvous store): what ranks tell each other outside
collectives, which a rank can check without blocking: who has reached a barrier, whether a rank stopped.

Each job gets keys of its own (`collectives.process_group` names it): the store may outlive a job, as when
torchrun restarts the ranks (--max-restarts) or a caller runs several jobs in one process group.
"""

from __future__ import annotations

import itertools

import torch.distributed as dist

_job_name = "none"  # this job's part of the store; the same on every rank
_barriers = itertools.count()  # barriers of this job so far: ranks stopped by a signal may differ in the last


def store() -> dist.Store | None:
    """The store of the default process group, or None for a process on its own."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.distributed_c10d._get_default_store()
    return None


def name_job(name: str) -> None:
    """Keys from now on belong to the job `name`, which every rank of the job must give."""
    global _job_name, _barriers
    _job_name, _barriers = name, itertools.count()


def next_barrier_key() -> str:
    return key(f"barrier/{next(_barriers)}")


def key(name: str) -> str:
    return f"esm_features/{_job_name}/{name}"
