"""One rank's whole job, for any model: the command line's request and a factory that builds the model.

The rank takes its device, handles stop signals, joins (or uses the caller's) process group and, on
rank 0, holds the output's lock; then it builds the model, reads the input into the input index with the
model's alphabet, and runs the job (`job.run_job`), or with a dry run says what the job would do.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from extract.contract import Embedder, Loading, ModelFactory
from extract.data import input_index
from extract.data.fasta import Alphabet
from extract.engine import dry_run, run_report
from extract.engine.job import JobSettings, run_job
from extract.errors import JobError, StopRequested, UserError
from extract.output.lock import held_by_leader
from extract.runtime import collectives, stopping
from extract.runtime.device import choose_device, current_device
from extract.runtime.identity import RankIdentity, rank_logger

META = torch.device("meta")


@dataclass(frozen=True)
class JobRequest:
    """What the command line asks of the engine, model aside."""

    fasta: list[Path]
    out: Path
    device: str  # auto, cuda or cpu
    toks_per_batch: int | str  # padded tokens per batch, or "auto": the model's budget for its device
    overwrite: bool
    progress_seconds: float
    storage_dtype: str
    report: Path | None
    dedupe: bool
    dry_run_ranks: int | None  # None: run the job; 0: plan it for this launch's ranks; else for so many
    argv: list[str]  # recorded in the run report, with the versions of `reported_packages`
    reported_packages: Sequence[str]


def run_rank(request: JobRequest, build_model: ModelFactory) -> None:
    """The whole job for this rank; raises UserError or JobError when it cannot finish, StopRequested
    when a signal stopped it."""
    started = time.monotonic()
    check_paths(request.fasta, request.out)
    identity = RankIdentity.from_env()
    log = rank_logger(identity)
    device = choose_device(request.device, identity)
    if request.dry_run_ranks is not None:
        if identity.is_leader:
            print("\n".join(_dry_run_lines(request, build_model, identity, device)))
        return
    with stopping.stop_on_signals(), current_device(device), collectives.process_group(identity, device), \
            held_by_leader(identity, request.out, log):
        # The model first: it loads in moments (memory-mapped), while reading millions of records takes
        # minutes that a bad --model should not cost.
        model = build_model(Loading(device=device, weights_device=device,
                                    local_leader_first=lambda: collectives.local_leader_first(identity),
                                    leader_decides=lambda action: collectives.leader_decides(identity, action)))
        index_directory = input_index.directory_for(request.out)
        reused = collectives.leader_decides(
            identity, lambda: input_index.prepare(request.fasta, alphabet_of(model), index_directory))
        inputs = input_index.load(index_directory)
        try:
            if identity.is_leader:
                log.info("%d records from %d file(s), input index %s; %s", len(inputs), len(request.fasta),
                         "reused (inputs unchanged)" if reused else "built", model.describe())
            run_job(identity, inputs, model, job_settings(request, model), log, started)
        except UserError:  # refused to start: keep no index made for nothing, but one a resume may need
            if identity.is_leader and not reused:
                input_index.remove(index_directory)
            raise
        if identity.is_leader:
            input_index.remove(index_directory)


def exit_code(program: str, run: Callable[[], None]) -> int:
    """`run()`, and the exit code it ends with: 0 complete, else the code of the UserError, JobError or
    StopRequested it raised, whose one line goes to stderr as `program: ...`."""
    try:
        run()
    except (UserError, JobError, StopRequested) as err:
        # One write: the lines of ranks sharing a stderr (torchrun's) must not interleave.
        sys.stderr.write(f"{program}: {err.prefix}{err}\n")
        sys.stderr.flush()
        return err.exit_code
    return 0


def alphabet_of(model: Embedder) -> Alphabet:
    return Alphabet(model.alphabet, model.alphabet_name)


def job_settings(request: JobRequest, model: Embedder) -> JobSettings:
    # Every rank plans alike: an automatic budget is the smallest any rank's free memory allows.
    budget = min(collectives.gather(model.auto_token_budget())) if request.toks_per_batch == "auto" \
        else request.toks_per_batch
    context = {"arguments": request.argv, "versions": run_report.package_versions(request.reported_packages),
               **model.run_context()}
    return JobSettings(out=request.out, toks_per_batch=budget, overwrite=request.overwrite,
                       progress_seconds=request.progress_seconds, storage_dtype=request.storage_dtype,
                       report=request.report, context=context, dedupe=request.dedupe)


def check_paths(fasta: list[Path], out: Path) -> None:
    """Refuse an input named twice, and an --out that names a directory or an input (which --overwrite would
    replace), before anything is read."""
    if out.is_dir():
        raise UserError(f"{out}: is a directory; name the output file")
    named: dict[tuple[int, int], Path] = {}
    for path in fasta:
        if path.is_file():
            file = path.stat()
            first = named.setdefault((file.st_dev, file.st_ino), path)
            if first is not path:
                raise UserError(f"--fasta {path}: names the same file as {first}; give each input once")
    if out.is_file() and (out.stat().st_dev, out.stat().st_ino) in named:
        raise UserError(f"{out}: is one of the --fasta inputs; choose another --out")


def _dry_run_lines(request: JobRequest, build_model: ModelFactory, identity: RankIdentity,
                   device: torch.device) -> list[str]:
    """On rank 0 alone (other ranks, and a caller's process group, are not asked): the model built on the
    meta device, the input read (or its saved index), and what a run would do."""
    model = build_model(Loading(device=device, weights_device=META, local_leader_first=contextlib.nullcontext,
                                leader_decides=lambda action: action()))
    alphabet = alphabet_of(model)
    saved = input_index.saved_if_current(request.fasta, alphabet, input_index.directory_for(request.out))
    inputs = saved or input_index.build(request.fasta, alphabet, None)
    lines = dry_run.plan_lines(inputs, model, job_settings(request, model),
                               request.dry_run_ranks or identity.world_size)
    if device.type == "cuda" and request.toks_per_batch == "auto":
        lines.append("note: on GPUs --toks-per-batch auto is sized from free memory once the model is loaded; "
                     "this plan uses the CPU's budget, pass --toks-per-batch to plan with another")
    return lines
