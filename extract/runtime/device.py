"""The rank's device and compute dtype, and host-to-device copies."""

from __future__ import annotations

import contextlib
import gc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from extract.errors import UserError
from extract.runtime.identity import RankIdentity

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPUINFO = Path("/proc/cpuinfo")


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


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype and why it was chosen (the log and the run report say both)."""

    dtype: torch.dtype
    reason: str


def choose_dtype(requested: str, device: torch.device) -> DtypeChoice:
    """`auto`: bf16 on GPUs of compute capability 8.0 or newer and on CPUs with bf16 matrix units (AMX),
    fp32 everywhere else."""
    if requested != "auto":
        return DtypeChoice(DTYPES[requested], f"--dtype {requested} as requested")
    if device.type == "cuda":
        return auto_gpu_dtype(torch.cuda.get_device_capability(device))
    return auto_cpu_dtype(*cpu_capabilities())


def auto_gpu_dtype(capability: tuple[int, int]) -> DtypeChoice:
    version = ".".join(map(str, capability))
    if capability >= (8, 0):
        return DtypeChoice(torch.bfloat16, f"auto: a GPU of compute capability {version} (8.0 or newer: fast bf16)")
    return DtypeChoice(torch.float32, f"auto: a GPU of compute capability {version} (bf16 needs 8.0 or newer)")


def auto_cpu_dtype(capabilities: Mapping[str, object] | None, source: str) -> DtypeChoice:
    """bf16 where the CPU reports bf16 matrix units (`has_bf16_matrix_units`). Without them bf16's speed
    depends on the CPU (slower than fp32 on one Xeon with avx512_bf16, several times faster on an AMD EPYC
    with it: docs/benchmarks.md), so fp32 stays."""
    if capabilities is None:
        return DtypeChoice(torch.float32, f"auto: fp32, as bf16 matrix units (AMX) could not be looked for: {source}")
    if has_bf16_matrix_units(capabilities):
        return DtypeChoice(torch.bfloat16, f"auto: this CPU has bf16 matrix units (AMX, from {source})")
    reason = f"auto: this CPU has no bf16 matrix units (no AMX, from {source})"
    if capabilities.get("avx512_bf16"):
        reason += "; it has avx512_bf16, with which --dtype bf16 can be faster (docs/benchmarks.md)"
    return DtypeChoice(torch.float32, reason)


def has_bf16_matrix_units(capabilities: Mapping[str, object]) -> bool:
    """AMX tiles with their bf16 instructions (`amx_tile` and `amx_bf16`, as torch's and Linux's flags
    name them)."""
    return bool(capabilities.get("amx_tile") and capabilities.get("amx_bf16"))


def cpu_capabilities() -> tuple[Mapping[str, object] | None, str]:
    """What this CPU reports, and where that was read: torch's `torch.cpu.get_capabilities()`, or where
    this torch lacks it, the flags of Linux's /proc/cpuinfo."""
    if hasattr(torch.cpu, "get_capabilities"):
        return torch.cpu.get_capabilities(), "torch.cpu.get_capabilities()"
    try:
        cpuinfo = CPUINFO.read_text()
    except OSError as err:
        return None, f"this torch has no torch.cpu.get_capabilities() and {CPUINFO} is unreadable ({err.strerror})"
    return dict.fromkeys(cpuinfo_flags(cpuinfo), True), str(CPUINFO)


def cpuinfo_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor in /proc/cpuinfo's text (x86: the `flags` line)."""
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    return set(flags.group(1).split()) if flags else set()


def agreed_dtype(choices: list[DtypeChoice]) -> DtypeChoice:
    """One dtype for the whole job, from every rank's own choice (rank order): rank 0's where all ranks
    chose the same dtype, else fp32 (ranks on different hardware: the file records one compute dtype)."""
    if all(choice.dtype == choices[0].dtype for choice in choices):
        return choices[0]
    differing = next(rank for rank, choice in enumerate(choices) if choice.dtype != choices[0].dtype)
    return DtypeChoice(torch.float32, f"fp32: ranks chose different dtypes (rank 0: {choices[0].reason}; "
                                      f"rank {differing}: {choices[differing].reason})")


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
