"""The engine: plan, run batches, write rows, resume, finish. It does not know which model it runs.

The model is any object with the attributes of `Embedder` below; `embed` returns, per dataset, the
batch's rows in batch order (for per-token datasets, every record's rows concatenated).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np
import torch

from extract import output_file, progress, run_report
from extract.errors import JobError, UserError
from extract.fasta import ProteinInputs
from extract.output_file import RowDataset, RowWriter
from extract.planning import plan_batches
from extract.run_report import RankStats
from extract.runtime import RankIdentity, barrier, gather, leader_decides


class Embedder(Protocol):
    device: torch.device

    def datasets(self) -> list[RowDataset]: ...
    def tokens_per_row(self, lengths: np.ndarray) -> np.ndarray: ...  # tokens of each of a row's model inputs
    def inputs_per_row(self, lengths: np.ndarray) -> np.ndarray: ...  # model inputs per row (e.g. windows)
    def residues_embedded(self, lengths: np.ndarray) -> np.ndarray: ...  # residues its outputs cover
    def settings(self) -> dict: ...
    def embed(self, sequences: list[str]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class JobSettings:
    out: Path
    toks_per_batch: int
    overwrite: bool
    progress_seconds: float = 30.0
    storage_dtype: str = "float32"
    report: Path | None = None
    context: Mapping[str, object] = field(default_factory=dict)  # recorded in the run report as given


def file_settings(embedder: Embedder, job: JobSettings) -> dict:
    """The settings that decide the file's contents."""
    return {**embedder.settings(), "storage_dtype": job.storage_dtype}


def fingerprint(inputs: ProteinInputs, embedder: Embedder, job: JobSettings) -> str:
    """What makes two outputs interchangeable: the same records, model and settings."""
    text = inputs.digest + json.dumps(file_settings(embedder, job), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prepare_output(inputs: ProteinInputs, embedder: Embedder, job: JobSettings, log: logging.Logger) -> str:
    """On rank 0: create the output, or check that an existing one may be resumed. Returns its status."""
    if job.report is not None and not os.access(job.report.parent, os.W_OK):
        raise UserError(f"--report {job.report}: cannot write a file in {job.report.parent}")
    expected = fingerprint(inputs, embedder, job)
    resuming = job.out.exists() and not job.overwrite
    if resuming:
        try:
            attrs = output_file.read_attrs(job.out)
        except UserError as err:
            raise UserError(f"{err}; pass --overwrite to replace it") from None
        if attrs["fingerprint"] != expected:
            raise UserError(f"{job.out}: exists and was made from other inputs or settings; "
                            f"pass --overwrite to replace it, or choose another --out")
    layout = output_file.FileLayout(inputs.ids, inputs.lengths, embedder.residues_embedded(inputs.lengths),
                                    embedder.datasets(), job.storage_dtype)
    planned = layout.planned_bytes()
    free = output_file.check_room(job.out, planned)
    log.info("output %s: %s planned, %s free on its file system", job.out, output_file.format_bytes(planned),
             output_file.format_bytes(free))
    if resuming:
        log.info("resuming %s (status %s)", job.out, attrs["status"])
        return str(attrs["status"])
    attrs = {**file_settings(embedder, job), "toks_per_batch": job.toks_per_batch, "tool": output_file.TOOL,
             "format_version": output_file.FORMAT_VERSION, "fingerprint": expected}
    output_file.create(job.out, layout, attrs)
    return output_file.INCOMPLETE


def _compute_rows(identity: RankIdentity, inputs: ProteinInputs, embedder: Embedder,
                  job: JobSettings, log: logging.Logger) -> RankStats:
    started = time.monotonic()
    writer = RowWriter(job.out, embedder.datasets())
    try:
        pending = writer.pending_rows()
        lengths = inputs.lengths[pending]
        plan = plan_batches(pending, embedder.tokens_per_row(lengths), job.toks_per_batch,
                            embedder.inputs_per_row(lengths))
        mine = plan.for_rank(identity.rank, identity.world_size)
        if identity.is_leader:
            log.info("%d rows to compute in %d batches of <= %d tokens", pending.size, len(plan.batches),
                     job.toks_per_batch)
        log.info("%d of the batches are this rank's", len(mine))
        rows = residues = 0
        for batch in mine:
            writer.write(batch, embedder.embed([inputs.sequences[row] for row in batch]))
            rows += batch.size
            residues += int(inputs.lengths[batch].sum())
    finally:
        writer.close()
    log.info("wrote %d rows (%d residues) in %d batches", rows, residues, len(mine))
    tokens = int(plan.batch_tokens[identity.rank::identity.world_size].sum())
    return RankStats(identity.rank, str(embedder.device), rows, residues, tokens, time.monotonic() - started,
                     run_report.peak_host_bytes(), run_report.peak_device_bytes(embedder.device))


def _finish(job: JobSettings, report: dict, log: logging.Logger) -> None:
    """On rank 0, after every rank has closed its writes: mark the file complete or say what is missing;
    store the run report in the file and, with --report, in its own file."""
    missing = output_file.mark_complete(job.out, {"last_run": report})
    if job.report is not None:
        status = output_file.INCOMPLETE if missing.size else output_file.COMPLETE
        run_report.write(job.report, {"status": status, "out": str(job.out), **report})
    if missing.size:
        raise JobError(f"{job.out}: {missing.size} rows are still not done; rerun the same command to resume")
    total = report["total"]
    log.info("complete: %d rows, %d residues in %.1f s (%.0f residues/s); rows per rank %s -> %s",
             total["rows"], total["residues"], total["seconds"], total["residues_per_second"],
             [rank["rows"] for rank in report["ranks"]], job.out)


def run_job(identity: RankIdentity, inputs: ProteinInputs, embedder: Embedder, job: JobSettings,
            log: logging.Logger, started: float) -> None:
    """Fill the output with every row's embeddings; raises UserError/JobError on every rank alike."""
    status = leader_decides(identity, lambda: prepare_output(inputs, embedder, job, log))
    if status == output_file.COMPLETE:
        if identity.is_leader:
            log.info("%s is already complete; nothing to do", job.out)
        return
    watch_every = job.progress_seconds if identity.is_leader else None
    with progress.watch(job.out, inputs.lengths, watch_every, log):
        stats = _compute_rows(identity, inputs, embedder, job, log)
        all_stats = gather(stats)
        barrier()
    settings = {**file_settings(embedder, job), "toks_per_batch": job.toks_per_batch,
                "world_size": identity.world_size}
    report = run_report.build(all_stats, time.monotonic() - started, len(inputs), settings, job.context)
    leader_decides(identity, lambda: _finish(job, report, log))
