"""The rank's device and compute dtype, and host-to-device copies."""

from __future__ import annotations

import contextlib
import gc

import torch

from extract.errors import UserError
from extract.runtime.identity import RankIdentity

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs of compute capability 8.0 or newer, fp32 everywhere else."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, so that the copy does not wait."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def free_device_memory() -> None:
    """Give back what a failed forward left allocated (once its exception, holding the tensors, is gone)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
