"""The Slurm templates, run for real on this machine through stand-in sbatch/srun/scontrol commands
(tests/fake_slurm) that start every "node" here with the variables Slurm sets."""

import gzip
import json
import re
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cluster_jobs import (SMALL_JOB_FLAGS, processes_mentioning, sbatch, sbatch_command, slurm_env,
                          wait_for_rows)
from jobs import REPO, phage_sample, write_fasta
from output_checks import assert_complete_and_like_fair_esm, read_all

SHELL_SCRIPTS = sorted([*REPO.glob("slurm/*.sbatch"), *REPO.glob("launch/*.sh")])


def test_templates_and_launchers_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run installs it)")
    assert len(SHELL_SCRIPTS) >= 6
    checked = subprocess.run(["shellcheck", "--shell=bash", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_one_node_template_runs_one_rank_per_gpu_or_one_on_a_cpu(tmp_path, tiny_model_path, capsid_fasta):
    out = tmp_path / "one.h5"
    env = slurm_env(tmp_path / "slurm", FASTA=capsid_fasta, MODEL=tiny_model_path, OUT=out,
                    LOG_DIR=tmp_path / "logs")
    del env["ESM_FEATURES_DIR"]  # found as the submit directory, as when users submit from the checkout
    done = sbatch("one_node.sbatch", env, REPO, f"--output={tmp_path}/one_%j.log")
    log = (tmp_path / "one_1000.log").read_text()
    assert done.returncode == 0, log
    assert done.stdout == "Submitted batch job 1000\n"
    ranks = max(1, torch.cuda.device_count())
    assert f"[rank 0/{ranks}] complete: 16 rows" in log
    assert_complete_and_like_fair_esm(out, [capsid_fasta], tiny_model_path)


@pytest.fixture(scope="module")
def two_node_job(tmp_path_factory, tiny_model_path, capsid_fasta):
    where = tmp_path_factory.mktemp("two_nodes")
    out, report = where / "two.h5", where / "two.json"
    env = slurm_env(where / "slurm", FASTA=capsid_fasta.parent / "caps*.fasta", MODEL=tiny_model_path, OUT=out,
                    NPROC=1, EXTRA_ARGS=" ".join(SMALL_JOB_FLAGS))  # a shell pattern, as the template's example
    done = sbatch("multi_node.sbatch", env, where, script_args=("--report", report))
    log = (where / "esm_features_1000.log").read_text()
    assert done.returncode == 0, log
    return SimpleNamespace(out=out, report_path=report, report=json.loads(report.read_text()), log=log,
                           logs=where / "esm_features_logs")


def test_two_nodes_write_the_same_file_as_one_process(two_node_job, single_process_run):
    data, attrs = read_all(two_node_job.out)
    expected, expected_attrs = read_all(single_process_run.out)
    assert data.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(data[name], expected[name], err_msg=name)
    assert attrs["status"] == "complete" and attrs["fingerprint"] == expected_attrs["fingerprint"]
    # Two torchrun agents, one per "node", each showing its local rank 0, met in a c10d rendezvous.
    assert two_node_job.report["settings"]["world_size"] == 2
    assert "[rank 0/2]" in two_node_job.log and "[rank 1/2]" in two_node_job.log
    assert len(list(two_node_job.logs.glob("1000/1000_*"))) == 2  # torchrun's log directory per agent


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



def test_job_array_gives_each_fasta_its_output_and_log(tmp_path, tiny_model_path, capsid_fasta, phage_dir):
    tails = tmp_path / "tails.fasta.gz"
    tails.write_bytes(gzip.compress(write_fasta(tmp_path / "tails.fasta", phage_sample(phage_dir, 6, long=0))
                                    .read_bytes()))
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{capsid_fasta}\n\n{tails}\n")
    env = slurm_env(tmp_path / "slurm", FASTA_LIST=listing, MODEL=tiny_model_path, OUT_DIR=tmp_path / "out", NPROC=1)
    done = sbatch("fasta_array.sbatch", env, tmp_path, "--array=0-2%2")
    logs = {task: (tmp_path / f"esm_features_1000_{task}.log").read_text() for task in range(3)}
    assert done.returncode == 0, logs
    assert "complete: 16 rows" in logs[0] and "complete: 6 rows" in logs[1]
    assert logs[2].strip() == f"task 2: {listing} names 2 file(s); nothing to do"
    assert_complete_and_like_fair_esm(tmp_path / "out" / "capsid.h5", [capsid_fasta], tiny_model_path)
    assert_complete_and_like_fair_esm(tmp_path / "out" / "tails.h5", [tails], tiny_model_path)


def test_preemptible_job_stops_its_workers_requeues_and_resumes(tmp_path, tiny_model_path, many_capsids_fasta):
    fasta = many_capsids_fasta
    out = tmp_path / "capsid.h5"
    env = slurm_env(tmp_path / "slurm", FASTA=fasta, MODEL=tiny_model_path, OUT=out, NPROC=1,
                    EXTRA_ARGS="--toks-per-batch 600")
    job = subprocess.Popen(sbatch_command("preemptible.sbatch"), env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_rows(out, job)
    (tmp_path / "slurm" / "time_limit").touch()  # Slurm's --signal=B:USR1@300 to the batch shell
    output, _ = job.communicate(timeout=300)
    log = (tmp_path / "esm_features_1000.log").read_text()
    assert job.returncode == 0, output + log
    first, second = log.split("esm_features: job 1000, run 2")
    assert "time limit near, stopping the workers" in first
    assert "torchrun: stopped the workers on SIGUSR1; rerun the same command to resume" in first
    assert "stopped ahead of its time limit; requeueing it to resume" in first
    resumed = re.search(r"\[rank 0/1\] rows: (\d+) to write", second)
    assert "(status incomplete)" in second and 0 < int(resumed.group(1)) < 120
    assert processes_mentioning(str(out)) == []
    assert_complete_and_like_fair_esm(out, [fasta], tiny_model_path)
