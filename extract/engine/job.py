"""The job: set up or resume the output, plan, run batches, write rows, finish. It does not know which model it
runs: the model is any `Embedder` (extract/contract.py).

Batches are read and made into model inputs (`prepare`) on a thread ahead of the model, and written on
another behind it, so the device does not wait for the host. Stop requests (signals) are acted on between
batches, after the rows written so far are durable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from extract.output import hdf5_file
from extract.engine import progress
from extract.engine import run_report
from extract.runtime import stopping
from extract.engine.background import RunAhead, RunBehind
from extract.contract import Embedder
from extract.engine.batch_runner import BatchRunner, InputRows
from extract.errors import JobError, UserError
from extract.data.input_index import InputIndex
from extract.output.hdf5_file import FileLayout, RowDataset, RowWriter
from extract.engine.planning import PendingRows, concatenated_ranges, plan_pending_rows
from extract.engine.run_report import RankStats
from extract.runtime.identity import RankIdentity
from extract.runtime.collectives import barrier, gather, leader_decides

FAILED_IDS_SHOWN = 10
BATCHES_AHEAD = 2  # batches read and made into model inputs on a thread while the current one computes
WRITES_QUEUED = 1  # computed batches waiting for their write while another is written, on a thread


@dataclass(frozen=True)
class JobSettings:
    out: Path
    toks_per_batch: int
    overwrite: bool
    progress_seconds: float = 30.0
    storage_dtype: str = "float32"
    report: Path | None = None
    context: Mapping[str, object] = field(default_factory=dict)  # recorded in the run report as given
    dedupe: bool = True  # compute each distinct sequence once and copy its values to every row holding it


def file_settings(embedder: Embedder, job: JobSettings) -> dict:
    """The settings that decide the file's contents."""
    return {**embedder.settings(), "storage_dtype": job.storage_dtype}


def fingerprint(inputs: InputIndex, embedder: Embedder, job: JobSettings) -> str:
    """What makes two outputs interchangeable: the same records, model and settings."""
    text = inputs.digest + json.dumps(file_settings(embedder, job), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def resumable_status(inputs: InputIndex, embedder: Embedder, job: JobSettings) -> str | None:
    """The status of the existing output this job would resume; None where it would create a new one.

    `--overwrite` replaces only an output this job cannot resume (made differently, not ours, not
    readable): the same command rerun, as torchrun's automatic restarts do, keeps the rows already done."""
    if not job.out.exists():
        return None
    if not os.access(job.out, os.R_OK | os.W_OK):
        problem = (f"{job.out}: exists but this job may not read and write it; change its permissions or choose "
                   f"another --out")
    else:
        try:
            attrs = hdf5_file.read_attrs(job.out)
        except UserError as err:
            problem = f"{err}; pass --overwrite to replace it"
        else:
            if attrs["fingerprint"] == fingerprint(inputs, embedder, job):
                return str(attrs["status"])
            problem = (f"{job.out}: exists and was made from other inputs or settings; pass --overwrite to replace "
                       f"it, or choose another --out")
    if job.overwrite:
        return None
    raise UserError(problem)


def file_layout(inputs: InputIndex, embedder: Embedder, job: JobSettings) -> FileLayout:
    return FileLayout(ids=inputs.ids, lengths=inputs.lengths, covered=embedder.residues_covered(inputs.lengths),
                      datasets=embedder.datasets(), storage_dtype=job.storage_dtype, id_bytes=inputs.id_bytes)


def check_writable(job: JobSettings) -> None:
    """Refuse at once an output or report that could not be written at the end of the job."""
    if not os.access(job.out.parent, os.W_OK):
        reason = os.strerror(errno.EACCES if job.out.parent.is_dir() else errno.ENOENT)
        raise UserError(f"{job.out}: cannot write in {job.out.parent} ({reason})")
    report = job.report
    if report is None:
        return
    if report.is_dir():
        raise UserError(f"--report {report}: is a directory; name a file in it")
    if not os.access(report.parent, os.W_OK):
        raise UserError(f"--report {report}: cannot write a file in {report.parent}")
    if report.exists() and not os.access(report, os.W_OK):
        raise UserError(f"--report {report}: exists and may not be written")


def prepare_output(inputs: InputIndex, embedder: Embedder, job: JobSettings, log: logging.Logger) -> str:
    """On rank 0: create the output, or check that an existing one may be resumed. Returns its status."""
    check_writable(job)
    status = resumable_status(inputs, embedder, job)
    layout = file_layout(inputs, embedder, job)
    planned = layout.planned_bytes()
    free = hdf5_file.check_room(job.out, planned)
    log.info("output %s: %s planned, %s free on its file system", job.out, hdf5_file.format_bytes(planned),
             hdf5_file.format_bytes(free))
    if status is not None:
        log.info("resuming %s (status %s)", job.out, status)
        return status
    attrs = {**file_settings(embedder, job), "toks_per_batch": job.toks_per_batch, "tool": hdf5_file.TOOL,
             "format_version": hdf5_file.FORMAT_VERSION, "fingerprint": fingerprint(inputs, embedder, job)}
    hdf5_file.create(job.out, layout, attrs)
    return hdf5_file.INCOMPLETE


@dataclass(frozen=True)
class RowCounts:
    """What the model makes of each row, in 32 bits (each count is far below 2**31): the tokens of each of
    its model inputs, its model inputs, and the residues its outputs cover."""

    tokens: np.ndarray
    inputs: np.ndarray
    covered: np.ndarray

    @classmethod
    def of(cls, inputs: InputIndex, embedder: Embedder) -> "RowCounts":
        lengths = np.asarray(inputs.lengths)
        return cls(*(counts.astype(np.int32) for counts in (embedder.tokens_per_input(lengths),
                                                             embedder.inputs_per_row(lengths),
                                                             embedder.residues_covered(lengths))))


def plan_job(inputs: InputIndex, counts: RowCounts, job: JobSettings, done: np.ndarray) -> PendingRows:
    """The plan every rank computes alike (and a dry run shows) for the rows whose `done` flag is 0."""
    # Row numbers in 32 bits while they fit: every rank holds several arrays of them as long as the input.
    row = np.int32 if len(inputs) < 2**31 else np.int64
    pending = np.flatnonzero(done == 0).astype(row)
    sources = np.asarray(inputs.representatives, dtype=row) if job.dedupe else None
    return plan_pending_rows(pending, sources, counts.tokens, job.toks_per_batch, counts.inputs)


def _values_for(positions: np.ndarray, values: Mapping[str, np.ndarray], token_counts: np.ndarray,
                datasets: list[RowDataset]) -> dict[str, np.ndarray]:
    """A computed batch's values for the rows that take them: row k takes those of the batch's row at
    `positions[k]` (in a per-token dataset, all of that row's `token_counts[positions[k]]` rows)."""
    per_token = {ds.name for ds in datasets if ds.per_token}
    token_rows = concatenated_ranges((np.cumsum(token_counts) - token_counts)[positions],
                                     token_counts[positions]) if per_token else None
    return {name: array[token_rows if name in per_token else positions] for name, array in values.items()}


def _compute_rows(identity: RankIdentity, inputs: InputIndex, embedder: Embedder,
                  job: JobSettings, log: logging.Logger) -> RankStats:
    """This rank's share of the rows not yet done; stops (StopRequested) between batches when asked to."""
    started = time.monotonic()
    run_report.reset_peak_device_bytes(embedder.device)  # the batches' peak, not the loading's
    with RowWriter(job.out, embedder.datasets()) as writer, inputs.sequences() as store:
        barrier()  # every rank plans from the same /done flags: none writes before all have read them
        counts = RowCounts.of(inputs, embedder)
        pending = plan_job(inputs, counts, job, writer.done)
        my_batches = pending.plan.for_rank(identity.rank, identity.world_size)
        if identity.is_leader:
            for line in pending.summary_lines(inputs.lengths, identity.world_size):
                log.info("%s", line)
        log.info("%d of the batches are this rank's", len(my_batches))
        copies = _Copies(pending, writer, inputs.lengths, counts.covered, embedder.datasets())
        rows = InputRows(fetch=store.fetch, ids=inputs.ids, lengths=np.asarray(inputs.lengths),
                         covered=counts.covered, tokens=counts.tokens, model_inputs=counts.inputs)
        # Exits in reverse order: the thread preparing batches stops, every queued write is finished (or its
        # failure raised), and only then does the writer make the done flags durable and close.
        with RunBehind(copies.write, WRITES_QUEUED, "esm-features writes") as writes:
            runner = BatchRunner(embedder, rows, writes.submit, job.toks_per_batch, log)
            with RunAhead(map(runner.prepare, my_batches), BATCHES_AHEAD, "esm-features inputs") as batches:
                for prepared in batches:
                    stopping.raise_if_requested()
                    runner.run(prepared)
    ran = runner.stats
    log.info("wrote %d rows (%d residues), %d of them computed, in %d batches", copies.rows, copies.residues,
             ran.rows, len(my_batches))
    return RankStats(rank=identity.rank, device=str(embedder.device), rows=copies.rows, residues=copies.residues,
                     rows_computed=ran.rows, residues_computed=ran.residues, tokens=ran.tokens,
                     residues_embedded=ran.residues_covered, seconds=time.monotonic() - started,
                     peak_host_bytes=run_report.peak_host_bytes(),
                     peak_device_bytes=run_report.peak_device_bytes(embedder.device),
                     oom_split_batches=ran.split_batches, failed_rows=len(ran.failed_rows),
                     low_memory_rows=ran.low_memory_rows,
                     failed_ids=[inputs.ids[row] for row in sorted(ran.failed_rows)])


class _Copies:
    """Writes computed rows' values to every pending row that takes them (identical sequences)."""

    def __init__(self, pending: PendingRows, writer: RowWriter, lengths: np.ndarray, covered: np.ndarray,
                 datasets: list[RowDataset]):
        self.pending, self.writer, self.datasets = pending, writer, datasets
        self.lengths, self.covered = lengths, covered
        self.rows = self.residues = 0

    def write(self, computed: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        targets, positions = self.pending.copies(computed)
        self.writer.write(targets, _values_for(positions, values, self.covered[computed], self.datasets))
        self.rows += targets.size
        self.residues += int(self.lengths[targets].sum())


def _failed_rows_error(job: JobSettings, failed_ids: list[str]) -> JobError:
    shown = ", ".join(failed_ids[:FAILED_IDS_SHOWN])
    more = f" and {len(failed_ids) - FAILED_IDS_SHOWN} more (see the log)" if len(failed_ids) > FAILED_IDS_SHOWN else ""
    return JobError(f"{job.out}: {len(failed_ids)} row(s) did not fit in device memory even alone with the "
                    f"low-memory forward: {shown}{more}; every other row is saved and the file stays incomplete; "
                    f"rerun the same command with more free device memory to compute them")


def _finish(job: JobSettings, report: dict, log: logging.Logger) -> None:
    """On rank 0, after every rank has closed its writes: mark the file complete or say what is missing;
    store the run report in the file and, with --report, in its own file."""
    # A rerun that only marks the file keeps the report of the run that computed its rows.
    missing = hdf5_file.mark_complete(job.out, {"last_run": report} if report["total"]["rows"] else {})
    if job.report is not None:
        status = hdf5_file.INCOMPLETE if missing.size else hdf5_file.COMPLETE
        run_report.write(job.report, {"status": status, "out": str(job.out), **report})
    failed_ids = report["total"]["failed_ids"]
    for row_id in failed_ids:
        log.error("not computed: %s, out of memory even alone with the low-memory forward", row_id)
    if failed_ids:
        raise _failed_rows_error(job, failed_ids)
    if missing.size:
        raise JobError(f"{job.out}: {missing.size} rows are still not done; rerun the same command to resume")
    total = report["total"]
    log.info("complete: %d rows, %d of them computed (%.1f%% were copies of identical sequences, saving %.1f%% of "
             "the residues); %d residues in %.1f s (%.0f residues/s); %.1f%% of the computed tokens were residues; "
             "rows per rank %s -> %s", total["rows"], total["rows_computed"], 100 * total["duplicate_share"],
             100 * total["residues_saved_share"], total["residues"], total["seconds"], total["residues_per_second"],
             100 * total["residue_share_of_tokens"], [rank["rows"] for rank in report["ranks"]], job.out)


def run_job(identity: RankIdentity, inputs: InputIndex, embedder: Embedder, job: JobSettings,
            log: logging.Logger, started: float) -> None:
    """Fill the output with every row's embeddings; raises UserError/JobError on every rank alike, or
    StopRequested on every rank when a signal asked the job to stop."""
    with stopping.deferred():
        status = leader_decides(identity, lambda: prepare_output(inputs, embedder, job, log))
        if status == hdf5_file.COMPLETE:
            if identity.is_leader:
                log.info("%s is already complete; nothing to do", job.out)
            return
        watch_every = job.progress_seconds if identity.is_leader else None
        with progress.watch(job.out, inputs.lengths, watch_every, log):
            all_stats = gather(_compute_rows(identity, inputs, embedder, job, log))
        settings = {**file_settings(embedder, job), "toks_per_batch": job.toks_per_batch,
                    "world_size": identity.world_size, "dedupe": job.dedupe}
        report = run_report.build(all_stats, time.monotonic() - started, len(inputs), settings, job.context)
        leader_decides(identity, lambda: _finish(job, report, log))
