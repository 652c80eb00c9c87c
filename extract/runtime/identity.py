"""Who this process is in the job, learnt once from torchrun's variables (or the caller's group), and its log lines."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from extract.errors import UserError


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
