"""The run report: what each rank computed, how long it took and what memory it used, with the settings
and software versions, as one JSON document (written to `--report` and stored in the output file)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from extract.errors import JobError


@dataclass(frozen=True)
class RankStats:
    """One rank's share of a run."""

    rank: int
    device: str
    rows: int  # rows written
    residues: int  # residues of the rows written
    rows_computed: int  # of them, rows computed; the others took the values of an identical sequence
    residues_computed: int
    tokens: int  # tokens computed (BOS/EOS included, and padding where the model pads batches)
    # Residues those tokens cover (not BOS/EOS, padding, a truncated tail or an overlap); the report's name.
    residues_embedded: int
    seconds: float  # time spent computing and writing this rank's batches
    peak_host_bytes: int
    peak_device_bytes: int | None  # None on the CPU
    oom_split_batches: int = 0  # batches that ran out of device memory and were computed in halves
    failed_rows: int = 0  # rows that did not fit even alone with the low-memory forward: left undone
    low_memory_rows: int = 0  # rows that did not fit alone and were computed with the low-memory forward
    failed_ids: list[str] = field(default_factory=list)


def peak_host_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_device_bytes(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def package_versions(names: Iterable[str]) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _rate(residues: int, seconds: float) -> float:
    return round(residues / seconds, 1) if seconds > 0 else 0.0


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _rank_entry(stats: RankStats) -> dict:
    return {**asdict(stats), "seconds": round(stats.seconds, 3),
            "residues_per_second": _rate(stats.residues, stats.seconds)}


def build(stats: list[RankStats], wall_seconds: float, rows_in_file: int, settings: Mapping,
          context: Mapping) -> dict:
    """The report of one run: per rank, the total over ranks, then `settings` and `context` as given."""
    device_peaks = [s.peak_device_bytes for s in stats if s.peak_device_bytes is not None]
    rows, computed = sum(s.rows for s in stats), sum(s.rows_computed for s in stats)
    residues, residues_computed = sum(s.residues for s in stats), sum(s.residues_computed for s in stats)
    total = {
        "ranks": len(stats),
        "rows_in_file": rows_in_file,
        "rows": rows,
        "residues": residues,
        "rows_computed": computed,
        "residues_computed": residues_computed,
        "duplicate_share": _share(rows - computed, rows),  # rows that took an identical sequence's values
        "residues_saved_share": _share(residues - residues_computed, residues),
        "tokens": sum(s.tokens for s in stats),
        "residues_embedded": sum(s.residues_embedded for s in stats),
        "residue_share_of_tokens": _share(sum(s.residues_embedded for s in stats), sum(s.tokens for s in stats)),
        "seconds": round(wall_seconds, 3),
        "residues_per_second": _rate(residues, wall_seconds),
        "peak_host_bytes": max(s.peak_host_bytes for s in stats),
        "peak_device_bytes": max(device_peaks) if device_peaks else None,
        "oom_split_batches": sum(s.oom_split_batches for s in stats),
        "failed_rows": sum(s.failed_rows for s in stats),
        "low_memory_rows": sum(s.low_memory_rows for s in stats),
        "failed_ids": [row_id for s in stats for row_id in s.failed_ids],
    }
    return {"total": total, "ranks": [_rank_entry(s) for s in stats], "settings": dict(settings), **context}


def write(path: Path, report: Mapping) -> None:
    try:
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise JobError(f"{path}: cannot write the report ({err.strerror or err}); the same report is in the "
                       f"output's last_run attribute") from None
