"""The engine: plan, run batches, write rows, resume, finish. It does not know which model it runs.

The model is any object with `datasets()`, `tokens_per_row(lengths)`, `settings()` and
`embed(sequences) -> {dataset name: (batch, width) float32 array}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from extract import output_file
from extract.errors import JobError, UserError
from extract.fasta import ProteinInputs
from extract.output_file import RowDataset, RowWriter
from extract.planning import plan_batches
from extract.runtime import RankIdentity, barrier, gather, leader_decides


class Embedder(Protocol):
    def datasets(self) -> list[RowDataset]: ...
    def tokens_per_row(self, lengths: np.ndarray) -> np.ndarray: ...
    def settings(self) -> dict: ...
    def embed(self, sequences: list[str]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class JobSettings:
    out: Path
    toks_per_batch: int
    overwrite: bool
    progress_seconds: float = 30.0


@dataclass(frozen=True)
class RankStats:
    rows: int
    residues: int
    tokens: int


def fingerprint(inputs: ProteinInputs, embedder: Embedder) -> str:
    """What makes two outputs interchangeable: the same records, model and settings."""
    text = inputs.digest + json.dumps(embedder.settings(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prepare_output(inputs: ProteinInputs, embedder: Embedder, job: JobSettings, log: logging.Logger) -> str:
    """On rank 0: create the output, or check that an existing one may be resumed. Returns its status."""
    expected = fingerprint(inputs, embedder)
    if job.out.exists() and not job.overwrite:
        attrs = output_file.read_attrs(job.out)
        if attrs["fingerprint"] != expected:
            raise UserError(f"{job.out}: exists and was made from other inputs or settings; "
                            f"pass --overwrite to replace it, or choose another --out")
        log.info("resuming %s (status %s)", job.out, attrs["status"])
        return str(attrs["status"])
    attrs = {**embedder.settings(), "toks_per_batch": job.toks_per_batch, "tool": output_file.TOOL,
             "format_version": output_file.FORMAT_VERSION, "fingerprint": expected}
    output_file.create(job.out, inputs.ids, inputs.lengths, embedder.datasets(), attrs)
    return output_file.INCOMPLETE


def _compute_rows(identity: RankIdentity, inputs: ProteinInputs, embedder: Embedder,
                  job: JobSettings, log: logging.Logger) -> RankStats:
    writer = RowWriter(job.out, embedder.datasets())
    try:
        pending = writer.pending_rows()
        tokens = embedder.tokens_per_row(inputs.lengths[pending])
        plan = plan_batches(pending, tokens, job.toks_per_batch)
        mine = plan.for_rank(identity.rank, identity.world_size)
        if identity.is_leader:
            log.info("%d rows to compute in %d batches of <= %d tokens", pending.size, len(plan.batches),
                     job.toks_per_batch)
        rows = residues = computed = 0
        last_report = time.monotonic()
        for number, batch in enumerate(mine, 1):
            writer.write(batch, embedder.embed([inputs.sequences[row] for row in batch]))
            rows += batch.size
            residues += int(inputs.lengths[batch].sum())
            computed += int(embedder.tokens_per_row(inputs.lengths[batch]).max()) * batch.size
            if identity.is_leader and time.monotonic() - last_report >= job.progress_seconds:
                log.info("progress: batch %d/%d of this rank, %d rows", number, len(mine), rows)
                last_report = time.monotonic()
    finally:
        writer.close()
    log.info("wrote %d rows (%d residues) in %d batches", rows, residues, len(mine))
    return RankStats(rows, residues, computed)


def _finish(job: JobSettings, stats: list[RankStats], seconds: float, log: logging.Logger) -> None:
    """On rank 0, after every rank has closed its writes: mark the file complete or say what is missing."""
    rows = sum(s.rows for s in stats)
    residues = sum(s.residues for s in stats)
    summary = {"rows_computed": rows, "residues_computed": residues, "seconds": round(seconds, 3),
               "rows_per_rank": [s.rows for s in stats]}
    missing = output_file.mark_complete(job.out, {"last_run": summary})
    if missing.size:
        raise JobError(f"{job.out}: {missing.size} rows are still not done; rerun the same command to resume")
    log.info("complete: %d rows, %d residues in %.1f s (%.0f residues/s); rows per rank %s -> %s",
             rows, residues, seconds, residues / max(seconds, 1e-9), summary["rows_per_rank"], job.out)


def run_job(identity: RankIdentity, inputs: ProteinInputs, embedder: Embedder, job: JobSettings,
            log: logging.Logger, started: float) -> None:
    """Fill the output with every row's embeddings; raises UserError/JobError on every rank alike."""
    status = leader_decides(identity, lambda: prepare_output(inputs, embedder, job, log))
    if status == output_file.COMPLETE:
        if identity.is_leader:
            log.info("%s is already complete; nothing to do", job.out)
        return
    stats = _compute_rows(identity, inputs, embedder, job, log)
    all_stats = gather(stats)
    barrier()
    leader_decides(identity, lambda: _finish(job, all_stats, time.monotonic() - started, log))
