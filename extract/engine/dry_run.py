"""The dry run: read, validate and plan exactly as the job would, then say what it would do.

No model weights are loaded (the model is built on the meta device, for its shape) and nothing is
written, so admins can size a job on a login node: rows, distinct sequences, residues, batches,
padded tokens per rank and the output file's size.
"""

from __future__ import annotations

import numpy as np

from extract.contract import Embedder
from extract.data.input_index import InputIndex
from extract.engine.job import (JobSettings, RowCounts, check_writable, file_layout, file_settings, plan_job,
                                resumable_status)
from extract.output import hdf5_file


def plan_lines(inputs: InputIndex, embedder: Embedder, job: JobSettings, world_size: int) -> list[str]:
    """What a run with these inputs, model and settings would do on `world_size` ranks; the UserError it
    would stop with, if any."""
    check_writable(job)
    status = resumable_status(inputs, embedder, job)
    if status == hdf5_file.COMPLETE:
        done = np.ones(len(inputs), dtype=np.uint8)
        output = f"{job.out} is complete; a run would do nothing"
    else:
        planned = file_layout(inputs, embedder, job).planned_bytes()
        room = (f"{hdf5_file.format_bytes(planned)} planned, "
                f"{hdf5_file.format_bytes(hdf5_file.check_room(job.out, planned))} free on its file system")
        if status is None:
            done = np.zeros(len(inputs), dtype=np.uint8)
            output = f"{job.out} would be created: {room}"
        else:
            flags = hdf5_file.DoneFlags(job.out)
            done = flags.read()
            flags.close()
            output = (f"{job.out} would be resumed, {int(np.count_nonzero(done)):,} of {len(inputs):,} rows are "
                      f"done: {room}")
    settings = {**file_settings(embedder, job), "toks_per_batch": job.toks_per_batch, "dedupe": job.dedupe}
    return [
        "dry run: nothing computed, nothing written",
        f"inputs: {len(inputs):,} rows, {int(np.sum(inputs.lengths)):,} residues, "
        f"{inputs.distinct:,} distinct sequences",
        "settings: " + ", ".join(f"{name} {value}" for name, value in settings.items()),
        f"output: {output}",
        *plan_job(inputs, RowCounts.of(inputs, embedder), job, done).summary_lines(inputs.lengths, world_size),
    ]
