"""Jobs interrupted for real (SIGKILL of a rank, signals to torchrun or to a plain run) and then resumed."""

import json
import os
import signal
import subprocess

import numpy as np
import pytest

from cluster_jobs import LOCAL_LAUNCHER, launch_env
from extract.errors import peers_lost
from extract.output.lock import lock_path
from extract.engine.planning import plan_batches
from job_control import is_running, start_extract, wait_for_done, wait_for_done_rows, worker_pids
from jobs import FP32, REPO, run_extract
from long_job import ROWS
from output_checks import read_all

OUR_FRAMES = f'File "{REPO / "extract"}'  # a traceback line inside our package


def stopped_line(signal_name: str) -> str:
    return (f"esm_features: stopped by {signal_name}; every finished row is saved; "
            f"rerun the same command to resume")


def our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("esm_features: ")]


def _resume(long_job, out, done, nproc):
    """Rerun the same command; it computes exactly the rows not done and ends equal to an uninterrupted run."""
    pending = ROWS - int(done.sum())
    rerun = run_extract(long_job.args(out), nproc=nproc)
    assert rerun.returncode == 0, rerun.stderr
    assert f"rows: {pending:,} to write" in rerun.stderr
    assert json.loads(read_all(out)[1]["last_run"])["total"]["rows"] == pending
    long_job.assert_complete_and_equal(out)
    assert not lock_path(out).exists()


def _two_ranks_interrupted(long_job, out, interrupt):
    """A 2-rank job, interrupted by `interrupt(job, workers)`: it must end non-zero, with no process left
    and no traceback of ours, its done rows right. Returns its stderr and /done flags."""
    job = start_extract(long_job.args(out), nproc=2)
    workers = worker_pids(job.pid, 2)
    interrupt(job, workers)
    _, stderr = job.communicate(timeout=120)

    assert job.returncode != 0, stderr
    assert not any(is_running(pid) for pid in workers.values())
    assert OUR_FRAMES not in stderr, stderr
    assert read_all(out)[1]["status"] == "incomplete"
    return stderr, long_job.assert_done_rows_correct(out)


@pytest.mark.parametrize("victim, rows_done_before, resume_nproc", [
    (1, 0, 2),  # as soon as the output exists: rank 1 is still setting up or in its first batch
    (1, 10, None),  # mid-run, in a forward pass or a write
    (0, 10, None),  # rank 0, which created the file and holds the output's lock
], ids=["rank1-at-start", "rank1-mid-run", "rank0-mid-run"])
def test_sigkill_of_a_rank_then_rerun_completes_the_file(tmp_path, long_job, victim, rows_done_before,
                                                         resume_nproc):
    out = tmp_path / "out.h5"

    def kill(job, workers):
        wait_for_done_rows(out, job, rows_done_before)
        os.kill(workers[victim], signal.SIGKILL)

    stderr, done = _two_ranks_interrupted(long_job, out, kill)
    # The surviving rank noticed the loss in a collective, or torchrun's SIGTERM stopped it at a safe point.
    assert our_lines(stderr) in ([stopped_line("SIGTERM")], [f"esm_features: error: {peers_lost()}"]), stderr
    _resume(long_job, out, done, resume_nproc)


def test_a_rank_waiting_for_a_peer_that_dies_does_not_hang(tmp_path, long_job):
    out = tmp_path / "out.h5"

    def kill_the_peer_it_waits_for(job, workers):
        wait_for_done_rows(out, job, 10)
        os.kill(workers[0], signal.SIGSTOP)  # rank 0 falls behind, until rank 1 has done its share and waits
        lengths = read_all(out)[0]["lengths"]
        rank1_rows = np.concatenate(plan_batches(np.arange(ROWS), lengths + 2, 64).for_rank(1, 2))
        wait_for_done(out, job, lambda done: done[rank1_rows].all())
        os.kill(workers[0], signal.SIGKILL)

    stderr, done = _two_ranks_interrupted(long_job, out, kill_the_peer_it_waits_for)
    assert our_lines(stderr) == [stopped_line("SIGTERM")], stderr  # torchrun's SIGTERM ended rank 1's wait
    _resume(long_job, out, done, None)


def test_sigterm_to_torchrun_stops_every_rank_then_rerun_resumes(tmp_path, long_job):
    out = tmp_path / "out.h5"

    def terminate_torchrun(job, _workers):
        wait_for_done_rows(out, job, 10)
        job.send_signal(signal.SIGTERM)

    stderr, done = _two_ranks_interrupted(long_job, out, terminate_torchrun)
    assert our_lines(stderr) == [stopped_line("SIGTERM")] * 2, stderr  # one line from each rank
    assert not lock_path(out).exists(), stderr
    assert 10 <= done.sum() < ROWS
    _resume(long_job, out, done, None)


@pytest.mark.parametrize("extra", [[], ["--overwrite"]], ids=["plain", "overwrite"])  # a restart reruns the argv
def test_the_launcher_restarts_killed_ranks_and_the_restart_resumes(tmp_path, long_job, extra):
    out = tmp_path / "out.h5"
    job = subprocess.Popen([str(LOCAL_LAUNCHER), *long_job.args(out, *extra, *FP32)], cwd=tmp_path, text=True,
                           env=launch_env(NPROC=2, MAX_RESTARTS=1, LOG_DIR=tmp_path / "logs"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    workers = worker_pids(job.pid, 2)
    wait_for_done_rows(out, job, 10)
    os.kill(workers[1], signal.SIGKILL)
    console, _ = job.communicate(timeout=180)

    assert job.returncode == 0, console
    assert sorted(path.name for path in tmp_path.glob("logs/*/attempt_*")) == ["attempt_0", "attempt_1"]
    assert f"[rank 0/2] resuming {out} (status incomplete)" in console
    assert not any(is_running(pid) for pid in workers.values())
    long_job.assert_complete_and_equal(out)


@pytest.mark.parametrize("stop_signal, resume_nproc", [(signal.SIGUSR1, 2), (signal.SIGINT, None)],
                         ids=["SIGUSR1-then-2-ranks", "SIGINT-then-1-rank"])
def test_signal_to_a_plain_run_stops_it_then_rerun_resumes(tmp_path, long_job, stop_signal, resume_nproc):
    out = tmp_path / "out.h5"
    job = start_extract(long_job.args(out))
    wait_for_done_rows(out, job, 10)
    job.send_signal(stop_signal)
    _, stderr = job.communicate(timeout=120)

    assert job.returncode == 128 + stop_signal
    assert stderr.strip().splitlines()[-1] == stopped_line(stop_signal.name)
    assert "Traceback" not in stderr
    assert not lock_path(out).exists()
    assert read_all(out)[1]["status"] == "incomplete"
    done = long_job.assert_done_rows_correct(out)
    _resume(long_job, out, done, resume_nproc)  # SIGUSR1's rerun uses two ranks instead of one
