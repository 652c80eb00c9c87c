"""The Slurm templates on a real Slurm cluster on this machine (tests/real_slurm.py: slurmctld and two slurmd
as the nodes n1 and n2, whose names do not resolve as host names). Skipped where Slurm is not installed.

To make each stop land while the job is computing, as it would in a long job, a test holds the job's workers
(SIGSTOP) once they have written rows, stops the job, and lets them go on (SIGCONT) once the stop has arrived.
"""

import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cluster_jobs import SMALL_JOB_FLAGS, free_port, launch_env, processes_mentioning, rows_done, worker_pids
from jobs import REPO, phage_sample, write_fasta
from output_checks import assert_complete_and_like_fair_esm, read_all
from real_slurm import GRACE_SECONDS, NODES, Job

SHELL_SCRIPTS = sorted([*REPO.glob("slurm/*.sbatch"), *REPO.glob("launch/*.sh")])
TEMPLATES = REPO / "slurm"
STOP_FLAGS = "--toks-per-batch 300"  # one protein per batch: a job of many batches to stop


def test_templates_and_launchers_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run installs it)")
    assert len(SHELL_SCRIPTS) >= 6
    checked = subprocess.run(["shellcheck", "--shell=bash", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def user_env(**settings) -> dict:
    """A user's environment on the cluster: this Python, the checkout named, a rendezvous port of its own."""
    return launch_env(ESM_FEATURES_DIR=REPO, RDZV_PORT=free_port(), **settings)


def job_log(where: Path, job: Job) -> str:
    log = where / f"esm_features_{job.id}.log"
    return log.read_text() if log.exists() else ""


def hold_workers(stops: list[SimpleNamespace], timeout: float = 240) -> None:
    """Pause each job's workers as soon as they have written rows to its output."""
    deadline = time.monotonic() + timeout
    waiting = list(stops)
    while waiting:
        for stop in [s for s in waiting if rows_done(s.out)]:
            stop.held = worker_pids(stop.out)
            for pid in stop.held:
                os.kill(pid, signal.SIGSTOP)
            assert stop.held, f"{stop.where.name}: the job ended before its workers could be held"
            waiting.remove(stop)
        assert all(s.job.poll() is None for s in waiting), "a job ended before writing a row"
        assert time.monotonic() < deadline, f"no rows yet: {[s.where.name for s in waiting]}"
        time.sleep(0.05)


def release(held: list[int]) -> None:
    for pid in held:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # killed meanwhile
            pass


# ---- every way Slurm stops a preemptible job ------------------------------------------------------------

# Each stop: the job's sbatch options, the command that stops it (if any), and who requeues the job: the
# template (its workers stopped on a signal while the job still runs) or Slurm itself.
STOPS = {
    # The time limit is lowered to 5 minutes once the job computes: the template's --signal=B:USR1@300 falls due.
    "time_limit": (["--time=30", "-w", "n1"], None, "template"),
    "usr1_to_the_batch_script": (["-w", "n1"], ["scancel", "--signal=USR1", "--batch"], "template"),
    **{f"term_to_every_process_{n}": (["-w", "n1"], ["scancel", "--signal=TERM", "--full"], "template")
       for n in (1, 2, 3)},
    "scontrol_requeue": (["-w", "n1"], ["scontrol", "requeue"], "slurm"),
    # A job of the high partition that needs all of n2 preempts these.
    "preemption_without_grace_time": (["-w", "n2", "--partition=low"], None, "slurm"),
    "preemption_with_grace_time": (["-w", "n2", "--partition=low_grace"], None, "slurm"),
    "two_nodes_usr1_to_the_batch_script": (["--nodes=2", "--partition=high"], ["scancel", "--signal=USR1", "--batch"],
                                           "template"),
    "two_nodes_term_to_every_process": (["--nodes=2", "--partition=high"], ["scancel", "--signal=TERM", "--full"],
                                        "template"),
    "two_nodes_preemption_with_grace_time": (["--nodes=2", "--partition=low_grace"], None, "template"),
}
GRACEFUL = [name for name in STOPS if name != "two_nodes_term_to_every_process"]
# What the log says once a stop has arrived: the template's line, or torchrun's as it signals its workers.
STOP_ARRIVED = ("stopping the workers", "closing signal SIGTERM")


def release_once_stopped(stops: list[SimpleNamespace], on_the_way=lambda: None, timeout: float = 120) -> None:
    """Let each job's held workers go on as soon as its stop has arrived (torchrun kills workers that have not
    stopped 30 s after it told them to); `on_the_way` is called while waiting."""
    deadline = time.monotonic() + timeout
    waiting = list(stops)
    while waiting:
        for stop in [s for s in waiting if any(text in job_log(s.where, s.job) for text in STOP_ARRIVED)]:
            release(stop.held)
            waiting.remove(stop)
        on_the_way()
        assert time.monotonic() < deadline, f"no stop arrived: {[s.where.name for s in waiting]}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stopped_jobs(slurm_cluster, tmp_path_factory, tiny_model_path, many_capsids_fasta) -> dict:
    """Every stop of STOPS applied to its own run of slurm/preemptible.sbatch, all at once; each job run until it
    has ended for good."""
    root = tmp_path_factory.mktemp("stops")
    jobs = {}
    for name, (options, _, _) in STOPS.items():
        where = root / name
        where.mkdir()
        out = where / "capsids.h5"
        env = user_env(FASTA=many_capsids_fasta, MODEL=tiny_model_path, OUT=out, NPROC=1, EXTRA_ARGS=STOP_FLAGS)
        jobs[name] = SimpleNamespace(job=slurm_cluster.sbatch(TEMPLATES / "preemptible.sbatch", env, where, *options),
                                     where=where, out=out)
    hold_workers(list(jobs.values()))
    time_limited = jobs["time_limit"].job
    slurm_cluster.run("scontrol", "update", f"JobId={time_limited.id}", "TimeLimit=5")
    for name, stop in jobs.items():
        if STOPS[name][1]:
            slurm_cluster.run(*STOPS[name][1], stop.job.id)
    preemptor = root / "preemptor.sh"
    preemptor.write_text("#!/bin/sh\ntrue\n")
    preempting = slurm_cluster.sbatch(preemptor, user_env(), root, "--partition=high", "-w", "n2", "--exclusive")

    def give_the_rerun_time_enough() -> None:  # else it is warned again: its time limit is still 5 minutes
        fields = time_limited.fields()
        if fields["JobState"] == "PENDING" and fields["Restarts"] == "1" and fields["TimeLimit"] != "00:30:00":
            slurm_cluster.run("scontrol", "update", f"JobId={time_limited.id}", "TimeLimit=30")

    release_once_stopped(list(jobs.values()), give_the_rerun_time_enough, timeout=GRACE_SECONDS + 120)
    while time_limited.fields()["TimeLimit"] != "00:30:00":
        give_the_rerun_time_enough()
        time.sleep(0.1)
    for stop in jobs.values():
        stop.fields = stop.job.wait()
        stop.log = job_log(stop.where, stop.job)
        stop.first, _, stop.second = stop.log.partition(f"esm_features: job {stop.job.id}, run 2")
    assert preempting.wait()["JobState"] == "COMPLETED"
    return jobs


@pytest.mark.parametrize("name", STOPS)
def test_a_stopped_preemptible_job_is_requeued_and_resumes_to_a_complete_file(stopped_jobs, name, fair_esm_tiny,
                                                                            many_capsids_fasta):
    stop = stopped_jobs[name]
    assert stop.fields["JobState"] == "COMPLETED" and stop.fields["Restarts"] == "1", stop.log
    resumed = re.search(r"\[rank 0/\d\] rows: (\d+) to write", stop.second)
    assert "(status incomplete)" in stop.second and 0 < int(resumed.group(1)) < 120, stop.log
    assert processes_mentioning(str(stop.out)) == []
    assert_complete_and_like_fair_esm(stop.out, [many_capsids_fasta], fair_esm_tiny)


@pytest.mark.parametrize("name", GRACEFUL)
def test_the_stop_reaches_every_worker_as_a_signal_and_each_stops_at_a_safe_point(stopped_jobs, name):
    stop = stopped_jobs[name]
    nodes = 2 if name.startswith("two_nodes") else 1
    # srun passes a signal to every process of its tasks: on two nodes the workers get SIGUSR1 themselves.
    stopped = re.findall(r"\[default0\]:esm_features: stopped by SIG(TERM|USR1); every finished row is saved", stop.first)
    assert len(stopped) == nodes, stop.first
    assert len(re.findall(r"torchrun: stopped the workers on SIG(TERM|USR1)", stop.first)) == nodes, stop.first
    assert "Killed" not in stop.first


def test_sigterm_to_srun_makes_it_kill_its_tasks(stopped_jobs):
    """What srun does with SIGTERM: no graceful stop on several nodes, but the rows done are kept and the job
    requeued."""
    stop = stopped_jobs["two_nodes_term_to_every_process"]
    assert "srun: forcing job termination" in stop.first, stop.first
    assert "requeueing the job to resume" in stop.first


@pytest.mark.parametrize("name", STOPS)
def test_the_template_requeues_only_jobs_that_slurm_does_not(stopped_jobs, name):
    requeued_by_template = "requeueing the job to resume" in stopped_jobs[name].first
    assert requeued_by_template == (STOPS[name][2] == "template"), stopped_jobs[name].first


def test_preemption_with_a_grace_time_signals_only_the_job_step(stopped_jobs):
    """On one node there is no job step: the job works on until the grace time is over, then gets SIGTERM as
    on any preemption. On two nodes the step's torchrun agents and workers get SIGTERM at once, the batch
    script nothing: it requeues the job once its workers have stopped."""
    assert "SIGTERM, stopping the workers" in stopped_jobs["preemption_with_grace_time"].first
    two_nodes = stopped_jobs["two_nodes_preemption_with_grace_time"].first
    assert "stopping the workers" not in two_nodes and "the workers stopped (exit code 143)" in two_nodes, two_nodes


# ---- one node, several nodes, an array ------------------------------------------------------------------


def test_node_names_do_not_resolve_as_host_names(slurm_cluster):
    """What the rendezvous tests below rely on: Slurm's node names are not this machine's host names."""
    for name in NODES:
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo(name, None)


def test_one_node_template_runs_one_rank_per_gpu_or_one_on_a_cpu(slurm_cluster, tmp_path, tiny_model_path,
                                                                  fair_esm_tiny, capsid_fasta):
    out = tmp_path / "one.h5"
    env = user_env(FASTA=capsid_fasta, MODEL=tiny_model_path, OUT=out, LOG_DIR=tmp_path / "logs")
    del env["ESM_FEATURES_DIR"]  # found as the submit directory, as when users submit from the checkout
    job = slurm_cluster.sbatch(TEMPLATES / "one_node.sbatch", env, REPO, f"--output={tmp_path}/one_%j.log")
    fields = job.wait()
    log = (tmp_path / f"one_{job.id}.log").read_text()
    assert fields["JobState"] == "COMPLETED", log
    ranks = max(1, torch.cuda.device_count())
    assert f"[rank 0/{ranks}] complete: 16 rows" in log
    assert_complete_and_like_fair_esm(out, [capsid_fasta], fair_esm_tiny)


@pytest.fixture(scope="module")
def two_node_job(slurm_cluster, tmp_path_factory, tiny_model_path, capsid_fasta):
    where = tmp_path_factory.mktemp("two_nodes")
    out, report = where / "two.h5", where / "two.json"
    env = user_env(FASTA=capsid_fasta.parent / "caps*.fasta", MODEL=tiny_model_path, OUT=out, NPROC=1,
                   EXTRA_ARGS=" ".join(SMALL_JOB_FLAGS))  # a shell pattern, as the template's example
    del env["RDZV_PORT"]  # the template's own port
    job = slurm_cluster.sbatch(TEMPLATES / "multi_node.sbatch", env, where, script_args=("--report", report))
    fields = job.wait()
    log = job_log(where, job)
    assert fields["JobState"] == "COMPLETED", log
    return SimpleNamespace(out=out, report_path=report, report=json.loads(report.read_text()), log=log,
                           logs=where / "esm_features_logs" / job.id, nodes=fields["NodeList"])


def test_two_nodes_write_the_same_file_as_one_process(two_node_job, single_process_run):
    data, attrs = read_all(two_node_job.out)
    expected, expected_attrs = read_all(single_process_run.out)
    assert data.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(data[name], expected[name], err_msg=name)
    assert attrs["status"] == "complete" and attrs["fingerprint"] == expected_attrs["fingerprint"]
    # Two torchrun agents, one per node, each showing its local rank 0, met in a c10d rendezvous on n1's
    # address as Slurm knows it (n1 itself does not resolve).
    assert two_node_job.nodes == "n[1-2]"
    assert two_node_job.report["settings"]["world_size"] == 2
    assert "[rank 0/2]" in two_node_job.log and "[rank 1/2]" in two_node_job.log
    assert len(list(two_node_job.logs.glob("*_*"))) == 2  # torchrun's log directory per agent


def test_two_node_report_lists_every_rank_and_the_total(two_node_job, capsid_fasta):
    report = two_node_job.report
    ranks, total = report["ranks"], report["total"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["device"] == "cpu" for r in ranks)
    assert all(r["rows"] > 0 and r["peak_host_bytes"] > 0 and r["peak_device_bytes"] is None for r in ranks)
    assert total["rows"] == sum(r["rows"] for r in ranks) == total["rows_in_file"] == 16
    with open(capsid_fasta) as handle:
        residues = sum(len(line.strip()) for line in handle if not line.startswith(">"))
    assert total["residues"] == sum(r["residues"] for r in ranks) == residues
    assert total["tokens"] >= residues + 2 * 16
    assert total["oom_split_batches"] == 0 and total["failed_rows"] == 0
    assert report["status"] == "complete" and report["out"] == str(two_node_job.out)
    assert report["arguments"][-2:] == ["--report", str(two_node_job.report_path)]


def test_progress_lines_count_the_rows_of_every_rank(two_node_job):
    lines = [line for line in two_node_job.log.splitlines() if "progress:" in line]
    assert lines and all("[rank 0/2]" in line for line in lines)
    assert re.search(r"progress: 16/16 rows, ([\d.]+k?)/\1 residues \(100%\)", lines[-1]), lines[-1]
    own = re.search(r"\[rank 0/2\] wrote (\d+) rows", two_node_job.log)
    assert int(own.group(1)) < 16  # rank 0 counted rank 1's rows too


def test_job_array_gives_each_fasta_its_output_and_logs_and_its_rerun_leaves_finished_tasks_alone(
        slurm_cluster, tmp_path, tiny_model_path, fair_esm_tiny, capsid_fasta, phage_dir):
    tails = tmp_path / "tails.fasta.gz"
    tails.write_bytes(gzip.compress(write_fasta(tmp_path / "tails.fasta", phage_sample(phage_dir, 40, long=0))
                                    .read_bytes()))
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{capsid_fasta}\n\n{tails}\n")
    out_dir = tmp_path / "out"
    env = user_env(FASTA_LIST=listing, MODEL=tiny_model_path, OUT_DIR=out_dir, NPROC=1, EXTRA_ARGS=STOP_FLAGS)
    first = slurm_cluster.sbatch(TEMPLATES / "fasta_array.sbatch", env, tmp_path, "--array=0-2%2")
    tails_task = SimpleNamespace(job=Job(slurm_cluster, f"{first.id}_1"), where=tmp_path, out=out_dir / "tails.h5")
    hold_workers([tails_task])
    slurm_cluster.run("scancel", "--signal=TERM", "--full", tails_task.job.id)  # stopped part-way, not requeued
    release_once_stopped([tails_task])
    for task in range(3):
        Job(slurm_cluster, f"{first.id}_{task}").wait()
    logs = {task: (tmp_path / f"esm_features_{first.id}_{task}.log").read_text() for task in range(3)}
    assert "complete: 16 rows" in logs[0] and "complete:" not in logs[1], logs
    assert logs[2].strip() == f"task 2: {listing} names 2 file(s); nothing to do"
    # Each task's per-rank logs sit under the name of the task's log.
    assert "[rank 0/1]" in (next((tmp_path / "esm_features_logs" / f"{first.id}_0").glob("*/attempt_0/0/stderr.log"))
                            .read_text())
    finished = (out_dir / "capsid.h5").stat()

    again = slurm_cluster.sbatch(TEMPLATES / "fasta_array.sbatch", env, tmp_path, "--array=0-1")
    for task in range(2):
        assert Job(slurm_cluster, f"{again.id}_{task}").wait()["JobState"] == "COMPLETED"
    rerun = {task: (tmp_path / f"esm_features_{again.id}_{task}.log").read_text() for task in range(2)}
    assert "already complete; nothing to do" in rerun[0], rerun[0]
    assert (out_dir / "capsid.h5").stat().st_mtime_ns == finished.st_mtime_ns
    assert "resuming" in rerun[1] and "complete: " in rerun[1], rerun[1]
    assert_complete_and_like_fair_esm(out_dir / "capsid.h5", [capsid_fasta], fair_esm_tiny)
    assert_complete_and_like_fair_esm(out_dir / "tails.h5", [tails], fair_esm_tiny)
