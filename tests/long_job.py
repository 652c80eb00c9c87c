"""A job long enough to interrupt (hundreds of one-row batches), and its uninterrupted result to compare with."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from extract.output.lock import lock_path
from fair_esm_reference import fair_esm_means
from job_control import start_extract, wait_for_done_rows
from jobs import job_args, random_proteins, run_extract, write_fasta
from output_checks import read_all

ROWS = 400
LAYER = "mean/layer_2"  # the tiny model's last layer


@dataclass(frozen=True)
class LongJob:
    model: Path
    fasta: Path
    reference: Path  # the output of an uninterrupted single-process run, checked against fair-esm

    @classmethod
    def prepare(cls, folder: Path, model: Path, fair_esm: tuple) -> "LongJob":
        """The job on `model`, its uninterrupted output checked against fair-esm's (model, alphabet) of it."""
        records = random_proteins(ROWS, seed=11, min_len=20, max_len=60)
        job = cls(model, write_fasta(folder / "long.fasta", records), folder / "reference.h5")
        done = run_extract(job.args(job.reference))
        assert done.returncode == 0, done.stderr
        expected = fair_esm_means(*fair_esm, [seq for _, seq in records], [2])[2]
        assert np.abs(read_all(job.reference)[0][LAYER] - expected).max() <= 1e-4
        return job

    def args(self, out: Path, *extra) -> list[str]:
        return job_args(self.model, self.fasta, out, "--toks-per-batch", "64", *extra)

    def assert_done_rows_correct(self, out: Path) -> np.ndarray:
        """Every row marked done holds the uninterrupted run's values; returns the done flags."""
        (data, _), (reference, _) = read_all(out), read_all(self.reference)
        done = data["done"].astype(bool)
        np.testing.assert_allclose(data[LAYER][done], reference[LAYER][done], rtol=0, atol=1e-5)
        return data["done"]

    def fail_mid_run_then_resume(self, out: Path, break_it: Callable[[subprocess.Popen], Callable[[], None]],
                                 last_line: str) -> None:
        """Freeze the job once 10 rows are done, `break_it(job)` (which returns how to repair it), thaw it: the
        job must stop with `last_line` and exit 1, release its lock and keep every row it marked done, correct
        and the file incomplete; once repaired, the same command must resume and complete the file."""
        job = start_extract(self.args(out))
        wait_for_done_rows(out, job, 10)
        job.send_signal(signal.SIGSTOP)
        repair = break_it(job)
        job.send_signal(signal.SIGCONT)
        _, err = job.communicate(timeout=120)

        assert job.returncode == 1
        assert err.strip().splitlines()[-1] == f"esm_features: error: {last_line}"
        assert "Traceback" not in err
        assert not lock_path(out).exists()
        assert read_all(out)[1]["status"] == "incomplete"
        done = self.assert_done_rows_correct(out)
        assert 10 <= done.sum() < done.size

        repair()
        rerun = run_extract(self.args(out))
        assert rerun.returncode == 0, rerun.stderr
        assert f"rows: {done.size - done.sum():,} to write" in rerun.stderr
        self.assert_complete_and_equal(out)

    def assert_complete_and_equal(self, out: Path) -> None:
        (data, attrs), (reference, reference_attrs) = read_all(out), read_all(self.reference)
        assert attrs["status"] == "complete"
        assert data["done"].all()
        np.testing.assert_array_equal(data["ids"], reference["ids"])
        np.testing.assert_array_equal(data["lengths"], reference["lengths"])
        np.testing.assert_allclose(data[LAYER], reference[LAYER], rtol=0, atol=1e-5)
        assert attrs["fingerprint"] == reference_attrs["fingerprint"]

