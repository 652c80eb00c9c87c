"""launch/local.sh: torchrun with sane defaults, a log file per rank, and SIGUSR1 reaching the workers."""

import signal
import subprocess
from types import SimpleNamespace

import pytest

from cluster_jobs import LOCAL_LAUNCHER, launch_env, processes_mentioning, wait_for_rows
from extract.check_output import find_problems
from jobs import job_args


@pytest.fixture(scope="module")
def stopped_launch(tmp_path_factory, tiny_model_path, many_capsids_fasta):
    """Two ranks started by the launcher, sent SIGUSR1 once they have written rows."""
    where = tmp_path_factory.mktemp("launch")
    out = where / "capsids.h5"
    args = job_args(tiny_model_path, many_capsids_fasta, out, "--toks-per-batch", "600")
    job = subprocess.Popen([str(LOCAL_LAUNCHER), *args],
                           env=launch_env(NPROC=2, LOG_DIR=where / "logs"), cwd=where, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    wait_for_rows(out, job)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=120)
    return SimpleNamespace(code=job.returncode, console=stdout + stderr, logs=where / "logs", out=out,
                           leftovers=processes_mentioning(str(out)))


def test_launcher_logs_each_rank_to_its_own_files_and_rank_0_to_the_console(stopped_launch):
    attempts = list(stopped_launch.logs.glob("*/attempt_*"))
    assert [a.name for a in attempts] == ["attempt_0"]  # the stop was not taken for a failure to restart
    for rank in (0, 1):
        assert f"[rank {rank}/2]" in (attempts[0] / str(rank) / "stderr.log").read_text()
    assert "[rank 0/2]" in stopped_launch.console and "[rank 1/2]" not in stopped_launch.console


def test_sigusr1_to_the_launcher_stops_the_workers(stopped_launch):
    assert stopped_launch.code == 128 + signal.SIGUSR1
    console = stopped_launch.console
    assert "torchrun: stopped the workers on SIGUSR1; rerun the same command to resume" in console
    assert console.count("closing signal SIGTERM") == 2  # torchrun's note for each worker it signals
    assert stopped_launch.leftovers == []
    assert "status is 'incomplete': the job has not finished; rerun it to resume" in find_problems(stopped_launch.out)


def test_bad_input_under_the_launcher_ends_with_its_line_and_exit_2(tmp_path, tiny_model_path):
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(">a\nMKV\n>b\nMK1V\n")
    env = launch_env(NPROC=1, MAX_RESTARTS=1, LOG_DIR=tmp_path / "logs")
    done = subprocess.run([str(LOCAL_LAUNCHER), *job_args(tiny_model_path, fasta, tmp_path / "out.h5")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    console = done.stdout + done.stderr
    assert done.returncode == 2, console
    assert f"esm_features: error: {fasta}: record 2 (b): character(s) '1' not in the ESM-2 protein alphabet" in console
    assert console.strip().splitlines()[-1] == "torchrun: the workers failed (rank 0 first, exit code 2); their own " \
                                               "lines say why"
    assert "Traceback" not in console
